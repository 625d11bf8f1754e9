"""The gateway's metrics after real traffic: every metric a dashboard panel or an alert rule queries is
really exported, each one the traffic should move has moved, and label values come from fixed sets only.

One real gateway (uvicorn, real nats-server, real tokens) gets the traffic the dashboards and alerts are
about: WebSocket clients receiving events of every kind, an SSE stream, a denied delivery, bad and
expired tokens (WebSocket and SSE), a bad URL parameter, an invalid event, bad client frames, a resume
with replay, a history request, and a slow client that is coalesced and then disconnected. Many users
and scopes take part, so a label per user, scope or connection would show up in the scrape.

The dashboards' and rules' metric names come from dashboards/grafana/*.json and dashboards/prometheus/
*.yaml as they are on disk (tests/support/promql.py); wsgateway_operator_* metrics are checked against a
running operator in tests/operator/test_operator_metrics.py.
"""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth import AUTH_FAILURE_REASONS
from gateway.devtools.natsproc import NatsProcess
from gateway.events import InvalidEvent
from gateway.metrics import CONNECTION_OUTCOMES, FRAME_ERROR_CODES, KIND_LABELS, LATENCY_BUCKETS, REPLAY_SOURCES
from tests.support.gateway import STALLED_HEARTBEAT_S, RunningGateway, run_gateway
from tests.support.idp import TestIdP
from tests.support.platform import Platform
from tests.support.promql import queried_metrics
from tests.support.wsclient import closed, connect, connect_stalled, events, recv, recv_type, subscribe, welcome

# label -> allowed values, per metric family (as the parser names them: counters without _total)
ALLOWED_LABELS: dict[str, dict[str, frozenset[str]]] = {
    "wsgateway_connection_attempts": {"outcome": frozenset(CONNECTION_OUTCOMES)},
    "wsgateway_auth_failures": {"reason": frozenset(AUTH_FAILURE_REASONS)},
    "wsgateway_delivery_latency_seconds": {
        "kind": frozenset(KIND_LABELS),
        "le": frozenset({*(str(float(b)) for b in LATENCY_BUCKETS), "+Inf"}),
    },
    "wsgateway_events_invalid": {"reason": frozenset(InvalidEvent.REASONS)},
    "wsgateway_client_frames_rejected": {"code": frozenset(FRAME_ERROR_CODES)},
    "wsgateway_replays": {"source": frozenset(REPLAY_SOURCES)},
}
USERS = ("alice", "mia", "bob", "carol", "dave")
TARGET, LIMIT = 1234, 500


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = float(s.value)
    return out


def value(scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in scraped.items() if n == name and set(labels.items()) <= set(ls))


async def make_traffic(g: RunningGateway, idp: TestIdP, platform: Platform) -> None:
    await platform.grant("acme.org", {"admins": ["user:alice"]})
    await platform.grant("acme.conversation.c1", {"members": [f"user:{u}" for u in USERS[1:]]})
    await platform.applied(idp, g)

    # live delivery of every kind to several users, one connection per (user, kind)
    clients = []
    for i, user in enumerate(USERS):
        ws = await connect(g.ws, idp.mint(user, groups=[f"team-{i}"]))
        await welcome(ws)
        assert (await subscribe(ws, "conversation:c1"))["type"] == "subscribed"
        clients.append(ws)
    admin = await connect(f"{g.ws}?scope=process:p1,agent:a1", idp.mint("alice"))
    await welcome(admin)
    await recv_type(admin, "subscribed")
    await recv_type(admin, "subscribed")
    for scope in ("conversation:c1", "process:p1", "agent:a1"):
        await platform.publish("acme", scope)
    for ws in clients:
        await events(ws, 1)
    await events(admin, 2)

    # a denied delivery: mia's pending subscription to a scope she may not see
    mia = clients[1]
    assert (await subscribe(mia, "process:secret", rid="x"))["code"] == "forbidden"
    await platform.publish("acme", "process:secret")

    # an invalid event, bad client frames (bad_request, read_only)
    await platform.publish_raw("events.acme.conversation.c1", b"{not json")
    await mia.send("hello")
    assert (await recv_type(mia, "error"))["code"] == "bad_request"
    await mia.send(json.dumps({"op": "publish", "id": 1, "scope": "conversation:c1"}))
    assert (await recv_type(mia, "error"))["code"] == "read_only"

    # refused tokens and a bad URL parameter (WebSocket), a refused and an accepted SSE stream
    for token in ("not-a-jwt", idp.mint("alice", exp_in=-120)):
        ws = await connect(g.ws, token)
        assert (await closed(ws))[0] == 4401
    ws = await connect(f"{g.ws}?since=-1", idp.mint("alice"))
    assert (await closed(ws))[0] == 4400
    async with httpx.AsyncClient(timeout=5) as http:
        refused = await http.get(f"{g.http}/v1/sse", headers={"Authorization": "Bearer nope"})
        assert refused.status_code == 401
        headers = {"Authorization": f"Bearer {idp.mint('carol')}"}
        async with http.stream("GET", f"{g.http}/v1/sse?scope=conversation:c1", headers=headers) as stream:
            assert stream.status_code == 200
            async for chunk in stream.aiter_bytes():
                assert b"welcome" in chunk
                break
        # replay: a history page and a resume from the start
        page = await http.get(f"{g.http}/v1/history?scope=conversation:c1", headers=headers)
        assert page.status_code == 200 and page.json()["events"]
    resumed = await connect(f"{g.ws}?scope=conversation:c1&since=0", idp.mint("dave"))
    await welcome(resumed)
    await recv_type(resumed, "subscribed")
    assert (await events(resumed, 1))[0]["event"]["scope"] == "conversation:c1"

    # a slow client: deltas are coalesced in its queue, then lifecycle events overflow it (4429)
    slow = await connect_stalled(f"{g.ws}?scope=process:slow", idp.mint("alice"))
    for _ in range(40):
        for _ in range(25):
            await platform.publish("acme", "process:slow", type="run.message.delta", run_id="r1",
                                   data={"message_id": "m1", "delta": "x" * 200})
        if await g.metric("wsgateway_events_coalesced_total"):
            break
    for i in range(2000):
        await platform.publish("acme", "process:slow", type="run.message.started", run_id=f"r{i}",
                               data={"message_id": f"m{i}"})
        if i % 25 == 0 and await g.metric("wsgateway_slow_client_disconnects_total"):
            break
    slow.transport.resume_reading()
    assert (await closed(slow))[0] == 4429

    for ws in [*clients, admin, resumed]:
        await ws.close()
    await g.metric_reaches("wsgateway_connections", 0)  # every client is counted out


@pytest.mark.timeout(120)
async def test_dashboards_and_alerts_query_exported_metrics_with_bounded_labels(
    nats_server: NatsProcess, idp: TestIdP, platform: Platform
) -> None:
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience, queue_max_messages=20,
                           socket_send_buffer=4096, connections_target=TARGET, max_connections=LIMIT,
                           heartbeat_s=STALLED_HEARTBEAT_S) as g:
        await make_traffic(g, idp, platform)
        await g.metric_reaches("wsgateway_consumer_lag", 0)  # the consumer watchdog's refresh, without events
        text = await g.metrics_text()
    scraped = samples(text)
    names = {name for name, _ in scraped}

    # 1. every metric a dashboard or a rule file queries is exported
    queried = queried_metrics(prefix="")
    ours = {m: files for m, files in queried.items() if not m.startswith("wsgateway_operator_")}
    assert ours, "no dashboard or rule queries a gateway metric: dashboards/ is missing?"
    missing = {m: sorted(files) for m, files in ours.items() if m not in names}
    assert not missing, f"queried but not exported: {missing}"

    # 2. the traffic moved what it should (a metric that is exported but never updated fails here)
    for outcome in CONNECTION_OUTCOMES:
        assert value(scraped, "wsgateway_connection_attempts_total", outcome=outcome) > 0, outcome
    assert value(scraped, "wsgateway_connection_attempts_total", outcome="unauthorized") == 3  # 2 WS + 1 SSE
    assert value(scraped, "wsgateway_auth_failures_total", reason="malformed") >= 2
    assert value(scraped, "wsgateway_auth_failures_total", reason="expired") == 1
    for kind in KIND_LABELS:
        assert value(scraped, "wsgateway_delivery_latency_seconds_count", kind=kind) > 0, kind
    for name in ("wsgateway_events_received_total", "wsgateway_events_delivered_total",
                 "wsgateway_events_denied_total", "wsgateway_events_coalesced_total",
                 "wsgateway_events_replayed_total", "wsgateway_slow_client_disconnects_total"):
        assert value(scraped, name) > 0, name
    assert value(scraped, "wsgateway_events_invalid_total", reason="json") == 1
    for code in FRAME_ERROR_CODES:
        assert value(scraped, "wsgateway_client_frames_rejected_total", code=code) == 1, code
    assert value(scraped, "wsgateway_nats_connected") == 1
    assert value(scraped, "wsgateway_connections") == 0 and value(scraped, "wsgateway_subscriptions") == 0
    assert value(scraped, "wsgateway_connections_limit") == LIMIT
    assert value(scraped, "wsgateway_connections_target") == TARGET
    assert ("wsgateway_consumer_lag", ()) in scraped and value(scraped, "wsgateway_consumer_lag") == 0

    # 3. label names and values from fixed sets only: no label per user, tenant, scope or connection
    for family in text_string_to_metric_families(text):
        allowed = ALLOWED_LABELS.get(family.name.removesuffix("_created"), {})  # _created: a family of its own
        for s in family.samples:
            for label, v in s.labels.items():
                assert label in allowed, f"{s.name}: unexpected label {label}={v!r}"
                assert v in allowed[label], f"{s.name}: {label}={v!r} is not one of the fixed values"
    assert all(name.startswith("wsgateway_") for name in names)
    for user in (*USERS, "acme", "c1", "secret"):
        assert user not in "".join(f"{ls}" for _, ls in scraped), user


async def test_connections_and_subscriptions_gauges_follow_clients(
    gw: RunningGateway, idp: TestIdP, platform: Platform
) -> None:
    """The gauges the autoscaler and the dashboards read go up and back down (SSE counted too)."""
    await platform.grant("acme.org", {"admins": ["user:alice"]})
    await platform.applied(idp, gw)
    ws = await connect(f"{gw.ws}?scope=conversation:a,conversation:b", idp.mint("alice"))
    await welcome(ws)
    await recv(ws)
    await recv(ws)
    headers = {"Authorization": f"Bearer {idp.mint('alice')}"}
    async with httpx.AsyncClient(timeout=5) as http, http.stream(
        "GET", f"{gw.http}/v1/sse?scope=process:p", headers=headers
    ) as stream:
        chunks, seen = stream.aiter_bytes(), b""  # (leaving an `async for` would close the stream)
        while b"event: subscribed" not in seen:
            seen += await anext(chunks)
        assert await gw.metric("wsgateway_connections") == 2
        assert await gw.metric("wsgateway_subscriptions") == 3
    await ws.close()
    await gw.metric_reaches("wsgateway_connections", 0)
    assert await gw.metric("wsgateway_subscriptions") == 0
    assert await gw.metric("wsgateway_connections_target") == 0  # not set: exported as 0
    # the limit in force: WSGATEWAY_MAX_CONNECTIONS, or less where ulimit -n leaves less (config.fit_open_file_limit)
    assert await gw.metric("wsgateway_connections_limit") == gw.gateway.settings.max_connections


async def test_consumer_lag_is_refreshed_without_events(gw: RunningGateway) -> None:
    """The lag gauge follows the consumer even when no event arrives to update it (the watchdog's
    consumer info, every second): a stale value would hide a stalled consumer, or keep an alert firing."""
    gw.gateway.metrics.consumer_lag.set(12345)  # as if the last event had seen a backlog
    assert await gw.metric("wsgateway_consumer_lag") == 12345
    await gw.metric_reaches("wsgateway_consumer_lag", 0)
