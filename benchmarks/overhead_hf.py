"""Train wall time with oxen-callbacks vs a bare Hugging Face Trainer run, and vs the anchors.

    python benchmarks/overhead_hf.py [--quick] [--repeats 3]

Like ``overhead.py`` but for ``transformers.Trainer``: a tiny BERT classifier whose
``checkpoint-N`` folders weigh ``size`` MB (a frozen buffer parameter), five saves.
Variants: ``bare`` (no callback, report_to none), ``ours`` (OxenTrainerCallback,
MLflow on SQLite), ``ours_oxen_only`` (``mlflow=False``), ``mlflow``
(``report_to="mlflow"`` with ``HF_MLFLOW_LOG_ARTIFACTS=1``: checkpoints copied into MLflow
artifacts) and ``naive`` (synchronous oxenai add + commit of each folder in ``on_save``).
``train_s`` includes waiting for every checkpoint to be committed. Every run logs into an
existing MLflow SQLite store and existing Oxen model repositories. Each run is a fresh
process; orders alternate; medians. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from overhead import headline, prepare_fit, variants  # benchmarks/ is on sys.path when run as a script
from user_env import user_env

VARIANTS = ("bare", "ours", "ours_oxen_only", "mlflow", "naive")
SAVES = 5
STEPS_PER_SAVE = 2


def run_one(variant: str, work: Path, size_mb: int, compute_s: float) -> dict:
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DataCollatorWithPadding,
        PreTrainedTokenizerFast,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    words = ["good", "bad", "film", "plot", "very", "the"]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    raw = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=2))
    model.register_parameter("blob", torch.nn.Parameter(torch.randn(size_mb * 262144), requires_grad=False))
    texts = [" ".join(words[(i + j) % len(words)] for j in range(5)) for i in range(64)]
    data = Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(64)]})
    data = data.map(lambda b: tokenizer(b["text"]), batched=True)

    class Compute(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            deadline = time.perf_counter() + compute_s / STEPS_PER_SAVE
            a = torch.randn(256, 256)
            while time.perf_counter() < deadline:
                a = torch.tanh(a @ a)

    setup_started = time.perf_counter()  # "wall" also counts building callbacks and the Trainer
    callbacks: list = [Compute()]
    report_to = "none"
    ours = None
    if variant.startswith("ours"):
        from oxen_callbacks.huggingface import OxenTrainerCallback

        options = ({"mlflow": False} if variant == "ours_oxen_only"
                   else {"mlflow_tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "experiment_name": "bench"})
        ours = OxenTrainerCallback(model_repo=work / "models", **options)
        callbacks.append(ours)
    elif variant == "mlflow":
        os.environ.update(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", HF_MLFLOW_LOG_ARTIFACTS="1",
                          MLFLOW_EXPERIMENT_NAME="bench")
        report_to = "mlflow"
    elif variant == "naive":
        import oxen

        repo = oxen.Repo(str(work / "naive-models"))

        class NaiveCommit(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                target = Path(repo.path) / folder.name
                os.makedirs(target)
                for f in folder.iterdir():
                    os.link(f, target / f.name)
                repo.add(str(target))
                repo.commit(f"step {state.global_step}")

        callbacks.append(NaiveCommit())
    args = TrainingArguments(output_dir=str(work / "out"), max_steps=SAVES * STEPS_PER_SAVE,
                             save_steps=STEPS_PER_SAVE, per_device_train_batch_size=8, report_to=report_to,
                             use_cpu=True, disable_tqdm=True, logging_steps=STEPS_PER_SAVE, save_strategy="steps")
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=callbacks)
    started = time.perf_counter()
    trainer.train()
    result = {"variant": variant, "fit_s": time.perf_counter() - started,
              "wall_s": time.perf_counter() - setup_started,
              "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if ours is not None:
        result["stall_ms"] = [s * 1000 for s in ours.stall_seconds]
    return result


def fit_in_child(variant: str, root: Path, size_mb: int, compute_s: float, i: int) -> dict:
    work = root / f"{variant}-{size_mb}-{compute_s}-{i}"
    work.mkdir(parents=True)
    prepare_fit(root, work, "mlflow.db")
    env = user_env(("MLFLOW_",), OXEN_CALLBACKS_CACHE=str(work / "cache"), OXEN_CONFIG_DIR=str(work / "oxen-config"))
    if variant == "naive":
        (work / "oxen-config").mkdir()
        (work / "oxen-config" / "user_config.toml").write_text('name = "bench"\nemail = "bench@example.com"\n')
    cmd = [sys.executable, __file__, "--child", variant, "--work", str(work), "--size-mb", str(size_mb),
           "--compute-s", str(compute_s)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return json.loads(out.stdout.strip().splitlines()[-1])


def workload(root: Path, size_mb: int, compute_s: float, repeats: int, variants: tuple[str, ...]) -> dict:
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(repeats):
        for variant in variants if i % 2 == 0 else tuple(reversed(variants)):
            runs[variant].append(fit_in_child(variant, root, size_mb, compute_s, i))
            print(f"  {variant:15s} size={size_mb}MB compute={compute_s}s/save: {runs[variant][-1]['fit_s']:.2f}s",
                  file=sys.stderr)
    med = {v: statistics.median(r["fit_s"] for r in rs) for v, rs in runs.items()}
    wall = {v: statistics.median(r["wall_s"] for r in rs) for v, rs in runs.items()}
    stalls = [s for r in runs["ours"] for s in r["stall_ms"]]
    return {"size_mb": size_mb, "saves": SAVES, "compute_s_per_save": compute_s,
            "train_s_median": {v: round(t, 3) for v, t in med.items()},
            "ratio": {v: round(t / med["bare"], 3) for v, t in med.items()},
               "wall_s_median": {v: round(t, 3) for v, t in wall.items()},
               "ratio_wall": {v: round(t / wall["bare"], 3) for v, t in wall.items()},
            "stall_ms_p50": round(statistics.median(stalls), 3),
            "rss_growth_mb": round(statistics.median(r["rss_peak_mb"] for r in runs["ours"])
                                   - statistics.median(r["rss_peak_mb"] for r in runs["bare"]), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 MB checkpoints (< 3 minutes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child")
    parser.add_argument("--work")
    parser.add_argument("--size-mb", type=int)
    parser.add_argument("--compute-s", type=float)
    args = parser.parse_args()
    if args.child:
        import logging

        logging.disable(logging.WARNING)
        print(json.dumps(run_one(args.child, Path(args.work), args.size_mb, args.compute_s)))
        return
    size = 20 if args.quick else 100
    with tempfile.TemporaryDirectory(prefix="oxen-bench-hf-") as tmp:
        root = Path(tmp)
        print("overlap (normal case):", file=sys.stderr)
        overlap = workload(root, size, 2.0 if not args.quick else 0.5, args.repeats,
                           variants(("bare", "ours", "ours_oxen_only"), args.quick))
        print("saturated (save-bound):", file=sys.stderr)
        repeats = args.repeats if args.quick else max(args.repeats, 5)  # full: 5 of these short, noisy fits
        saturated = workload(root, size, 0.0, repeats, variants(VARIANTS, args.quick))
    print(json.dumps(headline(overlap, saturated, quick=args.quick)))

if __name__ == "__main__":
    main()
