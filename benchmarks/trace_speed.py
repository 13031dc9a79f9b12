"""How long `oxen-callbacks trace` / `lineage` take, as whole processes, on 1,000 runs; prints JSON.

    python benchmarks/trace_speed.py [--runs 1000] [--cli-repeat 5] [--repeat 20]

Runs are created with ``MlflowClient`` in a SQLite store (no fits): each has the tags a
training run gets (``oxen.dataset.commit``: 20 dataset commits, 50 runs each;
``oxen.model.commit``: unique), 20 of them a registered model version and 10 an
endpoint. A model repository (``oxen init``, one committed ``runs/<run>/lineage.json``
per run, same run ids and commits) holds the same lineage. A real ``mlflow server``
then serves the store on 127.0.0.1. Measured:

* ``cli``: whole processes (start-up, imports and exit included), medians of
  ``--cli-repeat`` interleaved rounds: ``trace MODEL_COMMIT --json`` and ``lineage RUN --json``
  answered by the server (REST), by the model repository alone (``--model-repo``, no
  MLflow) and by the SQLite file (``MlflowClient``), next to MLflow's own
  ``mlflow runs describe --run-id RUN`` on the same SQLite store, the anchor. Each case also
  has its median CPU time (user + system), which a busy machine shakes less;
* ``imports_mlflow``: whether each of those processes imported ``mlflow`` (``-X importtime``);
* ``in_process``: ``LineageFinder.trace`` for each kind of target, after a warm-up;
* ``targets``: issue #13's targets, each with its measured value and ``met``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mlflow_server import MlflowServer
from user_env import user_env

from oxen_callbacks._ops.trace import LineageFinder
from oxen_callbacks._oxen import child as oxen_child
from oxen_callbacks.lineage import SCHEMA, write_lineage
from oxen_callbacks.model_repo import endpoint_tag, lineage_path

TARGET_S = 1.0  # issue #13: trace/lineage as a whole process, from a server or a model repository
AUTHOR = ("Trace Bench", "bench@example.com")


def commit_id(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()  # 32 hex characters, like an Oxen commit id


def run_name(i: int) -> str:
    return f"run-{i:04d}"


def populate(uri: str, runs: int) -> dict[str, Any]:
    """Create the runs; returns one target of each kind, the picked run's id and every run id by name."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment("trace-speed")
    client.create_registered_model("bench-clf")
    endpoints = [f"https://api.example.com/v1/model-{i}" for i in range(10)]
    pick = 50 * (runs // 100) + 7  # a run with a registered version (aliased) in the middle of the store
    run_ids = {}
    for i in range(runs):
        tags = {"oxen.run": run_name(i), "oxen.dataset.repo": "/data/reviews",
                "oxen.dataset.commit": commit_id(f"data-{i % 20}"), "oxen.dataset.revision": "main",
                "oxen.dataset.paths": '["train.csv"]', "oxen.model.repo": "/models/reviews",
                "oxen.model.commit": commit_id(f"model-{i}"), "oxen.model.path": f"runs/{run_name(i)}/checkpoints/last.ckpt",
                "oxen.code.git_commit": f"{i:040x}", "oxen.lineage.status": "FINISHED"}
        if i % 100 == 7:
            tags[endpoint_tag(endpoints[i // 100])] = endpoints[i // 100]
        run_id = run_ids[run_name(i)] = client.create_run(experiment, run_name=run_name(i), tags=tags).info.run_id
        if i % 50 == 7:
            version = client.create_model_version("bench-clf", f"runs:/{run_id}/oxen", run_id=run_id,
                                                  tags={"oxen.model.commit": tags["oxen.model.commit"]})
            if i == pick:
                client.set_registered_model_alias("bench-clf", "production", version.version)
    return {"targets": {"model_commit": commit_id(f"model-{pick}"), "model_commit_prefix": commit_id(f"model-{pick}")[:12],
                        "dataset_commit": commit_id("data-7"), "endpoint": endpoints[(runs - 1) // 200]},
            "pick": pick, "run_ids": run_ids}


def model_repository(path: Path, run_ids: dict[str, str]) -> None:
    """A model repository holding the same runs' lineage records, committed."""
    path.mkdir(parents=True)
    oxen_child.init_repo(path)
    for i, (name, run_id) in enumerate(sorted(run_ids.items())):
        checkpoint = {"commit": commit_id(f"model-{i}"), "path": f"runs/{name}/checkpoints/last.ckpt", "step": 10,
                      "epoch": 0, "metrics": {"val_loss": 0.5}}
        write_lineage({"schema": SCHEMA, "status": "FINISHED",
                       "dataset": {"repo": "/data/reviews", "revision": "main", "commit": commit_id(f"data-{i % 20}"),
                                   "paths": ["train.csv"]},
                       "model": {"repo": str(path), "commit": checkpoint["commit"], "path": checkpoint["path"]},
                       "checkpoints": [checkpoint], "run": {"name": name, "mlflow_run_id": run_id, "mlflow_tracking_uri": None},
                       "code": {"git_commit": f"{i:040x}", "git_dirty": False},
                       "framework": {"name": "lightning", "version": "2"}}, path / lineage_path(name))
    oxen_child.commit_paths(path, ["runs"], f"lineage of {len(run_ids)} runs", author=AUTHOR)


def median_s(seconds: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
            "max_s": round(max(seconds), 3), "n": len(seconds)}


def timed(fn: Callable[[], object], repeat: int) -> dict[str, float]:
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return median_s(seconds)


def cli_command() -> list[str]:
    """``oxen-callbacks`` as users run it: the console script next to this Python, else ``-m``."""
    script = Path(sys.executable).with_name("oxen-callbacks")
    return [str(script)] if script.exists() else [sys.executable, "-m", "oxen_callbacks.cli"]


def process_env(tracking_uri: str | None) -> dict[str, str]:
    return user_env(("MLFLOW_",), **({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}))


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_process(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, str]:
    """Wall and CPU seconds of the process ``cmd`` (CPU: less shaken by a busy machine), and its output."""
    cpu, started = children_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed, cpu = time.perf_counter() - started, children_cpu_s() - cpu
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed, cpu, proc.stdout


def imports_mlflow(cmd: list[str], env: dict[str, str], cwd: Path) -> bool:
    """Whether the process ``cmd`` imports ``mlflow`` (read from ``python -X importtime``)."""
    proc = subprocess.run(cmd, env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, cwd=cwd, capture_output=True, text=True,
                          check=True)
    names = (line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:"))
    return any(n == "mlflow" or n.startswith("mlflow.") for n in names)


def cli_cases(uris: dict[str, str], repo: Path, model_commit: str, run_id: str, name: str) -> dict[str, tuple]:
    """``case -> (command, tracking URI)`` for every whole process measured."""
    cli = cli_command()
    return {
        "trace/server": ([*cli, "trace", model_commit, "--json"], uris["server"]),
        "trace/model_repo": ([*cli, "trace", model_commit, "--model-repo", str(repo), "--json"], None),
        "trace/sqlite": ([*cli, "trace", model_commit, "--json"], uris["sqlite"]),
        "lineage/server": ([*cli, "lineage", run_id, "--json"], uris["server"]),
        "lineage/model_repo": ([*cli, "lineage", "--model-repo", str(repo), name, "--json"], None),
        "lineage/model_repo_by_run_id": ([*cli, "lineage", "--model-repo", str(repo), run_id, "--json"], None),
        "lineage/sqlite": ([*cli, "lineage", run_id, "--json"], uris["sqlite"]),
        "mlflow_runs_describe/sqlite": ([str(Path(sys.executable).with_name("mlflow")), "runs", "describe",
                                         "--run-id", run_id], uris["sqlite"]),
    }


def measure_cli(cases: dict[str, tuple], cwd: Path, rounds: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Interleaved rounds (every case once per round, so noise hits all alike); medians and answers.

    A first round is not timed: the server answers its first query slowly, and the files
    (Python's, the store, the repository) should be in the page cache for every case alike.
    """
    seconds: dict[str, list[float]] = {case: [] for case in cases}
    cpu_seconds: dict[str, list[float]] = {case: [] for case in cases}
    answers: dict[str, Any] = {}
    for round_ in range(rounds + 1):
        for case, (cmd, uri) in cases.items():
            elapsed, cpu, out = run_process(cmd, process_env(uri), cwd)
            if round_:
                seconds[case].append(elapsed)
                cpu_seconds[case].append(cpu)
            answers[case] = json.loads(out) if not case.startswith("mlflow") else None
    timings = {case: {**median_s(s), "cpu_median_s": round(statistics.median(cpu_seconds[case]), 3),
                      "imports_mlflow": imports_mlflow(cases[case][0], process_env(cases[case][1]), cwd)}
               for case, s in seconds.items()}
    return timings, answers


def check_answers(answers: dict[str, Any], run_id: str, dataset_commit: str) -> dict[str, bool]:
    """Each path found the picked run and its dataset commit (a fast wrong answer counts for nothing)."""
    def run_of(view: dict[str, Any]) -> tuple[str | None, str | None]:
        return view["run"].get("mlflow_run_id"), (view.get("dataset") or {}).get("commit")

    ok = {}
    for case, answer in answers.items():
        if answer is not None:
            views = answer["runs"] if case.startswith("trace") else [answer]
            ok[case] = [run_of(v) for v in views] == [(run_id, dataset_commit)]
    return ok


def targets(cli: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #13's CLI targets with their measured values."""
    found = []
    describe = cli["mlflow_runs_describe/sqlite"]["median_s"]
    for command in ("trace", "lineage"):
        for where, label in (("server", "an MLflow server"), ("model_repo", "the model repository")):
            measured = cli[f"{command}/{where}"]["median_s"]
            found.append({"target": f"`{command}` answered from {label}: whole process <= {TARGET_S} s",
                          "measured_s": measured, "limit_s": TARGET_S, "met": measured <= TARGET_S})
        ratio = round(cli[f"{command}/sqlite"]["median_s"] / describe, 3)
        cpu_ratio = round(cli[f"{command}/sqlite"]["cpu_median_s"] / cli["mlflow_runs_describe/sqlite"]["cpu_median_s"], 3)
        found.append({"target": f"`{command}` on a SQLite store / `mlflow runs describe` on the same run <= 1.0",
                      "measured_ratio": ratio, "cpu_ratio": cpu_ratio, "anchor_s": describe, "limit_ratio": 1.0,
                      "met": ratio <= 1.0})
    for case in ("trace/server", "trace/model_repo", "lineage/server", "lineage/model_repo"):
        found.append({"target": f"{case}: no mlflow import", "met": not cli[case]["imports_mlflow"]})
    return found


def in_process(uris: dict[str, str], queries: dict[str, str], repeat: int) -> dict[str, Any]:
    """``LineageFinder.trace`` in one process, warm (the query alone) and cold (a new finder each time)."""
    report: dict[str, Any] = {}
    for kind, target in queries.items():
        entry: dict[str, Any] = {"target": target}
        for store, uri in uris.items():
            finder = LineageFinder(tracking_uri=uri)
            entry["found_runs"] = len(finder.trace(target)["runs"])  # also the warm-up
            entry[f"{store}_warm"] = timed(lambda f=finder, t=target: f.trace(t), repeat)
            entry[f"{store}_cold"] = timed(lambda u=uri, t=target: LineageFinder(tracking_uri=u).trace(t),
                                           max(1, repeat // 4))
        report[kind] = entry
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=20, help="in-process repeats per query")
    parser.add_argument("--cli-repeat", type=int, default=5, help="interleaved rounds of whole processes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trace-speed-") as tmp:
        root = Path(tmp)
        folder, repo, cwd = root / "server", root / "models", root / "elsewhere"  # cwd: in no model repository
        folder.mkdir()
        cwd.mkdir()
        sqlite_uri = f"sqlite:///{folder / 'mlflow.db'}"
        started = time.perf_counter()
        made = populate(sqlite_uri, args.runs)
        model_repository(repo, made["run_ids"])
        report: dict[str, Any] = {"runs": args.runs, "populate_s": round(time.perf_counter() - started, 1),
                                  "machine_cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
        name = run_name(made["pick"])
        run_id, model_commit = made["run_ids"][name], made["targets"]["model_commit"]
        with MlflowServer(folder) as server:
            uris = {"server": server.uri, "sqlite": sqlite_uri}
            cli, answers = measure_cli(cli_cases(uris, repo, model_commit, run_id, name), cwd, args.cli_repeat)
            report["cli"] = {"model_commit": model_commit, "run_id": run_id, "run_name": name, **cli}
            report["answers_right"] = check_answers(answers, run_id, commit_id(f"data-{made['pick'] % 20}"))
            report["in_process"] = in_process({"server_rest": server.uri, "sqlite_client": sqlite_uri},
                                              made["targets"], args.repeat)
        report["targets"] = targets(cli)
        report["all_met"] = all(t["met"] for t in report["targets"]) and all(report["answers_right"].values())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
