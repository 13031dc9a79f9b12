"""What a fit's start and a checkpoint's commit cost in a model repository with a long past, paired against a new one.

    python benchmarks/fit_start.py [--runs 1000] [--repeats 7]

Two model repositories: ``new`` (one earlier run, to open it) and ``long_past`` with ``--runs`` earlier
runs: a commit each (their lineage records, made with oxenai) and each one's finished queue, which
are kept a day after their last job (copies of a real run's). Every repeat runs one fit's lineage in
each, in a shuffled order: ``LineageRun.start()`` (what ``fit()`` waits for at its start: the run name
claimed, the repository opened, the commit worker started), one 1 MB checkpoint published and
committed, the run finished. Times: ``start_s`` (wall), ``commit_s`` (the checkpoint's commit, as its
commit process measured it: staging, ``oxen add``, ``commit``), ``committed_s`` (from the save to its
result on disk: also the worker's start-up chores, which look at every queue folder once). Prints medians, paired ratios (long
past / new) with a 95 % bootstrap interval; the last line of stdout is one JSON object. Fit start
should cost the same in both: nothing it does reads one entry per earlier run or commit. A commit
cannot: Oxen's own ``add`` and ``commit`` of a file under ``runs/<run>/`` grow with the runs beside it
(its tree node of ``runs/`` lists them all).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from whole_script import IDENTITY, median_ci95

from oxen_callbacks._publish.queue import queues_of_run
from oxen_callbacks.run import LineageRun

HISTORY = """
import json, os, sys, oxen
repo = oxen.Repo(sys.argv[1])
for i in range(int(sys.argv[2])):
    path = os.path.join(sys.argv[1], "runs", f"past-{i}", "lineage.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"run": {"name": f"past-{i}"}, "checkpoints": []}, f)
    repo.add(path)
    repo.commit(f"past run {i}")
"""


def one_run(models: Path, root: Path, name: str) -> dict[str, float]:
    """One fit's lineage in ``models``: its start timed, one checkpoint committed, the run finished."""
    run = LineageRun(dataset=None, model_repo=models, framework=("bench", "0"), mlflow=False, run_name=name,
                     cache_dir=root / "cache")
    started = time.perf_counter()
    run.start()
    start_s = time.perf_counter() - started
    checkpoint = root / f"{name}.ckpt"
    checkpoint.write_bytes(os.urandom(1 << 20))
    (queue,) = queues_of_run(models, name)
    submitted = time.perf_counter()
    run.checkpoint_saved(checkpoint, step=1, epoch=0, metrics={"loss": 1.0})
    while not (done := [json.loads(p.read_text()) for p in (queue.folder / "done").glob("*.json")]):
        if time.perf_counter() - submitted > 120:  # (its commit alone: not grouped with the run's end)
            raise RuntimeError(f"the checkpoint of {name} was not committed in 120 s: see {queue.log_path}")
        time.sleep(0.001)
    committed_s = time.perf_counter() - submitted
    run.finish("FINISHED")
    run.wait()
    (commit,) = done
    return {"start_s": start_s, "commit_s": commit["seconds"], "committed_s": committed_s}


def long_past(models: Path, root: Path, runs: int) -> None:
    """Give ``models`` (with one finished run, ``first``) ``runs`` earlier runs: commits and finished queues."""
    out = subprocess.run([sys.executable, "-c", HISTORY, str(models), str(runs)], capture_output=True, text=True,
                         env={**os.environ, "OXEN_CONFIG_DIR": str(root / "oxen-config")}, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"making the history failed:\n{out.stderr[-4000:]}")
    (template,) = queues_of_run(models, "first")
    meta = json.loads((template.folder / "meta.json").read_text())
    for i in range(runs):
        copy = template.folder.with_name(f"past-{i}-{i:08x}")
        shutil.copytree(template.folder, copy)
        (copy / "meta.json").write_text(json.dumps({**meta, "run": f"past-{i}"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="oxen-bench-fit-start-") as tmp:
        root = Path(tmp)
        (root / "oxen-config").mkdir()
        (root / "oxen-config" / "user_config.toml").write_text(IDENTITY)
        os.environ["OXEN_CONFIG_DIR"] = str(root / "oxen-config")
        repos = {"new": root / "new", "long_past": root / "long_past"}
        for models in repos.values():
            one_run(models, root, "first")
        long_past(repos["long_past"], root, args.runs)
        print(f"made {args.runs} earlier runs in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in repos}
        for i in range(args.repeats):
            order = list(repos)
            random.Random(i).shuffle(order)
            for name in order:
                samples[name].append(one_run(repos[name], root, f"bench-{i}"))
                print(f"  #{i} {name:9s} start {samples[name][-1]['start_s'] * 1000:6.1f} ms "
                      f"commit {samples[name][-1]['commit_s'] * 1000:6.1f} ms "
                      f"committed {samples[name][-1]['committed_s'] * 1000:6.1f} ms", file=sys.stderr)
    result: dict = {"runs": args.runs, "repeats": args.repeats}
    for key in ("start_s", "commit_s", "committed_s"):
        result[key] = {name: round(statistics.median(s[key] for s in samples[name]), 4) for name in repos}
        ratios = [a[key] / b[key] for a, b in zip(samples["long_past"], samples["new"], strict=True)]
        result[key]["ratio"] = round(statistics.median(ratios), 3)
        result[key]["ratio_ci95"] = median_ci95(ratios)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
