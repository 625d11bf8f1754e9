"""A Python client for the gateway: reconnects with its cursor and drops duplicates.

    async with GatewayClient(url, token=token, scopes=["conversation:c1"]) as client:
        async for frame in client.frames():
            if frame["type"] == "event":
                handle(frame["event"])

`seq` (the JetStream stream sequence) is one cursor across all scopes of a connection. The client
remembers the highest `seq` it has handed out; after a disconnect it reconnects with
`?scope=...&since=<cursor>` (the gateway replays what was missed, then goes live) and skips anything at
or below the cursor, so the application sees every event once, in order. Close codes 4401
(unauthorized) and 4400 (bad request) are final; others are retried with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlencode

import websockets
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

FINAL_CLOSE_CODES = frozenset({4400, 4401})

TokenProvider = str | Callable[[], Awaitable[str]]


class GatewayClosed(Exception):
    """The gateway refused the session for good (bad token, bad request)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed with {code}: {reason}")
        self.code = code
        self.reason = reason


class GatewayClient:
    def __init__(
        self,
        url: str,
        *,
        token: TokenProvider,
        scopes: Sequence[str] = ("*",),
        since: int | None = None,
        reconnect: bool = True,
        max_backoff: float = 5.0,
    ) -> None:
        self.url = url
        self._token = token
        self.scopes = list(scopes)
        self.cursor = since
        self.reconnect = reconnect
        self.max_backoff = max_backoff
        self.connects = 0
        self.last_close: tuple[int, str] | None = None
        self._ws: Any = None

    async def _get_token(self) -> str:
        return self._token if isinstance(self._token, str) else await self._token()

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self.reconnect = False
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()

    async def drop(self) -> None:
        """Drop the current connection (as a network failure would); frames() resumes from the cursor."""
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.transport.abort()

    def _connect_url(self) -> str:
        """Subscriptions go on the URL so that a resume replays all scopes as ONE ordered stream."""
        query = [("scope", scope) for scope in self.scopes]
        if self.cursor is not None:
            query.append(("since", str(self.cursor)))
        sep = "&" if "?" in self.url else "?"
        return f"{self.url}{sep}{urlencode(query)}"

    async def frames(self) -> AsyncIterator[dict[str, Any]]:
        """Every server frame; event frames exactly once and in `seq` order across reconnects."""
        delay = 0.1
        while True:
            try:
                token = await self._get_token()
                async with websockets.connect(
                    self._connect_url(), subprotocols=[Subprotocol("wsgateway.v1"), Subprotocol(f"bearer.{token}")],
                    max_size=None, open_timeout=10,
                ) as ws:
                    self._ws = ws
                    self.connects += 1
                    delay = 0.1
                    async for raw in ws:
                        frame = json.loads(raw)
                        if frame.get("type") == "event":
                            seq = int(frame["seq"])
                            if self.cursor is not None and seq <= self.cursor:
                                continue
                            self.cursor = seq
                        yield frame
                    code, reason = ws.close_code or 1006, ws.close_reason or ""
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
                code, reason = (rcvd.code, rcvd.reason) if rcvd else (1006, "connection lost")
            except (TimeoutError, OSError, websockets.InvalidHandshake) as exc:
                code, reason = 1006, str(exc)
            finally:
                self._ws = None
            self.last_close = (code, reason)
            if code in FINAL_CLOSE_CODES:
                raise GatewayClosed(code, reason)
            if not self.reconnect:
                return
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.max_backoff)


async def watch(url: str, token: str, scopes: Sequence[str] | None, *, since: int | None = None) -> None:
    """Print the stream to the terminal (what `wsgateway watch` runs)."""
    client = GatewayClient(url, token=token, scopes=scopes or ["*"], since=since)
    async for frame in client.frames():
        if frame.get("type") == "event":
            ev = frame["event"]
            data = json.dumps(ev.get("data", {}), ensure_ascii=False)
            print(f"#{frame['seq']:<6} {ev.get('scope', ''):<28} {ev.get('type', ''):<32} {data[:120]}", flush=True)
        else:
            print(json.dumps(frame, ensure_ascii=False), flush=True)
