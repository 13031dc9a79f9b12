"""How long `oxen-callbacks trace` takes on an MLflow store holding 1,000 runs; prints JSON.

    python benchmarks/trace_speed.py [--runs 1000] [--repeat 20] [--cli-repeat 5]

Runs are created with ``MlflowClient`` in a SQLite store (no fits): each has the tags a
training run gets (``oxen.dataset.commit``: 20 dataset commits, 50 runs each;
``oxen.model.commit``: unique), 20 of them a registered model version and 10 an
endpoint. A real ``mlflow server`` then serves that store on 127.0.0.1. Measured:

* ``in_process``: ``LineageFinder.trace`` through the REST reader (server) and through
  ``MlflowClient`` (SQLite file), after one warm-up query;
* ``cli``: the whole ``oxen-callbacks trace TARGET --json`` process, start-up included.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mlflow_server import MlflowServer  # noqa: E402

from oxen_callbacks._ops.trace import LineageFinder  # noqa: E402
from oxen_callbacks.model_repo import endpoint_tag  # noqa: E402


def commit_id(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()  # 32 hex characters, like an Oxen commit id


def populate(uri: str, runs: int) -> dict[str, str]:
    """Create the runs; returns one target of each kind."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment("trace-speed")
    client.create_registered_model("bench-clf")
    endpoints = [f"https://api.example.com/v1/model-{i}" for i in range(10)]
    pick = 50 * (runs // 100) + 7  # a run with a registered version (aliased) in the middle of the store
    for i in range(runs):
        tags = {"oxen.run": f"run-{i:04d}", "oxen.dataset.repo": "/data/reviews",
                "oxen.dataset.commit": commit_id(f"data-{i % 20}"), "oxen.dataset.revision": "main",
                "oxen.dataset.paths": '["train.csv"]', "oxen.model.repo": "/models/reviews",
                "oxen.model.commit": commit_id(f"model-{i}"), "oxen.model.path": f"runs/run-{i:04d}/checkpoints/last.ckpt",
                "oxen.code.git_commit": f"{i:040x}", "oxen.lineage.status": "FINISHED"}
        if i % 100 == 7:
            tags[endpoint_tag(endpoints[i // 100])] = endpoints[i // 100]
        run_id = client.create_run(experiment, run_name=f"run-{i:04d}", tags=tags).info.run_id
        if i % 50 == 7:
            version = client.create_model_version("bench-clf", f"runs:/{run_id}/oxen", run_id=run_id,
                                                  tags={"oxen.model.commit": tags["oxen.model.commit"]})
            if i == pick:
                client.set_registered_model_alias("bench-clf", "production", version.version)
    return {"model_commit": commit_id(f"model-{pick}"), "model_commit_prefix": commit_id(f"model-{pick}")[:12],
            "dataset_commit": commit_id("data-7"), "endpoint": endpoints[(runs - 1) // 200]}


def timed(fn, repeat: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return {"median_s": round(statistics.median(seconds), 4), "max_s": round(max(seconds), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--cli-repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trace-speed-") as tmp:
        folder = Path(tmp) / "server"
        folder.mkdir()
        sqlite_uri = f"sqlite:///{folder / 'mlflow.db'}"
        started = time.perf_counter()
        targets = populate(sqlite_uri, args.runs)
        populate_s = time.perf_counter() - started
        report: dict = {"runs": args.runs, "populate_s": round(populate_s, 1), "machine_cpus": os.cpu_count(),
                        "targets": {}}
        with MlflowServer(folder) as server:
            stores = {"server_rest": server.uri, "sqlite_client": sqlite_uri}
            for kind, target in targets.items():
                entry: dict = {"target": target}
                for store, uri in stores.items():
                    finder = LineageFinder(tracking_uri=uri)
                    found = finder.trace(target)  # warm-up; also the answer checked below
                    entry["found_runs"] = len(found["runs"])
                    entry[f"in_process_{store}"] = timed(lambda f=finder, t=target: f.trace(t), args.repeat)
                    entry[f"in_process_{store}_cold"] = timed(
                        lambda u=uri, t=target: LineageFinder(tracking_uri=u).trace(t), max(1, args.repeat // 4))
                    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
                    cmd = [sys.executable, "-m", "oxen_callbacks.cli", "trace", target, "--json"]
                    entry[f"cli_{store}"] = timed(
                        lambda c=cmd, e=env: subprocess.run(c, env=e, cwd=tmp, capture_output=True, check=True),
                        args.cli_repeat)
                report["targets"][kind] = entry
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
