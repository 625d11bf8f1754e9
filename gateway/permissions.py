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
from collections.abc import Awaitable, Callable
from typing import Annotated

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints, ValidationError

from gateway.auth import Principal

log = logging.getLogger(__name__)


def _principal_id(entry: str) -> str:
    return entry if ":" in entry else f"user:{entry}"


PrincipalList = Annotated[
    list[Annotated[str, StringConstraints(min_length=1, max_length=300)]],
    AfterValidator(lambda entries: frozenset(_principal_id(e) for e in entries)),
]
"""A JSON list of principal ids; a string or an object where a list belongs makes the document unreadable."""


class _Doc(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class OrgAcl(_Doc):
    admins: PrincipalList = frozenset()  # type: ignore[assignment]


class ProjectAcl(_Doc):
    admins: PrincipalList = frozenset()  # type: ignore[assignment]
    viewers: PrincipalList = frozenset()  # type: ignore[assignment]


class ResourceAcl(_Doc):
    project: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,128}$")] | None = None
    members: PrincipalList = frozenset()  # type: ignore[assignment]
    owner: Annotated[str, StringConstraints(min_length=1, max_length=300), AfterValidator(_principal_id)] | None = None


def parse_doc(key: str, value: bytes) -> OrgAcl | ProjectAcl | ResourceAcl | None:
    """Parse one bucket entry; None (and a warning) when key or body is unusable: fail closed."""
    parts = key.split(".")
    try:
        body = orjson.loads(value) if value else {}
        if len(parts) == 2 and parts[1] == "org":
            return OrgAcl.model_validate(body)
        if len(parts) == 3 and parts[1] == "project":
            return ProjectAcl.model_validate(body)
        if len(parts) == 3 and parts[1] in ("conversation", "process", "agent"):
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
        self.loaded = False

    def apply(self, key: str, value: bytes | None) -> str:
        """Put (value) or delete (None) one entry; returns the tenant it belongs to."""
        doc = parse_doc(key, value) if value is not None else None
        if doc is None:
            self.docs.pop(key, None)
        else:
            self.docs[key] = doc
        return key.split(".", 1)[0]

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


OnChange = Callable[[str | None], None]
"""Called with the tenant whose documents changed, or None after the initial load (re-check all)."""


async def watch_acl(kv: object, store: AclStore, on_change: OnChange, ready: asyncio.Event) -> None:
    """Follow the bucket forever: initial values first (then `ready` is set), then every change.

    `kv` is a nats.js.kv.KeyValue. The initial values are loaded into a staging copy and swapped in at
    once, so a re-started watch (after a NATS restart) never passes through a half-loaded, deny-all state;
    after the swap every subscription is re-decided (on_change(None)).
    """
    watcher = await kv.watchall()  # type: ignore[attr-defined]
    staging: AclStore | None = AclStore()
    try:
        async for entry in watcher:
            if entry is None:  # end of initial values
                if staging is not None:
                    store.docs = staging.docs
                    staging = None
                store.loaded = True
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


AclChangeHandler = Callable[[str], Awaitable[None] | None]
