"""Whole-process cost of a short Lightning training script, with and without oxen-callbacks.

    python benchmarks/whole_script.py [--repeats 5] [--quick] [--epochs 3]

Each sample is a fresh ``python`` process running the quickstart's workload (the model, the
generated CSV tables and the pinned dataset come from ``examples/quickstart.py``: a tiny
classifier, 3 epochs, ``ModelCheckpoint(monitor="val_loss", save_top_k=2, save_last=True)``,
data read through ``PinnedDataset``) with one of these variants:

- ``bare``: ModelCheckpoint only, ``logger=False``;
- ``mlflow_logger``: ``MLFlowLogger(tracking_uri=<SQLite>, log_model=False)``;
- ``mlflow_logger_all``: the same with ``log_model="all"`` (checkpoints copied into MLflow);
- ``ours_mlflow``: ``OxenLightningCallback`` with its own MLflow run on the SQLite store, no logger;
- ``ours_shared``: ``MLFlowLogger(log_model=False)`` + ``OxenLightningCallback`` (joins its run);
  ``ours_shared_no_models``: the same with ``log_models=False`` (no MLflow logged model per
  checkpoint: the MLflow work of the naive callback's kind, tags and one pointer file);
- ``ours_oxen_only``: ``OxenLightningCallback(mlflow=False)``, no logger;
- ``naive``: ``MLFlowLogger(log_model=False)`` + a hand-written callback that runs oxenai
  ``add`` + ``commit`` of each saved checkpoint synchronously and tags the logger's run with the
  commit id (``naive_oxen.py``); ``naive_oxen_only``: that callback without a logger.

Every repeat runs every variant once, in its own shuffled order (seeded: the same on every run of
this script), so that no variant always follows the same one; before each sample the disk's dirty
pages are written (``os.sync()``, untimed), so no sample pays for an earlier one's writes. Two store
conditions: ``existing`` (one SQLite store, model repository and snapshot cache per variant,
created by an untimed warm-up run of each variant and holding every earlier run: a project's
second run of its script) and ``new`` (each process gets a not-yet-created SQLite store, model
repository and cache: a project's first run). The Oxen dataset repository is shared.

Numbers, per condition and variant (medians, and every sample under ``samples``):

- ``wall_s``: from starting the process until it exited (what the user waits for);
- ``cpu_s``: user + system CPU of the process and every descendant it or this script reaped
  (``os.wait4``), including helper processes that outlived it;
- ``fit_s``: ``trainer.fit()`` alone, as the child printed it;
- ``lingering_s``: how long helper processes outlived the script (this script is their
  subreaper on Linux and waits for them before the next sample, so they cannot slow it).

``ratios``: per condition, each target as the median of PAIRED ratios (the ratio within one
repeat, then the median over repeats) of ``wall_s``, with a 95 % bootstrap interval of that
median (``wall_ci95``), the target, ``met``, and the same
paired ratio of ``cpu_s`` and ``fit_s`` for information. ``ours_* / naive*``: ours is never
slower than the hand-written callback (target 1.0).

A sample fails the whole run (non-zero exit, stderr shown) when its process crashes, when an
ours variant's ``callback.lineage`` lists no committed checkpoint, when the naive callback made
no commit, or when the MLflow store does not hold the sample's run, FINISHED, with its
``oxen.model.commit`` tag (for the variants that log one) once the process and its helpers exited.

Every variant imports ``examples/quickstart.py``, which imports ``oxen_callbacks.lightning``
(~0.06 s on a 2-core machine): the variants without the callback pay that import too.
``--quick``: 3 repeats, ``existing`` only (a smoke test: 36 processes, ~5 minutes on a quiet
2-core machine). A full run is ``9 variants x (5 x 2 + 1)`` = 99 processes of ~6-12 s each
(~13 minutes on a quiet 2-core machine).
The last line of stdout is one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from user_env import user_env

VARIANTS = ("bare", "mlflow_logger", "mlflow_logger_all", "ours_mlflow", "ours_shared", "ours_shared_no_models",
            "ours_oxen_only", "naive", "naive_oxen_only")
MLFLOW_VARIANTS = {"mlflow_logger", "mlflow_logger_all", "ours_mlflow", "ours_shared", "ours_shared_no_models", "naive"}
# their MLflow run must carry the commit tag
TAGGING_VARIANTS = {"ours_mlflow", "ours_shared", "ours_shared_no_models", "naive"}
MODEL_COMMIT_TAG = "oxen.model.commit"
# (numerator, denominator, target): paired wall-time ratio <= target
TARGETS = (
    ("ours_shared", "mlflow_logger", 1.10),
    ("ours_mlflow", "mlflow_logger", 1.0),
    ("ours_oxen_only", "bare", 1.05),
    ("ours_shared", "naive", 1.0),
    ("ours_shared_no_models", "naive", 1.0),
    ("ours_mlflow", "naive", 1.0),
    ("ours_oxen_only", "naive", 1.0),
    ("ours_oxen_only", "naive_oxen_only", 1.0),
)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
IDENTITY = 'name = "bench"\nemail = "bench@example.com"\n'
ORPHAN_LIMIT_S = 600.0


# -- one script run, in a child process --------------------------------------------------
def run_script(variant: str, dataset: Path, revision: str, models: Path, store: Path, epochs: int) -> dict:
    """The quickstart's training with ``variant``'s callbacks and logger; returns what the parent checks."""
    sys.path.insert(0, str(EXAMPLES))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger
    from naive_oxen import naive_checkpoint
    from quickstart import Classifier, load_table
    from torch.utils.data import DataLoader

    from oxen_callbacks import PinnedDataset
    from oxen_callbacks.lightning import OxenLightningCallback

    uri = f"sqlite:///{store}"
    data = PinnedDataset(dataset, revision=revision, paths=["train.csv", "val.csv"])
    logger: MLFlowLogger | bool = False
    if variant in ("mlflow_logger", "ours_shared", "ours_shared_no_models", "naive"):
        logger = MLFlowLogger(experiment_name="bench", tracking_uri=uri, log_model=False)
    elif variant == "mlflow_logger_all":
        logger = MLFlowLogger(experiment_name="bench", tracking_uri=uri, log_model="all")
    checkpoint_args = {"dirpath": Path.cwd() / "checkpoints", "monitor": "val_loss", "save_top_k": 2,
                       "save_last": True}
    if variant.startswith("naive"):
        checkpoint = naive_checkpoint(models, logger if logger is not False else None, **checkpoint_args)
    else:
        checkpoint = ModelCheckpoint(**checkpoint_args)
    callbacks: list[L.Callback] = [checkpoint]
    ours = None
    if variant.startswith("ours"):
        options = {"ours_mlflow": {"mlflow_tracking_uri": uri, "experiment_name": "bench"},
                   "ours_shared": {}, "ours_shared_no_models": {"log_models": False},
                   "ours_oxen_only": {"mlflow": False}}[variant]
        ours = OxenLightningCallback(dataset=data, model_repo=models, **options)
        callbacks.append(ours)
    torch.manual_seed(0)
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=Path.cwd(), log_every_n_steps=10)
    train = DataLoader(load_table(data.file("train.csv")), batch_size=64, shuffle=True)
    val = DataLoader(load_table(data.file("val.csv")), batch_size=256)
    started = time.perf_counter()
    trainer.fit(Classifier(), train, val)
    result = {"variant": variant, "fit_s": time.perf_counter() - started}
    if ours is not None:
        result["checkpoints"] = len((ours.lineage or {}).get("checkpoints") or [])
    if variant.startswith("naive"):
        result["checkpoints"] = len(checkpoint.commits)
    if (ours is not None or variant.startswith("naive")) and result["checkpoints"] == 0:
        raise SystemExit(f"{variant}: no checkpoint was committed")
    return result


# -- orchestration --------------------------------------------------------------------------
def become_subreaper() -> bool:
    """Make helper processes that outlive a script ours to wait for (Linux ``PR_SET_CHILD_SUBREAPER``)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_orphans() -> tuple[float, float]:
    """Wait for every remaining descendant; their CPU seconds and how long the last one lived on."""
    started, cpu = time.perf_counter(), 0.0
    while True:
        try:
            pid, _status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return cpu, time.perf_counter() - started
        if pid:
            cpu += usage.ru_utime + usage.ru_stime
        elif time.perf_counter() - started > ORPHAN_LIMIT_S:
            raise RuntimeError(f"helper processes still running {ORPHAN_LIMIT_S:.0f} s after the script exited")
        else:
            time.sleep(0.02)


def mlflow_runs(store: Path) -> tuple[int, int, str | None]:
    """(runs, runs tagged with the model commit, status of the newest run) in a SQLite store."""
    if not store.exists():
        return 0, 0, None
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        runs = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        tagged = db.execute("SELECT COUNT(DISTINCT run_uuid) FROM tags WHERE key = ?", (MODEL_COMMIT_TAG,)).fetchone()[0]
        newest = db.execute("SELECT status FROM runs ORDER BY start_time DESC LIMIT 1").fetchone()
    return runs, tagged, newest[0] if newest else None


def run_in_child(variant: str, paths: dict[str, Path], root: Path, dataset: tuple[Path, str], epochs: int) -> dict:
    """One timed script process; raises when it crashed or its lineage / MLflow run is missing."""
    cwd = paths["cwd"]
    cwd.mkdir(parents=True, exist_ok=True)
    before = mlflow_runs(paths["store"])
    env = user_env(("MLFLOW_", "OXEN_CALLBACKS_"), OXEN_CALLBACKS_CACHE=str(paths["cache"]),
                   OXEN_CONFIG_DIR=str(root / "oxen-config"))
    cmd = [sys.executable, __file__, "--child", variant, "--dataset", str(dataset[0]), "--revision", dataset[1],
           "--models", str(paths["models"]), "--store", str(paths["store"]), "--epochs", str(epochs)]
    out_path, err_path = cwd / "stdout.txt", cwd / "stderr.txt"
    returncode, timed = timed_process(cmd, env, cwd, out_path)
    if returncode != 0:
        raise RuntimeError(f"{variant} exited with {returncode}:\n{err_path.read_text()[-4000:]}")
    result = json.loads(out_path.read_text().strip().splitlines()[-1])
    if variant in MLFLOW_VARIANTS:
        after = mlflow_runs(paths["store"])
        expected_tags = before[1] + (variant in TAGGING_VARIANTS)
        if after[0] != before[0] + 1 or after[1] != expected_tags or after[2] != "FINISHED":
            raise RuntimeError(f"{variant}: MLflow store {paths['store']} went from (runs, tagged, newest status) "
                               f"{before} to {after} after the script and its helpers exited")
    result.update(timed)
    return result


def timed_process(cmd: list[str], env: dict[str, str], cwd: Path, stdout: Path | None) -> tuple[int, dict[str, float]]:
    """Run one script process in ``cwd`` (stderr to ``cwd/stderr.txt``) and wait for it and every helper
    it left; returns its exit code and ``wall_s``, ``cpu_s`` (helpers included) and ``lingering_s``.
    The checkpoints it saved in ``cwd`` are removed: an existing store's next run starts without them."""
    with (stdout or Path(os.devnull)).open("w") as out, (cwd / "stderr.txt").open("w") as err:
        os.sync()  # an earlier sample's dirty pages are written now, not during this one
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    orphan_cpu, lingering = reap_orphans()
    shutil.rmtree(cwd / "checkpoints", ignore_errors=True)
    return os.waitstatus_to_exitcode(status), {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime + orphan_cpu,
                                                "lingering_s": lingering}


def condition_paths(root: Path, condition: str, variant: str, i: int | str) -> dict[str, Path]:
    """``existing``: a store, model repository, cache and cwd per variant, reused by every run;
    ``new``: all fresh per process."""
    if condition == "existing":
        home = root / "existing" / variant
        return {"cwd": home / "cwd", "store": home / "mlflow.db", "models": home / "models", "cache": home / "cache"}
    home = root / "new" / f"{variant}-{i}"
    return {"cwd": home / "cwd", "store": home / "mlflow.db", "models": home / "models", "cache": home / "cache"}


def prepare_dataset(root: Path) -> tuple[Path, str]:
    """The quickstart's dataset repository (two commits); returns it and its first commit."""
    (root / "oxen-config").mkdir()
    (root / "oxen-config" / "user_config.toml").write_text(IDENTITY)
    dataset = root / "dataset"
    code = (f"import sys; sys.path.insert(0, {str(EXAMPLES)!r}); from pathlib import Path; "
            "from quickstart import ensure_dataset; print(ensure_dataset(Path(sys.argv[1])))")
    env = {**os.environ, "OXEN_CONFIG_DIR": str(root / "oxen-config"), "OXEN_CALLBACKS_CACHE": str(root / "cache")}
    out = subprocess.run([sys.executable, "-c", code, str(dataset)], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"creating the dataset failed:\n{out.stderr[-4000:]}")
    return dataset, out.stdout.strip().splitlines()[-1]


def paired(runs: dict[str, list[dict]], num: str, den: str, key: str) -> float:
    return statistics.median(a[key] / b[key] for a, b in zip(runs[num], runs[den], strict=True))


def median_ci95(ratios: list[float], resamples: int = 10_000) -> tuple[float, float]:
    """A 95 % interval for the median of ``ratios`` (bootstrap percentiles, fixed seed): how far the
    median of so few noisy pairs could be from the machine's true one."""
    pick = random.Random(0).choices
    medians = sorted(statistics.median(pick(ratios, k=len(ratios))) for _ in range(resamples))
    return round(medians[int(0.025 * resamples)], 3), round(medians[int(0.975 * resamples) - 1], 3)


def sample_order(variants: tuple[str, ...], condition_name: str, repeat: int) -> list[str]:
    """Repeat ``repeat``'s order of the variants: shuffled with a fixed seed per condition and repeat.
    (A rotation keeps each variant after the same one every repeat: whatever that one leaves behind,
    its disk writes or its store's pages, would always weigh on the same variant.)"""
    order = list(variants)
    random.Random(f"{condition_name}-{repeat}").shuffle(order)
    return order


def condition(root: Path, name: str, dataset: tuple[Path, str], repeats: int, epochs: int) -> dict:
    if name == "existing":
        print(f"{name}: warm-up", file=sys.stderr)
        for variant in VARIANTS:
            run_in_child(variant, condition_paths(root, name, variant, "warmup"), root, dataset, epochs)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for i in range(repeats):
        for variant in sample_order(VARIANTS, name, i):
            paths = condition_paths(root, name, variant, i)
            sample = run_in_child(variant, paths, root, dataset, epochs)
            runs[variant].append(sample)
            if name == "new":
                shutil.rmtree(paths["cwd"].parent, ignore_errors=True)
            print(f"  {name} #{i} {variant:17s} wall {sample['wall_s']:6.2f}s cpu {sample['cpu_s']:6.2f}s "
                  f"fit {sample['fit_s']:5.2f}s lingering {sample['lingering_s']:.2f}s", file=sys.stderr)
    keys = ("wall_s", "cpu_s", "fit_s", "lingering_s")
    variants = {v: {**{k: round(statistics.median(r[k] for r in rs), 3) for k in keys},
                    "samples": {k: [round(r[k], 3) for r in rs] for k in keys}}
                for v, rs in runs.items()}
    ratios = {}
    for num, den, target in TARGETS:
        value = paired(runs, num, den, "wall_s")
        walls = [a["wall_s"] / b["wall_s"] for a, b in zip(runs[num], runs[den], strict=True)]
        ratios[f"{num} / {den}"] = {"wall": round(value, 3), "wall_ci95": median_ci95(walls), "target": target,
                                    "met": value <= target,
                                    "cpu": round(paired(runs, num, den, "cpu_s"), 3),
                                    "fit": round(paired(runs, num, den, "fit_s"), 3)}
    return {"variants": variants, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 repeats, existing store only (a smoke test)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--child", choices=VARIANTS)
    parser.add_argument("--dataset")
    parser.add_argument("--revision")
    parser.add_argument("--models")
    parser.add_argument("--store")
    args = parser.parse_args()
    if args.child:
        import logging

        logging.disable(logging.WARNING)
        print(json.dumps(run_script(args.child, Path(args.dataset), args.revision, Path(args.models),
                                    Path(args.store), args.epochs)))
        return
    repeats = 3 if args.quick else args.repeats
    conditions = ("existing",) if args.quick else ("existing", "new")
    started = time.perf_counter()
    subreaper = become_subreaper()
    with tempfile.TemporaryDirectory(prefix="oxen-bench-script-") as tmp:
        root = Path(tmp)
        dataset = prepare_dataset(root)
        reap_orphans()  # anything creating the dataset left running is not the first sample's
        results = {name: condition(root, name, dataset, repeats, args.epochs) for name in conditions}
    print(json.dumps({
        "conditions": results,
        "all_met": all(r["met"] for c in results.values() for r in c["ratios"].values()),
        "repeats": repeats, "epochs": args.epochs, "quick": args.quick,
        "helpers_reaped": subreaper,  # False: helpers outliving a script were not waited for nor counted
        "machine": {"cores": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)},
        "elapsed_s": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main()
