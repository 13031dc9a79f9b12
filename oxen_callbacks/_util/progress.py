"""Whether a long pull draws a progress bar: on a terminal and in a Jupyter kernel, never into a log.

tqdm's own ``disable=None`` draws only when stderr is a terminal. In Jupyter it is not (nor is a
child process's stderr there: ipykernel forwards it into the cell through a pipe), so bars never
showed in a notebook; in CI and in background processes' logs they must not show. Pulls run in
child processes (:func:`oxen_callbacks._oxen.child.run_in_child`): the parent decides for them
and says so in :data:`~oxen_callbacks.names.ENV_CHILD_PROGRESS`::

    tqdm(..., disable=not show_progress())
"""

from __future__ import annotations

import os
import sys

from ..names import ENV_CHILD_PROGRESS


def show_progress() -> bool:
    """Draw bars here: the parent process asked for them, else this is a Jupyter kernel or stderr a terminal."""
    asked = os.environ.get(ENV_CHILD_PROGRESS)
    if asked is not None:
        return asked == "1"
    return in_jupyter_kernel() or _is_terminal(sys.stderr)


def child_progress_env(stderr_shown: bool) -> dict[str, str]:
    """The environment entry for a child: bars only where its stderr reaches the user (a terminal or a
    notebook cell), never into a pipe that is read back or into a log."""
    return {ENV_CHILD_PROGRESS: "1" if stderr_shown and show_progress() else "0"}


def in_jupyter_kernel() -> bool:
    """Whether this process is a Jupyter kernel (JupyterLab, VS Code, Colab): IPython's shell runs in one."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    try:
        return shell is not None and "IPKernelApp" in shell.config
    except (AttributeError, TypeError):  # an unusual shell: no notebook
        return False


def _is_terminal(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):  # closed or replaced stream
        return False
