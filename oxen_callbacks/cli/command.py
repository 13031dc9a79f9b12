"""What a command of the ``oxen-callbacks`` command line is: a name, its options, what it does and shows."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Result = dict[str, Any]


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    return None


def _never_failed(result: Result) -> bool:
    return False


@dataclass(frozen=True)
class Command:
    """One sub-command: ``run`` does the work and returns JSON-able data, ``show`` prints it for people."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], Result]
    show: Callable[[Result], str]
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    shared: tuple[str, ...] = ()  # shared option sets by name: "mlflow", "repos", "cache"
    failed: Callable[[Result], bool] = _never_failed  # exit code 1 although the command ran


def commit_or_none(commit: str | None) -> str:
    """A commit id for people, or what its absence means."""
    return commit or "(none yet)"
