"""Exceptions raised by oxen-callbacks.

Every error that comes from bad input names the call, the bad value and a fix
(a ``HINT:``), in the style of Lightning's ``ModelCheckpoint`` messages.
"""

from __future__ import annotations


class OxenCallbacksError(Exception):
    """Base class of every error this library raises on purpose."""


class _Hinted(OxenCallbacksError):
    """An error whose message ends with how to fix it (``HINT:``, kept in :attr:`hint` too)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.hint = hint
        super().__init__(f"{message}\nHINT: {hint}" if hint else message)


class ConfigurationError(_Hinted, ValueError):
    """Bad input, found before any training time is spent."""


class OxenError(OxenCallbacksError):
    """An oxenai call failed (its panics and lock errors included)."""


class RepoBusyError(OxenError):
    """Another process holds the repository (Oxen's own database lock)."""


class DatasetMismatchError(OxenCallbacksError):
    """A resumed or distributed run would read another dataset commit than recorded."""


class PublishError(OxenCallbacksError):
    """A checkpoint could not be committed to the model repository."""


class PartlyDoneError(_Hinted):
    """A command did part of its work (the message says which part) and failed at the rest."""


class LineageValidationError(OxenCallbacksError, ValueError):
    """A lineage record does not follow the ``oxen-callbacks/lineage/v1`` schema."""
