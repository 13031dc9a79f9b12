"""One SLURM job step (a Lightning fit or an HF Trainer train) that may be pre-empted mid-fit.

``--signal-at-step N`` sends this process the pre-emption signal at step N, as ``sbatch
--signal=USR1@90`` would (``--signal-in-sanity-check``: during Lightning's sanity check instead). The result (written to ``--out`` however the fit ends) holds what was
committed to the model repository when the process was about to exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def lightning_fit(args: argparse.Namespace, out: dict) -> None:
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning_model import CsvData, TinyModel, make_trainer

    from oxen_callbacks.lightning import OxenLightningCallback

    class SignalAt(Callback):
        def on_train_batch_end(self, trainer, *_args, **_kwargs) -> None:  # type: ignore[no-untyped-def]
            out["steps"].append(trainer.global_step)
            if trainer.global_step == args.signal_at_step:
                out["signalled_at"] = time.monotonic()
                os.kill(os.getpid(), signal.SIGUSR1)

        def on_validation_batch_start(self, trainer, *_args, **_kwargs) -> None:  # type: ignore[no-untyped-def]
            if trainer.sanity_checking and args.signal_in_sanity_check and "signalled_at" not in out:
                out["signalled_at"] = time.monotonic()
                os.kill(os.getpid(), signal.SIGUSR1)

    cb = OxenLightningCallback(dataset=args.dataset, revision="main", paths=["train.csv", "val.csv"],
                               model_repo=args.model_repo, preempt_timeout=args.preempt_timeout,
                               experiment_name="slurm")
    out["callback"] = cb
    root = Path(args.root)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(root, [ckpt, cb, SignalAt()], epochs=args.epochs)
    model = TinyModel()
    out["trainer"] = trainer
    trainer.fit(model, datamodule=CsvData(cb.dataset))
    out["labels"] = sorted(model.labels_seen)


def hf_train(args: argparse.Namespace, out: dict) -> None:
    from hf_model import make_trainer
    from transformers import TrainerCallback

    from oxen_callbacks.huggingface import OxenTrainerCallback

    class SignalAt(TrainerCallback):
        def on_step_end(self, _args, state, control, **_kwargs):  # type: ignore[no-untyped-def]
            out["steps"].append(state.global_step)
            if state.global_step == args.signal_at_step:
                out["signalled_at"] = time.monotonic()
                os.kill(os.getpid(), signal.SIGUSR1)

    cb = OxenTrainerCallback(dataset=args.dataset, revision="main", paths=["train.jsonl"], model_repo=args.model_repo,
                             preempt_signal=signal.SIGUSR1, preempt_timeout=args.preempt_timeout,
                             experiment_name="slurm")
    out["callback"] = cb
    output = Path(args.root) / "out"
    trainer, collator = make_trainer(output, cb.dataset.load_dataset()["train"], [SignalAt(), cb],
                                     max_steps=args.max_steps, save_steps=2)
    out["trainer"] = trainer
    trainer.train(resume_from_checkpoint=True if any(output.glob("checkpoint-*")) else None)
    out["labels"] = sorted(set(collator.labels))


def report(args: argparse.Namespace, out: dict) -> None:
    """What the model repository holds now, as this process is about to exit."""
    from oxen_callbacks.lineage import read_lineage
    from oxen_callbacks.model_repo import lineage_path

    cb, trainer = out.get("callback"), out.get("trainer")
    run = cb.run.run_name
    committed = Path(args.model_repo) / lineage_path(run)
    result = {
        "run": run,
        "steps": out["steps"],
        "committed": read_lineage(committed) if committed.exists() else None,
        "stall_seconds": cb.stall_seconds,
        "pin": cb.dataset.to_lineage() if cb.dataset is not None else None,
        "exit_seconds": time.monotonic() - out["signalled_at"] if "signalled_at" in out else None,
        "labels": out.get("labels"),
    }
    if args.framework == "lightning" and trainer is not None:
        result.update(ckpt_path=trainer.ckpt_path, global_step=trainer.global_step)
    elif trainer is not None:
        result.update(global_step=trainer.state.global_step)
    if not out.get("preempted"):
        result["lineage"] = cb.lineage
    Path(args.out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("framework", choices=("lightning", "hf"))
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model-repo", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=8)
    # (also from the environment: a requeued job runs the same command line, see tests/test_preemption.py)
    parser.add_argument("--signal-at-step", type=int, default=int(os.environ.get("TEST_SIGNAL_AT_STEP", "-1")))
    parser.add_argument("--preempt-timeout", type=float, default=30.0)
    parser.add_argument("--signal-in-sanity-check", action="store_true",
                        default=os.environ.get("TEST_SIGNAL_IN_SANITY_CHECK") == "1")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("oxen_callbacks").setLevel(logging.INFO)
    out: dict = {"steps": []}
    try:
        (lightning_fit if args.framework == "lightning" else hf_train)(args, out)
    except SystemExit:  # Lightning's answer to SLURM's SIGTERM after the requeue
        out["preempted"] = True
        report(args, out)
        raise
    out["preempted"] = bool(out.get("signalled_at"))
    report(args, out)
    if args.framework == "hf" and out["callback"].preempted:  # the job script's part: requeue (SLURM then SIGTERMs it)
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
        time.sleep(5)


if __name__ == "__main__":
    main()
