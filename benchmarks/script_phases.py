"""Where a whole script's time goes, for two variants of ``whole_script.py`` paired and interleaved.

    python benchmarks/script_phases.py ours_shared naive [--repeats 12] [--new]
    python benchmarks/script_phases.py ours_shared@/tmp/new ours_shared@/tmp/old   # two versions of the library

Each sample is a fresh process of the quickstart's training on an existing store (``whole_script.py``'s
variants; ``--new``: a new store, model repository and snapshot cache per process), timed in phases:
``pre_fit`` (imports, building the trainer), ``fit``, ``post_fit`` (from
``fit()`` returning to the script's end: reading ``callback.lineage`` waits for the final record),
``atexit`` (exit handlers: ours waits for what MLflow has left), and ``teardown`` (the interpreter's
finalization, from the last exit handler to the process's end). A process that dies by a signal is
reported and its repeat left out. ``variant@folder`` runs the variant with the library of a checkout
at ``folder`` (put first on ``PYTHONPATH``, for the processes it starts too), to pair two versions of
the library. Prints medians, paired differences (first minus second) and the
paired wall ratio with a 95 % bootstrap interval of it; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from user_env import user_env

PHASES = ("pre_fit", "fit", "post_fit", "atexit", "teardown")


def child(variant: str, dataset: Path, revision: str, home: Path, times: Path) -> None:
    """One script process: ``whole_script``'s training, with the phase boundaries written to ``times``."""
    marks = {"start": time.time()}

    def last_exit_handler() -> None:  # registered first: runs after every other exit handler
        marks["atexit_last"] = time.time()
        times.write_text(json.dumps(marks))

    atexit.register(last_exit_handler)
    import lightning as L
    from whole_script import run_script

    fit = L.Trainer.fit

    def timed_fit(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        marks["fit_start"] = time.time()
        try:
            return fit(self, *args, **kwargs)
        finally:
            marks["fit_end"] = time.time()

    L.Trainer.fit = timed_fit  # type: ignore[method-assign]
    print(json.dumps(run_script(variant, dataset, revision, home / "models", home / "mlflow.db", 3)))
    marks["script_end"] = time.time()


def sample(variant: str, root: Path, dataset: tuple[Path, str], new: str | None = None) -> dict[str, float] | int:
    """The phases of one process of ``variant`` (seconds), or the signal that killed it; ``new``: a name
    for a home of its own (store, model repository, cache), removed after."""
    from whole_script import timed_process

    name, _, library = variant.partition("@")
    checkout = hashlib.sha256(library.encode()).hexdigest()[:8] if library else None
    home = root / "-".join(part for part in (name, checkout, new) if part is not None)
    cwd, times = home / "cwd", home / "times.json"
    cwd.mkdir(parents=True, exist_ok=True)
    env = user_env(("MLFLOW_", "OXEN_CALLBACKS_"), OXEN_CALLBACKS_CACHE=str(home / "cache"),
                   OXEN_CONFIG_DIR=str(root / "oxen-config"))
    if library:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(library).resolve()), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, __file__, "--child", name, str(dataset[0]), dataset[1], str(home), str(times)]
    started = time.time()
    returncode, timed = timed_process(cmd, env, cwd, None)
    ended = started + timed["wall_s"]
    if returncode != 0:
        return returncode
    marks = json.loads(times.read_text())
    times.unlink()
    if new is not None:
        shutil.rmtree(home, ignore_errors=True)
    return {"wall": timed["wall_s"], "cpu": timed["cpu_s"],
            "pre_fit": marks["fit_start"] - marks["start"], "fit": marks["fit_end"] - marks["fit_start"],
            "post_fit": marks["script_end"] - marks["fit_end"], "atexit": marks["atexit_last"] - marks["script_end"],
            "teardown": ended - marks["atexit_last"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs=2, help="two of whole_script.py's variants, e.g. ours_shared naive "
                        "(variant@folder: with the library of the checkout at folder)")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--new", action="store_true", help="a new store, model repository and cache per process")
    args = parser.parse_args()
    from whole_script import become_subreaper, median_ci95, prepare_dataset

    become_subreaper()
    first, second = args.variants
    runs: dict[str, list[dict[str, float]]] = {first: [], second: []}
    died: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="oxen-phases-") as tmp:
        root = Path(tmp)
        dataset = prepare_dataset(root)
        for i in range(-1, args.repeats):  # -1: an untimed warm-up that makes each variant's store
            pair = {}
            for variant in (args.variants if i % 2 == 0 else args.variants[::-1]):
                got = sample(variant, root, dataset, new=str(i) if args.new else None)
                if isinstance(got, int):
                    died.append({"variant": variant, "repeat": i, "exit": got})
                    print(f"#{i} {variant}: died ({got})", file=sys.stderr, flush=True)
                    continue
                pair[variant] = got
                print(f"#{i} {variant}: " + " ".join(f"{k} {v:.3f}" for k, v in got.items()), file=sys.stderr, flush=True)
            if i >= 0 and len(pair) == 2:
                for variant, got in pair.items():
                    runs[variant].append(got)
    pairs = list(zip(runs[first], runs[second]))
    if not pairs:
        raise SystemExit("no repeat had both variants alive")
    keys = ("wall", "cpu", *PHASES)
    result = {
        "variants": args.variants, "condition": "new" if args.new else "existing", "pairs": len(pairs), "died": died,
        "median_s": {v: {k: round(statistics.median(r[k] for r in runs[v]), 3) for k in keys} for v in args.variants},
        "paired_diff_s": {k: round(statistics.median(a[k] - b[k] for a, b in pairs), 3) for k in keys},
        "wall_ratio": round(statistics.median(a["wall"] / b["wall"] for a, b in pairs), 3),
        "wall_ratio_ci95": median_ci95([a["wall"] / b["wall"] for a, b in pairs]),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        import logging

        logging.disable(logging.WARNING)
        variant, dataset, revision, home, times = sys.argv[2:7]
        child(variant, Path(dataset), revision, Path(home), Path(times))
    else:
        main()
