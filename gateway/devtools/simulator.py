"""A simulated agent platform for `wsgateway dev`: demo ACLs and realistic traffic through the Publisher.

Nothing here is used in production; it exists so that a newcomer sees live events within seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import uuid
from dataclasses import dataclass

import orjson
from nats.js.kv import KeyValue

from gateway.sdk.publisher import Publisher

log = logging.getLogger(__name__)

TENANT = "demo"


@dataclass(frozen=True)
class DemoUser:
    name: str
    groups: tuple[str, ...]
    sees: str


DEMO_USERS = (
    DemoUser("alice", (), "org admin: every scope of tenant demo; her inbox: approving new hires"),
    DemoUser("bob", ("apollo-team",), "viewer of project apollo: conversation:welcome, process:onboarding, "
             "agent:researcher; his inbox: identity checks (asked of group apollo-team)"),
    DemoUser("carol", ("support",), "member of conversation:support (through group support) only"),
)

DEMO_ACLS: dict[str, dict[str, object]] = {
    f"{TENANT}.org": {"admins": ["user:alice"]},
    f"{TENANT}.project.apollo": {"admins": [], "viewers": ["group:apollo-team"]},
    f"{TENANT}.project.helpdesk": {"admins": ["user:alice"], "viewers": []},
    f"{TENANT}.conversation.welcome": {"project": "apollo", "members": []},
    f"{TENANT}.conversation.support": {"project": "helpdesk", "members": ["group:support"]},
    f"{TENANT}.process.onboarding": {"project": "apollo", "owner": "user:alice"},
    f"{TENANT}.agent.researcher": {"project": "apollo", "members": []},
}


async def seed_acls(kv: KeyValue) -> None:
    for key, doc in DEMO_ACLS.items():
        await kv.put(key, orjson.dumps(doc))


def _chunks(text: str, size: int = 12) -> list[str]:
    words = text.split(" ")
    out, cur = [], ""
    for w in words:
        cur = f"{cur} {w}" if cur else w
        if len(cur) >= size:
            out.append(cur + " ")
            cur = ""
    if cur:
        out.append(cur)
    return out


ANSWERS = [
    "The nearest JetStream replica is in the same zone, so failover costs one leader election and no data.",
    "Three suppliers match: two ship within a week, one is cheaper but needs a customs declaration.",
    "Your deployment is healthy; the error spike at 14:02 came from a retried batch job, not from users.",
]
QUESTIONS = ["Which region should we fail over to?", "Who can deliver 40 units by Friday?", "Why did errors spike?"]
REASONING = [
    "The user wants a failover target. I should check replica placement and latency before answering.",
    "I need suppliers with stock and delivery dates; the catalogue search should have both.",
    "An error spike: compare the error logs with deployments and batch jobs around that time.",
]
TOOLS = [("search_topology", "eu-west"), ("search_catalogue", "40 units"), ("query_logs", "14:00-14:05")]
HITS = [
    [{"title": "eu-west-1b: replica, 2 ms"}, {"title": "eu-central-1a: replica, 9 ms"}],
    [{"title": "Acme Parts: 120 in stock, 4 days"}, {"title": "Bolt & Co: 60 in stock, 6 days"}],
    [{"title": "batch export retried 3x at 14:02"}, {"title": "no deploys between 13:00 and 15:00"}],
]


# The onboarding's requests for input, by stage: (request id prefix, prompt, assignee, who answers, answer).
# Assignees are demo principals: bob through his group, alice by name; carol is asked nothing.
INBOX_REQUESTS: dict[str, tuple[str, str, str, str, str]] = {
    "verify identity": ("verify", "Do the ID documents of the new hire match?", "group:apollo-team", "bob", "yes"),
    "approve": ("approve", "Approve access for the new hire?", "user:alice", "alice", "approved"),
}


class Simulator:
    """Publishes agent runs, conversation traffic and process progress in a loop until stopped.

    `pace` multiplies every pause (0.2 makes traffic five times faster, as the viewer test does)."""

    def __init__(self, publisher: Publisher, *, pace: float = 1.0) -> None:
        self.pub = publisher
        self.pace = pace
        self.published = 0

    async def _emit(
        self, scope: str, type_: str, data: dict[str, object], *, actor: str | None = None, run_id: str | None = None
    ) -> None:
        await self.pub.publish(tenant=TENANT, scope=scope, type=type_, data=data, actor=actor, run_id=run_id)
        self.published += 1

    async def _sleep(self, s: float) -> None:
        await asyncio.sleep(s * self.pace)

    async def agent_run(self, scope: str, n: int, *, fail: bool = False) -> None:
        """One run: reasoning, a tool call (args streamed; result or error), a streamed answer, the outcome.

        With `fail` the run ends with outcome `error` after its tool call (the model provider gave up)."""
        run = f"run-{uuid.uuid4().hex[:8]}"
        i = n % len(QUESTIONS)
        q, answer, tool, arg = QUESTIONS[i], ANSWERS[i], *TOOLS[i]
        r = {"run_id": run, "actor": "agent:researcher"}
        await self._emit(scope, "run.started", {"agent_id": "researcher", "input": q}, **r)
        await self._emit(scope, "run.step.started", {"step_id": "think", "name": "Reasoning"}, **r)
        rid = f"r-{run}"
        await self._emit(scope, "run.reasoning.started", {"message_id": rid}, **r)
        for piece in _chunks(REASONING[i]):
            await self._emit(scope, "run.reasoning.delta", {"message_id": rid, "delta": piece}, **r)
            await self._sleep(0.08)
        await self._emit(scope, "run.reasoning.finished", {"message_id": rid, "content": REASONING[i]}, **r)
        await self._emit(scope, "run.step.finished", {"step_id": "think", "name": "Reasoning"}, **r)
        await self._emit(scope, "run.step.started", {"step_id": "tool", "name": f"Calling {tool}"}, **r)
        tc = f"tc-{run}"
        await self._emit(scope, "run.tool_call.started", {"tool_call_id": tc, "name": tool}, **r)
        args = f'{{"query": {orjson.dumps(arg).decode()}, "limit": 5}}'
        for piece in ['{"query": ', orjson.dumps(arg).decode(), ', "limit": 5}']:
            await self._emit(scope, "run.tool_call.args.delta", {"tool_call_id": tc, "delta": piece}, **r)
            await self._sleep(0.1)
        await self._emit(scope, "run.tool_call.args.finished", {"tool_call_id": tc, "arguments": args}, **r)
        await self._sleep(0.4)
        tool_failed = n % 5 == 4
        if tool_failed:
            await self._emit(scope, "run.tool_call.error", {"tool_call_id": tc, "error": f"{tool} timed out"}, **r)
        else:
            await self._emit(scope, "run.tool_call.finished", {"tool_call_id": tc, "result": {"hits": HITS[i]}}, **r)
        await self._emit(scope, "run.step.finished", {"step_id": "tool", "name": f"Calling {tool}"}, **r)
        if fail:
            await self._sleep(0.3)
            await self._emit(scope, "run.finished", {"outcome": "error",
                                                     "error": "model provider rate limit: try again later"}, **r)
            return
        if tool_failed:
            answer = "I could not reach the search, so this is from memory: " + answer[0].lower() + answer[1:]
        mid = f"m-{run}"
        await self._emit(scope, "run.message.started", {"message_id": mid, "role": "assistant"}, **r)
        for piece in _chunks(answer):
            await self._emit(scope, "run.message.delta", {"message_id": mid, "delta": piece}, **r)
            await self._sleep(0.06)
        await self._emit(scope, "run.message.finished", {"message_id": mid, "content": answer}, **r)
        words = len(answer.split())
        await self._emit(scope, "run.finished", {"outcome": "success", "usage": {
            "input_tokens": 600 + 37 * i, "output_tokens": words * 2, "total_tokens": 600 + 37 * i + words * 2}}, **r)

    async def welcome_chat(self, n: int) -> None:
        """Project apollo's team channel: a member asks, the research agent answers."""
        scope = "conversation:welcome"
        who = ["bob", "alice"][n % 2]
        await self._emit(scope, "conversation.message.created",
                         {"message_id": f"cm-{uuid.uuid4().hex[:8]}", "role": "user",
                          "content": QUESTIONS[n % len(QUESTIONS)], "author_id": who})
        await self._sleep(0.3)
        await self.agent_run(scope, n)

    async def support_chat(self, n: int) -> None:
        """The helpdesk: a customer joins, asks, gets an agent's answer and a human's follow-up, leaves."""
        scope = "conversation:support"
        who = ["dave", "erin", "frank"][n % 3]
        await self._emit(scope, "conversation.participant.joined", {"participant_id": who, "role": "customer"})
        mid = f"cm-{uuid.uuid4().hex[:8]}"
        await self._emit(scope, "conversation.message.created",
                         {"message_id": mid, "role": "user", "content": f"Hi, {who} here: my export is stuck.",
                          "author_id": who})
        await self._sleep(0.5)
        await self.agent_run(scope, n)
        await self._sleep(0.4)
        await self._emit(scope, "conversation.message.created",
                         {"message_id": f"cm-{uuid.uuid4().hex[:8]}", "role": "user", "author_id": "carol",
                          "content": f"Thanks {who}, I restarted your export; it should finish in a minute.",
                          "reply_to": mid})
        await self._sleep(0.4)
        await self._emit(scope, "conversation.participant.left", {"participant_id": who, "reason": "resolved"})

    async def onboarding(self, n: int) -> None:
        scope = "process:onboarding"
        stages = ["collect documents", "verify identity", "approve", "provision accounts"]
        await self._emit(scope, "process.started", {"name": f"Onboarding #{n}", "stages": stages})
        for i, stage in enumerate(stages):
            changed: dict[str, object] = {"stage": stage, "index": i, "total": len(stages)}
            if i:
                changed["previous_stage"] = stages[i - 1]
            await self._emit(scope, "process.stage_changed", changed)
            for k in range(1, 4):
                await self._sleep(0.3)
                if stage == stages[-1] and k == 3 and n % 4 == 3:  # every fourth one fails at the very end
                    await self._emit(scope, "process.failed", {"error": "directory service unavailable",
                                                                "stage": stage})
                    return
                await self._emit(scope, "process.progress",
                                 {"fraction": round((i + k / 3) / len(stages), 3), "message": stage})
            asked = INBOX_REQUESTS.get(stage)
            if asked is not None:  # a human in the loop: the request waits in the assignee's inbox
                req, prompt, assignee, by, value = asked
                await self._emit(scope, "process.input_required",
                                 {"request_id": f"{req}-{n}", "prompt": prompt, "assignees": [assignee]})
                await self._sleep(6.0)
                await self._emit(scope, "process.input_received", {"request_id": f"{req}-{n}", "by": by,
                                                                   "value": value})
        await self._emit(scope, "process.completed", {"result": {"accounts": 3}})

    async def run(self, stop: asyncio.Event) -> None:
        """Loop the four storylines concurrently until `stop` is set; errors are logged, never fatal."""

        async def forever(story: str) -> None:
            for n in itertools.count():
                if stop.is_set():
                    return
                try:
                    if story == "welcome":
                        await self.welcome_chat(n)
                    elif story == "support":
                        await self.support_chat(n)
                    elif story == "standalone":
                        await self.agent_run("agent:researcher", n, fail=n % 6 == 5)
                    else:
                        await self.onboarding(n)
                except Exception as exc:  # NATS restarting, etc.: try again shortly
                    log.warning("simulator %s: %s", story, exc)
                await self._sleep(1.0 + random.random())

        await asyncio.gather(*(forever(s) for s in ("welcome", "support", "standalone", "onboarding")))
