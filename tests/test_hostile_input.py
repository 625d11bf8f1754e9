"""Every parameter of every endpoint, with hostile values: a clear 400 (HTTP) or close 4400 (WebSocket), never
a 5xx, an unhandled exception, or a harmed neighbour.

One validation per parameter (gateway/protocol.py: `parse_seq`, `parse_int` for numbers: ASCII digits with a
length bound; `is_scope` for scopes: a full match). The values are sent exactly as written here (already
percent-encoded), so unicode digits, NUL, a trailing newline and invalid UTF-8 reach the gateway as such.
"""

from __future__ import annotations

import logging

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from gateway.edge.http_api import INBOX_MAX_LIMIT
from tests.support.gateway import RunningGateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.wsclient import connect, events, recv_type, welcome

ADMIN = {"admins": ["user:alice"]}

# Values for a numeric parameter (a sequence, a cursor, a page size).
NUMBERS = {
    "unicode superscript two": "%C2%B2",
    "arabic-indic three": "%D9%A3",
    "fullwidth one": "%EF%BC%91",
    "5000 digits": "9" * 5000,
    "20 digits": "9" * 20,
    "negative": "-1",
    "plus sign": "%2B1",
    "leading space": "%201",
    "trailing newline": "1%0A",
    "NUL": "1%00",
    "exponent": "1e3",
    "hex": "0x10",
    "path traversal": "..%2F..%2Fetc",
    "invalid UTF-8": "%FF",
    "very long": "x" * 10000,
    "empty": "",
}
# Values for a scope parameter.
SCOPES = {
    "trailing newline": "conversation:c1%0A",
    "NUL": "conversation:c1%00",
    "path traversal": "conversation:..%2F..%2Fetc",
    "raw dots and slash": "conversation:../x",
    "unknown kind": "user:c1",
    "no id": "conversation:",
    "id too long": "conversation:" + "a" * 129,
    "very long": "conversation:" + "a" * 10000,
    "unicode digit id": "conversation:%C2%B2",
    "invalid UTF-8": "conversation:c%FF",
    "space": "conversation:c%201",
    "empty": "",
}


def _values(
    values: dict[str, str], *, drop: tuple[str, ...] = (), extra: dict[str, str] | None = None
) -> dict[str, str]:
    return {**{k: v for k, v in values.items() if k not in drop}, **(extra or {})}


class Failures:
    """Collects every value a parameter mishandled, so one run shows all of them."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def check(self, name: str, ok: bool, detail: object) -> None:
        if not ok:
            self.items.append(f"{name}: {detail}")

    def __bool__(self) -> bool:
        return bool(self.items)

    def __str__(self) -> str:
        return "\n".join(self.items)


@pytest.fixture
async def token(gw: RunningGateway, idp: TestIdP, platform: Platform) -> str:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, gw)
    return idp.mint("alice")


async def _get(gw: RunningGateway, token: str, path_and_query: str, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.http, timeout=30) as c:
        return await c.get(path_and_query, headers={"Authorization": f"Bearer {token}", **headers})


def _is_400(r: httpx.Response, param: str) -> bool:
    """A 400 with the JSON error body whose message names the parameter."""
    if r.status_code != 400:
        return False
    err = r.json()["error"]
    return bool(err["code"] == "bad_request" and param in err["message"])


async def _all_400(gw: RunningGateway, token: str, template: str, param: str, values: dict[str, str]) -> None:
    failures = Failures()
    for name, value in values.items():
        r = await _get(gw, token, template.format(value))
        failures.check(name, _is_400(r, param), (r.status_code, r.text[:200]))
    assert not failures, f"{template}:\n{failures}"


@pytest.fixture(autouse=True)
def no_unhandled_errors(caplog: pytest.LogCaptureFixture) -> object:
    """Nothing the gateway logs at ERROR (an "Exception in ASGI application", a crashed task)."""
    caplog.set_level(logging.ERROR)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# --- GET /v1/history ------------------------------------------------------------------------------


async def test_history_scope(gw: RunningGateway, token: str) -> None:
    await _all_400(gw, token, "/v1/history?scope={}", "scope", _values(SCOPES, extra={"wildcard": "*"}))


async def test_history_after(gw: RunningGateway, token: str) -> None:
    await _all_400(gw, token, "/v1/history?scope=conversation:c1&after={}", "after", NUMBERS)


async def test_history_limit(gw: RunningGateway, token: str) -> None:
    extra = {"zero": "0", "above the maximum": "1001"}
    await _all_400(gw, token, "/v1/history?scope=conversation:c1&limit={}", "limit", _values(NUMBERS, extra=extra))


# --- GET /v1/scopes -------------------------------------------------------------------------------


async def test_scopes_after(gw: RunningGateway, token: str) -> None:
    # an empty `after` is the first page
    await _all_400(gw, token, "/v1/scopes?after={}", "after", _values(SCOPES, drop=("empty",)))


async def test_scopes_limit(gw: RunningGateway, token: str) -> None:
    await _all_400(gw, token, "/v1/scopes?limit={}", "limit", _values(NUMBERS, extra={"zero": "0"}))


# --- GET /v1/inbox ---------------------------------------------------------------------------------


async def test_inbox_after(gw: RunningGateway, token: str) -> None:
    await _all_400(gw, token, "/v1/inbox?after={}", "after", NUMBERS)


async def test_inbox_limit(gw: RunningGateway, token: str) -> None:
    extra = {"zero": "0", "above the maximum": str(INBOX_MAX_LIMIT + 1)}
    await _all_400(gw, token, "/v1/inbox?limit={}", "limit", _values(NUMBERS, extra=extra))


# --- GET /v1/presence ------------------------------------------------------------------------------


async def test_presence_scope(gw: RunningGateway, token: str) -> None:
    await _all_400(gw, token, "/v1/presence?scope={}", "scope", _values(SCOPES, extra={"wildcard": "*"}))


# Values for a flag parameter (`presence`, `listed`, `compact`): only `true` and `false` are (`parse_flag`).
FLAGS = {"yes": "yes", "upper case": "TRUE", "one": "1", "zero": "0", "two": "2", "trailing newline": "true%0A",
         "NUL": "1%00", "unicode one": "%EF%BC%91", "invalid UTF-8": "%FF", "very long": "t" * 10000, "empty": ""}


async def test_sse_flags(gw: RunningGateway, token: str) -> None:
    for param in ("presence", "listed", "compact"):
        await _all_400(gw, token, f"/v1/sse?scope=conversation:c1&{param}={{}}", param, FLAGS)


# --- GET /v1/sse ----------------------------------------------------------------------------------


async def test_sse_scope(gw: RunningGateway, token: str) -> None:
    # `scope=` (empty) only means no subscription yet
    await _all_400(gw, token, "/v1/sse?scope={}", "scope", _values(SCOPES, drop=("empty",)))


async def test_sse_since(gw: RunningGateway, token: str) -> None:
    # `since=` (empty) means no cursor
    await _all_400(gw, token, "/v1/sse?scope=conversation:c1&since={}", "since", _values(NUMBERS, drop=("empty",)))


HEADER_VALUES = {  # what a Last-Event-ID header can carry (no NUL or newline: HTTP itself forbids them)
    "latin-1 superscript two": "\xb2",
    "5000 digits": "9" * 5000,
    "20 digits": "9" * 20,
    "negative": "-1",
    "leading plus": "+1",
    "exponent": "1e3",
    "path traversal": "../../etc",
    "very long": "x" * 6000,
}


async def test_sse_last_event_id(gw: RunningGateway, token: str) -> None:
    failures = Failures()
    async with httpx.AsyncClient(base_url=gw.http, timeout=30) as c:
        for name, value in HEADER_VALUES.items():
            headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": value.encode("latin-1")}
            r = await c.get("/v1/sse?scope=conversation:c1", headers=headers)  # type: ignore[arg-type]
            failures.check(name, _is_400(r, "since"), (r.status_code, r.text[:200]))
    assert not failures, str(failures)


# --- GET /v1/agui ---------------------------------------------------------------------------------


async def test_agui_scope(gw: RunningGateway, token: str) -> None:
    extra = {"wildcard": "*", "two scopes": "conversation:c1,conversation:c2"}
    await _all_400(gw, token, "/v1/agui?scope={}", "scope", _values(SCOPES, extra=extra))


async def test_agui_since(gw: RunningGateway, token: str) -> None:
    await _all_400(gw, token, "/v1/agui?scope=conversation:c1&since={}", "since", NUMBERS)


async def test_agui_last_event_id(gw: RunningGateway, token: str) -> None:
    failures = Failures()
    async with httpx.AsyncClient(base_url=gw.http, timeout=30) as c:
        for name, value in HEADER_VALUES.items():
            headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": value.encode("latin-1")}
            r = await c.get("/v1/agui?scope=conversation:c1", headers=headers)  # type: ignore[arg-type]
            failures.check(name, _is_400(r, "Last-Event-ID"), (r.status_code, r.text[:200]))
    assert not failures, str(failures)


# --- WS /v1/ws URL parameters ---------------------------------------------------------------------


async def _ws_all_refused(gw: RunningGateway, token: str, template: str, param: str, values: dict[str, str]) -> None:
    """Each URL is refused with close 4400 and a reason naming the parameter (nothing else is sent first)."""
    failures = Failures()
    for name, value in values.items():
        ws = await connect(f"{gw.ws}?{template.format(value)}", token)
        frames = []
        try:
            while True:
                frames.append(await ws.recv())
        except ConnectionClosed as closed:
            rcvd = closed.rcvd
            failures.check(name, not frames and rcvd is not None and rcvd.code == 4400 and param in rcvd.reason,
                           (rcvd, frames[:1]))
    assert not failures, f"{template}:\n{failures}"


async def test_ws_url_scope(gw: RunningGateway, token: str) -> None:
    await _ws_all_refused(gw, token, "scope={}", "scope", _values(SCOPES, drop=("empty",)))


async def test_ws_url_since(gw: RunningGateway, token: str) -> None:
    await _ws_all_refused(gw, token, "scope=conversation:c1&since={}", "since", _values(NUMBERS, drop=("empty",)))


async def test_ws_url_flags(gw: RunningGateway, token: str) -> None:
    for param in ("presence", "listed", "compact"):
        await _ws_all_refused(gw, token, f"scope=conversation:c1&{param}={{}}", param, FLAGS)


# --- no harmed neighbour --------------------------------------------------------------------------


async def test_a_neighbour_keeps_receiving_while_hostile_requests_are_refused(
    gw: RunningGateway, token: str, platform: Platform
) -> None:
    ws = await connect(f"{gw.ws}?scope=conversation:c1", token)
    await welcome(ws)
    await recv_type(ws, "subscribed")
    for name, value in NUMBERS.items():
        assert _is_400(await _get(gw, token, f"/v1/history?scope=conversation:c1&limit={value}"), "limit")
        assert _is_400(await _get(gw, token, f"/v1/sse?scope=conversation:c1&since={value or 'x'}"), "since")
        seq = await platform.publish("acme", "conversation:c1", data={"after": name})
        assert [f["seq"] for f in await events(ws, 1)] == [seq]
    await ws.close()
