"""`wsgateway watch`: the live stream of a gateway in a terminal, for people, not programs.

Events go to stdout, one line each; what the watcher does (connecting, reconnecting, why a
connection ended) goes to stderr as one line per step, never a traceback. It resumes from its
cursor after every disconnect (through :class:`gateway.sdk.client.GatewayClient`) and stops with
exit status 1 on the close codes that retrying cannot fix (4400 bad request, 4401 unauthorized).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from gateway.logs import redact
from gateway.sdk.client import GatewayClient, GatewayClosed

FIRST_RETRY_S = 0.5
MAX_RETRY_S = 5.0


def _event_line(frame: dict[str, Any]) -> str:
    ev = frame.get("event") or {}
    data = json.dumps(ev.get("data", {}), ensure_ascii=False)
    return f"#{frame.get('seq', '?'):<6} {ev.get('scope', ''):<28} {ev.get('type', ''):<32} {data[:120]}"


async def watch(
    url: str, token: str, scopes: Sequence[str] | None, *, since: int | None = None,
    out: TextIO | None = None, err: TextIO | None = None, max_retry_s: float = MAX_RETRY_S,
) -> int:
    """Follow the stream until a final close code (returns 1); other closes are retried with backoff."""
    out = out or sys.stdout
    err = err or sys.stderr

    def say(text: str) -> None:
        print(f"wsgateway watch: {redact(text)}", file=err, flush=True)

    client = GatewayClient(url, token=token, scopes=list(scopes or ["*"]), since=since, reconnect=False)
    delay = FIRST_RETRY_S
    attempt = 0
    while True:
        attempt += 1
        resume = f", resuming after seq {client.cursor}" if client.cursor is not None else ""
        say(f"{'connecting' if attempt == 1 else 'reconnecting'} to {url}{resume}")
        connected_before = client.connects
        try:
            async for frame in client.frames():
                kind = frame.get("type")
                if kind == "welcome":
                    who = (frame.get("principal") or {}).get("id", "?")
                    say(f"connected as {who} (connection {frame.get('connection_id', '?')})")
                if kind == "event":
                    print(_event_line(frame), file=out, flush=True)
                else:
                    print(json.dumps(frame, ensure_ascii=False), file=out, flush=True)
        except GatewayClosed as exc:
            say(f"the gateway closed the connection with {exc.code} {exc.reason or ''}".rstrip()
                + ": final (4400 bad request, 4401 unauthorized), not retrying")
            return 1
        code, reason = client.last_close or (1006, "connection lost")
        if client.connects > connected_before:
            delay = FIRST_RETRY_S  # it was connected: start the backoff afresh
        detail = f"{code} {reason}".strip() if code != 1006 else (reason or "connection lost")
        say(f"connection {'closed' if client.connects > connected_before else 'failed'} ({detail}); "
            f"retrying in {delay:.1f}s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_retry_s)
