"""One Lightning fit with the Oxen callback, as its own process (concurrency and crash tests)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import MLFlowLogger  # noqa: E402
from lightning_model import CsvData, TinyModel, make_trainer  # noqa: E402

from oxen_callbacks import PinnedDataset  # noqa: E402
from oxen_callbacks.lightning import OxenLightningCallback  # noqa: E402


class SlowSteps(Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        time.sleep(self.seconds)


class Progress(Callback):
    """Logs ``progress``, the epoch: a metric whose best is always the latest."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        pl_module.log("progress", float(trainer.current_epoch))


class GateAtTrainEnd(Callback):
    """At train end (before the callback's fit end), writes ``<gate>.reached`` and waits for ``gate`` to exist."""

    def __init__(self, gate: Path) -> None:
        self.gate = gate

    def on_train_end(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.gate.with_suffix(".reached").touch()
        deadline = time.monotonic() + 300
        while not self.gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset")
    parser.add_argument("--revision")
    parser.add_argument("--model-repo", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--run-name")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every-n-steps", type=int, default=2)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--ckpt-path")
    parser.add_argument("--mlflow", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--resume-from")
    parser.add_argument("--mlflow-timeout", type=float, default=60.0)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--logger", action="store_true", help="an MLFlowLogger whose run the callback joins")
    parser.add_argument("--logger-run-id", help="that logger logs to this existing MLflow run")
    parser.add_argument("--best-is-last", action="store_true",
                        help="one checkpoint per epoch, of a monitored metric that only grows: the best is the last")
    parser.add_argument("--no-log-models", action="store_true", help="log_models=False")
    parser.add_argument("--register-model", help="register_model=")
    parser.add_argument("--after-fit", choices=("exit", "kill"), default="exit",
                        help="kill: SIGKILL this process the moment fit() returns")
    parser.add_argument("--move-branch-in-rank-one", action="store_true",
                        help="in the process of local rank 1, commit to the dataset's branch before pinning it")
    parser.add_argument("--gate", help="at train end, wait until this file exists (writes <gate>.reached first)")
    parser.add_argument("--worker-pid", help="once the lineage is complete, write the commit worker's pid here")
    parser.add_argument("--forked-child", help="fork a child that sleeps 600 s once the callback is built; "
                        "write its pid and the commit worker's (after fit) to this JSON file")
    args, _unknown = parser.parse_known_args()  # e.g. secrets the lineage record must mask
    root = Path(args.root)
    if args.resume_from:  # the dataset pin comes back with the checkpoint
        cb = OxenLightningCallback(model_repo=args.model_repo, mlflow=args.mlflow, run_name=args.run_name,
                                   resume_from=args.resume_from)
        pin, args.ckpt_path = cb.dataset, cb.ckpt_path
    else:
        if args.move_branch_in_rank_one and os.environ.get("LOCAL_RANK") == "1":  # rank 0 resolved the branch already
            from helpers import Repo, commit_files

            commit_files(Repo(Path(args.dataset).resolve()), "moved meanwhile", {"train.csv": "x0,x1,x2,x3,label\n"})
        pin = PinnedDataset(args.dataset, revision=args.revision, paths=["train.csv", "val.csv"])
        cb = OxenLightningCallback(dataset=pin, model_repo=args.model_repo, mlflow=args.mlflow,
                                   run_name=args.run_name, **({"mlflow_timeout": args.mlflow_timeout}
                                                              if args.mlflow else {}),
                                   **({"log_models": False} if args.no_log_models else {}),
                                   **({"register_model": args.register_model} if args.register_model else {}))
    forked = None
    if args.forked_child:  # as a DataLoader worker or a user's fork Pool would: forked, never exec'd
        forked = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,), daemon=False)
        forked.start()
    callbacks = [ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=args.every_n_steps, save_top_k=-1,
                                 save_last=True) if not args.best_is_last else
                 ModelCheckpoint(dirpath=root / "ckpt", monitor="progress", mode="max", save_top_k=1), cb]
    if args.best_is_last:
        callbacks.append(Progress())
    if args.step_sleep:
        callbacks.append(SlowSteps(args.step_sleep))
    if args.gate:
        callbacks.insert(0, GateAtTrainEnd(Path(args.gate)))
    logger = MLFlowLogger(experiment_name="fit-script", log_model=False, run_id=args.logger_run_id) if args.logger else False
    trainer = make_trainer(root, callbacks, epochs=args.epochs, strategy=args.strategy, devices=args.devices,
                           logger=logger)
    model = TinyModel()
    trainer.fit(model, datamodule=CsvData(pin), ckpt_path=args.ckpt_path)
    if forked is not None:
        Path(args.forked_child).write_text(json.dumps({"forked": forked.pid, "worker": cb.run.publisher.worker_pid}))
    if args.after_fit == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    rows = Path(args.out).with_suffix(f".rank{trainer.global_rank}.json") if args.out else None
    if rows:
        rows.write_text(json.dumps({"labels": sorted(model.labels_seen), "commit": pin.commit,
                                    "snapshot": str(pin.path)}))
    if args.out and trainer.global_rank == 0:
        Path(args.out).write_text(json.dumps({"lineage": cb.lineage, "saved": sorted(p.name for p in (root / "ckpt").iterdir())}))
    if args.worker_pid:
        cb.run.wait()
        Path(args.worker_pid).write_text(str(cb.run.publisher.worker_pid))


if __name__ == "__main__":
    main()
