"""Every child process this library starts, in one table, and how to start one.

Three long-lived or one-shot processes run a module of this package with ``python -m``;
short oxenai calls run one function in a child (:func:`oxen_callbacks._oxen.child.run_in_child`),
named by the function object itself (:func:`function_reference`). A test checks that each
module in :data:`ENTRY_POINTS` has the ``main`` it is started by.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .fork_guard import keep_from_forks

#: name -> the module ``python -m`` runs; its ``main()`` is the process.
ENTRY_POINTS: Mapping[str, str] = {
    "oxen-call": "oxen_callbacks._oxen.child",  # one oxenai call, request on stdin, JSON reply on stdout
    "publish-worker": "oxen_callbacks._publish.worker",  # drains a run's checkpoint queue into commits
    "mlflow-sink": "oxen_callbacks._mlflow.sink_process",  # carries a run's MLflow journal out
}

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

#: Linux starts no program given one environment string (``NAME=value``) longer than 32 pages
#: (``MAX_ARG_STRLEN``): ``execve`` fails with E2BIG, "Argument list too long".
MAX_ENV_STRING_BYTES = 32 * (os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096)


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


def start_helper(entry: str, *args: str, env: Mapping[str, str], stdout: int = subprocess.PIPE,
                 cwd: str | None = None) -> subprocess.Popen[bytes]:
    """Start one of :data:`ENTRY_POINTS` as a background helper: in a process group of its own
    (:data:`OWN_PROCESS_GROUP`), its stdin a pipe of ours (EOF: training is done, or gone), whose
    ends processes that training forks do not keep (:mod:`.fork_guard`)."""
    proc = subprocess.Popen(python_command(entry, *args), stdin=subprocess.PIPE, stdout=stdout,
                            stderr=subprocess.DEVNULL, env=dict(env), cwd=cwd, **OWN_PROCESS_GROUP)
    keep_from_forks(proc.stdin, proc.stdout)
    return proc


def python_command(entry: str, *args: str) -> list[str]:
    """``python -m <module of entry> args...`` for one of :data:`ENTRY_POINTS`."""
    return [sys.executable, "-m", ENTRY_POINTS[entry], *args]


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``extra``, with this package importable in the child
    (it may run from a source checkout that is not installed)."""
    env = {**os.environ, **(extra or {})}
    given = env.get("PYTHONPATH")
    paths = [p for p in given.split(os.pathsep) if p != _PACKAGE_ROOT] if given else []
    env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *paths])  # (once, however deep the helper)
    return env


def check_can_start_processes(env: Mapping[str, str] | None = None) -> None:
    """Refuse, before any work, an environment (default: what our helpers get,
    :func:`child_environment`) no helper process can be started with; the error names the
    variables, never their values (they may be secrets).

    Raises:
        ConfigurationError: a variable is too long for Linux, or the whole environment too large.
    """
    from ..errors import ConfigurationError

    env = child_environment() if env is None else env
    sizes = {name: len(os.fsencode(name)) + len(os.fsencode(value)) + 2 for name, value in env.items()}
    too_long = sorted(name for name, size in sizes.items() if size > MAX_ENV_STRING_BYTES)
    why = None
    if too_long and sys.platform.startswith("linux"):
        why = (f"environment variable(s) {', '.join(too_long)} hold more than {MAX_ENV_STRING_BYTES // 1024} KiB "
               "each, more than Linux passes to a new process")
    elif (total := sum(sizes.values()) + 8 * len(sizes)) > _arg_max():
        largest = sorted(sizes, key=sizes.__getitem__, reverse=True)[:3]
        why = (f"the environment holds {total / 2**20:.1f} MiB, more than a new process can be given "
               f"(the largest variables: {', '.join(largest)})")
    if why:
        raise ConfigurationError(
            f"No helper process can start: {why} (\"Argument list too long\"). The commit worker, "
            "dataset copies and the MLflow sink all run as helper processes.",
            "unset them or make them smaller (pass large data through a file), then build the callback "
            "or pin the dataset.",
        )


def _arg_max() -> int:
    """What a new process's environment and command line may hold together, less room for the latter."""
    try:
        limit = os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):
        limit = -1
    return limit - 64 * 1024 if limit > 128 * 1024 else 2**62  # (-1: the system names no limit)


def function_reference(function: Callable[..., Any]) -> str:
    """``"package.module:name"`` for a module-level function, whatever name its module runs under."""
    module = sys.modules[function.__module__]
    spec = getattr(module, "__spec__", None)
    return f"{spec.name if spec is not None else function.__module__}:{function.__qualname__}"
