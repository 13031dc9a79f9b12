"""A notebook's cells: the quickstart's training run again and again in one warm Python process.

    python benchmarks/notebook_cells.py [--rounds 8] [--pause 2.5]

A notebook user pays no imports after the first cell; what a cell that builds a trainer and calls
``fit()`` costs is the training, our fit start and what ``callback.lineage`` waits for after it
(the commits and MLflow work of the fit's end). One kernel process runs every variant of
``whole_script.py`` as a cell, in a shuffled order each round (fixed seed), each variant with its own
model repository, MLflow store and working folder, with ``--pause`` seconds between cells (a user
reading the output; it also lets a cell's idle commit process retire before the next cell, see
``Batches.IDLE_S``). A cell is timed from building its trainer and callbacks until ``run_script``
returns (for ours: after reading ``callback.lineage``, complete). Prints per-cell medians, paired
ratios per round with a 95 % bootstrap interval, and, last on stdout, one JSON object.
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

from user_env import user_env

CELL_VARIANTS = ("bare", "mlflow_logger", "ours_shared", "ours_mlflow", "ours_oxen_only", "naive", "naive_oxen_only")
#: (numerator, denominator): paired per round
PAIRS = (("ours_shared", "naive"), ("ours_mlflow", "naive"), ("ours_oxen_only", "naive_oxen_only"),
         ("ours_shared", "mlflow_logger"), ("ours_oxen_only", "bare"))


def kernel(root: Path, dataset: Path, revision: str, rounds: int, pause: float) -> None:
    """The notebook's process: a warm-up cell per variant, then ``rounds`` rounds; JSON on stdout."""
    import logging

    logging.disable(logging.WARNING)
    from whole_script import run_script

    cells: dict[str, list[dict[str, float]]] = {v: [] for v in CELL_VARIANTS}
    for i in range(-1, rounds):  # -1: warm-up (first imports, each variant's store and repository made)
        order = list(CELL_VARIANTS)
        random.Random(f"cells-{i}").shuffle(order)
        for variant in order:
            home = root / variant
            (home / "cwd").mkdir(parents=True, exist_ok=True)
            os.chdir(home / "cwd")
            started = time.perf_counter()
            result = run_script(variant, dataset, revision, home / "models", home / "mlflow.db", 3)
            cell = time.perf_counter() - started
            shutil.rmtree(home / "cwd" / "checkpoints", ignore_errors=True)  # each cell saves afresh
            if i >= 0:
                cells[variant].append({"cell_s": cell, "fit_s": result["fit_s"]})
                print(f"  #{i} {variant:16s} cell {cell:.3f}s fit {result['fit_s']:.3f}s", file=sys.stderr, flush=True)
            time.sleep(pause)
    print(json.dumps(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--pause", type=float, default=2.5)
    parser.add_argument("--kernel", nargs=3, metavar=("ROOT", "DATASET", "REVISION"))
    args = parser.parse_args()
    if args.kernel:
        kernel(Path(args.kernel[0]), Path(args.kernel[1]), args.kernel[2], args.rounds, args.pause)
        return
    from whole_script import become_subreaper, median_ci95, prepare_dataset, reap_orphans

    become_subreaper()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="oxen-bench-cells-") as tmp:
        root = Path(tmp)
        dataset, revision = prepare_dataset(root)
        reap_orphans()
        env = user_env(("MLFLOW_", "OXEN_CALLBACKS_"), OXEN_CALLBACKS_CACHE=str(root / "cache"),
                       OXEN_CONFIG_DIR=str(root / "oxen-config"))
        out = subprocess.run([sys.executable, __file__, "--kernel", str(root / "cells"), str(dataset), revision,
                              "--rounds", str(args.rounds), "--pause", str(args.pause)],
                             env=env, stdout=subprocess.PIPE, text=True, check=True)
        reap_orphans()
    cells = json.loads(out.stdout.strip().splitlines()[-1])
    medians = {v: {k: round(statistics.median(c[k] for c in cs), 3) for k in ("cell_s", "fit_s")}
               for v, cs in cells.items()}
    pairs = {}
    for num, den in PAIRS:
        ratios = [a["cell_s"] / b["cell_s"] for a, b in zip(cells[num], cells[den], strict=True)]
        pairs[f"{num} / {den}"] = {
            "cell": round(statistics.median(ratios), 3), "cell_ci95": median_ci95(ratios),
            "cell_diff_s": round(statistics.median(a["cell_s"] - b["cell_s"]
                                                   for a, b in zip(cells[num], cells[den], strict=True)), 3),
            "fit_diff_s": round(statistics.median(a["fit_s"] - b["fit_s"]
                                                  for a, b in zip(cells[num], cells[den], strict=True)), 3)}
    for variant, m in medians.items():
        print(f"{variant:16s} cell {m['cell_s']:.3f}s  fit {m['fit_s']:.3f}s", file=sys.stderr)
    for name, p in pairs.items():
        print(f"{name:34s} {p['cell']:.3f}x {p['cell_ci95']}  cell {p['cell_diff_s']:+.3f}s  fit {p['fit_diff_s']:+.3f}s",
              file=sys.stderr)
    print(json.dumps({"rounds": args.rounds, "pause_s": args.pause, "median_s": medians, "paired": pairs,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
