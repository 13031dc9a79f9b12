"""One HF Trainer run with the Oxen callback, launched by torchrun (one process per rank)."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hf_model import make_trainer  # noqa: E402

from oxen_callbacks import PinnedDataset  # noqa: E402
from oxen_callbacks.huggingface import OxenTrainerCallback  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model-repo", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out)
    pin = PinnedDataset(args.dataset, revision="main", paths=["train.jsonl", "eval.jsonl"])
    splits = pin.load_dataset()
    cb = OxenTrainerCallback(dataset=pin, model_repo=args.model_repo)
    trainer, collator = make_trainer(out / "hf", splits["train"], [cb], max_steps=4, save_steps=2,
                                     report_to="mlflow", ddp_backend="gloo")
    trainer.train()
    (out / f"rank{rank}.json").write_text(json.dumps({"labels": sorted(set(collator.labels)), "commit": pin.commit}))
    if rank == 0:
        (out / "lineage.json").write_text(json.dumps(cb.lineage))
    # Leave without interpreter finalization, after the exit handlers (ours wait for the lineage there):
    # tearing down gloo's process group there can abort the rank ("terminate called without an active
    # exception") or hang it (its worker thread waits for the GIL the tearing-down thread holds), a
    # PyTorch bug (pytorch/pytorch#190489) that fails the launcher although everything was committed.
    atexit._run_exitfuncs()
    os._exit(0)


if __name__ == "__main__":
    main()
