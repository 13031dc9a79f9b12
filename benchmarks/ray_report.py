"""Cost per reported checkpoint: OxenRayCallback's stall on Ray's controller vs Ray's own upload of the same checkpoint.

    python benchmarks/ray_report.py [--size-mb 50] [--reports 7]

One Ray Train job (2 workers, a local ``storage_path`` on the same disk as the cache): rank 0 writes a
checkpoint of ``--size-mb`` random bytes and reports it with ``checkpoint_upload_mode=SYNC``; the time
``ray.train.report`` takes there is Ray's upload (a copy into ``storage_path``). On the controller, the
time ``OxenRayCallback.after_report`` takes is ours: what a slow hook would add to every worker's next
report. Both for the same checkpoint (paired), reports apart from each other (Ray's controller polls
every 2 s), medians. ``hard_linked``: each checkpoint was frozen by hard link, not copied (no second
full copy). ``committed``: checkpoints the lineage lists once the job ended. The last line of stdout
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from ray.train import Checkpoint, CheckpointUploadMode, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from oxen_callbacks.ray import OxenRayCallback


class TimedOxenRayCallback(OxenRayCallback):
    """OxenRayCallback that notes, per report, how long its hook held the controller and the link count."""

    def __init__(self, *, timings: str, **options: Any) -> None:
        super().__init__(**options)
        self.timings = timings

    def after_report(self, training_report: Any, metrics: list[dict[str, Any]]) -> None:
        started = time.perf_counter()
        super().after_report(training_report, metrics)
        held = time.perf_counter() - started
        if training_report.checkpoint is not None:
            links = os.stat(os.path.join(training_report.checkpoint.path, "weights.bin")).st_nlink
            with open(self.timings, "a") as f:
                f.write(json.dumps({"side": "oxen", "step": metrics[0]["step"], "seconds": held, "links": links}) + "\n")


def train_func(config: dict[str, Any]) -> None:
    rank = ray.train.get_context().get_world_rank()
    for step in range(config["reports"]):
        time.sleep(2.5)  # let the controller poll the last report first: each report timed alone
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                with open(os.path.join(folder, "weights.bin"), "wb") as f:
                    f.write(os.urandom(config["size_mb"] << 20))
                checkpoint = Checkpoint.from_directory(folder)
            started = time.perf_counter()
            ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.SYNC)
            if rank == 0:
                with open(config["timings"], "a") as f:
                    f.write(json.dumps({"side": "ray", "step": step, "seconds": time.perf_counter() - started}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--reports", type=int, default=7)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ray-report-"))
    os.environ.setdefault("OXEN_CALLBACKS_CACHE", str(root / "cache"))  # same disk as storage_path: hard links
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    timings = root / "timings.jsonl"
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False, log_to_driver=False)
    oxen = TimedOxenRayCallback(timings=str(timings), model_repo=root / "models")
    TorchTrainer(train_func, train_loop_config={"reports": args.reports, "size_mb": args.size_mb, "timings": str(timings)},
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                 run_config=RunConfig(storage_path=str(root / "ray_results"), callbacks=[oxen])).fit()
    lineage = oxen.lineage
    ray.shutdown()
    rows = [json.loads(line) for line in timings.read_text().splitlines()]
    shutil.rmtree(root, ignore_errors=True)
    ours = {r["step"]: r for r in rows if r["side"] == "oxen"}
    theirs = {r["step"]: r["seconds"] for r in rows if r["side"] == "ray"}
    steps = sorted(set(ours) & set(theirs))
    print(json.dumps({
        "checkpoint_mb": args.size_mb, "reports": len(steps),
        "ray_upload_ms": round(statistics.median(theirs[s] for s in steps) * 1000, 2),
        "oxen_stall_ms": round(statistics.median(ours[s]["seconds"] for s in steps) * 1000, 2),
        "stall_per_upload": round(statistics.median(ours[s]["seconds"] / theirs[s] for s in steps), 4),
        "hard_linked": all(ours[s]["links"] > 1 for s in steps),
        "committed": len(lineage["checkpoints"]) if lineage else 0,
    }))


if __name__ == "__main__":
    main()
