"""A Kubernetes API server for the operator tests: kmock's emulator plus what a real API server does and
kmock 0.8 does not, added here faithfully rather than worked around in the operator:

* names from metadata.generateName (kopf's Events); metadata.uid, creationTimestamp, generation and
  resourceVersion on create; resourceVersion bumped on every write and generation when the spec
  changes (kopf patches with a JSON-patch `test` on the resourceVersion; the status uses generations);
* CRD defaulting for WebSocketGateways (the defaults of the generated CRD's schema, applied on create
  and update like the API server's structural defaulting);
* lists with a resourceVersion and watches that start from it (kmock replays all objects as ADDED);
* `/api/v1/namespaces[/<name>]` (kmock parses `namespaces` as the namespace path segment and fails
  with a 500, so kopf could not list namespaces).

Not emulated (the tests do that part of the cluster by hand): controllers (Deployments get no pods and
no status unless a test writes them), garbage collection of children by ownerReferences, label
selectors on lists (the operator filters by labels itself), server-side apply (the operator does not
use it), admission (CRD schema and CEL validation are tested directly in test_crd.py).
"""

from __future__ import annotations

import copy
import datetime
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import jsonpatch
import kmock
from kmock._internal import dicts, enums, parsing, rendering

from wsgateway_operator.crd import build_crd

GATEWAYS = "wsgateway.dev/v1alpha1/websocketgateways"


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: absent properties with a default get it (and
    are then defaulted themselves); present objects and array items are defaulted recursively."""
    if not isinstance(value, dict) or schema.get("type") != "object":
        if isinstance(value, list) and isinstance(schema.get("items"), dict):
            return [apply_defaults(schema["items"], v) for v in value]
        return value
    out = dict(value)
    for name, prop in (schema.get("properties") or {}).items():
        if name not in out and "default" in prop:
            out[name] = copy.deepcopy(prop["default"])
        if name in out:
            out[name] = apply_defaults(prop, out[name])
    return out


def crd_root_schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


_original_parse_path = parsing.parse_path


def parse_path_with_namespaces(path: str) -> parsing.ParsedPath:
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None, None)
    return _original_parse_path(path)


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    _version: int = attrs.field(default=0, init=False)
    _crd_schema: dict[str, Any] = attrs.field(factory=crd_root_schema, init=False)

    def _find(self, request: rendering.Request) -> dict[str, Any] | None:
        for (resource, namespace, name), obj in self.objects.items():
            if resource == request.resource and namespace == request.namespace and name == request.name:
                return None if obj.deleted else obj.raw
        return None

    async def _handle(self, request: rendering.Request) -> Any:
        if request.resource is not None and request.data is not None:
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self._version += 1
            version = str(self._version)
            is_gateway = request.resource == GATEWAYS
            if request.action == enums.action.CREATE and isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):  # e.g. kopf's Events
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", now)
                meta["generation"] = 1
                meta["resourceVersion"] = version
                if is_gateway:
                    request.data.update(apply_defaults(self._crd_schema, request.data))
            elif request.action == enums.action.UPDATE:
                current = self._find(request)
                if current is not None:
                    try:
                        after = dicts.patch_dict(copy.deepcopy(current), request.data)
                    except jsonpatch.JsonPatchException as exc:  # kopf's `test` of resourceVersion failed
                        raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from None
                    if is_gateway and request.subresource is None:
                        after = apply_defaults(self._crd_schema, after)
                    spec_changed = request.subresource is None and after.get("spec") != current.get("spec")
                    generation = int(current.get("metadata", {}).get("generation") or 1) + int(spec_changed)
                    if isinstance(request.data, dict):
                        if is_gateway and request.subresource is None and "spec" in request.data:
                            request.data["spec"] = after["spec"]  # defaulted, as stored by the API server
                        meta = request.data.get("metadata") or {}
                        request.data["metadata"] = meta
                        meta["resourceVersion"] = version
                        meta["generation"] = generation
                    elif isinstance(request.data, list):
                        request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
                        request.data.append({"op": "add", "path": "/metadata/generation", "value": generation})
        return await super()._handle(request)

    async def _serve_list(self, request: rendering.Request) -> Any:
        """Lists carry the current resourceVersion, so a watch can start right after them."""
        body = await super()._serve_list(request)
        body["metadata"]["resourceVersion"] = str(self._version)
        return body

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        """A watch from a resourceVersion sends only later changes (kmock replays every object as ADDED,
        which made kopf process a stale copy of a new object after its own finalizer patch)."""
        since = _int(request.params.get("resourceVersion"))
        async for event in super()._serve_watch(request):
            if since and isinstance(event, dict) and event.get("type") == "ADDED":
                version = _int(event.get("object", {}).get("metadata", {}).get("resourceVersion"))
                if version is not None and version <= since:
                    continue
            yield event

    # --- test conveniences ---------------------------------------------------------------------

    def get_object(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        for (res, ns, n), obj in self.objects.items():
            if res == resource and ns == namespace and n == name and not obj.deleted:
                return obj.raw
        return None

    def names(self, resource: str, namespace: str | None) -> list[str]:
        return sorted(n for (res, ns, n), obj in self.objects.items()
                      if res == resource and ns == namespace and not obj.deleted)

    def writes(self, since: int = 0) -> list[rendering.Request]:
        """Create/patch/delete requests (not kopf's own on the WebSocketGateways) after request number `since`."""
        out = []
        for req in list(self)[since:]:
            if req.action in (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE) \
                    and req.resource is not None and req.resource != GATEWAYS and req.resource != "v1/events":
                out.append(req)
        return out
