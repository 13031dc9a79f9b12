"""The ``oxen-callbacks`` command line: ``app.py`` parses and dispatches, one module per command group."""

from .app import main

__all__ = ["main"]
