"""Free loopback ports for the servers tests start: gateway/devtools/ports.py (why below the ephemeral range)."""

from gateway.devtools.ports import free_port, free_ports

__all__ = ["free_port", "free_ports"]
