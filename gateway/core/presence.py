"""Presence: who is watching each scope now, and which agents are active in it, one truth cluster-wide.

A *member* of a scope is a principal with at least one connection whose explicit subscription to the
scope is allowed and listed (`listed: false` watches without being listed); members are principal ids,
so several connections (tabs, instances) of one user are one member. *Agents* are the runs of the scope
between their `run.started` and `run.finished` events. A connection that subscribed with
`presence: true` receives the scope's `presence` frames: a snapshot after `subscribed`, then deltas.

Every instance contributes an *entry* per scope (its own members and the runs its consumer saw) through
the presence bucket (gateway/core/presence_kv.py does the I/O); the view of a scope is the union of the
entries of all live instances, so clients on any instance see the same members and agents. Changes are
coalesced per scope: at most one delta per `WSGATEWAY_PRESENCE_FLUSH_MS`, whatever the number of joins
and leaves in between, and frames list at most `WSGATEWAY_PRESENCE_MAX_MEMBERS` members (the first by
id; `count` is exact). Presence frames reach only connections allowed to see the scope, and a
connection that loses the scope leaves it.

This module is pure state (no NATS); the hub owns it and calls the small interface below from the
places where subscriptions change (`watch`, `settle`, `unwatch`, `drop`, `permission`) and for run
events (`on_run`); the KV side calls `apply`, `heartbeat`, `sweep` and `entries`.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from gateway.core.queue import OutFrame, control
from gateway.events import KINDS, NAME_RE
from gateway.principal import Principal, profile_name, profile_picture
from gateway.protocol import INBOX, WILDCARD, kept_json

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.core.connection import Connection
    from gateway.events import Envelope
    from gateway.metrics import Metrics

Key = tuple[str, str]  # (tenant, scope)
RUN_EDGES = frozenset({"run.started", "run.finished"})
MAX_RUNS_PER_SCOPE = 1024  # runs remembered per scope (a publisher that never finishes its runs is bounded)
MAX_ENTRY_MEMBERS = 10_000  # members one entry names (well under NATS's 1 MB payload); the rest are counted
_ID_MAX = 256
INSTANCE_RE = re.compile(r"[0-9a-f]{32}")


class Member(NamedTuple):
    name: str | None
    picture: str | None


class Agent(NamedTuple):
    agent_id: str | None
    since: str  # the `time` of run.started (RFC 3339)


def member_row(pid: str, m: Member, n: int) -> bytes:
    """One member of an encoded entry: `[id, name, picture, connections]`."""
    return kept_json([pid, m.name, m.picture, n])  # one per member, kept: its own size


class Entry:
    """One instance's contribution to one scope: its listed members (with connection counts) and runs;
    `extra`: members beyond MAX_ENTRY_MEMBERS, only counted. `rows`: the members already encoded
    (`member_row`, same keys and order), which this instance keeps for its own entries: a big scope
    with joins and leaves is re-encoded on every flush, and building 10,000 rows each time was a
    tenth of a handshake's CPU at 15,000 connections."""

    __slots__ = ("agents", "extra", "members", "rows")

    def __init__(self, members: dict[str, tuple[Member, int]] | None = None,
                 agents: dict[str, Agent] | None = None, extra: int = 0,
                 rows: dict[str, bytes] | None = None) -> None:
        self.members = members or {}
        self.agents = agents or {}
        self.extra = extra
        self.rows = rows

    def __bool__(self) -> bool:
        return bool(self.members or self.agents or self.extra)

    def encode(self) -> bytes:
        """`{"m": [rows], "a": [[run_id, agent_id, since]], "x": more}`, "x" only when members are left out."""
        named = min(len(self.members), MAX_ENTRY_MEMBERS)
        rest: dict[str, Any] = {"a": [[rid, a.agent_id, a.since] for rid, a in self.agents.items()]}
        if len(self.members) > named or self.extra:
            rest["x"] = self.extra + len(self.members) - named
        rows = self.rows
        if rows is None or len(rows) != len(self.members):
            rows = {pid: member_row(pid, m, n) for pid, (m, n) in itertools.islice(self.members.items(), named)}
        return b'{"m":[' + b",".join(itertools.islice(rows.values(), named)) + b"]," + orjson.dumps(rest)[1:]

    @classmethod
    def decode(cls, raw: bytes) -> Entry | None:
        """An entry as another instance wrote it; None when it is not one (the bucket is input too)."""
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict):
            return None
        if not isinstance(doc.get("m", []), list) or not isinstance(doc.get("a", []), list):
            return None
        members: dict[str, tuple[Member, int]] = {}
        for item in doc.get("m", []):
            if not (isinstance(item, list) and len(item) == 4 and _ident(item[0]) and type(item[3]) is int
                    and item[3] > 0):
                return None
            members[item[0]] = (Member(profile_name(item[1]), profile_picture(item[2])), item[3])
        agents: dict[str, Agent] = {}
        for item in doc.get("a", []):
            if not (isinstance(item, list) and len(item) == 3 and _ident(item[0]) and isinstance(item[2], str)
                    and len(item[2]) <= 64):
                return None
            agents[item[0]] = Agent(item[1] if _ident(item[1]) else None, item[2])
        extra = doc.get("x", 0)
        if not isinstance(extra, int) or isinstance(extra, bool) or not 0 <= extra <= 10**9:
            return None
        return cls(members, agents, extra)


def _ident(v: object) -> bool:
    return isinstance(v, str) and 0 < len(v) <= _ID_MAX


class State(NamedTuple):
    """What the clients of a scope were told: the listed members and agents, and the member count."""

    total: int  # members, listed or not
    members: dict[str, Member]
    agents: dict[str, Agent]


def member_json(pid: str, m: Member) -> dict[str, str]:
    out = {"id": pid}
    if m.name is not None:
        out["name"] = m.name
    if m.picture is not None:
        out["picture"] = m.picture
    return out


def agent_json(run_id: str, a: Agent) -> dict[str, str]:
    out = {"run_id": run_id, "since": a.since}
    if a.agent_id is not None:
        out["agent_id"] = a.agent_id
    return out


def state_json(scope: str, s: State) -> dict[str, Any]:
    """The snapshot's fields (the `presence` snapshot frame and GET /v1/presence)."""
    return {
        "scope": scope, "count": s.total,
        "members": [member_json(pid, m) for pid, m in s.members.items()],
        "agents": [agent_json(rid, a) for rid, a in s.agents.items()],
    }


def delta_frame(scope: str, old: State, new: State) -> OutFrame | None:
    """One `presence` delta from what clients were told to what is true now; None when nothing changed."""
    joined = [member_json(pid, m) for pid, m in new.members.items() if pid not in old.members]
    left = [pid for pid in old.members if pid not in new.members]
    started = [agent_json(rid, a) for rid, a in new.agents.items() if rid not in old.agents]
    finished = [rid for rid in old.agents if rid not in new.agents]
    if not (joined or left or started or finished) and new.total == old.total:
        return None
    return control("presence", scope=scope, count=new.total, joined=joined or None, left=left or None,
                   agents_started=started or None, agents_finished=finished or None)


def kv_key(instance: str, key: Key) -> str:
    """The bucket key of one instance's entry for a scope: `m.<instance>.<tenant>.<kind>.<id>`."""
    tenant, scope = key
    kind, _, rid = scope.partition(":")
    return f"m.{instance}.{tenant}.{kind}.{rid}"


def parse_kv_key(text: str) -> tuple[str, Key] | None:
    """(instance, (tenant, scope)) of an entry key; None when it is none."""
    parts = text.split(".")
    if len(parts) != 5 or parts[0] != "m" or not INSTANCE_RE.fullmatch(parts[1]):
        return None
    _, inst, tenant, kind, rid = parts
    if kind not in KINDS or not NAME_RE.fullmatch(tenant) or not NAME_RE.fullmatch(rid):
        return None
    return inst, (tenant, f"{kind}:{rid}")


class Watch:
    """One connection's presence wishes for one scope, and what they currently amount to."""

    __slots__ = ("counted", "frames", "listed", "receiving", "snapshot_due")

    def __init__(self) -> None:
        self.listed = True  # appear among the scope's members
        self.frames = False  # receive the scope's presence frames
        self.counted = False  # currently counted as a member (allowed and listed)
        self.receiving = False  # currently among the scope's receivers
        self.snapshot_due = False  # send a snapshot when the subscription is (again) allowed


class Presence:
    """Presence state of one gateway process (see the module docstring)."""

    def __init__(self, send: Callable[[Connection, OutFrame], None], settings: Settings, metrics: Metrics,
                 *, instance: str | None = None) -> None:
        self.send = send  # the hub's: queue a frame behind what is queued, schedule a write
        self.instance = instance or uuid.uuid4().hex
        self.flush_s = settings.presence_flush_ms / 1000
        self.cap = settings.presence_max_members
        self.ttl_s = settings.presence_ttl_s
        self.metrics = metrics
        self.watches: dict[Connection, dict[str, Watch]] = {}
        self.local: dict[Key, dict[str, tuple[Member, int]]] = {}  # pid -> (Member, connections)
        self.rows: dict[Key, dict[str, bytes]] = {}  # pid -> member_row, as `local` (what Entry.encode joins)
        self.runs: dict[Key, dict[str, Agent]] = {}
        self.view: dict[Key, dict[str, Entry]] = {}  # instance -> entry, this instance's included
        self.receivers: dict[Key, dict[Connection, None]] = {}
        self.sent: dict[Key, State] = {}
        self.seen: dict[str, float] = {}  # other instance -> monotonic time it was last heard of
        self.keys_of: dict[str, set[Key]] = {}  # other instance -> the scopes it has entries for
        self.publish: Callable[[Key, bytes | None], None] | None = None  # the KV side: write our entry
        self.synced = False  # the bucket was read once: the view includes the other instances
        self._dirty_local: set[Key] = set()
        self._dirty_view: set[Key] = set()
        self._timer: asyncio.TimerHandle | None = None
        self.listed_connections = 0

    # --- subscriptions (called by the hub, the session and the replayer) --------------------------

    def watch(self, conn: Connection, scope: str, *, listed: bool, frames: bool, settle: bool = True) -> None:
        """A subscription was made (or answered again) with these presence wishes. `settle=False`: the
        subscription starts with a replay, which settles it once registered (snapshot after `subscribed`)."""
        if scope in (WILDCARD, INBOX) or conn.closed or (settle and scope not in conn.subs):
            return
        w = self.watches.setdefault(conn, {}).get(scope)
        if w is None:
            w = self.watches[conn][scope] = Watch()
        w.listed, w.frames = listed, frames
        w.snapshot_due = frames
        if settle:
            self._settle(conn, scope, w)

    def settle(self, conn: Connection, scopes: list[str]) -> None:
        """The replay registered its subscriptions: apply the watches that waited for them."""
        mine = self.watches.get(conn)
        if mine is None:
            return
        for scope in scopes:
            w = mine.get(scope)
            if w is not None:
                self._settle(conn, scope, w)

    def permission(self, conn: Connection, scope: str) -> None:
        """The decision of a subscription changed (ACL change, refresh): join or leave accordingly."""
        w = self.watches.get(conn, {}).get(scope)
        if w is not None:
            self._settle(conn, scope, w)

    def unwatch(self, conn: Connection, scope: str) -> None:
        mine = self.watches.get(conn)
        w = mine.pop(scope, None) if mine is not None else None
        if w is not None:
            self._release(conn, (conn.principal.tenant, scope), w)
            if not mine:
                del self.watches[conn]

    def drop(self, conn: Connection) -> None:
        """The connection is gone: it leaves every scope."""
        tenant = conn.principal.tenant
        for scope, w in self.watches.pop(conn, {}).items():
            self._release(conn, (tenant, scope), w)

    def _settle(self, conn: Connection, scope: str, w: Watch) -> None:
        sub = conn.subs.get(scope)
        key = (conn.principal.tenant, scope)
        if sub is None or conn.closed:  # refused at the limit, or gone: nothing to watch
            self._release(conn, key, w)
            mine = self.watches.get(conn)
            if mine is not None and mine.get(scope) is w:
                del mine[scope]
                if not mine:
                    del self.watches[conn]
            return
        if not sub.allowed:
            self._release(conn, key, w)
            w.snapshot_due = w.frames  # a grant starts over with a snapshot
            return
        if w.listed and not w.counted:
            self._join(key, conn.principal)
            w.counted = True
        elif not w.listed and w.counted:
            self._leave(key, conn.principal.name)
            w.counted = False
        if w.frames:
            if not w.receiving:
                self.receivers.setdefault(key, {})[conn] = None
                w.receiving = True
            if w.snapshot_due:
                w.snapshot_due = False
                self._snapshot(conn, key)
        elif w.receiving:
            self._stop_receiving(conn, key)
            w.receiving = False

    def _release(self, conn: Connection, key: Key, w: Watch) -> None:
        if w.counted:
            self._leave(key, conn.principal.name)
            w.counted = False
        if w.receiving:
            self._stop_receiving(conn, key)
            w.receiving = False

    def _stop_receiving(self, conn: Connection, key: Key) -> None:
        rec = self.receivers.get(key)
        if rec is not None:
            rec.pop(conn, None)
            if not rec:
                del self.receivers[key]
                self.sent.pop(key, None)

    def _join(self, key: Key, p: Principal) -> None:
        members = self.local.setdefault(key, {})
        pid = p.name
        item = members.get(pid)
        members[pid] = item = (Member(p.display_name, p.picture), 1) if item is None else (item[0], item[1] + 1)
        self.rows.setdefault(key, {})[pid] = member_row(pid, *item)
        self.listed_connections += 1
        self.metrics.presence_members.inc()
        self._touch(key)

    def _leave(self, key: Key, pid: str) -> None:
        members = self.local.get(key)
        item = members.get(pid) if members is not None else None
        if members is None or item is None:
            return
        rows = self.rows[key]
        if item[1] > 1:
            members[pid] = item = (item[0], item[1] - 1)
            rows[pid] = member_row(pid, *item)
        else:
            del members[pid], rows[pid]
            if not members:
                del self.local[key], self.rows[key]
        self.listed_connections -= 1
        self.metrics.presence_members.dec()
        self._touch(key)

    # --- agents -------------------------------------------------------------------------------

    def on_run(self, env: Envelope) -> None:
        """`run.started` / `run.finished` (the hub's dispatch, for every such event of the stream)."""
        rid = env.run_id
        if rid is None:
            return
        key = (env.tenant, env.scope)
        if env.type == "run.started":
            runs = self.runs.setdefault(key, {})
            agent_id = env.data.get("agent_id")
            runs.pop(rid, None)
            runs[rid] = Agent(agent_id if _ident(agent_id) else None, env.time.isoformat().replace("+00:00", "Z"))
            if len(runs) > MAX_RUNS_PER_SCOPE:
                del runs[next(iter(runs))]
        else:
            ended = self.runs.get(key)
            if ended is None or ended.pop(rid, None) is None:
                return
            if not ended:
                del self.runs[key]
        self._touch(key)

    # --- the cluster (called by the KV side) --------------------------------------------------

    def apply(self, instance: str, key: Key, entry: Entry | None, now: float) -> None:
        """Another instance's entry for a scope (None: it has none any more)."""
        if instance == self.instance:
            return
        self.seen[instance] = now
        entries = self.view.get(key)
        if entry:
            if entries is None:
                entries = self.view[key] = {}
            entries[instance] = entry
            self.keys_of.setdefault(instance, set()).add(key)
        else:
            if entries is not None:
                entries.pop(instance, None)
                if not entries:
                    del self.view[key]
            keys = self.keys_of.get(instance)
            if keys is not None:
                keys.discard(key)
        self._dirty_view.add(key)
        self._schedule()

    def grace(self, now: float) -> None:
        """Nobody could be heard (this instance's NATS connection was down): every instance gets a fresh TTL."""
        for inst in self.seen:
            self.seen[inst] = now

    def heartbeat(self, instance: str, now: float) -> None:
        if instance != self.instance:
            self.seen[instance] = now

    def forget(self, instance: str) -> list[Key]:
        """Drop an instance and its entries (dead); returns the scopes it had entries for."""
        self.seen.pop(instance, None)
        keys = self.keys_of.pop(instance, set())
        for key in keys:
            entries = self.view.get(key)
            if entries is not None:
                entries.pop(instance, None)
                if not entries:
                    del self.view[key]
            self._dirty_view.add(key)
        if keys:
            self._schedule()
        return sorted(keys)

    def sweep(self, now: float) -> dict[str, list[Key]]:
        """Instances not heard of for the TTL are dead: their members leave. Returns {instance: its scopes}."""
        dead = [inst for inst, t in self.seen.items() if now - t > self.ttl_s]
        return {inst: self.forget(inst) for inst in dead}

    def alive(self) -> list[str]:
        """The instances known alive, this one included, sorted."""
        return sorted({self.instance, *self.seen})

    def entries(self) -> dict[Key, bytes]:
        """This instance's current entries, encoded (a full re-write after a reconnect)."""
        out = {}
        for key in set(self.local) | set(self.runs):
            entry = self._own(key)
            if entry:
                out[key] = entry.encode()
        return out

    def entry_of(self, key: Key) -> bytes | None:
        """This instance's current entry for one scope, encoded (None: it has none)."""
        entry = self._own(key)
        return entry.encode() if entry else None

    # --- reading -------------------------------------------------------------------------------

    def state(self, key: Key) -> State:
        """The scope's presence as the union of every live instance's entry (this one's as of the last flush)."""
        members: dict[str, Member] = {}
        agents: dict[str, Agent] = {}
        extra = 0
        for entry in self.view.get(key, {}).values():
            extra += entry.extra
            for pid, (m, _) in entry.members.items():
                members.setdefault(pid, m)
            for rid, a in entry.agents.items():
                agents.setdefault(rid, a)
        listed = {pid: members[pid] for pid in sorted(members)[: self.cap]}
        running = dict(sorted(agents.items(), key=lambda kv: (kv[1].since, kv[0]))[: self.cap])
        return State(len(members) + extra, listed, running)

    def current(self, tenant: str, scope: str) -> dict[str, Any]:
        """GET /v1/presence: the snapshot of a scope, now."""
        return state_json(scope, self.state((tenant, scope)))

    def _snapshot(self, conn: Connection, key: Key) -> None:
        state = self.sent.get(key)
        if state is None:  # the first receiver: what it is told now is what the next delta starts from
            state = self.sent[key] = self.state(key)
        self.metrics.presence_snapshots.inc()
        self.send(conn, control("presence", snapshot=True, **state_json(key[1], state)))

    # --- flushing ------------------------------------------------------------------------------

    def _touch(self, key: Key) -> None:
        self._dirty_local.add(key)
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (in-process use): the caller flushes
            self._timer = loop.call_later(self.flush_s, self.flush)

    def _own(self, key: Key) -> Entry:
        # the live dicts, not copies: the view sees this instance's changes at once, and memory holds them once
        return Entry(self.local.get(key), self.runs.get(key), rows=self.rows.get(key))

    def flush(self) -> int:
        """Publish this instance's changed entries and send one delta per changed scope; returns frames queued."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for key in self._dirty_local:
            entry = self._own(key)
            entries = self.view.get(key)
            if entry:
                if entries is None:
                    entries = self.view[key] = {}
                entries[self.instance] = entry
            elif entries is not None:
                entries.pop(self.instance, None)
                if not entries:
                    del self.view[key]
            if self.publish is not None:
                self.publish(key, entry.encode() if entry else None)
            self._dirty_view.add(key)
        self._dirty_local.clear()
        frames = 0
        for key in self._dirty_view:
            receivers = self.receivers.get(key)
            old = self.sent.get(key)
            if not receivers or old is None:
                continue
            new = self.state(key)
            frame = delta_frame(key[1], old, new)
            if frame is None:
                continue
            self.sent[key] = new
            scope = key[1]
            for c in list(receivers):  # a copy: sending never changes the set today; the loop must not care
                sub = c.subs.get(scope)
                if sub is not None and sub.allowed:
                    self.send(c, frame)
                    frames += 1
        self._dirty_view.clear()
        if frames:
            self.metrics.presence_deltas.inc(frames)
        self.metrics.presence_scopes.set(len(self.view))
        return frames


__all__ = [
    "RUN_EDGES", "Agent", "Entry", "Member", "Presence", "State", "kv_key",
    "parse_kv_key",
]
