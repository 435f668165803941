"""The built-in sample source: a small social network served over HTTP on loopback in the Graph API's shape."""

from deeptarget.sandbox.network import SandboxNetwork
from deeptarget.sandbox.server import create_app, sandbox_server

__all__ = ["SandboxNetwork", "create_app", "sandbox_server"]
