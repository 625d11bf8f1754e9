"""A client's inbox, kept from the frames of the `inbox` scope (docs/protocol.md, Inbox).

    inbox = InboxView()
    inbox.load(answer_of_GET_v1_inbox)            # optional: the requests open before the subscription
    async with GatewayClient(url, token=token, scopes=["inbox"], since=answer["seq"]) as client:
        async for frame in client.frames():
            if inbox.apply(frame):
                show(inbox.open())                 # what waits for the user now, oldest first

The rules are the gateway's: a `process.input_required` adds a request; `process.input_received`
removes the request it answers; `process.completed` / `failed` / `cancelled` remove every request of
the process; a `revoked` frame for a process removes its requests; a request whose `expires_at` has
passed is not `open()` any more (the gateway sends no frame for expiry: it is not an event of the stream).
Feed it the frames of a connection subscribed to `inbox` alone: events of other subscriptions (a
`process:<id>` scope) would count as requests.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

ENDS = frozenset({"process.completed", "process.failed", "process.cancelled"})


def _expiry(data: dict[str, Any]) -> float | None:
    value = data.get("expires_at")
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


class InboxView:
    """The open requests of one user, by (process scope, request_id), in stream order."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], tuple[int, dict[str, Any], float | None]] = {}

    def load(self, body: dict[str, Any]) -> None:
        """Start from an answer of GET /v1/inbox (then subscribe with `since=body["seq"]`)."""
        self._open.clear()
        for item in body.get("requests", []):
            self._add(int(item["seq"]), item["event"])

    def _add(self, seq: int, env: dict[str, Any]) -> None:
        data = env.get("data") or {}
        self._open[(str(env.get("scope")), str(data.get("request_id")))] = (seq, env, _expiry(data))

    def apply(self, frame: dict[str, Any]) -> bool:
        """Apply one server frame; True when the inbox changed."""
        if frame.get("type") == "revoked":
            scope = str(frame.get("scope"))
            gone = [key for key in self._open if key[0] == scope]
            for key in gone:
                del self._open[key]
            return bool(gone)
        if frame.get("type") != "event":
            return False
        env = frame.get("event") or {}
        etype, scope, data = env.get("type"), str(env.get("scope")), env.get("data") or {}
        if etype == "process.input_required":
            self._add(int(frame["seq"]), env)
            return True
        if etype == "process.input_received":
            return self._open.pop((scope, str(data.get("request_id"))), None) is not None
        if etype in ENDS:
            gone = [key for key in self._open if key[0] == scope]
            for key in gone:
                del self._open[key]
            return bool(gone)
        return False

    def open(self, now: float | None = None) -> list[dict[str, Any]]:
        """The requests waiting now (not expired), oldest first: `{"seq", "event"}` like GET /v1/inbox."""
        now = time.time() if now is None else now
        items = sorted(((seq, env) for seq, env, expires in self._open.values() if expires is None or expires > now),
                       key=lambda item: item[0])
        return [{"seq": seq, "event": env} for seq, env in items]


__all__ = ["InboxView"]
