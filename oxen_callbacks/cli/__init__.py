"""The ``oxen-callbacks`` command line: one module per command group, ``main`` the entry point."""

from .main import main

__all__ = ["main"]
