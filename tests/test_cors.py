"""CORS (WSGATEWAY_CORS_ORIGINS): pages of listed origins may call GET /v1/history, /v1/scopes, /v1/sse and /v1/agui.

HTTP-level checks of preflights and response headers against a real gateway, the settings rule (`*` and
anything that is not an exact origin refuse start-up), and headless Chromium calling the gateway from
pages of two other origins: one listed (fetch with an Authorization header and EventSource with
`access_token` work), one not (both fail, and Chromium says it was the CORS policy).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import ConfigError, Settings, load_settings
from gateway.devtools.natsproc import NatsProcess
from tests.support.browser import ensure_browser, run_driver_async
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.ports import free_port

APP = "http://127.0.0.1:5173"  # listed
OTHER = "http://127.0.0.1:5174"  # not listed
ADMIN = {"admins": ["user:alice"]}
CORS_PATHS = ["/v1/history?scope=conversation:c1", "/v1/scopes", "/v1/inbox", "/v1/presence?scope=conversation:c1",
              "/v1/sse?scope=conversation:c1",
              "/v1/agui?scope=conversation:c1"]
WSGATEWAY = str(Path(sys.executable).parent / "wsgateway")


def _cors_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.lower().startswith("access-control-")}


def _vary(r: httpx.Response) -> set[str]:
    return {v.strip().lower() for v in r.headers.get("vary", "").split(",") if v.strip()}


@pytest.fixture
async def cors_gw(nats_server: NatsProcess, idp: TestIdP) -> AsyncIterator[RunningGateway]:
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience,
                           cors_origins=f"{APP}, https://app.example.com") as g:
        yield g


async def _get(c: httpx.AsyncClient, path: str, headers: dict[str, str]) -> httpx.Response:
    """GET `path`; for the endpless SSE stream only its status and headers (the body is not read)."""
    if path.startswith(("/v1/sse", "/v1/agui")):
        async with c.stream("GET", path, headers=headers) as r:
            return r
    return await c.get(path, headers=headers)


# --- preflight -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CORS_PATHS)
@pytest.mark.parametrize("requested", [None, "authorization", "last-event-id", "authorization,last-event-id",
                                       "Authorization, Last-Event-ID"])
async def test_preflight_from_a_listed_origin_allows_get_with_authorization_and_last_event_id(
    cors_gw: RunningGateway, path: str, requested: str | None
) -> None:
    headers = {"Origin": APP, "Access-Control-Request-Method": "GET"}
    if requested is not None:
        headers["Access-Control-Request-Headers"] = requested
    async with httpx.AsyncClient(base_url=cors_gw.http) as c:
        r = await c.options(path, headers=headers)
    assert r.status_code == 204 and r.content == b""
    assert _cors_headers(r) == {
        "access-control-allow-origin": APP,
        "access-control-allow-methods": "GET",
        "access-control-allow-headers": "Authorization, Last-Event-ID",
        "access-control-max-age": "600",
    }
    assert {"origin", "access-control-request-method", "access-control-request-headers"} <= _vary(r)


@pytest.mark.parametrize(
    ("method", "requested", "named"),
    [("POST", None, "'POST'"), ("DELETE", "authorization", "'DELETE'"), ("get", None, "'get'"),
     ("GET", "authorization,x-requested-with", "'x-requested-with'"), ("GET", "content-type", "'content-type'")],
)
async def test_a_preflight_for_anything_else_is_refused_with_a_clear_error_and_no_cors_header(
    cors_gw: RunningGateway, method: str, requested: str | None, named: str
) -> None:
    headers = {"Origin": APP, "Access-Control-Request-Method": method}
    if requested is not None:
        headers["Access-Control-Request-Headers"] = requested
    async with httpx.AsyncClient(base_url=cors_gw.http) as c:
        r = await c.options("/v1/history?scope=conversation:c1", headers=headers)
    assert r.status_code == 400 and _cors_headers(r) == {}
    error = r.json()["error"]
    assert error["code"] == "bad_request" and named in error["message"] and "CORS preflight" in error["message"]


@pytest.mark.parametrize("path", CORS_PATHS)
async def test_an_unlisted_origin_gets_no_cors_header_on_its_preflight(cors_gw: RunningGateway, path: str) -> None:
    async with httpx.AsyncClient(base_url=cors_gw.http) as c:
        for origin in (OTHER, "https://app.example.com.evil.test", "null", APP.upper(), APP + "/"):
            r = await c.options(path, headers={"Origin": origin, "Access-Control-Request-Method": "GET",
                                               "Access-Control-Request-Headers": "authorization"})
            assert r.status_code == 405 and _cors_headers(r) == {}, origin  # what OPTIONS gets without CORS


# --- responses -----------------------------------------------------------------------------------


async def test_responses_to_a_listed_origin_echo_it_with_vary_origin(
    cors_gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, cors_gw)
    seq = await platform.publish("acme", "conversation:c1")
    auth = {"Authorization": f"Bearer {idp.mint('alice')}"}
    async with httpx.AsyncClient(base_url=cors_gw.http) as c:
        for origin in (APP, "https://app.example.com"):
            for path in CORS_PATHS:
                r = await _get(c, path, {**auth, "Origin": origin})
                assert r.status_code == 200, (path, r.status_code)
                assert _cors_headers(r) == {"access-control-allow-origin": origin}, path  # never credentials
                assert "origin" in _vary(r), path
            history = await c.get("/v1/history?scope=conversation:c1", headers={**auth, "Origin": origin})
            assert [e["seq"] for e in history.json()["events"]] == [seq]
        # errors too: the page can read why it was refused
        for path in CORS_PATHS:
            r = await _get(c, path, {"Origin": APP})
            assert r.status_code == 401 and _cors_headers(r) == {"access-control-allow-origin": APP}, path
        sse = await _get(c, "/v1/sse?scope=conversation:c1&since=%C2%B2", {**auth, "Origin": APP})
        assert sse.status_code == 400 and sse.headers["access-control-allow-origin"] == APP


async def test_an_unlisted_origin_gets_the_answer_but_no_cors_header(
    cors_gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    await platform.grant("acme.org", ADMIN)
    await platform.applied(idp, cors_gw)
    auth = {"Authorization": f"Bearer {idp.mint('alice')}"}
    async with httpx.AsyncClient(base_url=cors_gw.http) as c:
        for path in CORS_PATHS:
            for headers in ({**auth, "Origin": OTHER}, auth, {"Origin": OTHER}):
                r = await _get(c, path, headers)
                assert r.status_code in (200, 401) and _cors_headers(r) == {}, (path, headers.keys())
                assert "origin" in _vary(r)  # the answer depends on Origin: caches must not mix them


async def test_other_paths_never_get_cors_headers(cors_gw: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=cors_gw.http) as c:
        for path in ("/readyz", "/healthz", "/metrics", "/", "/static/viewer.js", "/v1/historyx", "/openapi.json"):
            r = await c.get(path, headers={"Origin": APP})
            assert r.status_code in (200, 404) and _cors_headers(r) == {}, path
            pre = await c.options(path, headers={"Origin": APP, "Access-Control-Request-Method": "GET"})
            assert _cors_headers(pre) == {}, path


async def test_cors_is_off_by_default(gw: RunningGateway, idp: TestIdP) -> None:
    assert gw.settings.cors_origins is None
    async with httpx.AsyncClient(base_url=gw.http) as c:
        for path in CORS_PATHS:
            pre = await c.options(path, headers={"Origin": APP, "Access-Control-Request-Method": "GET"})
            assert pre.status_code == 405 and _cors_headers(pre) == {}
            r = await _get(c, path, {"Origin": APP, "Authorization": f"Bearer {idp.mint('alice')}"})
            assert _cors_headers(r) == {}


# --- the setting ---------------------------------------------------------------------------------


def _settings(**kw: Any) -> Settings:
    return Settings(oidc_issuer="https://idp.example.com", **kw)


def test_origins_are_normalized_exact_origins() -> None:
    s = _settings(cors_origins=" HTTPS://App.Example.com , http://127.0.0.1:5173,,https://app.example.com,http://[::1]:8080")
    assert s.cors_origin_list == ("https://app.example.com", "http://127.0.0.1:5173", "http://[::1]:8080")
    assert _settings().cors_origin_list == () and _settings(cors_origins=" , ").cors_origin_list == ()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("*", "'*' is not allowed: list the exact origins"),
        ("https://app.example.com,*", "'*' is not allowed"),
        ("null", "'null' is not allowed"),
        ("https://app.example.com/", "no path and no trailing slash"),
        ("https://app.example.com/app", "no path"),
        ("app.example.com", "is not an origin"),
        ("ftp://files.example.com", "with http or https"),
        ("https://*.example.com", "is not an origin"),
        ("https://app.example.com:443", "drop the default port 443"),
        ("http://app.example.com:80", "drop the default port 80"),
        ("http://127.0.0.1:70000", "the port must be between 1 and 65535"),
    ],
)
def test_anything_but_exact_origins_refuses_start_up_naming_the_variable(
    value: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.upper().startswith("WSGATEWAY_") and n != "WSGATEWAY_GC_GEN0_THRESHOLD"]:
        monkeypatch.delenv(name)
    with pytest.raises(ConfigError) as err:
        load_settings(oidc_issuer="https://idp.example.com", cors_origins=value)
    [line] = err.value.problems
    assert line.startswith("WSGATEWAY_CORS_ORIGINS: ") and says in line, line


def test_serve_with_a_wildcard_origin_exits_2_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATEWAY_")}
    env.update({"WSGATEWAY_OIDC_ISSUER": "http://127.0.0.1:1", "WSGATEWAY_NATS_URL": "nats://127.0.0.1:1",
                "WSGATEWAY_CORS_ORIGINS": "*"})
    out = subprocess.run([WSGATEWAY, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "wsgateway serve: WSGATEWAY_CORS_ORIGINS: '*' is not allowed: list the exact origins, "
        "e.g. https://app.example.com"
    ]


# --- headless Chromium from pages of other origins ---------------------------------------------------


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><meta charset=utf-8><title>another origin</title><p>an app of another origin</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _page_server(port: int) -> Iterator[str]:
    """A tiny page on its own loopback port: an origin other than the gateway's."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _Page)
    thread = threading.Thread(target=server.serve_forever, name=f"page-{port}", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.timeout(180)
async def test_chromium_reads_the_apis_from_a_listed_origin_and_not_from_another(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform, tmp_path: Path
) -> None:
    ensure_browser()
    with _page_server(free_port()) as listed, _page_server(free_port()) as other:
        async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, cors_origins=listed) as g:
            await platform.grant("acme.org", ADMIN)
            await platform.applied(idp, g)
            await platform.publish("acme", "conversation:c1")
            seq = await platform.publish("acme", "conversation:c1")
            config = {"gateway": g.http, "token": idp.mint("alice", exp_in=600), "scope": "conversation:c1",
                      "seq": seq, "pages": {"listed": f"{listed}/", "other": f"{other}/"}}
            out = await run_driver_async("cors.mjs", config, tmp_path, timeout=150)
    assert out["problems"] == [], out["problems"]

    ok = out["listed"]
    assert ok["origin"] == listed
    assert ok["history"] == {"status": 200, "seqs": [seq - 1, seq]}
    assert ok["scopes"] == {"status": 200, "principal": "user:alice"}
    assert ok["sseFetch"] == {"status": 200, "firstId": seq}  # preflighted: Authorization + Last-Event-ID
    assert ok["eventSource"] == {"welcome": True, "lastEventId": str(seq), "seq": seq}
    assert not [line for line in ok["console"] if "CORS" in line], ok["console"]

    refused = out["other"]
    assert refused["origin"] == other
    for probe in ("history", "scopes", "sseFetch"):
        assert "TypeError" in refused[probe].get("error", ""), (probe, refused[probe])  # fetch rejects
    assert refused["eventSource"] == {"welcome": False, "error": "closed", "readyState": 2}
    blocked = [line for line in refused["console"] if "blocked by CORS policy" in line]
    assert len(blocked) >= 4, refused["console"]  # Chromium says why: each of the four requests
