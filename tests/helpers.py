"""Test helpers: real Oxen repositories and a tiny Lightning model on CSV data."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from oxen_callbacks._oxen import child as oxen_child

AUTHOR = ("Test Data", "data@example.com")


@dataclass
class Repo:
    path: Path
    commits: list[str] = field(default_factory=list)  # in order, oldest first

    @property
    def head(self) -> str:
        return self.commits[-1]


def make_repo(path: Path, history: list[tuple[str, dict[str, str | bytes]]]) -> Repo:
    """An Oxen repository with one commit per ``(message, {relpath: content})``."""
    path.mkdir(parents=True, exist_ok=True)
    oxen_child.init_repo(path)
    made = Repo(path.resolve())
    for message, files in history:
        commit_files(made, message, files)
    return made


def store_elsewhere(repo: Path, versions_path: Path) -> None:
    """Give a new repository a content store of its own elsewhere (``versions_path``): Oxen reads it, our
    copy from the store does not (pins go through ``oxen restore``)."""
    config = repo / ".oxen" / "config.toml"
    config.write_text(config.read_text().replace('kind = "local"', f'kind = "local"\nversions_path = "{versions_path}"'))


def commit_files(repo: Repo, message: str, files: dict[str, str | bytes]) -> str:
    """Write ``files`` into the working tree and commit them (in a child process, as users' tools would)."""
    for rel, content in files.items():
        target = repo.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    commit = oxen_child.commit_paths(repo.path, list(files), message, author=AUTHOR)
    repo.commits.append(commit)
    return commit


def free_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_contents(root: Path) -> tuple[set[str], dict[str, bytes]]:
    """Folders and file bytes under ``root``, relative."""
    dirs, files = set(), {}
    for dirpath, dirnames, names in os.walk(root):
        base = Path(dirpath).relative_to(root)
        dirs.update(str(base / d) for d in dirnames)
        files.update({str(base / n): (Path(dirpath) / n).read_bytes() for n in names})
    return dirs, files


def tree_state(path: Path) -> dict[str, str]:
    """Hash of every working-tree file plus .oxen/HEAD: to prove nothing changed."""
    state = {}
    for dirpath, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if d not in ("versions", "oxen-callbacks")]
        for name in names:
            p = Path(dirpath) / name
            if "LOCK" in name or name.startswith("LOG") or name.endswith(".mdb"):
                continue  # databases' own bookkeeping
            rel = str(p.relative_to(path))
            if rel.startswith(".oxen/") and rel != ".oxen/HEAD":  # refs: compared as branches
                continue
            state[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
    return state


def read_csv_rows(path: Path) -> list[list[str]]:
    with open(path) as f:
        return list(csv.reader(f))[1:]


def file_at(repo_path: Path, commit: str, rel: str, cache: Path) -> Path:
    """A committed file's bytes, read from the repository at ``commit`` (not its working tree)."""
    from oxen_callbacks import PinnedDataset

    return PinnedDataset(repo_path, revision=commit, paths=[rel], cache_dir=cache).file(rel)


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (any of its threads), now running."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process it or its descendants started, now running (parents first)."""
    return [pid] + [p for child in children(pid) for p in process_tree(child)]


def stop_processes(find: Callable[[], Iterable[int]]) -> set[int]:
    """SIGSTOP the processes ``find()`` names, scanning again until none is new, and return them all: a
    process forks at any time, and a child forked between a scan and its parent's stop would go on running."""
    stopped: set[int] = set()
    while new := set(find()) - stopped:
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        stopped |= new
    return stopped


def sync_until_nothing_pending(timeout: float = 180.0, every: float = 1.0) -> dict:  # type: ignore[type-arg]
    """Run ``sync`` again until it leaves nothing pending (a killed trainer's commit worker outlives it
    and may still be committing; a sink process may still be retrying); returns its last report."""
    from oxen_callbacks._ops import sync

    deadline = time.monotonic() + timeout
    while (report := sync.sync_all())["pending"] and time.monotonic() < deadline:
        time.sleep(every)
    assert report["pending"] == 0, report
    return report


def killed_as_fit_returns_then_synced(dataset_repo, tmp_path: Path, *args: str) -> None:  # type: ignore[no-untyped-def]
    """``fit_script.py`` (2 epochs, MLflow through an ``MLFlowLogger``, ``args`` more) SIGKILLed the
    moment ``fit()`` returns, the end of its run still to log; then ``sync`` until nothing is pending."""
    cmd = [sys.executable, str(Path(__file__).parent / "fit_script.py"), "--dataset", str(dataset_repo.path),
           "--revision", dataset_repo.commits[0], "--model-repo", str(tmp_path / "models"), "--root",
           str(tmp_path / "fit"), "--epochs", "2", "--mlflow", "--logger", "--after-fit", "kill", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    sync_until_nothing_pending()


def logged_models_of_run(uri: str, run_id: str) -> list:  # type: ignore[type-arg]
    """The MLflow logged models whose source is run ``run_id`` (in its experiment)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_run(run_id).info.experiment_id
    return [m for m in client.search_logged_models([experiment]) if m.source_run_id == run_id]


def model_of_each_checkpoint(models: list, record: dict) -> dict:  # type: ignore[type-arg]
    """Each checkpoint of ``record`` (by ``(commit, path)``) -> its logged model: its own, or (a
    ``last.ckpt`` with ``same_model_as``) that of the latest save before it of that path at its fit's
    step. Asserts that every model names one of the run's checkpoints, that no checkpoint has two,
    and that each has one."""
    entries = {(c["commit"], c["path"]) for c in record["checkpoints"]}
    own: dict = {}  # type: ignore[type-arg]
    for model in models:
        key = (model.tags["oxen.model.commit"], model.tags["oxen.model.path"])
        assert key in entries and key not in own, f"a logged model of no checkpoint, or a second one: {model}"
        own[key] = model
    out: dict = {}  # type: ignore[type-arg]
    latest: dict = {}  # type: ignore[type-arg]
    for c in record["checkpoints"]:
        key = (c["commit"], c["path"])
        if key in own:
            out[key] = latest[(c.get("fit_id"), c["step"], c["path"])] = own[key]
        else:
            out[key] = latest[(c.get("fit_id"), c["step"], c.get("same_model_as"))]
    return out


def process_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def assert_every_saved_checkpoint_committed(models: Path, record: dict, ckpt_dir: Path, cache: Path) -> None:
    """Each file the trainer saved in ``ckpt_dir`` is, byte for byte, in the commit ``record`` names for it."""
    saved = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    named = {Path(entry["path"]).name: file_at(models, entry["commit"], entry["path"], cache).read_bytes()
             for entry in record["checkpoints"]}
    assert saved and set(saved) <= set(named)
    assert all(named[name] == data for name, data in saved.items())


def wait_until_released(*folders: Path, timeout: float = 60.0) -> list[str]:
    """Wait until no process holds a file under ``folders`` open; returns the holders left at the timeout.

    A SIGKILLed multithreaded process shows as a zombie (empty cmdline, empty ``/proc/<pid>/fd``)
    while its other threads still exit holding its files and locks: look at every thread's fds."""
    import time

    prefixes = tuple(str(Path(f).resolve()) for f in folders)
    deadline = time.monotonic() + timeout
    while True:
        holders = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    fds = os.listdir(f"/proc/{pid}/task/{tid}/fd")
                except OSError:
                    continue
                for fd in fds:
                    try:
                        target = os.readlink(f"/proc/{pid}/task/{tid}/fd/{fd}")
                    except OSError:
                        continue
                    if target.startswith(prefixes):
                        holders.append(f"{pid}/{tid}: {target}")
        if not holders or time.monotonic() > deadline:
            return holders
        time.sleep(0.1)


# Starts the command and reaps it and, as their subreaper, the helpers it leaves: a stopped commit
# worker whose trainer was killed then keeps a parent in this session (an orphaned process group
# with a stopped member would get SIGHUP from the kernel: an artifact of stopping it, not the library).
SUBREAPER = ("import ctypes, os, subprocess, sys\n"
             "ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)\n"
             "subprocess.Popen(sys.argv[1:])\n"
             "while True:\n"
             "    try:\n"
             "        os.wait()\n"
             "    except ChildProcessError:\n"
             "        break\n")
