"""A loopback Hugging Face Hub for publishing tests (the real Hub is not reachable from CI)."""

from tests.hub_server.server import HubServer

__all__ = ["HubServer"]
