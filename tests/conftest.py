"""Shared fixtures: real nats-server processes on free ports, never the machine's shared server; a real
test identity provider over HTTP; a real gateway on a free port; the platform side (publisher + ACLs)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest

from gateway.devtools.natsproc import NatsProcess
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.platform import Platform

if TYPE_CHECKING:
    from tests.support.idp import TestIdP

pytest_plugins = ["tests.support.idp"]

# In-process gateways must not gc.freeze() the shared pytest process (gateway/gc_tuning.py); gateway
# subprocesses started by tests inherit this too unless a test sets its own value.
os.environ.setdefault("WSGATEWAY_GC_GEN0_THRESHOLD", "0")


@pytest.fixture(params=["c", "python"])
def fast_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with fan-out's compiled loops and once with the Python fallback (gateway/core/fastpath.py):
    WSGATEWAY_FAST_PATH for the gateways it starts, in-process or as child processes. Modules of delivery
    tests use it for every test: `pytestmark = pytest.mark.usefixtures("fast_path")`."""
    from gateway.core import fastpath

    if request.param == "c" and not fastpath.AVAILABLE:
        pytest.fail("gateway.core._fastpath is not built: `pip install -e .` builds it (needs gcc and Python headers)")
    monkeypatch.setenv("WSGATEWAY_FAST_PATH", "true" if request.param == "c" else "false")
    return str(request.param)


@pytest.fixture
def nats_server() -> Iterator[NatsProcess]:
    """A fresh `nats-server -js` with its own store dir, stopped and removed after the test."""
    with NatsProcess() as server:
        yield server


@pytest.fixture
async def gw(nats_server: NatsProcess, idp: TestIdP) -> AsyncIterator[RunningGateway]:
    async with run_gateway(nats_server.url, idp.issuer, audience=idp.audience) as g:
        yield g


@pytest.fixture
async def platform(nats_server: NatsProcess) -> AsyncIterator[Platform]:
    p = await Platform.connect(nats_server.url)
    try:
        yield p
    finally:
        await p.close()
