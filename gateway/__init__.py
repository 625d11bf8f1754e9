"""wsgateway: NATS JetStream events as live, per-user, permission-filtered WebSocket streams.

The package root re-exports the publisher-facing contract lazily (PEP 562), so that importing a
submodule such as ``gateway.config`` does not drag in the NATS client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.events import Envelope, InvalidEvent, parse_event
    from gateway.sdk.publisher import Publisher

__all__ = ["Envelope", "InvalidEvent", "Publisher", "parse_event"]

_LAZY = {
    "Envelope": "gateway.events",
    "InvalidEvent": "gateway.events",
    "parse_event": "gateway.events",
    "Publisher": "gateway.sdk.publisher",
}


def package_version() -> str:
    """The installed package's version (`wsgateway --version`, the OpenAPI document, the image label)."""
    from importlib import metadata

    try:
        return metadata.version("wsgateway")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
