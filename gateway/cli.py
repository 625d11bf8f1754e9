"""`wsgateway` command line: serve (production), dev (local demo), watch (a terminal client), operator."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
from types import FrameType
from typing import TYPE_CHECKING

from gateway import package_version

if TYPE_CHECKING:
    from starlette.types import ASGIApp

log = logging.getLogger("gateway.cli")

DOCS = "README.md#configuration (every WSGATEWAY_* variable), docs/operations.md (running it)"


def version() -> str:
    return package_version()


class _Stopped(Exception):
    """SIGTERM/SIGINT outside uvicorn's own handling (before it starts, or re-raised after it drained)."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signum)


def serve_app() -> ASGIApp:
    """uvicorn factory of `wsgateway serve`: the gateway app from WSGATEWAY_* variables, timed for the
    access lines (gateway/logs.py). A worker process of `--workers N` starts here."""
    from gateway.config import Settings
    from gateway.lean_imports import PYDANTIC_V1, defer_unused_imports, without

    settings = Settings()
    defer_unused_imports(settings.nats_servers)  # before gateway.app imports nats-py, httpx and uvicorn
    from gateway.app import app_from_env
    from gateway.logs import AccessTiming

    with without(PYDANTIC_V1):  # FastAPI's check that no route uses a pydantic v1 model (lean_imports.py)
        return AccessTiming(app_from_env(settings))


def _serve(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError, load_settings
    from gateway.lean_imports import defer_unused_imports
    from gateway.logs import config_summary, configure_logging

    overrides = {"host": args.host, "port": args.port, "workers": args.workers}
    for key, value in overrides.items():
        if value is not None:
            os.environ[f"WSGATEWAY_{key.upper()}"] = str(value)
    try:
        settings, unknown = load_settings()
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"wsgateway serve: {problem}", file=sys.stderr)
        return 2
    if settings.dev_mode:
        print("wsgateway serve: WSGATEWAY_DEV_MODE is reserved for `wsgateway dev` (it has no production identity "
              "provider); unset it and set WSGATEWAY_OIDC_ISSUER or WSGATEWAY_JWKS_URL", file=sys.stderr)
        return 2
    defer_unused_imports(settings.nats_servers)  # before anything imports nats-py, httpx and uvicorn
    import uvicorn

    from gateway.app import uvicorn_options

    configure_logging(settings.log_level, settings.log_format)
    for line in unknown:
        log.warning("%s", line)
    workers = settings.workers or os.cpu_count() or 1
    log.info("wsgateway %s serve (%d worker%s): %s", version(), workers, "" if workers == 1 else "s",
             config_summary(settings))
    mp_dir = None
    if workers > 1:  # metrics of all workers are summed through prometheus_client's multiprocess files
        mp_dir = tempfile.mkdtemp(prefix="wsgateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to end the process by it. A shutdown
    # that was asked for and completed is a success: the re-raised signal lands here and exits 0.
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.run(
            "gateway.cli:serve_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=workers,
            log_config=None,  # configure_logging's handler (text or JSON, tokens redacted) formats everything
            **uvicorn_options(settings),  # type: ignore[arg-type]
        )
    except _Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if mp_dir:
            shutil.rmtree(mp_dir, ignore_errors=True)
    return 0


def _dev(args: argparse.Namespace) -> int:
    from gateway.devtools.dev import run_dev

    if not 0.01 <= args.pace <= 100:
        print("wsgateway dev: --pace must be between 0.01 and 100", file=sys.stderr)
        return 2
    return run_dev(host=args.host, port=args.port, nats_port=args.nats_port, simulate=not args.no_simulator,
                   pace=args.pace)


def _watch(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from gateway.devtools.watch import watch

    url = urlsplit(args.url)
    if url.scheme not in ("ws", "wss") or not url.hostname:
        print(f"wsgateway watch: --url must be a ws:// or wss:// URL, e.g. ws://127.0.0.1:8080/v1/ws "
              f"(got {args.url!r})", file=sys.stderr)
        return 2
    try:
        return asyncio.run(watch(args.url, args.token, args.scope, since=args.since))
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
    except Exception as exc:  # a bad URL and the like: one line, no traceback
        print(f"wsgateway watch: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def _operator(args: argparse.Namespace) -> int:
    from wsgateway_operator.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.HelpFormatter
    p = argparse.ArgumentParser(
        prog="wsgateway", description=__doc__, formatter_class=fmt,
        epilog=f"Documentation: README.md, {DOCS}; `wsgateway COMMAND --help` for each command.",
    )
    p.add_argument("--version", action="version", version=f"wsgateway {version()}",
                   help="print the package version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "serve", help="run the gateway (configured by WSGATEWAY_* environment variables)", formatter_class=fmt,
        description="Run the gateway in production: uvicorn workers on one port, configured by WSGATEWAY_* "
                    "environment variables; an identity provider (WSGATEWAY_OIDC_ISSUER or WSGATEWAY_JWKS_URL) "
                    "is required. Exit status 2: a bad setting (one line per problem, naming the variable).",
        epilog=f"Settings: {DOCS}. SIGTERM drains and exits 0 (docs/operations.md#graceful-shutdown).",
    )
    s.add_argument("--host", default=None, help="listen address (overrides $WSGATEWAY_HOST; default 0.0.0.0)")
    s.add_argument("--port", type=int, default=None, help="listen port (overrides $WSGATEWAY_PORT; default 8080)")
    s.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes on one port (overrides $WSGATEWAY_WORKERS; default 0: one per CPU core)")
    s.set_defaults(func=_serve)

    d = sub.add_parser(
        "dev", help="local demo: embedded nats-server, INSECURE dev identity provider, simulator", formatter_class=fmt,
        description="The local demo (what `make run` starts): an embedded nats-server with JetStream on a "
                    "temporary store, the INSECURE development identity provider, demo ACLs and a simulated agent "
                    "platform. Never expose it to a network. Other WSGATEWAY_* settings apply as in `serve`.",
        epilog="Documentation: README.md#quick-start, docs/operations.md#development-mode.",
    )
    d.add_argument("--host", default="127.0.0.1",
                   help="listen address (default 127.0.0.1; dev mode does not read $WSGATEWAY_HOST)")
    d.add_argument("--port", type=int, default=8080,
                   help="listen port (default 8080; dev mode does not read $WSGATEWAY_PORT)")
    d.add_argument("--nats-port", type=int, default=None, metavar="PORT",
                   help="port of the embedded nats-server (default: a free port; the banner prints its URL, which "
                        "publishers use: README.md#publishing-platform-services)")
    d.add_argument("--no-simulator", action="store_true", help="do not publish simulated agent traffic")
    d.add_argument("--pace", type=float, default=1.0,
                   help="simulator pauses are multiplied by this (0.2: five times faster traffic; default 1)")
    d.set_defaults(func=_dev)

    w = sub.add_parser(
        "watch", help="print the live stream of a gateway (reconnects and resumes)", formatter_class=fmt,
        description="Print a gateway's live stream: events on stdout, one line each; connecting, reconnecting "
                    "and close reasons on stderr. Resumes from the last seq after every disconnect. Exit status 1 "
                    "when the gateway closes with a final code (4400 bad request, 4401 unauthorized).",
        epilog="Documentation: docs/protocol.md (frames, close codes, resume). No WSGATEWAY_* variables.",
    )
    w.add_argument("--url", default="ws://127.0.0.1:8080/v1/ws",
                   help="WebSocket URL of the gateway (default ws://127.0.0.1:8080/v1/ws, what `wsgateway dev` serves)")
    w.add_argument("--token", required=True,
                   help="access token (JWT) of the identity provider; sent as the bearer.<jwt> subprotocol")
    w.add_argument("--scope", action="append", default=None,
                   help="scope to follow, e.g. conversation:c-42 (repeatable; default * = everything you may see)")
    w.add_argument("--since", type=int, default=None, metavar="SEQ",
                   help="start after this stream sequence (replays what came after it)")
    w.set_defaults(func=_watch)

    from wsgateway_operator.cli import add_arguments as operator_arguments  # argparse only; kopf loads on run

    o = sub.add_parser(
        "operator", help="run the Kubernetes operator for WebSocketGateway resources (kopf)", formatter_class=fmt,
        description="Run the Kubernetes operator (needs the `operator` extra: pip install 'wsgateway[operator]'). "
                    "Settings: the options below and WSGATEWAY_OPERATOR_* variables.",
        epilog="Documentation: operator/README.md (variables, RBAC), docs/operations.md#kubernetes.",
    )
    operator_arguments(o)
    o.set_defaults(func=_operator)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
