"""The gateway's event catalogue as AG-UI 1.0 events: one stateful mapper per AG-UI stream.

AG-UI (the `@ag-ui/core` 1.0 schema, checked by `@ag-ui/client`'s verifier) is a per-stream
protocol: a stream starts with RUN_STARTED, a message's content only follows its START, nothing but a
new RUN_STARTED follows RUN_FINISHED. The gateway's stream is per scope and has no beginning, so the
mapper keeps a model of the thread (the scope): its messages, its state, the active run, its open
steps, messages, reasoning and tool calls. `feed` maps one gateway envelope to the AG-UI events it
stands for; `prelude` is what a consumer that joins (or resumes) now must get first: RUN_STARTED of
the active run, a MESSAGES_SNAPSHOT and a STATE_SNAPSHOT of the thread so far, and the re-opening of
every step, message, reasoning and tool call still open, so the deltas that follow are valid.

The same algorithm is implemented once more in TypeScript (`clients/js/src/ag-ui.ts`); both are
tested against `tests/agui_vectors.json` (gateway events in, AG-UI events out), and docs/events.md's
mapping table is checked against the same file. Pure: no I/O, no clock.
"""

from __future__ import annotations

import copy
import json
import re
from collections import OrderedDict
from decimal import Decimal
from typing import Any

AgEvent = dict[str, Any]
Json = Any

MAX_MESSAGES = 1000  # the thread model keeps the newest messages (a snapshot's size is bounded)
MAX_FINISHED = 1024  # finished run ids remembered, so that stragglers of a finished run are dropped
TEXT_ROLES = ("developer", "system", "assistant", "user")


class PatchError(ValueError):
    pass


_INDEX_RE = re.compile(r"[0-9]{1,19}")


def _index(token: str) -> bool:
    """An array index in a JSON pointer: ASCII digits (str.isdigit would take "²", which int() refuses)."""
    return _INDEX_RE.fullmatch(token) is not None


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Json, parts: list[str]) -> tuple[Json, str]:
    cur = doc
    for p in parts[:-1]:
        if isinstance(cur, list):
            if not _index(p) or int(p) >= len(cur):
                raise PatchError(f"no element {p!r}")
            cur = cur[int(p)]
        elif isinstance(cur, dict):
            if p not in cur:
                raise PatchError(f"no member {p!r}")
            cur = cur[p]
        else:
            raise PatchError(f"cannot descend into {p!r}")
    return cur, parts[-1]


def _get(doc: Json, path: str) -> Json:
    parts = _pointer(path)
    if not parts:
        return doc
    parent, key = _parent(doc, parts)
    if isinstance(parent, list):
        if not _index(key) or int(key) >= len(parent):
            raise PatchError(f"no element {key!r}")
        return parent[int(key)]
    if not isinstance(parent, dict) or key not in parent:
        raise PatchError(f"no member {key!r}")
    return parent[key]


def _remove(doc: Json, path: str) -> Json:
    parts = _pointer(path)
    if not parts:
        raise PatchError("cannot remove the whole document")
    parent, key = _parent(doc, parts)
    if isinstance(parent, list):
        if not _index(key) or int(key) >= len(parent):
            raise PatchError(f"no element {key!r}")
        return parent.pop(int(key))
    if not isinstance(parent, dict) or key not in parent:
        raise PatchError(f"no member {key!r}")
    return parent.pop(key)


def _add(doc: Json, path: str, value: Json) -> Json:
    parts = _pointer(path)
    if not parts:
        return value
    parent, key = _parent(doc, parts)
    if isinstance(parent, list):
        if key == "-":
            parent.append(value)
        elif _index(key) and int(key) <= len(parent):
            parent.insert(int(key), value)
        else:
            raise PatchError(f"bad index {key!r}")
    elif isinstance(parent, dict):
        parent[key] = value
    else:
        raise PatchError(f"cannot add to {key!r}")
    return doc


def apply_patch(doc: Json, patch: list[dict[str, Any]]) -> Json:
    """RFC 6902 on a copy of `doc` (all or nothing: PatchError leaves `doc` as it was)."""
    doc = copy.deepcopy(doc)
    for op in patch:
        kind, path = op.get("op"), str(op.get("path", ""))
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)
            if _pointer(path):
                _remove(doc, path)
            doc = _add(doc, path, copy.deepcopy(op.get("value")))
        elif kind == "move":
            value = _remove(doc, str(op.get("from", "")))
            doc = _add(doc, path, value)
        elif kind == "copy":
            doc = _add(doc, path, copy.deepcopy(_get(doc, str(op.get("from", "")))))
        elif kind == "test":
            if _get(doc, path) != op.get("value"):
                raise PatchError(f"test failed at {path!r}")
        else:
            raise PatchError(f"unknown op {kind!r}")
    return doc


def _text(content: Json) -> str:
    """A message's content as text (content parts: their `text`, joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _user_content(content: Json) -> Json:
    if isinstance(content, list):
        return [{"type": "text", "text": str(p.get("text", ""))}
                for p in content if isinstance(p, dict) and p.get("type") == "text"]
    return _text(content)


def _js_number(x: float) -> str:
    """A float as JavaScript's Number#toString writes it (what JSON.stringify writes), so the TypeScript twin
    produces the same text: 1.0 -> "1", 1e-07 -> "1e-7", 1e+16 -> "10000000000000000"."""
    if x != x or x in (float("inf"), float("-inf")):
        return "null"
    if x == 0:
        return "0"
    if x.is_integer() and abs(x) < 1e21:
        return str(int(x))
    sign, digits_t, exp = Decimal(repr(x)).as_tuple()
    assert isinstance(exp, int)
    digits = "".join(map(str, digits_t)).rstrip("0") or "0"
    exp += len("".join(map(str, digits_t))) - len(digits)
    k = len(digits)
    n = exp + k  # the decimal point's position after the first `n` digits
    minus = "-" if sign else ""
    if k <= n <= 21:
        return minus + digits + "0" * (n - k)
    if 0 < n <= 21:
        return minus + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return minus + "0." + "0" * (-n) + digits
    e = n - 1
    return minus + digits[0] + ("." + digits[1:] if k > 1 else "") + "e" + ("+" if e > 0 else "-") + str(abs(e))


def _js_json(v: Json) -> str:
    """JSON with sorted keys and no spaces, byte for byte as the TypeScript twin writes it."""
    if isinstance(v, dict):
        return "{" + ",".join(f"{_js_json(str(k))}:{_js_json(v[k])}" for k in sorted(v)) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_js_json(x) for x in v) + "]"
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, float):
        return _js_number(v)
    if isinstance(v, int):
        return str(v)
    return json.dumps(v, ensure_ascii=False)


def _result_text(result: Json) -> str:
    if result is None:
        return ""
    if isinstance(result, str):
        return result
    return _js_json(result)


def _message(mid: str, role: str, content: Json, sub: str | None) -> dict[str, Any] | None:
    """An AG-UI message from a catalogue message (None for roles AG-UI cannot hold as plain messages)."""
    if role not in TEXT_ROLES:
        return None  # a `tool` message needs the call it answers: not in the catalogue's message
    msg: dict[str, Any] = {"id": mid, "role": role,
                           "content": _user_content(content) if role == "user" else _text(content)}
    if sub is not None:
        msg["subagentRunId"] = sub
    return msg


class AguiMapper:
    """Gateway envelopes (dicts, as published) in, AG-UI events (dicts) out, for one thread (scope)."""

    def __init__(self, thread_id: str) -> None:
        self.thread = thread_id
        self.main: str | None = None  # the active run
        self.main_parent: str | None = None  # ... and the run that started it
        self.subs: OrderedDict[str, dict[str, Any]] = OrderedDict()  # active subagent runs
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.steps: OrderedDict[tuple[str, str], str] = OrderedDict()  # (run, step_id) -> step name
        self.texts: OrderedDict[str, str] = OrderedDict()  # open text message -> its run
        self.reasoning: OrderedDict[str, str] = OrderedDict()  # open reasoning message -> its run
        self.tools: OrderedDict[str, str] = OrderedDict()  # tool calls whose arguments are open -> run
        self.messages: list[dict[str, Any]] = []
        self.state: Json = None  # None: no state seen
        self.pending = True  # the consumer lacks the thread so far: snapshot after the next RUN_STARTED

    # -- the model ---------------------------------------------------------------------------------

    def _find(self, mid: str) -> dict[str, Any] | None:
        for m in self.messages:
            if m["id"] == mid:
                return m
        return None

    def _put(self, msg: dict[str, Any]) -> None:
        old = self._find(msg["id"])
        if old is not None:
            old.clear()
            old.update(msg)
            return
        self.messages.append(msg)
        if len(self.messages) > MAX_MESSAGES:
            del self.messages[0]

    def _tool_owner(self, tcid: str) -> dict[str, Any] | None:
        for m in self.messages:
            if m.get("role") == "assistant" and any(tc["id"] == tcid for tc in m.get("toolCalls", ())):
                return m
        return None

    def _tool_call(self, tcid: str) -> dict[str, Any] | None:
        owner = self._tool_owner(tcid)
        if owner is None:
            return None
        call: dict[str, Any] = next(tc for tc in owner["toolCalls"] if tc["id"] == tcid)
        return call

    def _snapshots(self) -> list[AgEvent]:
        out: list[AgEvent] = []
        if self.messages:
            out.append({"type": "MESSAGES_SNAPSHOT", "messages": copy.deepcopy(self.messages)})
        if self.state is not None:
            out.append({"type": "STATE_SNAPSHOT", "snapshot": copy.deepcopy(self.state)})
        return out

    def _tag(self, run: str) -> dict[str, str]:
        return {} if run == self.main else {"subagentRunId": run}

    def _sub(self, run: str) -> str | None:
        return None if run == self.main else run

    # -- runs --------------------------------------------------------------------------------------

    def _start(self, run: str, data: dict[str, Any]) -> list[AgEvent]:
        if run == self.main or run in self.subs:
            return []
        if self.main is None:
            self.main = run
            parent = data.get("parent_run_id")
            self.main_parent = parent if isinstance(parent, str) else None
            out = [self._run_started()]
            if self.pending:
                out += self._snapshots()
                self.pending = False
            return out
        parent = data.get("parent_run_id")
        name = data.get("agent_id")
        self.subs[run] = {"name": name if isinstance(name, str) else run,
                          "parent": parent if isinstance(parent, str) and parent in self.subs else None}
        return [self._sub_started(run)]

    def _run_started(self) -> AgEvent:
        ev: AgEvent = {"type": "RUN_STARTED", "threadId": self.thread, "runId": self.main}
        if self.main_parent is not None:
            ev["parentRunId"] = self.main_parent
        return ev

    def _sub_started(self, run: str) -> AgEvent:
        info = self.subs[run]
        ev: AgEvent = {"type": "SUBAGENT_STARTED", "subagentRunId": run, "name": info["name"]}
        if info["parent"] is not None:
            ev["parentSubagentRunId"] = info["parent"]
        return ev

    def _close_owned(self, run: str) -> list[AgEvent]:
        """End what `run` left open (AG-UI ends a run only after its messages, calls and steps)."""
        out: list[AgEvent] = []
        tag = self._tag(run)
        for mid in [m for m, r in self.texts.items() if r == run]:
            del self.texts[mid]
            out.append({"type": "TEXT_MESSAGE_END", "messageId": mid, **tag})
        for tcid in [t for t, r in self.tools.items() if r == run]:
            del self.tools[tcid]
            out.append({"type": "TOOL_CALL_END", "toolCallId": tcid, **tag})
        for mid in [m for m, r in self.reasoning.items() if r == run]:
            del self.reasoning[mid]
            out += [{"type": "REASONING_MESSAGE_END", "messageId": mid, **tag},
                    {"type": "REASONING_END", "messageId": mid, **tag}]
        for key in [k for k in self.steps if k[0] == run]:
            out.append({"type": "STEP_FINISHED", "stepName": self.steps.pop(key), **tag})
        return out

    def _done(self, run: str) -> None:
        self.finished[run] = None
        if len(self.finished) > MAX_FINISHED:
            self.finished.popitem(last=False)

    def _finish(self, run: str, data: dict[str, Any]) -> list[AgEvent]:
        outcome = data.get("outcome")
        out = self._close_owned(run)
        if run != self.main:
            del self.subs[run]
            self._done(run)
            if outcome == "success" or outcome == "interrupted":
                ev: AgEvent = {"type": "SUBAGENT_FINISHED", "subagentRunId": run,
                               "outcome": {"type": "success" if outcome == "success" else "suspended"}}
                if "result" in data and outcome == "success":
                    ev["result"] = data["result"]
                return [*out, ev]
            message = data.get("error") if outcome == "error" else "cancelled"
            return [*out, {"type": "SUBAGENT_ERROR", "subagentRunId": run,
                           "message": message if isinstance(message, str) and message else "run failed",
                           "code": str(outcome)}]
        for sub in list(self.subs):  # a subagent cannot outlive the run it belongs to in AG-UI
            out += self._close_owned(sub)
            out.append({"type": "SUBAGENT_ERROR", "subagentRunId": sub,
                        "message": "the parent run ended first", "code": "parent_finished"})
            self._done(sub)
        self.subs.clear()
        self.main = None
        self._done(run)
        if outcome == "error":
            err = data.get("error")
            return [*out, {"type": "RUN_ERROR", "message": err if isinstance(err, str) and err else "run failed",
                           "code": "error"}]
        fin: AgEvent = {"type": "RUN_FINISHED", "threadId": self.thread, "runId": run}
        if outcome == "cancelled":
            fin["outcome"] = {"type": "cancelled"}
        elif outcome == "interrupted":
            fin["outcome"] = {"type": "interrupt",
                              "interrupts": [{"id": f"{run}.interrupt", "reason": "input_required"}]}
        else:
            fin["outcome"] = {"type": "success"}
            if "result" in data:
                fin["result"] = data["result"]
        usage = data.get("usage")
        if isinstance(usage, dict):
            u = {camel: usage[snake] for snake, camel in (("input_tokens", "inputTokens"),
                                                          ("output_tokens", "outputTokens"),
                                                          ("total_tokens", "totalTokens")) if snake in usage}
            if u:
                fin["usage"] = [u]
        return [*out, fin]

    # -- feed --------------------------------------------------------------------------------------

    def feed(self, env: dict[str, Any]) -> list[AgEvent]:
        """The AG-UI events one gateway event stands for (possibly none)."""
        etype = env.get("type")
        data = env.get("data")
        if not isinstance(etype, str):
            return []
        if not isinstance(data, dict):
            data = {}
        if etype.startswith("run."):
            run = env.get("run_id")
            if not isinstance(run, str) or run in self.finished:
                return []  # a straggler of a finished run
            if etype == "run.started":
                return self._start(run, data)
            out: list[AgEvent] = []
            if run != self.main and run not in self.subs:
                out += self._start(run, {})  # joined after its start left the stream: start it implicitly
            if etype == "run.finished":
                return out + self._finish(run, data)
            return out + self._run_event(run, etype, data)
        if etype.startswith("conversation.message."):
            changed = self._conversation(etype, data)
            if not changed:
                return []
            if self.main is None:
                self.pending = True
                return []
            return [{"type": "MESSAGES_SNAPSHOT", "messages": copy.deepcopy(self.messages)}]
        if self.main is None:
            return []  # AG-UI has nothing between runs but RUN_STARTED
        return [{"type": "CUSTOM", "name": etype, "value": copy.deepcopy(data)}]

    def _conversation(self, etype: str, data: dict[str, Any]) -> bool:
        mid = data.get("message_id")
        if not isinstance(mid, str):
            return False
        if etype == "conversation.message.created":
            msg = _message(mid, str(data.get("role")), data.get("content"), None)
            if msg is None:
                return False
            self._put(msg)
            return True
        old = self._find(mid)
        if old is None:
            return False
        if etype == "conversation.message.updated":
            old["content"] = _user_content(data.get("content")) if old["role"] == "user" else _text(data.get("content"))
            return True
        if etype == "conversation.message.deleted":
            self.messages.remove(old)
            return True
        return False

    def _run_event(self, run: str, etype: str, data: dict[str, Any]) -> list[AgEvent]:
        tag = self._tag(run)
        if etype in ("run.message.started", "run.message.delta", "run.message.finished"):
            return self._text_event(run, etype, data, tag)
        if etype in ("run.reasoning.started", "run.reasoning.delta", "run.reasoning.finished"):
            return self._reasoning_event(run, etype, data, tag)
        if etype.startswith("run.tool_call."):
            return self._tool_event(run, etype, data, tag)
        if etype in ("run.step.started", "run.step.finished"):
            sid, name = data.get("step_id"), data.get("name")
            if not isinstance(sid, str) or not isinstance(name, str):
                return []
            key = (run, sid)
            if etype == "run.step.started":
                if key in self.steps or any(r == run and n == name for (r, _), n in self.steps.items()):
                    return []  # AG-UI names steps: one open step per name
                self.steps[key] = name
                return [{"type": "STEP_STARTED", "stepName": name, **tag}]
            if key not in self.steps:
                return []
            return [{"type": "STEP_FINISHED", "stepName": self.steps.pop(key), **tag}]
        if etype == "run.state.snapshot":
            state = data.get("state")
            self.state = copy.deepcopy(state)
            return [{"type": "STATE_SNAPSHOT", "snapshot": copy.deepcopy(state), **tag}]
        if etype == "run.state.delta":
            patch = data.get("patch")
            if not isinstance(patch, list):
                return []
            try:
                self.state = apply_patch(self.state if self.state is not None else {}, patch)
            except PatchError:
                pass  # the consumer's patch fails the same way; the next snapshot repairs both
            return [{"type": "STATE_DELTA", "delta": copy.deepcopy(patch), **tag}]
        if etype == "run.messages.snapshot":
            msgs = data.get("messages")
            if not isinstance(msgs, list):
                return []
            sub = self._sub(run)
            converted = [_message(str(m.get("message_id", "")), str(m.get("role")), m.get("content"), sub)
                         for m in msgs if isinstance(m, dict) and isinstance(m.get("message_id"), str)]
            snap = {m["id"]: m for m in converted if m is not None}
            # AG-UI's rule: messages missing from a snapshot go, except reasoning when it carries none
            keep_reasoning = not any(m["role"] == "reasoning" for m in snap.values())
            merged = [snap.get(m["id"], m) for m in self.messages
                      if m["id"] in snap or (keep_reasoning and m.get("role") == "reasoning")]
            have = {m["id"] for m in merged}
            self.messages = (merged + [m for m in snap.values() if m["id"] not in have])[-MAX_MESSAGES:]
            return [{"type": "MESSAGES_SNAPSHOT", "messages": copy.deepcopy(self.messages)}]
        return [{"type": "CUSTOM", "name": etype, "value": copy.deepcopy(data), **tag}]

    def _text_event(self, run: str, etype: str, data: dict[str, Any], tag: dict[str, str]) -> list[AgEvent]:
        mid = data.get("message_id")
        if not isinstance(mid, str):
            return []
        out: list[AgEvent] = []
        if mid not in self.texts:
            if etype == "run.message.started" or self._find(mid) is None or etype == "run.message.delta":
                role = data.get("role", "assistant")
                out.append(self._open_text(run, mid, role if role in TEXT_ROLES else "assistant", tag))
            else:
                return []  # finished twice
        msg = self._find(mid)
        if etype == "run.message.started":
            return out
        if etype == "run.message.delta":
            delta = str(data.get("delta", ""))
            if msg is not None:
                msg["content"] = str(msg.get("content") or "") + delta
            return [*out, {"type": "TEXT_MESSAGE_CONTENT", "messageId": mid, "delta": delta, **tag}]
        full = data.get("content")
        if msg is not None and isinstance(full, str):
            have = str(msg.get("content") or "")
            if full.startswith(have) and len(full) > len(have):
                out.append({"type": "TEXT_MESSAGE_CONTENT", "messageId": mid, "delta": full[len(have):], **tag})
            msg["content"] = full
        del self.texts[mid]
        return [*out, {"type": "TEXT_MESSAGE_END", "messageId": mid, **tag}]

    def _open_text(self, run: str, mid: str, role: str, tag: dict[str, str]) -> AgEvent:
        self.texts[mid] = run
        if self._find(mid) is None:
            msg: dict[str, Any] = {"id": mid, "role": role, "content": ""}
            if tag:
                msg["subagentRunId"] = run
            self._put(msg)
        return {"type": "TEXT_MESSAGE_START", "messageId": mid, "role": role, **tag}

    def _reasoning_event(self, run: str, etype: str, data: dict[str, Any], tag: dict[str, str]) -> list[AgEvent]:
        mid = data.get("message_id")
        if not isinstance(mid, str):
            return []
        out: list[AgEvent] = []
        if mid not in self.reasoning:
            if etype == "run.reasoning.finished" and self._find(mid) is not None:
                return []
            self.reasoning[mid] = run
            if self._find(mid) is None:
                new: dict[str, Any] = {"id": mid, "role": "reasoning", "content": ""}
                if tag:
                    new["subagentRunId"] = run
                self._put(new)
            out += [{"type": "REASONING_START", "messageId": mid, **tag},
                    {"type": "REASONING_MESSAGE_START", "messageId": mid, "role": "reasoning", **tag}]
        msg = self._find(mid)
        if etype == "run.reasoning.started":
            return out
        if etype == "run.reasoning.delta":
            delta = str(data.get("delta", ""))
            if msg is not None:
                msg["content"] = str(msg.get("content") or "") + delta
            return [*out, {"type": "REASONING_MESSAGE_CONTENT", "messageId": mid, "delta": delta, **tag}]
        full = data.get("content")
        if msg is not None and isinstance(full, str):
            have = str(msg.get("content") or "")
            if full.startswith(have) and len(full) > len(have):
                out.append({"type": "REASONING_MESSAGE_CONTENT", "messageId": mid, "delta": full[len(have):], **tag})
            msg["content"] = full
        del self.reasoning[mid]
        return [*out, {"type": "REASONING_MESSAGE_END", "messageId": mid, **tag},
                {"type": "REASONING_END", "messageId": mid, **tag}]

    def _tool_event(self, run: str, etype: str, data: dict[str, Any], tag: dict[str, str]) -> list[AgEvent]:
        tcid = data.get("tool_call_id")
        if not isinstance(tcid, str):
            return []
        call = self._tool_call(tcid)
        if etype == "run.tool_call.started":
            name = data.get("name")
            if call is not None or not isinstance(name, str):
                return []
            parent = data.get("message_id")
            owner = self._find(parent) if isinstance(parent, str) else None
            if owner is None or owner.get("role") != "assistant":
                owner = {"id": tcid if owner is not None or not isinstance(parent, str) else parent,
                         "role": "assistant", "toolCalls": []}
                if tag:
                    owner["subagentRunId"] = run
                self._put(owner)
            owner.setdefault("toolCalls", []).append(
                {"id": tcid, "type": "function", "function": {"name": name, "arguments": ""}})
            self.tools[tcid] = run
            ev: AgEvent = {"type": "TOOL_CALL_START", "toolCallId": tcid, "toolCallName": name, **tag}
            if isinstance(parent, str):
                ev["parentMessageId"] = parent
            return [ev]
        if call is None:
            return []  # a call this thread never saw start: AG-UI needs its name
        if etype in ("run.tool_call.args.delta", "run.tool_call.args.finished"):
            if tcid not in self.tools:
                return []
            fn = call["function"]
            if etype == "run.tool_call.args.delta":
                delta = str(data.get("delta", ""))
                fn["arguments"] += delta
                return [{"type": "TOOL_CALL_ARGS", "toolCallId": tcid, "delta": delta, **tag}]
            out: list[AgEvent] = []
            full = data.get("arguments")
            if isinstance(full, str):
                if full.startswith(fn["arguments"]) and len(full) > len(fn["arguments"]):
                    out.append({"type": "TOOL_CALL_ARGS", "toolCallId": tcid,
                                "delta": full[len(fn["arguments"]):], **tag})
                fn["arguments"] = full
            del self.tools[tcid]
            return [*out, {"type": "TOOL_CALL_END", "toolCallId": tcid, **tag}]
        if etype not in ("run.tool_call.finished", "run.tool_call.error"):
            return [{"type": "CUSTOM", "name": etype, "value": copy.deepcopy(data), **tag}]
        rid = f"{tcid}.result"
        if self._find(rid) is not None:
            return []
        out = []
        if tcid in self.tools:
            del self.tools[tcid]
            out.append({"type": "TOOL_CALL_END", "toolCallId": tcid, **tag})
        failed = etype == "run.tool_call.error"
        content = str(data.get("error", "")) if failed else _result_text(data.get("result"))
        result: AgEvent = {"type": "TOOL_CALL_RESULT", "messageId": rid, "toolCallId": tcid,
                           "content": content, "role": "tool", **tag}
        tool_msg: dict[str, Any] = {"id": rid, "role": "tool", "toolCallId": tcid, "content": content}
        if failed:
            result["metadata"] = {"wsgateway": {"error": True}}
            tool_msg["error"] = content
        if tag:
            tool_msg["subagentRunId"] = run
        owner = self._tool_owner(tcid)
        at = len(self.messages)
        if owner is not None:
            at = self.messages.index(owner) + 1
            while at < len(self.messages) and self.messages[at].get("role") == "tool":
                at += 1
        self.messages.insert(at, tool_msg)
        return [*out, result]

    # -- join / resume -----------------------------------------------------------------------------

    def prelude(self) -> list[AgEvent]:
        """What a consumer joining now gets first: the active run, the thread so far, and the re-opening
        of everything still open. Nothing when no run is active (the next RUN_STARTED carries the snapshot)."""
        if self.main is None:
            self.pending = True
            return []
        out: list[AgEvent] = [self._run_started()]
        out += [self._sub_started(s) for s in self.subs]
        out += self._snapshots()
        self.pending = False
        for (run, _), name in self.steps.items():
            out.append({"type": "STEP_STARTED", "stepName": name, **self._tag(run)})
        for mid, run in self.texts.items():
            msg = self._find(mid)
            role = msg["role"] if msg is not None and msg.get("role") in TEXT_ROLES else "assistant"
            out.append({"type": "TEXT_MESSAGE_START", "messageId": mid, "role": role, **self._tag(run)})
        for mid, run in self.reasoning.items():
            out += [{"type": "REASONING_START", "messageId": mid, **self._tag(run)},
                    {"type": "REASONING_MESSAGE_START", "messageId": mid, "role": "reasoning", **self._tag(run)}]
        for tcid, run in self.tools.items():
            call = self._tool_call(tcid)
            owner = self._tool_owner(tcid)
            if call is None or owner is None:
                continue
            ev: AgEvent = {"type": "TOOL_CALL_START", "toolCallId": tcid,
                           "toolCallName": call["function"]["name"], **self._tag(run)}
            if owner["id"] != tcid:
                ev["parentMessageId"] = owner["id"]
            out.append(ev)
        return out


__all__ = ["MAX_MESSAGES", "AgEvent", "AguiMapper", "PatchError", "apply_patch"]
