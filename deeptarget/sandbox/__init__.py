"""The built-in sample source: a small social network served over HTTP on loopback in the Graph API's shape."""

from deeptarget.sandbox.faults import Faults
from deeptarget.sandbox.network import SandboxNetwork
from deeptarget.sandbox.server import create_app, sandbox_server

__all__ = ["Faults", "SandboxNetwork", "create_app", "sandbox_server"]
