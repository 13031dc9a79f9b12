"""Publisher cost per checkpoint vs a bare ``oxen add`` + ``commit`` of the same bytes, and vs ``cp``.

    python benchmarks/publish.py [--quick] [--repeats 3]

For each size: ``cp`` (the physical floor); ``bare`` (oxenai add + commit in a fresh
process, timing only those two calls, into one repository that grows over the sweep as
ours does); ``bare_with_lineage`` (the same plus a second add of a small lineage file in
the same commit, at the same paths: the Oxen work ours does); ``ours`` (CheckpointPublisher:
from ``submit_checkpoint`` until the worker reports the commit, worker already running, the
save apart from others so that its commit process opens the repository afresh, as ``bare``
does); ``ours_burst`` (a second save right after, served by the same commit process); and
``stall_ms`` (time ``submit_checkpoint`` held the caller). Also: the same checkpoint
written twice, and an HF-style folder where only the weights change.
Warm page cache; medians of the repeats (at least 9 up to 10 MB). The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from oxen_callbacks._publish.batches import Batches

BARE = """
import os, sys, time, oxen
repo = oxen.Repo(sys.argv[1])
if not os.path.isdir(os.path.join(sys.argv[1], ".oxen")): repo.init()
t = time.perf_counter()
for path in sys.argv[2:]: repo.add(path)
repo.commit(os.path.basename(sys.argv[2])); print(time.perf_counter() - t)
"""


def write_blob(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(size >> 20):
            f.write(block[:-8] + (seed * 100000 + i).to_bytes(8, "little"))


def bare_commit(root: Path, src: Path, *, with_lineage: bool = False) -> float:
    """oxenai add + commit of ``src`` into one repository that grows over the sweep, like ours;
    ``with_lineage``: the Oxen work ours does: the same paths (``runs/<run>/checkpoints/<name>``)
    and a lineage file added in the same commit (a second add)."""
    repo = root / ("bare-lineage" if with_lineage else "bare")
    repo.mkdir(exist_ok=True)
    target = repo / "runs" / "bench" / "checkpoints" / src.name if with_lineage else repo / src.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    paths = [str(target)]
    if with_lineage:
        lineage = repo / "runs" / "bench" / "lineage.json"
        lineage.write_text(json.dumps({"checkpoint": src.name, "padding": "x" * 2000}))
        paths.append(str(lineage))
    out = subprocess.run([sys.executable, "-c", BARE, str(repo), *paths], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def cp(src: Path, root: Path) -> float:
    dest = root / f"cp-{time.monotonic_ns()}"
    started = time.perf_counter()
    shutil.copyfile(src, dest)
    seconds = time.perf_counter() - started
    dest.unlink()
    return seconds


class Ours:
    """One publisher on one model repository, as a training run has."""

    def __init__(self, root: Path) -> None:
        from oxen_callbacks._publish.publisher import CheckpointPublisher
        from oxen_callbacks.lineage import new_record

        self.record = new_record(dataset=None, model_repo=str(root / "models"), framework={"name": "bench",
                                                                                            "version": "0"})
        self.pub = CheckpointPublisher(model_repo=root / "models", run="bench", cache_dir=root / "cache")
        self.step = 0

    def publish(self, path: Path) -> tuple[float, float]:
        """(seconds until committed, stall seconds)."""
        self.step += 1
        started = time.perf_counter()
        self.pub.submit_checkpoint(path, record=self.record, step=self.step, epoch=0)
        stall = time.perf_counter() - started
        self.pub.flush()
        return time.perf_counter() - started, stall

    def close(self) -> None:
        self.pub.close()


def sweep(root: Path, sizes_mb: list[int], repeats: int) -> dict:
    ours = Ours(root)
    rows = {}
    try:
        for mb in sizes_mb:
            samples: dict[str, list[float]] = {"cp": [], "bare": [], "bare_lineage": [], "ours": [], "ours_burst": [],
                                               "stall": []}
            for i in range(max(repeats, 9) if mb <= 10 else repeats):  # small sizes: ms-level noise
                src, twin = (root / "ckpts" / f"{mb}mb-{i}{tag}.ckpt" for tag in "ab")
                write_blob(src, mb << 20, seed=mb * 1000 + i)
                write_blob(twin, mb << 20, seed=mb * 1000 + 500 + i)
                samples["cp"].append(cp(src, root))
                samples["bare"].append(bare_commit(root, src))
                samples["bare_lineage"].append(bare_commit(root, src, with_lineage=True))
                time.sleep(Batches.IDLE_S + 0.5)  # the previous commit process has retired
                total, stall = ours.publish(src)
                samples["ours"].append(total)
                samples["stall"].append(stall)
                samples["ours_burst"].append(ours.publish(twin)[0])
                src.unlink()
                twin.unlink()
            med = {k: statistics.median(v) for k, v in samples.items()}
            rows[f"{mb}MB"] = {"cp_s": round(med["cp"], 4), "bare_add_commit_s": round(med["bare"], 4),
                               "ours_s": round(med["ours"], 4), "ours_burst_s": round(med["ours_burst"], 4),
                               "stall_ms": round(med["stall"] * 1000, 3),
                               "bare_with_lineage_s": round(med["bare_lineage"], 4),
                               "ratio_vs_bare": round(med["ours"] / med["bare"], 3),
                               "ratio_vs_bare_with_lineage": round(med["ours"] / med["bare_lineage"], 3),
                               "ratio_burst_vs_bare": round(med["ours_burst"] / med["bare"], 3),
                               "ratio_vs_cp": round(med["ours"] / med["cp"], 3)}
            print(f"  {mb:5d} MB: {rows[f'{mb}MB']}", file=sys.stderr)
        # the same bytes saved twice (e.g. last.ckpt beside epoch=N.ckpt): stored once
        mb = sizes_mb[min(2, len(sizes_mb) - 1)]
        src = root / "ckpts" / "twice-a.ckpt"
        write_blob(src, mb << 20, seed=7)
        first, _ = ours.publish(src)
        twin = root / "ckpts" / "twice-b.ckpt"
        shutil.copyfile(src, twin)
        second, _ = ours.publish(twin)
        rows["written_twice"] = {"size_mb": mb, "first_s": round(first, 4), "second_s": round(second, 4)}
        # an HF checkpoint folder where only the weights change between saves
        folder = root / "ckpts" / "checkpoint-1"
        write_blob(folder / "model.safetensors", mb << 20, seed=11)
        write_blob(folder / "optimizer.pt", 2 * mb << 20, seed=12)
        (folder / "config.json").write_text("{}")
        first, _ = ours.publish(folder)
        folder2 = root / "ckpts" / "checkpoint-2"
        shutil.copytree(folder, folder2)
        write_blob(folder2 / "model.safetensors", mb << 20, seed=13)
        second, _ = ours.publish(folder2)
        rows["folder_partly_unchanged"] = {"folder_mb": 3 * mb, "changed_mb": mb, "first_s": round(first, 4),
                                           "second_s": round(second, 4)}
    finally:
        ours.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1-100 MB only (< 3 minutes)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [1, 10, 100] if args.quick else [1, 10, 100, 1000]
    with tempfile.TemporaryDirectory(prefix="oxen-bench-publish-") as tmp:
        root = Path(tmp)
        os.environ["OXEN_CONFIG_DIR"] = str(root / "oxen-config")
        (root / "oxen-config").mkdir()
        (root / "oxen-config" / "user_config.toml").write_text('name = "bench"\nemail = "bench@example.com"\n')
        os.environ["OXEN_CALLBACKS_CACHE"] = str(root / "cache")
        rows = sweep(root, sizes, args.repeats)
    sized = [v for k, v in rows.items() if k.endswith("MB")]
    print(json.dumps({"publisher_ratio_vs_bare_max": max(r["ratio_vs_bare"] for r in sized),
                      "publisher_ratio_vs_bare_with_lineage_max": max(r["ratio_vs_bare_with_lineage"] for r in sized),
                      "publisher_ratio_vs_bare_at_largest": sized[-1]["ratio_vs_bare"],
                      "stall_ms_max": max(r["stall_ms"] for r in sized), "sizes": rows,
                      "machine": {"cores": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)},
                      "quick": args.quick}))


if __name__ == "__main__":
    main()
