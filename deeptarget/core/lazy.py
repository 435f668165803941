"""Lazy exports for a package's ``__init__`` (PEP 562): a name is imported from its submodule on first use, so a
package can name its public classes without making every import of one of its submodules load torch or FAISS.

    __getattr__, __dir__ = lazy_exports(__name__, {"Embedder": "deeptarget.models.embedder", ...})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The package's module ``__getattr__`` and ``__dir__`` for ``exports`` (name -> the module defining it). A name
    resolved once is kept in the package's namespace, so later lookups do not come back here."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
