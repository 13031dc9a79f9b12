"""An HF Trainer script whose train() raises at step 3 (user code, or Ctrl-C) and is not caught."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hf_model import make_trainer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from oxen_callbacks import PinnedDataset  # noqa: E402
from oxen_callbacks.huggingface import OxenTrainerCallback  # noqa: E402


class RaiseAtStep3(TrainerCallback):
    def __init__(self, error: BaseException, armed: bool = True) -> None:
        self.error, self.armed = error, armed

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.armed and state.global_step == 3:
            raise self.error


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model-repo", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--raise", dest="error", choices=["error", "ctrl-c"], required=True)
    parser.add_argument("--report-to", default="none")
    parser.add_argument("--retry", action="store_true", help="catch it, then train again with a new Trainer")
    parser.add_argument("--after-a-good-train", action="store_true",
                        help="the same Trainer trains once without error first (the raise is in its second train())")
    parser.add_argument("--then-own-run", action="store_true",
                        help="catch it, end transformers' run, start a run of one's own and exit with it active")
    args = parser.parse_args()
    pin = PinnedDataset(args.dataset, revision="main", paths=["train.jsonl", "eval.jsonl"])
    cb = OxenTrainerCallback(dataset=pin, model_repo=args.model_repo, run_name=None if args.retry else "raised")
    error = KeyboardInterrupt() if args.error == "ctrl-c" else RuntimeError("user code failed at step 3")
    raising = RaiseAtStep3(error, armed=not args.after_a_good_train)
    trainer, _ = make_trainer(Path(args.out), pin.load_dataset()["train"], [cb, raising], max_steps=6,
                              save_steps=2, report_to=args.report_to)
    if args.after_a_good_train:
        trainer.train()
        print(json.dumps({"first": cb.lineage}), flush=True)
        raising.armed = True
    if args.then_own_run:
        import mlflow

        try:
            trainer.train()
        except RuntimeError:
            pass
        theirs = mlflow.active_run().info.run_id
        mlflow.end_run()  # the user tidies up the run transformers left active
        mine = mlflow.start_run(run_name="my-own-evaluation").info.run_id
        mlflow.log_metric("my_eval", 0.9)
        print(json.dumps({"transformers_run": theirs, "own_run": mine}))
        return  # exits normally, the user's run active
    if not args.retry:
        trainer.train()  # raises: the script dies of it
        return
    try:
        trainer.train()
    except RuntimeError:
        pass  # fixed: a new Trainer and callback (transformers left its MLflow run active)
    again = OxenTrainerCallback(dataset=pin, model_repo=args.model_repo)
    retried, _ = make_trainer(Path(args.out) / "again", pin.load_dataset()["train"], [again], max_steps=4,
                              save_steps=2, report_to=args.report_to)
    retried.train()
    print(json.dumps({"first": cb.run.run_name, "again": again.lineage}))


if __name__ == "__main__":
    main()
