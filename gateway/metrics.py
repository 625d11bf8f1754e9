"""Prometheus metrics of one gateway: names and labels are part of the product (docs/operations.md).

Every gateway object gets its `Metrics` passed in (no module-level globals), so tests can run several
gateways in one process. With several worker processes (`wsgateway serve --workers N`), the values live
in prometheus_client's multiprocess files and `/metrics` sums the workers.
"""

from __future__ import annotations

import os
from bisect import bisect_left

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.events import KINDS, InvalidEvent
from gateway.principal import AUTH_FAILURE_REASONS
from gateway.protocol import ERR_BAD_REQUEST, ERR_READ_ONLY

# Fine enough to read p50/p99 anywhere between 1 ms and 5 s.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
)
KIND_LABELS = KINDS  # the `kind` label of wsgateway_delivery_latency_seconds
# accepted: joined the hub; unauthorized: no valid token; rejected: over the connection limit or a bad URL.
CONNECTION_OUTCOMES = ("accepted", "unauthorized", "rejected")
# Codes of client frames answered with an `error` frame (the label of wsgateway_client_frames_rejected_total).
FRAME_ERROR_CODES = (ERR_BAD_REQUEST, ERR_READ_ONLY)
REPLAY_SOURCES = ("window", "stream")  # the `source` label of wsgateway_replays_total


class WeightedHistogram(Histogram):
    """A Histogram that can record one value observed by many deliveries in one call.

    Fan-out writes the same event to thousands of sockets in one flush; observing once per socket
    would cost more than the write. `observe_many(v, n)` adds n observations of v.
    """

    def observe_many(self, amount: float, count: int) -> None:
        self._raise_if_not_observable()
        self._sum.inc(amount * count)
        i = bisect_left(self._upper_bounds, amount)
        self._buckets[i].inc(count)


class Metrics:
    """All gateway metrics, registered in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = None if self.multiprocess else self.registry

        self.connections = Gauge(
            "wsgateway_connections", "Open authenticated connections (WebSocket and SSE).",
            registry=reg, multiprocess_mode="livesum",
        )
        # Capacity next to the load (dashboards, alerts): set once at start-up from the settings.
        self.connections_limit = Gauge(
            "wsgateway_connections_limit",
            "Configured connection limit (WSGATEWAY_MAX_CONNECTIONS) summed over the live worker processes.",
            registry=reg, multiprocess_mode="livesum",
        )
        self.connections_target = Gauge(
            "wsgateway_connections_target",
            "Autoscaling target of open connections per pod (WSGATEWAY_CONNECTIONS_TARGET; 0: not set).",
            registry=reg, multiprocess_mode="livemax",
        )
        self.connection_attempts = Counter(
            "wsgateway_connection_attempts_total", "WebSocket and SSE connection attempts by outcome.",
            ["outcome"], registry=reg,
        )
        self.auth_failures = Counter(
            "wsgateway_auth_failures_total", "Rejected tokens by reason.", ["reason"], registry=reg
        )
        self.delivery_latency = WeightedHistogram(
            "wsgateway_delivery_latency_seconds",
            "Time from the event's envelope time to the socket write, per delivery.",
            ["kind"], buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.events_received = Counter(
            "wsgateway_events_received", "Events read from JetStream.", registry=reg
        )
        self.events_delivered = Counter(
            "wsgateway_events_delivered", "Event frames written to client sockets.", registry=reg
        )
        self.events_denied = Counter(
            "wsgateway_events_denied", "Deliveries withheld from a subscriber by the permission check.",
            registry=reg,
        )
        self.events_invalid = Counter(
            "wsgateway_events_invalid", "Events that failed validation and were never delivered.",
            ["reason"], registry=reg,
        )
        self.events_coalesced = Counter(
            "wsgateway_events_coalesced", "Queued frames merged or dropped by slow-client coalescing.",
            registry=reg,
        )
        self.events_replayed = Counter(
            "wsgateway_events_replayed", "Events sent from JetStream history (resume, SSE resume).",
            registry=reg,
        )
        self.replays = Counter(
            "wsgateway_replays", "Resume replays by where their events came from: window (memory) or stream "
            "(JetStream, for all or the rest of the range).", ["source"], registry=reg,
        )
        self.slow_client_disconnects = Counter(
            "wsgateway_slow_client_disconnects", "Connections closed with 4429 because they fell behind.",
            registry=reg,
        )
        self.frames_compressed = Counter(
            "wsgateway_frames_compressed", "Server frames compressed for permessage-deflate clients (once per "
            "frame, whatever the number of compressing recipients).", registry=reg,
        )
        self.client_frames_rejected = Counter(
            "wsgateway_client_frames_rejected", "Client frames answered with an error, by code.",
            ["code"], registry=reg,
        )
        self.subscriptions = Gauge(
            "wsgateway_subscriptions", "Active subscriptions (including pending ones).",
            registry=reg, multiprocess_mode="livesum",
        )
        self.nats_connected = Gauge(
            "wsgateway_nats_connected", "1 while the NATS connection is up.",
            registry=reg, multiprocess_mode="livemin",
        )
        self.consumer_lag = Gauge(
            "wsgateway_consumer_lag", "Stream messages not yet delivered to this instance's consumer.",
            registry=reg, multiprocess_mode="livemax",
        )
        self.presence_members = Gauge(
            "wsgateway_presence_members", "Connections listed in the presence of a scope (one per listed "
            "subscription), on this process.", registry=reg, multiprocess_mode="livesum",
        )
        self.presence_scopes = Gauge(
            "wsgateway_presence_scopes", "Scopes with presence (watchers or active agents) in this process's "
            "cluster-wide view.", registry=reg, multiprocess_mode="livemax",
        )
        self.presence_instances = Gauge(
            "wsgateway_presence_instances", "Gateway processes alive in the presence bucket, as this one sees them.",
            registry=reg, multiprocess_mode="livemax",
        )
        self.presence_snapshots = Counter(
            "wsgateway_presence_snapshots", "Presence snapshot frames queued to clients.", registry=reg,
        )
        self.presence_deltas = Counter(
            "wsgateway_presence_deltas", "Presence delta frames queued to clients (one per receiver and flush).",
            registry=reg,
        )
        self.presence_kv_writes = Counter(
            "wsgateway_presence_kv_writes", "This process's presence entries written to (or deleted from) the bucket.",
            registry=reg,
        )
        self.presence_kv_errors = Counter(
            "wsgateway_presence_kv_errors", "Presence bucket writes that failed (retried).", registry=reg,
        )
        # Pre-create labelled children so every series exists from the start (rates work, alerts see 0).
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)
        for outcome in CONNECTION_OUTCOMES:
            self.connection_attempts.labels(outcome)
        self.connections_accepted = self.connection_attempts.labels("accepted")  # counted on every handshake
        for invalid in InvalidEvent.REASONS:
            self.events_invalid.labels(invalid)
        for code in FRAME_ERROR_CODES:
            self.client_frames_rejected.labels(code)
        self.latency_by_kind = {k: self.delivery_latency.labels(k) for k in KIND_LABELS}

    def set_capacity(self, max_connections: int, connections_target: int) -> None:
        """This process's connection limit and the per-pod autoscaling target (start-up, from Settings)."""
        self.connections_limit.set(max_connections)
        self.connections_target.set(connections_target)

    def exposition(self) -> tuple[bytes, str]:
        """Body and content type for GET /metrics."""
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
