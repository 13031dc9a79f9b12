"""Which waiting publishing jobs share one commit, and that commit's message.

Saves that pile up while a commit runs are committed together where that loses no version:
each group is one run's, writes each path at most once, and ends at the run's final record.
"""

from __future__ import annotations

from .queue import Job


def commit_groups(jobs: list[Job]) -> list[list[Job]]:
    """Split ``jobs`` (in order) into groups that one commit each can hold without losing a version.

    A group belongs to one run, writes each path at most once (``last.ckpt`` saved again starts
    a new group, so every save's bytes reach history), never removes a path it wrote, and ends
    at a finalize job. Removals go with the next write (a group of removals alone comes last).
    """
    groups: list[list[Job]] = []
    current: list[Job] = []
    written: set[str] = set()

    def close() -> list[Job]:
        """End the current group; returns its trailing removals, which go with the next write."""
        nonlocal current, written
        body = list(current)
        while body and body[-1].kind == "remove":
            body.pop()
        tail = current[len(body):]
        if body:
            groups.append(body)
        current, written = [], set()
        return tail

    for job in jobs:
        run, dest = job.payload.get("run"), job.payload.get("dest")
        if current and (run != current[0].payload.get("run") or dest in written):
            tail = close()
            if tail and tail[0].payload.get("run") != run:
                groups.append(tail)
            else:
                current = tail
        current.append(job)
        if job.kind == "checkpoint":
            written.add(dest)
        elif job.kind == "finalize":
            close()
    tail = close()
    if tail:
        groups.append(tail)
    return groups


def group_message(run: str, messages: list[str]) -> str:
    """A job's own message; for several, the run once and what each job adds."""
    if len(messages) == 1:
        return messages[0]
    prefix = f"oxen-callbacks: {run}"
    return f"{prefix}: " + "; ".join(m.removeprefix(prefix).lstrip(": ") for m in messages)
