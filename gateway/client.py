"""Public import path of the Python client: ``from gateway.client import GatewayClient``.

The implementation lives in :mod:`gateway.sdk.client`.
"""

from gateway.sdk.client import GatewayClient, GatewayClosed

__all__ = ["GatewayClient", "GatewayClosed"]
