"""Keep `wsgateway serve` from importing what serving never uses (part of the base RSS, issue 13).

Two dependencies import optional parts at their own import time, whenever those are installed:

- nats-py imports aiohttp (with yarl, multidict, attrs, ...: about 8 MiB of RSS) for its WebSocket
  transport alone, which only `ws://` / `wss://` NATS URLs use. The operator extra and the container
  image install aiohttp (kopf needs it), so every gateway process paid for it. Unless a configured
  NATS URL is a WebSocket one, nats-py is imported here without it (nats-py handles the ImportError:
  its other transports do not need aiohttp).
- httpx's package imports its command line (`httpx._main`: click, rich, pygments) when those are
  installed (about 3 MiB). The gateway uses httpx's client only, so httpx is imported without it
  (`httpx.main` then says that the command line is not installed).
- uvicorn imports watchfiles (a Rust extension, about 1 MiB) for `--reload`, which `wsgateway serve`
  does not have; without it uvicorn would fall back to its own file-polling reloader.
- FastAPI imports `pydantic.v1` (23 modules, about 1 MiB) while it builds each route, only to check
  that the route's types are no pydantic v1 models. The gateway has none; if `pydantic.v1` was never
  imported, nothing can be one, so `serve_app` builds the app `without` it (FastAPI handles that
  ImportError: "not a v1 model").

Every part left out stays importable afterwards for any other code of the process. `defer_unused_imports` runs
in `wsgateway serve` and in each of its worker processes (gateway/cli.py) once the settings are read
and before anything imports nats-py or httpx; it changes nothing that is already imported. Nothing
else calls it: a program that imports `gateway` keeps its dependencies' usual imports. OpenTelemetry's
SDK and exporter (tracing off) and kopf (the operator) are not imported by serving in the first place
(gateway/tracing.py, gateway/cli.py).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterable, Iterator

WEBSOCKET_SCHEMES = ("ws://", "wss://")
# (package, its optional part left out when `wsgateway serve` imports the package)
LEFT_OUT = (("httpx", "httpx._main"), ("uvicorn", "watchfiles"))
PYDANTIC_V1 = "pydantic.v1"


@contextlib.contextmanager
def without(part: str) -> Iterator[None]:
    """Inside, importing the module `part` raises ImportError (unless it is imported already);
    afterwards it is importable again."""
    blocked = part not in sys.modules
    if blocked:
        sys.modules[part] = None  # type: ignore[assignment]  # the import system's "raise ImportError" entry
    try:
        yield
    finally:
        if blocked and part in sys.modules and sys.modules[part] is None:
            del sys.modules[part]


def import_without(package: str, part: str) -> bool:
    """Import `package` while its optional module `part` cannot be imported (`package` handles that
    ImportError itself). False (nothing done) when `package` is already imported."""
    if package in sys.modules:
        return False
    with without(part):
        importlib.import_module(package)
    return True


def defer_unused_imports(nats_servers: Iterable[str]) -> None:
    """Import nats-py (without aiohttp unless a NATS URL needs its WebSocket transport), httpx and
    uvicorn (without the parts in LEFT_OUT)."""
    if not any(url.strip().lower().startswith(WEBSOCKET_SCHEMES) for url in nats_servers):
        import_without("nats", "aiohttp")
    for package, part in LEFT_OUT:
        import_without(package, part)
