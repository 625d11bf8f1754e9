"""Reads `wsgateway_connections` from each ready gateway pod's /metrics, for status.connections.

The operator asks the pods directly (pod IP, the container's `http` port) rather than Prometheus, so the
status is true even where no Prometheus runs. Each scrape has a short timeout and failures are counted,
not raised: one unreachable pod must not hide the others' connections or stall the refresh.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from wsgateway_operator.builders import CONNECTIONS_METRIC, CONTAINER_PORT


class ScrapeResult(BaseModel):
    connections: int = 0
    scraped: int = 0
    failed: list[str] = []  # pod names whose /metrics did not answer usefully


def is_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    if (pod.get("metadata") or {}).get("deletionTimestamp") or not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def metrics_url(pod: dict[str, Any]) -> str:
    port = CONTAINER_PORT
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == "http" and p.get("containerPort"):
                port = int(p["containerPort"])
    ip = pod["status"]["podIP"]
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/metrics"


def parse_connections(text: str) -> int:
    """The value of wsgateway_connections in a Prometheus text exposition (summed over its series)."""
    total = 0.0
    found = False
    for family in text_string_to_metric_families(text):
        if family.name != CONNECTIONS_METRIC:
            continue
        for sample in family.samples:
            if sample.name == CONNECTIONS_METRIC:
                total += sample.value
                found = True
    if not found:
        raise ValueError(f"{CONNECTIONS_METRIC} not in the exposition")
    return int(total)


async def scrape_connections(
    pods: list[dict[str, Any]], *, timeout: float = 2.0, concurrency: int = 16
) -> ScrapeResult:
    ready = [p for p in pods if is_ready(p)]
    if not ready:
        return ScrapeResult()
    limit = asyncio.Semaphore(concurrency)
    result = ScrapeResult()

    async def one(client: httpx.AsyncClient, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        async with limit:
            try:
                resp = await client.get(metrics_url(pod))
                resp.raise_for_status()
                result.connections += parse_connections(resp.text)
                result.scraped += 1
            except (httpx.HTTPError, ValueError):
                result.failed.append(name)

    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        await asyncio.gather(*(one(client, p) for p in ready))
    result.failed.sort()
    return result
