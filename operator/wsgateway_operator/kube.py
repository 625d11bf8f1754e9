"""A small async Kubernetes REST client (httpx) for the operator's own calls.

kopf watches the WebSocketGateways and patches them; everything else (children, pods, the credentials
Secret, API discovery) goes through this client. It uses the very credentials kopf logged in with
(`kopf.ConnectionInfo`: server, Authorization header, TLS context) and asks for a fresh login once when
the API server answers 401 (rotated service-account tokens).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from wsgateway_operator import FIELD_MANAGER

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


class Credentials(Protocol):
    """What the client needs of `kopf.ConnectionInfo` (a frozen dataclass: `server` is read-only)."""

    @property
    def server(self) -> str: ...

    def as_http_headers(self) -> dict[str, str]: ...

    def as_ssl_context(self) -> Any: ...


@dataclass(frozen=True)
class ResourceRef:
    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version_path(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        p = f"{self.group_version_path}/namespaces/{namespace}/{self.plural}"
        if name:
            p += f"/{name}"
        if subresource:
            p += f"/{subresource}"
        return p


PODS = ResourceRef("", "v1", "pods", "Pod")
SECRETS = ResourceRef("", "v1", "secrets", "Secret")
CHILD_REFS: dict[str, ResourceRef] = {
    r.kind: r
    for r in (
        ResourceRef("", "v1", "configmaps", "ConfigMap"),
        ResourceRef("apps", "v1", "deployments", "Deployment"),
        ResourceRef("", "v1", "services", "Service"),
        ResourceRef("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget"),
        ResourceRef("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler"),
        ResourceRef("keda.sh", "v1alpha1", "scaledobjects", "ScaledObject"),
        ResourceRef("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor"),
        ResourceRef("monitoring.coreos.com", "v1", "prometheusrules", "PrometheusRule"),
    )
}


class ApiError(Exception):
    """A failed API call, with the API server's own reason and message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class KubeClient:
    def __init__(
        self,
        credentials: Credentials,
        *,
        relogin: Callable[[], Awaitable[Credentials | None]] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._relogin = relogin
        self._timeout = timeout
        self._credentials = credentials
        self._http = self._make(credentials)

    def _make(self, credentials: Credentials) -> httpx.AsyncClient:
        verify: Any = True
        if credentials.server.startswith("https:"):
            verify = credentials.as_ssl_context()
        return httpx.AsyncClient(
            base_url=credentials.server.rstrip("/"),
            headers={**credentials.as_http_headers(), "User-Agent": FIELD_MANAGER, "Accept": "application/json"},
            verify=verify,
            timeout=self._timeout,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        resp = await self._http.request(method, path, **kwargs)
        if resp.status_code == 401 and self._relogin is not None:
            fresh = await self._relogin()
            if fresh is not None:
                await self._http.aclose()
                self._credentials = fresh
                self._http = self._make(fresh)
                resp = await self._http.request(method, path, **kwargs)
        return resp

    async def _call(self, method: str, path: str, *, missing_ok: bool = False, **kwargs: Any) -> Any:
        resp = await self._send(method, path, **kwargs)
        if missing_ok and resp.status_code == 404:
            return None
        if resp.status_code >= 400:
            try:
                body = resp.json()
                reason, message = str(body.get("reason") or resp.reason_phrase), str(body.get("message") or "")
            except ValueError:
                reason, message = resp.reason_phrase, resp.text[:500]
            raise ApiError(resp.status_code, reason, message)
        return resp.json() if resp.content else {}

    async def get(self, ref: ResourceRef, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        return await self._call("GET", ref.path(namespace, name), missing_ok=True)  # type: ignore[no-any-return]

    async def list(self, ref: ResourceRef, namespace: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else {}
        body = await self._call("GET", ref.path(namespace), params=params)
        return list(body.get("items") or [])

    async def create(self, ref: ResourceRef, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call(  # type: ignore[no-any-return]
            "POST", ref.path(namespace), json=body, params={"fieldManager": FIELD_MANAGER}
        )

    async def patch(
        self, ref: ResourceRef, namespace: str, name: str, patch: dict[str, Any], *, subresource: str | None = None
    ) -> dict[str, Any]:
        return await self._call(  # type: ignore[no-any-return]
            "PATCH", ref.path(namespace, name, subresource), json=patch,
            headers={"Content-Type": MERGE_PATCH}, params={"fieldManager": FIELD_MANAGER},
        )

    async def delete(self, ref: ResourceRef, namespace: str, name: str, *, propagation: str = "Background") -> bool:
        """True if something was deleted (False: it was already gone)."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        result = await self._call("DELETE", ref.path(namespace, name), missing_ok=True, json=body)
        return result is not None

    async def served_resources(self, group_version_path: str) -> set[str]:
        """Plural names the API server serves under /apis/<group>/<version> (empty: not installed).

        Discovery needs no RBAC (every authenticated client may read it), which is why the operator
        detects the Prometheus Operator and KEDA this way rather than by reading CRDs.
        """
        body = await self._call("GET", group_version_path, missing_ok=True)
        if not body:
            return set()
        return {r.get("name", "") for r in body.get("resources") or [] if "/" not in r.get("name", "")}
