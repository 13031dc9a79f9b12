"""Every child process this library starts, in one table, and how to start one.

Three long-lived or one-shot processes run a module of this package with ``python -m``;
short oxenai calls run one function in a child (:func:`oxen_callbacks._oxen.child.run_in_child`),
named by the function object itself (:func:`function_reference`). A test checks that each
module in :data:`ENTRY_POINTS` has the ``main`` it is started by.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: name -> the module ``python -m`` runs; its ``main()`` is the process.
ENTRY_POINTS: Mapping[str, str] = {
    "oxen-call": "oxen_callbacks._oxen.child",  # one oxenai call, request on stdin, JSON reply on stdout
    "publish-worker": "oxen_callbacks._publish.worker",  # drains a run's checkpoint queue into commits
    "mlflow-sink": "oxen_callbacks._mlflow.sink_process",  # carries a run's MLflow journal out
}

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def yield_cpu_to_training(*, idle: bool, pid: int = 0) -> None:
    """Let training keep the CPU when this background process wants it too: the lowest ``nice``,
    which still guarantees progress; ``idle`` (Linux ``SCHED_IDLE``, for bookkeeping that may wait,
    like MLflow logging): run only on a core nothing else wants.

    This only works inside training's session: Linux shares the CPU fairly between session
    autogroups first, whatever their ``nice``, so a busy process in a session of its own stalled a
    0.3 s fit five times over, 72 ms at a time. Background processes are therefore started in a
    process group of their own (:data:`OWN_PROCESS_GROUP`: a Ctrl-C or a notebook's interrupt
    meant for the trainer spares them), never a session of their own.

    ``pid``: another process of ours (its main thread) instead of this one.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, pid, 19)
        if idle and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        pass  # not allowed here: keep the priority we have


#: ``subprocess.Popen`` keywords for a background process: its own process group, the trainer's session.
OWN_PROCESS_GROUP: Mapping[str, Any] = {"process_group": 0}


def python_command(entry: str, *args: str) -> list[str]:
    """``python -m <module of entry> args...`` for one of :data:`ENTRY_POINTS`."""
    return [sys.executable, "-m", ENTRY_POINTS[entry], *args]


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``extra``, with this package importable in the child
    (it may run from a source checkout that is not installed)."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
    return env


def function_reference(function: Callable[..., Any]) -> str:
    """``"package.module:name"`` for a module-level function, whatever name its module runs under."""
    module = sys.modules[function.__module__]
    spec = getattr(module, "__spec__", None)
    return f"{spec.name if spec is not None else function.__module__}:{function.__qualname__}"
