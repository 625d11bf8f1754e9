"""Permissions: default deny, hierarchical, live (docs/permissions.md).

ACL documents live in a NATS KV bucket written by the platform's REST services:

    <tenant>.org                 {"admins": [...]}
    <tenant>.project.<id>        {"admins": [...], "viewers": [...]}
    <tenant>.<kind>.<id>         {"project": "<id>", "members": [...], "owner": "..."}

Entries are principal ids, `user:<sub>` or `group:<name>` (a bare name means `user:<name>`).
A principal may see scope `<kind>:<id>` of tenant T iff it belongs to T and it is an org admin of T,
or an admin or viewer of the scope's project, or the owner or a member of the scope. Anything else,
including a missing or unreadable document, is denied.

`AclStore` is the in-memory copy the hot path reads (a dict lookup or three per decision);
`watch_acl` keeps it in step with the bucket and reports which tenant changed, so the hub re-checks
only that tenant's subscriptions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Strict, StringConstraints, ValidationError

from gateway.events import KINDS, NAME_PATTERN
from gateway.principal import Principal

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

log = logging.getLogger(__name__)


def principal_id(entry: str) -> str:
    """An ACL list entry as a principal id: `user:<sub>` or `group:<name>` (a bare name is a user)."""
    return entry if ":" in entry else f"user:{entry}"


def _principal_ids(entries: frozenset[str]) -> frozenset[str]:
    return frozenset(principal_id(e) for e in entries)


PrincipalList = Annotated[
    frozenset[Annotated[str, StringConstraints(min_length=1, max_length=300)]],
    Strict(False),  # the container only: a JSON list becomes the set; the entries stay strict strings
    AfterValidator(_principal_ids),
]
"""A JSON list of principal ids, held as a frozenset of `user:`/`group:` ids (decisions are set
intersections); a string or an object where a list belongs makes the document unreadable."""


class _Doc(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class OrgAcl(_Doc):
    admins: PrincipalList = frozenset()


class ProjectAcl(_Doc):
    admins: PrincipalList = frozenset()
    viewers: PrincipalList = frozenset()


class ResourceAcl(_Doc):
    project: Annotated[str, StringConstraints(pattern=NAME_PATTERN)] | None = None
    members: PrincipalList = frozenset()
    owner: Annotated[str, StringConstraints(min_length=1, max_length=300), AfterValidator(principal_id)] | None = None


def parse_doc(key: str, value: bytes) -> OrgAcl | ProjectAcl | ResourceAcl | None:
    """Parse one bucket entry; None (and a warning) when key or body is unusable: fail closed."""
    parts = key.split(".")
    try:
        body = orjson.loads(value) if value else {}
        if len(parts) == 2 and parts[1] == "org":
            return OrgAcl.model_validate(body)
        if len(parts) == 3 and parts[1] == "project":
            return ProjectAcl.model_validate(body)
        if len(parts) == 3 and parts[1] in KINDS:
            return ResourceAcl.model_validate(body)
    except (orjson.JSONDecodeError, ValidationError, TypeError) as exc:
        log.warning("ACL entry %r is unreadable, treated as absent (deny): %s", key, str(exc)[:200])
        return None
    log.warning("ACL key %r does not name an org, project or scope; ignored", key)
    return None


class AclStore:
    """In-memory ACL documents keyed like the bucket."""

    def __init__(self) -> None:
        self.docs: dict[str, OrgAcl | ProjectAcl | ResourceAcl] = {}
        self.scopes: dict[str, set[str]] = {}  # tenant -> scopes that have a resource document

    def apply(self, key: str, value: bytes | None) -> str:
        """Put (value) or delete (None) one entry; returns the tenant it belongs to."""
        doc = parse_doc(key, value) if value is not None else None
        tenant, _, rest = key.partition(".")
        scope = rest.replace(".", ":", 1)
        if doc is None:
            self.docs.pop(key, None)
            if tenant in self.scopes:
                self.scopes[tenant].discard(scope)
        else:
            self.docs[key] = doc
            if isinstance(doc, ResourceAcl):
                self.scopes.setdefault(tenant, set()).add(scope)
        return tenant

    def adopt(self, other: AclStore) -> None:
        """Take over another store's documents at once (the watcher's fully loaded staging copy)."""
        self.docs, self.scopes = other.docs, other.scopes

    def may_see(self, principal: Principal, tenant: str, kind: str, resource_id: str) -> bool:
        if principal.tenant != tenant:
            return False
        ids = principal.ids
        org = self.docs.get(f"{tenant}.org")
        if isinstance(org, OrgAcl) and not ids.isdisjoint(org.admins):
            return True
        res = self.docs.get(f"{tenant}.{kind}.{resource_id}")
        if not isinstance(res, ResourceAcl):
            return False
        if (res.owner is not None and res.owner in ids) or not ids.isdisjoint(res.members):
            return True
        if res.project:
            proj = self.docs.get(f"{tenant}.project.{res.project}")
            if isinstance(proj, ProjectAcl) and (
                not ids.isdisjoint(proj.admins) or not ids.isdisjoint(proj.viewers)
            ):
                return True
        return False

    def is_org_admin(self, principal: Principal) -> bool:
        org = self.docs.get(f"{principal.tenant}.org")
        return isinstance(org, OrgAcl) and not principal.ids.isdisjoint(org.admins)

    def visible_scopes(self, principal: Principal, after: str = "", limit: int = 100) -> list[tuple[str, str]]:
        """Scopes of the principal's tenant that have a document and that the principal may see, sorted,
        after `after`, at most `limit`: ``[(scope, why)]``. `may_see` decides; `why` only explains it.

        Org admins also see every scope *without* a document; those cannot be listed (see
        `is_org_admin`). Cost: the tenant's scopes are sorted per call (the index is per tenant)."""
        tenant = principal.tenant
        out: list[tuple[str, str]] = []
        for scope in sorted(self.scopes.get(tenant, ())):
            if scope <= after:
                continue
            kind, _, rid = scope.partition(":")
            if self.may_see(principal, tenant, kind, rid):
                out.append((scope, self.why(principal, kind, rid) or "allowed"))
                if len(out) >= limit:
                    break
        return out

    def why(self, principal: Principal, kind: str, resource_id: str) -> str | None:
        """Which rule of the decision lets the principal see the scope (None: denied); for people, not for
        the hot path, which only needs `may_see`."""
        tenant, ids = principal.tenant, principal.ids
        if self.is_org_admin(principal):
            return "org admin"
        res = self.docs.get(f"{tenant}.{kind}.{resource_id}")
        if not isinstance(res, ResourceAcl):
            return None
        if res.owner is not None and res.owner in ids:
            return f"owner ({res.owner})"
        if not ids.isdisjoint(res.members):
            return f"member ({min(ids & res.members)})"
        proj = self.docs.get(f"{tenant}.project.{res.project}") if res.project else None
        if isinstance(proj, ProjectAcl):
            if not ids.isdisjoint(proj.admins):
                return f"admin of project {res.project} ({min(ids & proj.admins)})"
            if not ids.isdisjoint(proj.viewers):
                return f"viewer of project {res.project} ({min(ids & proj.viewers)})"
        return None


OnChange = Callable[[str | None], None]
"""Called with the tenant whose documents changed, or None after the initial load (re-check all)."""


async def watch_acl(kv: KeyValue, store: AclStore, on_change: OnChange, ready: asyncio.Event) -> None:
    """Follow the bucket forever: initial values first (then `ready` is set), then every change.

    The initial values are loaded into a staging copy and swapped in at
    once, so a re-started watch (after a NATS restart) never passes through a half-loaded, deny-all state;
    after the swap every subscription is re-decided (on_change(None)).
    """
    watcher = await kv.watchall()
    staging: AclStore | None = AclStore()
    try:
        async for entry in watcher:
            if entry is None:  # end of initial values
                if staging is not None:
                    store.adopt(staging)
                    staging = None
                ready.set()
                on_change(None)
                continue
            deleted = entry.operation in ("DEL", "PURGE")
            target = staging if staging is not None else store
            tenant = target.apply(entry.key, None if deleted else entry.value)
            if staging is None:
                on_change(tenant)
    finally:
        await watcher.stop()
