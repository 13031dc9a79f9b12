"""Fit wall time with oxen-callbacks vs a bare ModelCheckpoint fit, and vs the anchors (Lightning).

    python benchmarks/overhead.py [--quick] [--repeats 3]

Every fit runs in a fresh process (same imports, own peak RSS), variants alternate
order across repeats, medians are reported. Two workloads, both one checkpoint per epoch:

- "overlap": training between two saves takes longer than committing one checkpoint
  (real CPU work per epoch), the normal case;
- "saturated": trivial compute, so saving dominates (5 x 100 MB by default).

Variants: ``bare`` (ModelCheckpoint only), ``ours`` (+ OxenLightningCallback, MLflow on a
SQLite store), ``ours_oxen_only`` (the callback with ``mlflow=False``), ``mlflow``
(MLFlowLogger(log_model="all"), SQLite + local artifacts), ``naive`` (synchronous oxenai
add + commit after each save, in the training process: ``naive_oxen.py``) and
``naive_mlflow`` (the same next to ``MLFlowLogger(log_model=False)``, whose run gets each
commit id as a tag). ``--quick`` leaves ``ours_oxen_only`` out of the overlap workload only.
``fit_s`` is the wall time of ``trainer.fit()``: for ours it includes whatever the callback
waits for before ``fit()`` returns (see the README for what is guaranteed then), not MLflow
work finished later in the background. Every fit logs into an existing MLflow SQLite store
and existing Oxen model repositories (see ``prepare_fit``).

``targets`` lists the issue's targets: each with its measured value, the anchor it is
compared with (a number, or the ratio of the variant it must not exceed) and ``met``.
The last line of stdout is one JSON object."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from user_env import user_env

VARIANTS = ("bare", "ours", "ours_oxen_only", "mlflow", "naive", "naive_mlflow")
RATIO_OVERLAP_TARGET = 1.10


def variants(names: tuple[str, ...], quick: bool, *, save_bound: bool = False) -> tuple[str, ...]:
    """``--quick`` runs what the headline ratios and targets need: no ``mlflow=False`` variant outside the
    save-bound workload (each fit is a process paying torch's and the trainer's imports, 3-5 s here)."""
    return tuple(v for v in names if not (quick and not save_bound and v == "ours_oxen_only"))


# -- one fit, in a child process -------------------------------------------------------
def run_one(variant: str, work: Path, size_mb: int, epochs: int, compute_s: float) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    class Blob(L.LightningModule):
        """A model whose checkpoint is ``size_mb`` MB; each epoch burns ``compute_s`` of CPU."""

        def __init__(self) -> None:
            super().__init__()
            self.blob = torch.nn.Parameter(torch.randn(size_mb * 262144), requires_grad=False)
            self.lin = torch.nn.Linear(8, 1)

        def training_step(self, batch, _idx):  # type: ignore[no-untyped-def]
            x, y = batch
            deadline = time.perf_counter() + compute_s / 4  # 4 batches per epoch
            a = torch.randn(256, 256)
            while time.perf_counter() < deadline:
                a = torch.tanh(a @ a)
            return torch.nn.functional.mse_loss(self.lin(x), y)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.lin.parameters(), lr=0.01)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randn(64, 1)), batch_size=16)
    ckpt_dir = work / f"ckpt-{variant}"
    setup_started = time.perf_counter()  # "wall" also counts building callbacks and loggers
    callbacks: list = []
    logger: object = False
    uri = f"sqlite:///{work / f'mlflow-{variant}.db'}"
    if variant in ("mlflow", "naive_mlflow"):
        from lightning.pytorch.loggers import MLFlowLogger

        logger = MLFlowLogger(experiment_name="bench", tracking_uri=uri, log_model="all" if variant == "mlflow" else False,
                              artifact_location=str(work / "mlflow-artifacts"))
    checkpoint_args = {"dirpath": ckpt_dir, "every_n_epochs": 1, "save_top_k": -1}
    if variant.startswith("naive"):
        # benchmarks/ is on sys.path when run as a script
        from naive_oxen import naive_checkpoint

        naive = naive_checkpoint(work / "naive-models", logger if logger is not False else None, **checkpoint_args)
        callbacks.append(naive)
    else:
        callbacks.append(ModelCheckpoint(**checkpoint_args))
    ours = None
    if variant.startswith("ours"):
        from oxen_callbacks.lightning import OxenLightningCallback

        mlflow_options = ({"mlflow": False} if variant == "ours_oxen_only"
                          else {"mlflow_tracking_uri": uri, "experiment_name": "bench"})
        ours = OxenLightningCallback(model_repo=work / "models", **mlflow_options)
        callbacks.append(ours)
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=work,
                        num_sanity_val_steps=0, log_every_n_steps=1)
    model = Blob()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    trainer.fit(model, data)
    fit_s = time.perf_counter() - started
    result = {"variant": variant, "fit_s": fit_s, "wall_s": time.perf_counter() - setup_started, "rss_before_mb": rss_before,
              "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if ours is not None:
        result["stall_ms"] = [s * 1000 for s in ours.stall_seconds]
        result["checkpoints"] = len((ours.lineage or {}).get("checkpoints") or [])
    if variant.startswith("naive"):
        result["checkpoints"] = len(naive.commits)
    if "checkpoints" in result and result["checkpoints"] != epochs:  # a broken variant must not look fast
        raise SystemExit(f"{variant}: {result['checkpoints']} checkpoints committed, {epochs} saved")
    return result


# -- orchestration --------------------------------------------------------------------------
def mlflow_store_template(root: Path) -> Path:
    """An MLflow SQLite store with its tables created, as any store is after its first run
    (creating them takes ~2 s once per store; every fit below starts from a copy)."""
    db = root / "mlflow-template.db"
    if not db.exists():
        subprocess.run([sys.executable, "-c", ("import sys; from mlflow.tracking import MlflowClient; "
                                               "MlflowClient(f'sqlite:///{sys.argv[1]}').search_experiments()"),
                        str(db)],
                       check=True, capture_output=True)
    return db


def prepare_fit(root: Path, work: Path, mlflow_db: str) -> None:
    """Give a fit an existing MLflow store (``work/mlflow_db``) and existing Oxen model repositories
    (``work/models`` for ours, ``work/naive-models`` for the naive baseline), as every run after a
    project's first has: one-time creation (``oxen init``, MLflow's tables) is not what is compared.
    Earlier fits' writes are flushed first: each fit writes 0.5 GB, and the kernel's write-back of
    the previous fit's made the next one swing (bare fits 0.7-1.9 s without this, 1.6-1.8 s with it)."""
    os.sync()
    shutil.copyfile(mlflow_store_template(root), work / mlflow_db)
    oxen_template = root / "oxen-template"
    if not oxen_template.exists():
        subprocess.run([sys.executable, "-c", "import sys, oxen; oxen.Repo(sys.argv[1], mkdir=True).init()",
                        str(oxen_template)], check=True, capture_output=True)
    for name in ("models", "naive-models"):
        shutil.copytree(oxen_template, work / name)


def fit_in_child(variant: str, root: Path, size_mb: int, epochs: int, compute_s: float, i: int) -> dict:
    work = root / f"{variant}-{size_mb}-{compute_s}-{i}"
    work.mkdir(parents=True)
    prepare_fit(root, work, f"mlflow-{variant}.db")
    env = user_env(OXEN_CALLBACKS_CACHE=str(work / "cache"), OXEN_CONFIG_DIR=str(work / "oxen-config"))
    if variant.startswith("naive"):  # the naive baseline commits in-process: it needs an identity
        (work / "oxen-config").mkdir()
        (work / "oxen-config" / "user_config.toml").write_text('name = "bench"\nemail = "bench@example.com"\n')
    cmd = [sys.executable, __file__, "--child", variant, "--work", str(work), "--size-mb", str(size_mb),
           "--epochs", str(epochs), "--compute-s", str(compute_s)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return result


def workload(root: Path, size_mb: int, epochs: int, compute_s: float, repeats: int, variants: tuple[str, ...]) -> dict:
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(repeats):
        order = variants if i % 2 == 0 else tuple(reversed(variants))
        for variant in order:
            runs[variant].append(fit_in_child(variant, root, size_mb, epochs, compute_s, i))
            print(f"  {variant:7s} size={size_mb}MB compute={compute_s}s/epoch: {runs[variant][-1]['fit_s']:.2f}s",
                  file=sys.stderr)
    med = {v: statistics.median(r["fit_s"] for r in rs) for v, rs in runs.items()}
    wall = {v: statistics.median(r["wall_s"] for r in rs) for v, rs in runs.items()}
    summary = {"size_mb": size_mb, "epochs": epochs, "compute_s_per_epoch": compute_s,
               "fit_s_median": {v: round(t, 3) for v, t in med.items()},
               "ratio": {v: round(t / med["bare"], 3) for v, t in med.items()},
               "wall_s_median": {v: round(t, 3) for v, t in wall.items()},
               "ratio_wall": {v: round(t / wall["bare"], 3) for v, t in wall.items()},
               "rss_growth_mb": round(statistics.median(r["rss_peak_mb"] for r in runs["ours"])
                                      - statistics.median(r["rss_peak_mb"] for r in runs["bare"]), 1)}
    stalls = [s for r in runs["ours"] for s in r["stall_ms"]]
    summary["stall_ms_p50"] = round(statistics.median(stalls), 3)
    summary["stall_ms_max"] = round(max(stalls), 3)
    return summary


def headline(overlap: dict, saturated: dict, *, quick: bool) -> dict:
    """The JSON keys both overhead benchmarks print (``overhead_hf.py`` uses this too)."""
    r = saturated["ratio"]
    return {
        "stall_ms_p50": overlap["stall_ms_p50"],
        "ratio_overlap": overlap["ratio"]["ours"],
        "ratio_overlap_oxen_only": overlap["ratio"].get("ours_oxen_only"),  # not in --quick
        "ratio_saturated": r["ours"],
        "ratio_saturated_oxen_only": r.get("ours_oxen_only"),
        "ratio_saturated_mlflow": r["mlflow"],
        "ratio_saturated_naive": r["naive"],
        "ratio_saturated_naive_mlflow": r.get("naive_mlflow"),  # not in overhead_hf.py
        "overhead_vs_mlflow_anchor": round((r["ours"] - 1) / (r["mlflow"] - 1), 3) if r["mlflow"] > 1 else None,
        # the same, counting from building the callbacks / loggers (MLFlowLogger imports MLflow there)
        "ratio_saturated_wall": saturated["ratio_wall"]["ours"],
        "ratio_saturated_mlflow_wall": saturated["ratio_wall"]["mlflow"],
        "ratio_saturated_naive_wall": saturated["ratio_wall"]["naive"],
        "ratio_saturated_naive_mlflow_wall": saturated["ratio_wall"].get("naive_mlflow"),
        "overhead_vs_mlflow_anchor_wall": round((saturated["ratio_wall"]["ours"] - 1)
                                                / (saturated["ratio_wall"]["mlflow"] - 1), 3),
        "rss_growth_mb": max(overlap["rss_growth_mb"], saturated["rss_growth_mb"]),
        "overlap": overlap,
        "saturated": saturated,
        "machine": {"cores": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)},
        "quick": quick,
    }


def targets(overlap: dict, saturated: dict) -> list[dict]:
    """The issue's targets for this benchmark: the measured ratio (``fit_s`` median / bare's), what it is
    compared with, and whether it is met."""
    r = saturated["ratio"]
    rows = [("ratio_overlap <= 1.10 (ours vs bare, normal case)", overlap["ratio"]["ours"],
             RATIO_OVERLAP_TARGET, "target"),
            ("save-bound, Oxen only: ours_oxen_only <= naive", r["ours_oxen_only"], r["naive"], "naive"),
            ("save-bound, with MLflow: ours <= naive_mlflow (naive + MLFlowLogger)", r["ours"], r["naive_mlflow"],
             "naive_mlflow")]
    return [{"target": name, "value": value, "anchor": anchor, "anchor_is": anchor_is, "met": value <= anchor}
            for name, value, anchor, anchor_is in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller checkpoints, 3 repeats (< 3 minutes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child")
    parser.add_argument("--work")
    parser.add_argument("--size-mb", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--compute-s", type=float)
    args = parser.parse_args()
    if args.child:
        import logging

        logging.disable(logging.WARNING)
        print(json.dumps(run_one(args.child, Path(args.work), args.size_mb, args.epochs, args.compute_s)))
        return
    size = 20 if args.quick else 100
    with tempfile.TemporaryDirectory(prefix="oxen-bench-") as tmp:
        root = Path(tmp)
        print("overlap (normal case):", file=sys.stderr)
        overlap = workload(root, size, 5, 2.0 if not args.quick else 0.5, args.repeats,
                           variants(("bare", "ours", "ours_oxen_only"), args.quick))
        print("saturated (save-bound):", file=sys.stderr)
        repeats = args.repeats if args.quick else max(args.repeats, 5)  # full: 5 of these short, noisy fits
        saturated = workload(root, size, 5, 0.0, repeats, variants(VARIANTS, args.quick, save_bound=True))
        stall_sweep = {}
        if not args.quick:
            for mb in (1, 1000):
                stall_sweep[f"{mb}MB"] = workload(root, mb, 3, 0.0, 1, ("bare", "ours"))["stall_ms_p50"]
    result = headline(overlap, saturated, quick=args.quick)
    result["stall_ms_p50_by_size"] = {f"{size}MB": saturated["stall_ms_p50"], **stall_sweep}
    result["targets"] = targets(overlap, saturated)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
