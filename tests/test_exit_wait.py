"""A script that ends right after ``fit()`` waits at exit for the lineage, says so when that takes over a
second, and Ctrl-C there ends the wait at once with nothing lost (README, "What holds when ``fit()``
returns")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from oxen_callbacks._publish.queue import repo_lock_path
from oxen_callbacks._util.locks import FileLock

SCRIPT = """
import sys
from pathlib import Path
from oxen_callbacks.run import LineageRun
root = Path(sys.argv[1])
run = LineageRun(dataset=None, model_repo=root / "models", framework=("test", "1"), mlflow=False,
                 run_name="script", author=("T", "t@example.com"))
run.start()
(root / "last.ckpt").write_bytes(b"weights" * 100)
print("started", flush=True)
sys.stdin.readline()  # the parent holds the repository's lock now: the commit waits
run.checkpoint_saved(root / "last.ckpt", step=4, epoch=1)
run.finish_soon("FINISHED")  # what fit() returns after; then the script ends
"""


def test_the_exit_wait_says_so_and_ctrl_c_ends_it_losing_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    script = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert script.stdout.readline().strip() == "started"
    holder = FileLock(repo_lock_path(tmp_path / "models"))
    holder.acquire()
    try:
        script.stdin.write("go\n")
        script.stdin.flush()
        said = script.stderr.readline()  # (nothing else is logged before it)
        assert "finishing the lineage of run script" in said and "Ctrl-C leaves the rest" in said, said
        script.send_signal(signal.SIGINT)
        script.wait(timeout=10)  # at once, though the commit still waits for the repository
        assert "not waiting; what is left is journaled" in script.stderr.read()
    finally:
        holder.release()
        if script.poll() is None:
            script.kill()
    record_path = tmp_path / "models" / "runs" / "script" / "lineage.json"
    deadline, record = time.monotonic() + 60, {}
    while time.monotonic() < deadline and not (record.get("status") == "FINISHED" and record["checkpoints"][0]["commit"]):
        time.sleep(0.2)
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
    assert record["status"] == "FINISHED" and record["checkpoints"][0]["commit"]  # the worker went on alone
