"""A notebook session, cell by cell in a real IPython shell: train() stopped with Ctrl-C, then run again.

Prints one JSON line: the status of each cell and the run names of both train() calls."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from IPython.core.interactiveshell import InteractiveShell

SETUP = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from hf_model import make_trainer
from transformers import TrainerCallback
from oxen_callbacks import PinnedDataset
from oxen_callbacks.huggingface import OxenTrainerCallback

class CtrlCAtStep3(TrainerCallback):  # the user presses Ctrl-C (Jupyter's interrupt: SIGINT)
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)

pin = PinnedDataset(sys.argv[1], revision="main", paths=["train.jsonl", "eval.jsonl"])
cb = OxenTrainerCallback(dataset=pin, model_repo=sys.argv[2], mlflow=False)
trainer, _ = make_trainer(Path(sys.argv[3]), pin.load_dataset()["train"], [cb, CtrlCAtStep3()], max_steps=4, save_steps=2)
"""
CELLS = [SETUP, "trainer.train()", "stopped = cb.run.run_name\ntrainer.remove_callback(CtrlCAtStep3)\ntrainer.train()"]


def main() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    shell = InteractiveShell.instance()
    results = [shell.run_cell(cell) for cell in CELLS]
    errors = [type(r.error_in_exec).__name__ if r.error_in_exec else None for r in results]
    ns = shell.user_ns
    sys.stdout = sys.__stdout__
    print(json.dumps({"errors": errors, "stopped": ns.get("stopped"), "again": ns["cb"].lineage["run"]["name"]}))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
