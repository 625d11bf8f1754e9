"""`wsgateway` command line: serve (production), dev (local demo), watch (a terminal client), operator."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile

from pydantic import ValidationError


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import uvicorn_options
    from gateway.config import Settings

    overrides = {"host": args.host, "port": args.port, "workers": args.workers}
    for key, value in overrides.items():
        if value is not None:
            os.environ[f"WSGATEWAY_{key.upper()}"] = str(value)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"wsgateway: bad configuration:\n{exc}", file=sys.stderr)
        return 2
    if settings.dev_mode:
        print("wsgateway: WSGATEWAY_DEV_MODE is reserved for `wsgateway dev` (it has no production identity "
              "provider); unset it and set WSGATEWAY_OIDC_ISSUER or WSGATEWAY_JWKS_URL", file=sys.stderr)
        return 2
    workers = settings.workers or os.cpu_count() or 1
    mp_dir = None
    if workers > 1:  # metrics of all workers are summed through prometheus_client's multiprocess files
        mp_dir = tempfile.mkdtemp(prefix="wsgateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    try:
        uvicorn.run(
            "gateway.app:app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=workers,
            **uvicorn_options(settings),  # type: ignore[arg-type]
        )
    finally:
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
    from gateway.sdk.client import watch

    try:
        asyncio.run(watch(args.url, args.token, args.scope, since=args.since))
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    return 0


def _operator(args: argparse.Namespace) -> int:
    from wsgateway_operator.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsgateway", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway (configured by WSGATEWAY_* environment variables)")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--workers", type=int, default=None, help="processes on one port (default: one per core)")
    s.set_defaults(func=_serve)

    d = sub.add_parser("dev", help="local demo: embedded nats-server, INSECURE dev identity provider, simulator")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)
    d.add_argument("--nats-port", type=int, default=None, help="embedded nats-server port (default: free port)")
    d.add_argument("--no-simulator", action="store_true", help="do not publish simulated agent traffic")
    d.add_argument("--pace", type=float, default=1.0,
                   help="simulator pauses are multiplied by this (0.2: five times faster traffic; default 1)")
    d.set_defaults(func=_dev)

    w = sub.add_parser("watch", help="print the live stream of a gateway (reconnects and resumes)")
    w.add_argument("--url", default="ws://127.0.0.1:8080/v1/ws")
    w.add_argument("--token", required=True)
    w.add_argument("--scope", action="append", default=None, help="scope to follow (repeatable; default *)")
    w.add_argument("--since", type=int, default=None)
    w.set_defaults(func=_watch)

    from wsgateway_operator.cli import add_arguments as operator_arguments  # argparse only; kopf loads on run

    o = sub.add_parser("operator", help="run the Kubernetes operator for WebSocketGateway resources (kopf)")
    operator_arguments(o)
    o.set_defaults(func=_operator)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
