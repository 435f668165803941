"""The ``deeptarget`` command."""

from deeptarget.cli.commands import main

__all__ = ["main"]
