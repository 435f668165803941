"""The built-in sample source: a small social network served over HTTP on loopback in the Graph API's shape."""

from deeptarget.sandbox.network import SandboxNetwork
from deeptarget.sandbox.server import SandboxServer, create_app

__all__ = ["SandboxNetwork", "SandboxServer", "create_app"]
