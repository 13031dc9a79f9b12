"""Lines from this process's stdin, with a timeout: how the background processes hear their trainer.

Read straight from the file descriptor, so ``select`` never misses a line that a
buffered ``sys.stdin`` had already read ahead (a lost ``end`` would leave a
sink waiting for good).

Example::

    lines = StdinLines()
    line = lines.next(timeout=1.0)   # None: nothing came; "": EOF (the trainer is gone)
"""

from __future__ import annotations

import os
import select


class StdinLines:
    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self._buffer = b""
        self._eof = False

    def next(self, timeout: float | None) -> str | None:
        """The next line (with its newline), ``None`` if none came within ``timeout`` s, ``""`` at EOF."""
        while b"\n" not in self._buffer and not self._eof:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self.fd, 65536)
            self._eof = not chunk
            self._buffer += chunk
        line, newline, self._buffer = self._buffer.partition(b"\n")
        return (line + newline).decode()
