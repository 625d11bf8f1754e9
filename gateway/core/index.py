"""The subscription index and the permission flags: who wants which scope, and who may see it.

Permissions are decided when a subscription is made and again whenever the ACL of its tenant changes
(or the connection's token is refreshed), so fan-out reads a boolean, not the ACL. `*` subscriptions
decide per scope on first sight and cache the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple

from gateway.core.inbox import Inbox, InboxSubscription
from gateway.permissions import AclStore
from gateway.protocol import INBOX, WILDCARD

if TYPE_CHECKING:
    from prometheus_client import Gauge

    from gateway.core.connection import Connection
    from gateway.events import Envelope


class Subscription:
    """A connection's interest in one scope; `allowed` is the cached permission decision."""

    __slots__ = ("allowed", "conn", "key", "kind", "resource_id", "scope")

    def __init__(self, conn: Connection, scope: str, kind: str, resource_id: str, allowed: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.kind = kind
        self.resource_id = resource_id
        self.allowed = allowed
        self.key = (conn.principal.tenant, scope)


class WildSubscription:
    """A `*` subscription: every scope of the tenant the principal may see, decided per scope and cached."""

    __slots__ = ("conn", "decisions")

    MAX_CACHED = 4096

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.decisions: dict[str, bool] = {}


AnySubscription = Subscription | WildSubscription | InboxSubscription


class Change(NamedTuple):
    """A permission decision that changed: the scope was revoked, or (re)granted."""

    conn: Connection
    scope: str
    allowed: bool


def allowed_conns(subs: dict[Subscription, None]) -> list[Connection]:
    """The connections of a scope's subscriptions allowed to see it (compiled: gateway.core.fastpath)."""
    return [sub.conn for sub in subs if sub.allowed]


class SubscriptionIndex:
    """Subscriptions by (tenant, scope), by tenant, the `*` subscriptions by tenant, and the inbox."""

    def __init__(self, acl: AclStore, max_subscriptions: int, gauge: Gauge) -> None:
        self.acl = acl
        self.max_subscriptions = max_subscriptions
        self.gauge = gauge  # wsgateway_subscriptions, maintained incrementally
        self.by_scope: dict[tuple[str, str], dict[Subscription, None]] = {}
        self.by_tenant: dict[str, dict[Subscription, None]] = {}
        self.wild: dict[str, dict[WildSubscription, None]] = {}
        self.inbox = Inbox(acl)  # the `inbox` subscriptions and the request registry (gateway/core/inbox.py)
        # a scope's allowed connections: `gateway.core.fastpath`'s loop (the hub sets the one it uses)
        self.allowed: Callable[[dict[Subscription, None]], list[Connection]] = allowed_conns

    def add(self, conn: Connection, scope: str) -> AnySubscription | None:
        """Register interest in a scope (idempotent); None when the connection is at its limit."""
        if scope == WILDCARD:
            if conn.wild is None:
                conn.wild = WildSubscription(conn)
                self.wild.setdefault(conn.principal.tenant, {})[conn.wild] = None
                self.gauge.inc()
            return conn.wild
        if scope == INBOX:
            inbox, made = self.inbox.add(conn)
            if made:
                self.gauge.inc()
            return inbox
        sub = conn.subs.get(scope)
        if sub is None:
            if len(conn.subs) >= self.max_subscriptions:
                return None
            kind, _, rid = scope.partition(":")
            allowed = self.acl.may_see(conn.principal, conn.principal.tenant, kind, rid)
            sub = Subscription(conn, scope, kind, rid, allowed)
            conn.subs[scope] = sub
            self.by_scope.setdefault(sub.key, {})[sub] = None
            self.by_tenant.setdefault(sub.key[0], {})[sub] = None
            self.gauge.inc()
        return sub

    def remove(self, conn: Connection, scope: str) -> None:
        if scope == WILDCARD:
            if conn.wild is not None:
                self._drop_wild(conn.wild)
                conn.wild = None
            return
        if scope == INBOX:
            if self.inbox.remove(conn):
                self.gauge.dec()
            return
        sub = conn.subs.pop(scope, None)
        if sub is not None:
            self._drop(sub)

    def remove_all(self, conn: Connection) -> None:
        for sub in conn.subs.values():
            self._drop(sub)
        conn.subs.clear()
        if conn.wild is not None:
            self._drop_wild(conn.wild)
            conn.wild = None
        if self.inbox.remove(conn):
            self.gauge.dec()

    def _drop(self, sub: Subscription) -> None:
        scoped = self.by_scope.get(sub.key)
        if scoped is not None and sub in scoped:
            del scoped[sub]
            self.gauge.dec()
            if not scoped:
                del self.by_scope[sub.key]
        tenant = sub.key[0]
        of_tenant = self.by_tenant.get(tenant)
        if of_tenant is not None and sub in of_tenant:
            del of_tenant[sub]
            if not of_tenant:
                del self.by_tenant[tenant]

    def _drop_wild(self, w: WildSubscription) -> None:
        tenant = w.conn.principal.tenant
        entries = self.wild.get(tenant)
        if entries is not None and w in entries:
            del entries[w]
            self.gauge.dec()
            if not entries:
                del self.wild[tenant]

    def targets(self, env: Envelope) -> tuple[list[Connection], int]:
        """The connections allowed to see an event (a connection may appear twice: a scope and `*`),
        and how many subscriptions were denied it."""
        tenant, scope = env.tenant, env.scope
        subs = self.by_scope.get((tenant, scope))
        wild = self.wild.get(tenant)
        targets = self.allowed(subs) if subs else []
        denied = len(subs) - len(targets) if subs else 0
        if wild:
            kind, rid = env.kind, env.resource_id
            for w in wild:
                ok = w.decisions.get(scope)
                if ok is None:
                    ok = self.acl.may_see(w.conn.principal, tenant, kind, rid)
                    if len(w.decisions) >= w.MAX_CACHED:
                        w.decisions.clear()
                    w.decisions[scope] = ok
                if ok:
                    targets.append(w.conn)
                else:
                    denied += 1
        if self.inbox.subs:
            denied += self.inbox.targets(env, targets)
        return targets, denied

    def tenants(self) -> set[str]:
        return set(self.by_tenant) | set(self.wild) | self.inbox.tenants()

    def recheck(self, conns: Iterable[Connection] = (), tenant: str | None = None) -> list[Change]:
        """Re-decide permissions after an ACL change (a tenant) or a token refresh (connections).

        Returns the decisions that changed; `*` subscriptions report only revocations (a newly visible
        scope simply starts delivering)."""
        conns = list(conns)
        subs: list[Subscription] = []
        wilds: list[WildSubscription] = []
        if tenant is not None:
            subs.extend(self.by_tenant.get(tenant, {}))
            wilds.extend(self.wild.get(tenant, {}))
        for c in conns:
            subs.extend(c.subs.values())
            if c.wild is not None:
                wilds.append(c.wild)
        acl = self.acl
        changes: list[Change] = []
        for sub in subs:
            c = sub.conn
            now = acl.may_see(c.principal, c.principal.tenant, sub.kind, sub.resource_id)
            if now != sub.allowed:
                sub.allowed = now
                changes.append(Change(c, sub.scope, now))
        for w in wilds:
            c = w.conn
            old = w.decisions
            w.decisions = {}
            for scope, was in old.items():
                kind, _, rid = scope.partition(":")
                now = acl.may_see(c.principal, c.principal.tenant, kind, rid)
                w.decisions[scope] = now
                if was and not now:
                    changes.append(Change(c, scope, False))
        changes.extend(Change(c, scope, False) for c, scope in self.inbox.recheck(conns, tenant))
        return changes


__all__ = ["AnySubscription", "Change", "Subscription", "SubscriptionIndex", "WildSubscription", "allowed_conns"]
