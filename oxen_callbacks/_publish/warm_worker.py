"""A publishing worker started when the callback is built, before it has a queue.

Its start-up (a Python process and this library's imports, ~0.1 s of CPU) then overlaps the
user building the model and the trainer, where the training process leaves a core free,
instead of running, at the lowest priority, against the first steps of ``fit()`` and being
waited for when ``fit()`` ends. It runs at normal priority until then: nothing trains yet. At fit start the publisher hands it the command line and
environment a cold worker would get (:meth:`WarmWorker.hand_over`); unused, it exits when this
object goes away or the training process ends (its stdin closes).
"""

from __future__ import annotations

import json
import os
import subprocess
import weakref
from collections.abc import Mapping

from .._util.processes import OWN_PROCESS_GROUP, child_environment, python_command, yield_cpu_to_training


class WarmWorker:
    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            python_command("publish-worker", "--warm"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_environment(),
            **OWN_PROCESS_GROUP,  # as a cold worker: a Ctrl-C meant for the trainer must not kill a commit halfway
        )
        self._closer = weakref.finalize(self, _close_stdin, self.proc)

    def hand_over(self, args: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes] | None:
        """Give the worker its arguments (what ``worker.main`` parses) and environment; ``None`` if it
        is gone (killed since it was started: start a cold one then). Used once."""
        proc, self.proc = self.proc, None
        self._closer.detach()
        if proc is None or proc.stdin is None:
            return None
        if proc.poll() is not None:
            _close_stdin(proc)
            return None
        # through the pipe, never on disk: the environment may hold the user's tokens
        handoff = {"args": args, "env": dict(env), "cwd": os.getcwd()}
        try:
            proc.stdin.write(json.dumps(handoff).encode() + b"\n")
            proc.stdin.flush()
        except OSError:
            _close_stdin(proc)
            return None
        yield_cpu_to_training(idle=False, pid=proc.pid)  # now, even if its imports are not done yet
        return proc


def _close_stdin(proc: subprocess.Popen[bytes]) -> None:
    for stream in (proc.stdin, proc.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
