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

from gateway.publisher import Publisher

log = logging.getLogger(__name__)

TENANT = "demo"


@dataclass(frozen=True)
class DemoUser:
    name: str
    groups: tuple[str, ...]
    sees: str


DEMO_USERS = (
    DemoUser("alice", (), "org admin: every scope of tenant demo"),
    DemoUser("bob", ("apollo-team",), "viewer of project apollo: conversation:welcome, process:onboarding, "
             "agent:researcher"),
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


async def seed_acls(kv: object) -> None:
    for key, doc in DEMO_ACLS.items():
        await kv.put(key, orjson.dumps(doc))  # type: ignore[attr-defined]


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


class Simulator:
    """Publishes agent runs, conversation traffic and process progress in a loop until stopped."""

    def __init__(self, publisher: Publisher, *, pace: float = 1.0) -> None:
        self.pub = publisher
        self.pace = pace
        self.published = 0

    async def _emit(self, scope: str, type_: str, data: dict[str, object], **kw: object) -> None:
        await self.pub.publish(tenant=TENANT, scope=scope, type=type_, data=data, **kw)  # type: ignore[arg-type]
        self.published += 1

    async def _sleep(self, s: float) -> None:
        await asyncio.sleep(s * self.pace)

    async def agent_run(self, scope: str, n: int) -> None:
        run = f"run-{uuid.uuid4().hex[:8]}"
        q, answer = QUESTIONS[n % len(QUESTIONS)], ANSWERS[n % len(ANSWERS)]
        r = {"run_id": run, "actor": "agent:researcher"}
        await self._emit(scope, "run.started", {"agent_id": "researcher", "input": q}, **r)
        await self._emit(scope, "run.step.started", {"step_id": "think", "name": "Reasoning"}, **r)
        rid = f"r-{run}"
        await self._emit(scope, "run.reasoning.started", {"message_id": rid}, **r)
        for piece in _chunks("I should check the live data before answering, then summarise it briefly."):
            await self._emit(scope, "run.reasoning.delta", {"message_id": rid, "delta": piece}, **r)
            await self._sleep(0.08)
        await self._emit(scope, "run.reasoning.finished", {"message_id": rid}, **r)
        await self._emit(scope, "run.step.finished", {"step_id": "think", "name": "Reasoning"}, **r)
        tc = f"tc-{run}"
        await self._emit(scope, "run.tool_call.started", {"tool_call_id": tc, "name": "search"}, **r)
        for piece in ['{"query": ', orjson.dumps(q).decode(), ', "limit": 5}']:
            await self._emit(scope, "run.tool_call.args.delta", {"tool_call_id": tc, "delta": piece}, **r)
            await self._sleep(0.1)
        await self._sleep(0.4)
        if n % 5 == 4:
            await self._emit(scope, "run.tool_call.error", {"tool_call_id": tc, "error": "search timed out"}, **r)
        else:
            await self._emit(scope, "run.tool_call.finished", {"tool_call_id": tc, "result": {"hits": 3}}, **r)
        mid = f"m-{run}"
        await self._emit(scope, "run.message.started", {"message_id": mid, "role": "assistant"}, **r)
        for piece in _chunks(answer):
            await self._emit(scope, "run.message.delta", {"message_id": mid, "delta": piece}, **r)
            await self._sleep(0.06)
        await self._emit(scope, "run.message.finished", {"message_id": mid, "content": answer}, **r)
        await self._emit(scope, "run.finished", {"outcome": "success"}, **r)

    async def support_chat(self, n: int) -> None:
        scope = "conversation:support"
        who = ["dave", "erin", "frank"][n % 3]
        await self._emit(scope, "conversation.participant.joined", {"participant_id": who, "role": "customer"})
        mid = f"cm-{uuid.uuid4().hex[:8]}"
        await self._emit(scope, "conversation.message.created",
                         {"message_id": mid, "role": "user", "content": f"Hi, {who} here: my export is stuck.",
                          "author_id": who})
        await self._sleep(0.5)
        await self.agent_run(scope, n)
        await self._emit(scope, "conversation.participant.left", {"participant_id": who})

    async def onboarding(self, n: int) -> None:
        scope = "process:onboarding"
        stages = ["collect documents", "verify identity", "approve", "provision accounts"]
        await self._emit(scope, "process.started", {"name": f"Onboarding #{n}", "stages": stages})
        for i, stage in enumerate(stages):
            await self._emit(scope, "process.stage_changed", {"stage": stage, "index": i, "total": len(stages)})
            for k in range(1, 4):
                await self._sleep(0.3)
                await self._emit(scope, "process.progress",
                                 {"fraction": round((i + k / 3) / len(stages), 3), "message": stage})
            if stage == "approve":
                req = f"req-{n}"
                await self._emit(scope, "process.input_required",
                                 {"request_id": req, "prompt": "Approve access for the new hire?",
                                  "assignees": ["alice"]})
                await self._sleep(2.0)
                await self._emit(scope, "process.input_received", {"request_id": req, "by": "alice",
                                                                   "value": "approved"})
        if n % 4 == 3:
            await self._emit(scope, "process.failed", {"error": "directory service unavailable",
                                                        "stage": stages[-1]})
        else:
            await self._emit(scope, "process.completed", {"result": {"accounts": 3}})

    async def run(self, stop: asyncio.Event) -> None:
        """Loop the three storylines concurrently until `stop` is set; errors are logged, never fatal."""

        async def forever(story: str) -> None:
            for n in itertools.count():
                if stop.is_set():
                    return
                try:
                    if story == "welcome":
                        await self.agent_run("conversation:welcome", n)
                    elif story == "support":
                        await self.support_chat(n)
                    elif story == "standalone":
                        await self.agent_run("agent:researcher", n)
                    else:
                        await self.onboarding(n)
                except Exception as exc:  # NATS restarting, etc.: try again shortly
                    log.warning("simulator %s: %s", story, exc)
                await self._sleep(1.0 + random.random())

        await asyncio.gather(*(forever(s) for s in ("welcome", "support", "standalone", "onboarding")))
