"""Cold and cached pin of a local dataset commit, against ``cp -r`` of the same files.

    python benchmarks/pin.py [--quick] [--repeats 5] [--workdir /tmp]

Target (issue "training never waits on lineage"): a cold pin costs <= 1.2x ``cp -r`` of
the same files, and a cached re-pin < 50 ms. Sweeps: one file of 1 MB, 100 MB, 1 GB; and
1, 100, 10k, 100k files of 1 KiB in one folder (``--quick``: no 1 GB, no 100k; < 3 min). And
``listed-3000``: 3,000 files of one folder pinned by naming each (a shard list), against pinning
their folder: first pull, re-pin and the fit-start check (``verify()``) of each, and ``file()`` of each
listed path (the listed pin grew with the square of its paths before 7292684: 50 s to pull 3,000;
``file()`` read the snapshot's records again per call: 25 ms each).

Per case, each repeat times in alternating order: ``cp -r`` of the working-tree folder,
and a cold pin (``PinnedDataset(repo, revision=<commit id>, paths=[folder]).pull()`` into
an empty cache: tree read, copy, read-only snapshot); and ``copy_s``, the tree read and copy
alone (``source_local.copy_from_store``), to tell them from the snapshot bookkeeping (lock,
manifest, read-only marking). The old path, ``oxen restore`` in a
shadow working tree (now the fallback), is timed once per case for reference. Then the
cached re-pin by commit id and by branch name (the branch name costs a child process that
lists branches, and one that checks the checked-out branch for local changes).

The page cache cannot be dropped without root: every number is WARM-cache. ``sync`` runs
before each timed step so the previous step's writeback does not land in it. Nothing is
deleted until the end (ext4 scans recently deleted inodes when it allocates new ones, which
made a step right after a big delete several times slower): a full run needs ~14 GB free.
Medians are reported; ``ratio`` is the median of per-repeat pin/cp ratios. The machine load
(``os.getloadavg``) is reported before and after. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

AUTHOR = ("Benchmark", "bench@example.com")
MB = 1_000_000
SIZES = {"1MB": MB, "100MB": 100 * MB, "1GB": 1000 * MB}
COUNTS = {"1": 1, "100": 100, "10k": 10_000, "100k": 100_000}
QUICK_SKIP = {"1GB", "100k"}
SMALL = 1024


def timed(step: Callable[[], object]) -> float:
    os.sync()
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def make_case(root: Path, name: str, files: dict[str, int]) -> tuple[Path, str]:
    """A dataset repository whose one commit holds ``files`` (relative path -> size) under ``data/``."""
    from oxen_callbacks._oxen import child as oxen_child

    repo = root / f"repo-{name}"
    (repo / "data").mkdir(parents=True)
    block = os.urandom(16 << 20)
    for i, (rel, size) in enumerate(files.items()):
        with open(repo / "data" / rel, "wb") as f:
            f.write(i.to_bytes(8, "little"))  # distinct content: the store keeps one copy per hash
            left = size - 8
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)
    oxen_child.init_repo(repo)
    commit = oxen_child.commit_paths(repo, ["data"], f"{name} of data", author=AUTHOR)
    return repo, commit


def pull(repo: Path, revision: str, cache: Path) -> None:
    """A pin as training code makes it: resolve the revision, then materialize (or find it cached)."""
    from oxen_callbacks import PinnedDataset

    PinnedDataset(repo, revision=revision, paths=["data"], cache_dir=cache).pull()


def measure(root: Path, name: str, files: dict[str, int], repeats: int) -> dict:
    from oxen_callbacks._data.local import copy_from_store
    from oxen_callbacks._oxen import child as oxen_child

    started = time.perf_counter()
    repo, commit = make_case(root, name, files)
    setup_s = time.perf_counter() - started
    cp_s, pin_s, copy_s, ratios = [], [], [], []
    for i in range(repeats):
        cp_dest, cache, copy_dest = root / f"cp-{name}-{i}", root / f"cache-{name}-{i}", root / f"copy-{name}-{i}"
        copy_dest.mkdir()
        steps = [partial(subprocess.run, ["cp", "-r", str(repo / "data"), str(cp_dest)], check=True),
                 partial(pull, repo, commit, cache),
                 partial(copy_from_store, repo, commit, ["data"], copy_dest)]
        order = [0, 1, 2] if i % 2 == 0 else [2, 1, 0]
        took = dict(zip(order, (timed(steps[k]) for k in order), strict=True))
        cp_s.append(took[0])
        pin_s.append(took[1])
        copy_s.append(took[2])
        ratios.append(took[1] / took[0])
    restore_s = timed(partial(oxen_child.materialize, repo, commit, ["data"], root / f"restore-{name}"))
    by_commit = [timed(partial(pull, repo, commit, cache)) for _ in range(max(5, repeats))]
    by_branch = [timed(partial(pull, repo, "main", cache)) for _ in range(3)]
    return {
        "case": name,
        "files": len(files),
        "bytes": sum(files.values()),
        "cp_s": round(statistics.median(cp_s), 4),
        "pin_s": round(statistics.median(pin_s), 4),
        "ratio": round(statistics.median(ratios), 3),
        "copy_s": round(statistics.median(copy_s), 4),
        "ratio_max": round(max(ratios), 3),
        "restore_s": round(restore_s, 4),
        "repin_commit_ms": round(statistics.median(by_commit) * 1000, 2),
        "repin_branch_ms": round(statistics.median(by_branch) * 1000, 1),
        "setup_s": round(setup_s, 1),
        "runs": {"cp_s": [round(x, 4) for x in cp_s], "pin_s": [round(x, 4) for x in pin_s],
                 "copy_s": [round(x, 4) for x in copy_s]},
    }


def measure_listed(root: Path, count: int, repeats: int) -> dict:
    """``count`` files pinned by naming each, against pinning their folder (see the module docstring)."""
    from oxen_callbacks import PinnedDataset

    files = {f"part-{i:05d}.bin": SMALL for i in range(count)}  # (random bytes named .csv: Oxen skips some)
    repo, commit = make_case(root, f"listed-{count}", files)
    listed = [f"data/{name}" for name in files]
    times: dict[str, list[float]] = {}
    for i in range(repeats):
        for how, paths in (("listed", listed), ("folder", ["data"])) if i % 2 == 0 else (("folder", ["data"]), ("listed", listed)):
            cache = root / f"cache-listed-{how}-{i}"
            times.setdefault(f"{how}_pull_s", []).append(timed(partial(
                lambda p, c: PinnedDataset(repo, revision=commit, paths=p, cache_dir=c).pull(), paths, cache)))
            pin = PinnedDataset(repo, revision=commit, paths=paths, cache_dir=cache)
            times.setdefault(f"{how}_repin_s", []).append(timed(pin.pull))
            times.setdefault(f"{how}_verify_s", []).append(timed(pin.verify))
            if how == "listed":  # a loop over the shards, as a DataLoader's dataset makes it
                times.setdefault("listed_file_ms", []).append(timed(lambda: [pin.file(p) for p in listed]) * 1000 / count)
    result = {"case": f"listed-{count}", "files": count, **{k: round(statistics.median(v), 4) for k, v in times.items()}}
    result["ratio_pull"] = round(result["listed_pull_s"] / result["folder_pull_s"], 2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 1 GB and 100k-file cases (< 3 min)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="where the temp folder goes (default: system temp)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="oxcb-pin-bench-", dir=args.workdir))
    os.environ["OXEN_CONFIG_DIR"] = str(root / "oxen-config")
    os.environ["OXEN_CALLBACKS_CACHE"] = str(root / "default-cache")
    cases = {f"size-{k}": {"blob.bin": v} for k, v in SIZES.items()}
    cases |= {f"count-{k}": {f"f{i:06d}.bin": SMALL for i in range(v)} for k, v in COUNTS.items()}
    if args.quick:
        cases = {k: v for k, v in cases.items() if k.split("-")[1] not in QUICK_SKIP}
    load_before = os.getloadavg()
    started = time.perf_counter()
    results = []
    try:
        for name, files in cases.items():
            result = measure(root, name, files, args.repeats)
            print(f"{name:>12}: cp {result['cp_s']:.3f}s  pin {result['pin_s']:.3f}s  ratio {result['ratio']:.2f}  "
                  f"(copy {result['copy_s']:.3f}s)  "
                  f"restore {result['restore_s']:.3f}s  re-pin {result['repin_commit_ms']:.1f}ms "
                  f"(branch {result['repin_branch_ms']:.0f}ms)", file=sys.stderr, flush=True)
            results.append(result)
        listed = measure_listed(root, 3000, args.repeats)
        print(f"{listed['case']:>12}: pull {listed['listed_pull_s']:.3f}s (folder {listed['folder_pull_s']:.3f}s)  "
              f"re-pin {listed['listed_repin_s'] * 1000:.1f}ms  verify {listed['listed_verify_s']:.3f}s",
              file=sys.stderr, flush=True)
        results.append(listed)
    finally:  # snapshots are read-only: make them writable, then delete (in C: ~1M files in a full run)
        subprocess.run(["chmod", "-R", "u+w", str(root)], check=False)
        subprocess.run(["rm", "-rf", str(root)], check=False)
    print(json.dumps({
        "benchmark": "pin",
        "warm_cache": True,
        "quick": args.quick,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "total_s": round(time.perf_counter() - started, 1),
        "cases": results,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
