"""`wsgateway operator`: runs kopf with the operator's handlers (gateway/cli.py delegates here).

Watched namespaces come from `--namespace` (repeatable, globs allowed) or, when none is given, from
WSGATEWAY_OPERATOR_NAMESPACES (comma-separated); `--all-namespaces` watches the whole cluster. With
neither, the operator refuses to start rather than guess. kopf is imported only when the command runs,
so the gateway itself never needs it installed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

NAMESPACES_ENV = "WSGATEWAY_OPERATOR_NAMESPACES"
_NAMESPACE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # a name, not a kopf glob or negation


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", action="append", dest="namespaces", default=None, metavar="NS",
                   help=f"namespace to serve (repeatable; globs like 'team-*' allowed; default: ${NAMESPACES_ENV})")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace")
    peer = p.add_mutually_exclusive_group()
    peer.add_argument("--peering", metavar="NAME", default=None,
                      help="kopf peering object: several operator instances coordinate (needs kopf's peering CRDs)")
    peer.add_argument("--standalone", action="store_true", help="no peering (one operator instance)")
    p.add_argument("--liveness", metavar="URL", default=None,
                   help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve the operator's Prometheus metrics on http://0.0.0.0:PORT/metrics "
                        "(default: $WSGATEWAY_OPERATOR_METRICS_PORT, else 9090; 0: off)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.add_argument("-d", "--debug", action="store_true", help="log everything (API calls included)")


def watched_namespaces(args: argparse.Namespace) -> list[str]:
    if args.namespaces:
        return [n for n in args.namespaces if n]
    return [n.strip() for n in os.environ.get(NAMESPACES_ENV, "").split(",") if n.strip()]


def needs_cluster_scanning(args: argparse.Namespace, namespaces: list[str]) -> bool:
    """Whether kopf must list and watch namespaces: only for globs and negations ('team-*', '!kube-*').
    Named namespaces are served as they are, which needs no cluster-wide permission."""
    return bool(args.all_namespaces) or not all(_NAMESPACE_NAME.fullmatch(n) for n in namespaces)


def run(args: argparse.Namespace) -> int:
    namespaces = watched_namespaces(args)
    if args.all_namespaces and namespaces:
        print("wsgateway operator: use --all-namespaces or --namespace/$WSGATEWAY_OPERATOR_NAMESPACES, not both",
              file=sys.stderr)
        return 2
    if not args.all_namespaces and not namespaces:
        print(f"wsgateway operator: say which namespaces to serve: --namespace NS (repeatable), ${NAMESPACES_ENV}, "
              "or --all-namespaces", file=sys.stderr)
        return 2
    try:
        import kopf
    except ImportError:
        print("wsgateway operator: kopf is not installed; install the operator extra: "
              "pip install 'wsgateway[operator]'", file=sys.stderr)
        return 2
    from pydantic import ValidationError

    from wsgateway_operator.controller import OperatorConfig
    from wsgateway_operator.handlers import register

    try:
        config = OperatorConfig.from_env()
        overrides: dict[str, object] = {"cluster_scanning": needs_cluster_scanning(args, namespaces)}
        if args.metrics_port is not None:
            overrides["metrics_port"] = args.metrics_port
        config = OperatorConfig.model_validate({**config.model_dump(), **overrides})
    except ValidationError as exc:
        print(f"wsgateway operator: bad configuration:\n{exc}", file=sys.stderr)
        return 2
    kopf.configure(debug=args.debug, verbose=args.verbose)
    registry = kopf.OperatorRegistry()
    register(registry, config)
    kopf.run(
        registry=registry,
        clusterwide=bool(args.all_namespaces),
        namespaces=namespaces,
        standalone=True if args.standalone else None,
        peering_name=args.peering,
        liveness_endpoint=args.liveness,
    )
    return 0
