"""No credential ever lands in MLflow, logs, commit messages, lineage files, journals or caches."""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer

from oxen_callbacks import PinnedDataset, read_lineage
from oxen_callbacks._util.redact import redact_argv
from oxen_callbacks.checkpoints import _copy, materialize_checkpoint
from oxen_callbacks.errors import ConfigurationError, LineageValidationError
from oxen_callbacks.lightning import OxenLightningCallback

TOKEN = "oxtok_4f9c2e7d1b8a6053SECRET"
SCRIPT = Path(__file__).parent / "fit_script.py"
# fake credentials of real shapes, assembled here so that no scanner mistakes this file for a leak
GITHUB = "ghp_" + "Xq7Lm2Rt9Vb4Nc8Kd1Fh6Jw3Ps5Gz0Ya2Ue"
HF = "hf_" + "QwErTyUiOpAsDfGhJkLzXcVbNmQwErTyUi"
OPENAI = "sk-proj-" + "T3BlbkFJ9xK2mQ7vR4nW8zL1pY6cH5dG0sA"
AWS_ID, AWS_SECRET = "AKIA" + "Q3X7RZ2M8N4K6P1T", "wJalrXUtn8EMI/K7MDeNG+bPxRf4CYzEXAMP1E9kEY"
JWT = "eyJhbGciOiJIUzI1NiJ9." + "eyJzdWIiOiJ1c2VyLTEyMyJ9." + "dBjftJeZ4CVPmB92K27uhbUJU1p1r_wW1gFWFOEjXk"
RANDOM = "Zk3v9QmT2xW7bN4pL8rF1sD6"
HEX32, HEX40 = "0f1e2d3c4b5a69788796a5b4c3d2e1f0", "9c1185a5c5e9fc54612808977ee8f548b2258d31"  # run, snapshot ids
"""Arguments that must survive redaction untouched: what reproduces a run."""
BENIGN = [
    "train.py", "--lr=3e-4", "--lr", "1e-05", "--weight-decay", "0.01", "--epochs", "3", "x0,x1,x2,x3",
    "bert-base-uncased", "distilbert-base-uncased-finetuned-sst-2-english", "meta-llama/Llama-2-7b-chat-hf",
    "HuggingFaceTB/SmolLM2-135M-Instruct", "sentence-transformers/all-MiniLM-L6-v2", "Qwen/Qwen2.5-0.5B-Instruct",
    "20250101-120000-ab12cd", "--run-name=exp42-lr3e4-bs32-wd01-seed1234", "ckpt_epoch_0003_step_000120",
    "/tmp/pytest-of-user/pytest-12/test_x0/models", "runs/20250101-120000-ab12cd/checkpoints/epoch=3-step=120.ckpt",
    "train-00000-of-00002-a1b2c3d4e5f6a7b8.parquet", "hf_model.py", "sk-learn-classification-pipeline-v2",
    "sqlite:////tmp/mlflow.db", "https://hub.oxen.ai/ox/reviews", "cuda:0", "bf16-mixed", "trainer.max_epochs=10",
    "--max-new-tokens", "512", "--pad-token", "<pad>", "--tokenizer", "bert-base-uncased", "--token-file",
    "/home/a/.hf_token", "MyVeryLongCamelCaseClassName2", "ResNet50V2ImageNet1KWeights",
    "0123456789abcdef0123456789abcde", "0123456789abcdef0123456789abcdef",  # Oxen commit ids: 31 and 32 hex
    "da39a3ee5e6b4b0d3255bfef95601890afd80709",  # a git commit id (a 40-hex secret is masked by name only)
    # paths holding hex ids: each component is judged alone, and ids are exempt
    f"runs:/{HEX32}/model", f"s3://b/prefix/run-{HEX32}", f"runs/{HEX32}",
    f"/root/.cache/huggingface/hub/models--x/snapshots/{HEX40}/config.json",
    f"/root/.cache/oxen-callbacks/snapshots/data-1a2b3c4d5e/{HEX32}/train.csv",
    # options whose names only look secret, and values that are no secret under any name
    "--key", "val_loss", "--key", "eval/f1", "--eval-key", "val_acc", "--auth-type", "basic", "--monitor-key", "val_loss", "--sort-key", "date", "--cache-key", "v2", "--key-columns", "id",
    "--private", "false", "--session", "3", "--token-limit", "1000", "--token_type_ids", "--image-token", "<image>",
    "--pass-through", "--pass_k", "5", "--prompt", "the -v flag", "--set", "trainer.max_epochs", "10", "-v",
    "--token", "--", "x.py",  # '--' ends the options: no value of --token
]
"""``(argv, secret, what must remain)``: by option name in every spelling, and by value shape."""
SECRET_ARGS = [
    (["--access-key", "plain-words-secret"], "plain-words-secret", "--access-key ***"),
    (["--wandb_key=da39a3ee5e6b4b0d3255bfef95601890afd80709"], "da39a3ee5e6b", "--wandb_key=***"),
    (["--pat", "hunter2hunter2"], "hunter2", "--pat ***"),
    (["trainer.api_key=letmein42"], "letmein42", "trainer.api_key=***"),
    (["+wandb.key=letmein43"], "letmein43", "+wandb.key=***"),
    (["++logger.mlflow.password=letmein44"], "letmein44", "++logger.mlflow.password=***"),
    (["MY_TOKEN=letmein45"], "letmein45", "MY_TOKEN=***"),
    (["--hf-token", "letmein46"], "letmein46", "--hf-token ***"),
    (["--api-key=letmein47"], "letmein47", "--api-key=***"),
    (["--apiKey", "letmein48"], "letmein48", "--apiKey ***"),
    (["--client-secret", "letmein49"], "letmein49", "--client-secret ***"),
    (["--passwd", "letmein50"], "letmein50", "--passwd ***"),
    (["--auth", "me:letmein51"], "letmein51", "--auth ***"),
    (["--credentials", "letmein52"], "letmein52", "--credentials ***"),
    (["--cookie", "sid=letmein53"], "letmein53", "--cookie ***"),
    (["--url-sig", "letmein54"], "letmein54", "--url-sig ***"),
    (["--private-key", "letmein55"], "letmein55", "--private-key ***"),
    (["--session", "letmein56"], "letmein56", "--session ***"),
    (["--hftoken", "letmein57"], "letmein57", "--hftoken ***"),
    (["--openaiapikey", "letmein58"], "letmein58", "--openaiapikey ***"),
    (["--env", "WANDB_API_KEY=letmein59"], "letmein59", "--env WANDB_API_KEY=***"),
    (["--config", '{"lr": 0.1, "api_key": "letmein60"}'], "letmein60", '"lr": 0.1'),
    (["--endpoint", "https://me:letmein61@hub.oxen.ai/ox/m"], "letmein61", "https://hub.oxen.ai/ox/m"),
    (["--endpoint", "https://h.example/x?token=letmein62&n=1"], "letmein62", "&n=1"),
    (["--header", "Authorization: Bearer letmein63"], "letmein63", "--header"),
    ([GITHUB], GITHUB[4:], "***"),
    (["--repo-url", f"https://x-access:{GITHUB}@github.com/a/b"], GITHUB[4:], "github.com/a/b"),
    ([HF], HF[3:], "***"),
    (["--model", OPENAI], OPENAI[8:], "--model ***"),
    (["--region", "eu", AWS_ID, AWS_SECRET], "MDeNG", "--region eu *** ***"),
    (["--note", JWT], "eyJzdWIiOiJ1c2VyLTEyMyJ9", "--note ***"),
    (["xoxb-" + "2048-8192-Q4vXbKz9LmR2"], "Q4vXbKz9LmR2", "***"),
    (["glpat-" + "x9Kq2LmZ7vRt4Wn8Bc1D"], "x9Kq2LmZ7vRt4Wn8Bc1D", "***"),
    (["AIza" + "SyD4x9Kq2LmZ7vRt4Wn8Bc1Dq3Zk3v9QmT2x"], "SyD4x9Kq2LmZ", "***"),
    (["--seed", "7", RANDOM], RANDOM, "--seed 7 ***"),
    # a URL's first query parameter (``https:`` is no key), its value up to the next ``&name=``
    (["--u", "https://h/x?client_secret=Tr0ub4dor&3"], "Tr0ub4dor&3", "https://h/x?client_secret=***"),
    (["--u", "https://h/x?private_token=correcthorsebattery"], "correcthorse", "private_token=***"),
    (["--u", "http://mlflow:5000?auth=letmein70"], "letmein70", "http://mlflow:5000?auth=***"),
    (["--token", "-Summer2024"], "Summer2024", "--token ***"),  # a value starting with '-'
    (["--password", "123456"], "123456", "--password ***"),  # a number under a password's name
    (["-password", "letmein71"], "letmein71", "-password ***"),
    (["--config", '{"password": "correct horse battery"}'], "horse", '{"password": "***"}'),
    (["--config", "db:\n  password: letmein72"], "letmein72", "password: ***"),  # nested YAML
    (["--config", "{db: {password: letmein73}}"], "letmein73", "{db: {password: ***}}"),
    (["--config", "db:\n  password:\n    letmein82\n  user: bob"], "letmein82", "password: ***\n  user: bob"),
    (["--config", "db:\n  password: |\n    letmein83\nlr: 1"], "letmein83", "password: ***\nlr: 1"),
    (["--header", "Authorization: Basic Ym9iOnB3"], "Ym9iOnB3", "Authorization: Basic ***"),
    (["--header", f"Authorization: token {HEX40}"], HEX40, "Authorization: token ***"),
    (["--header", f'Proxy-Authorization: Digest username="bob", response="{HEX32}"'], HEX32, "Digest ***"),
    (["--header", "X-Api-Key: letmein74"], "letmein74", "X-Api-Key: ***"),
    (["--header", '{"Authorization": "Basic Ym9iOnB3"}'], "Ym9iOnB3", '{"Authorization": "***"}'),
    *[([name, "letmein75"], "letmein75", f"{name} ***")
      for name in ("--secrets", "--privkey", "--pw", "--cred", "--oauth", "--jwt", "--passw0rd", "--oauth2-token")],
    (["--set", "wandb.api_key", "letmein76"], "letmein76", "--set wandb.api_key ***"),
    (["--opts", "MODEL.DEVICE", "cpu", "WANDB.KEY", "letmein77"], "letmein77", "MODEL.DEVICE cpu WANDB.KEY ***"),
    (["--extra", "--password letmein78 --lr 1"], "letmein78", "--lr 1"),  # a command line in one argument
    (["--launcher-args=train.py --api-key letmein79"], "letmein79", "--launcher-args=train.py --api-key"),
    (["--launcher-args='--token letmein84'"], "letmein84", "--launcher-args='--token ***'"),  # quoted by hand
    (["--cmd", "curl -H 'Authorization: Basic Ym9iOnB3' https://x"], "Ym9iOnB3", "Basic ***' https://x"),
    (["--key", "letmein80"], "letmein80", "--key ***"),  # a bare --key keeps metric names only
    (["--key", "correct_horse_battery"], "horse", "--key ***"),
    (["--s3", "s3://b/Zk3v9QmT2xW7bN4pL8rF1sD6/f"], "Zk3v9QmT2xW7", "--s3 s3:***"),  # a random component: the run goes
    (["--blob", "a" * 3 + "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"], "9f86d081884c", "***"),
]


def test_a_configured_token_appears_nowhere(dataset_repo, tmp_path, caplog):
    import oxen

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    host = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()
    auth = tmp_path / "oxen-config" / "auth_config.toml"
    auth.parent.mkdir(parents=True, exist_ok=True)
    oxen.auth.config_auth(TOKEN, host=host, path=str(auth))  # the user's token, in Oxen's own config
    assert TOKEN in auth.read_text()

    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", remote_url=f"http://{host}/ox/models",
                               push_timeout=5, experiment_name="secrets")
    with caplog.at_level(logging.DEBUG):
        make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb], epochs=1).fit(
            TinyModel(), datamodule=CsvData(pin))
    assert cb.lineage["push"]["pushed"] is False  # the push was tried (and failed) with that token configured

    assert TOKEN not in caplog.text
    leaks = []
    for dirpath, _dirs, names in os.walk(tmp_path):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.realpath(path) == str(auth.resolve()) or os.path.islink(path):
                continue  # the user's own config file (and our link to it)
            try:
                if TOKEN.encode() in open(path, "rb").read():
                    leaks.append(path)
            except OSError:
                continue
    assert not leaks  # MLflow store and artifacts, model repo (commits, lineage), journals, worker logs, caches


def test_each_fit_pushes_with_the_tokens_of_its_own_oxen_config(dataset_repo, tmp_path, monkeypatch):
    """Two fits of one process, one author, each under its own Oxen config folder holding its own token
    for the same server (two accounts): each push carries its own folder's token, never the other's
    (the author's private config folder linked the first folder's tokens for good)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[tuple[str, str | None]] = []  # (path, Authorization)

    class Server(BaseHTTPRequestHandler):
        def answer(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_HEAD = answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Server)
    host = f"127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
    try:
        for account in ("alice", "bob", "nobody"):
            config = tmp_path / f"config-{account}"
            config.mkdir()
            if account != "nobody":
                (config / "auth_config.toml").write_text(
                    f'[[host_configs]]\nhost = "{host}"\nauth_token = "tok-of-{account}"\n')
            monkeypatch.setenv("OXEN_CONFIG_DIR", str(config))
            before = len(seen)
            cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / f"models-{account}", mlflow=False,
                                       author=("Sweep Bot", "bot@example.com"),
                                       remote_url=f"http://{host}/ns/{account}", push_timeout=20)
            make_trainer(tmp_path / account, [ModelCheckpoint(dirpath=tmp_path / account / "ckpt"), cb], epochs=1).fit(
                TinyModel(), datamodule=CsvData(pin))
            assert cb.lineage["push"]["pushed"] is False  # (tried: the stand-in server knows no repository)
            sent = {auth for path, auth in seen[before:] if f"/ns/{account}" in path}
            assert sent, f"{account}'s push reached the server"
            assert sent == ({None} if account == "nobody" else {f"Bearer tok-of-{account}"})
    finally:
        server.shutdown()


@pytest.mark.parametrize("path", ["../../etc/passwd", "runs\\..\\x", "a\\b", "C:/x", "c:x", "/etc/passwd", ""])
def test_lineage_paths_are_validated_before_anything_is_read(tmp_path, path):
    record = {
        "schema": "oxen-callbacks/lineage/v1",
        "dataset": None,
        "model": {"repo": str(tmp_path), "commit": "abc1234", "path": path},
        "checkpoints": [],
        "run": {"mlflow_run_id": None, "mlflow_tracking_uri": None},
        "code": {"git_commit": None, "git_dirty": None},
        "framework": {"name": "x", "version": "1"},
    }
    with pytest.raises(LineageValidationError, match="unsafe path"):
        read_lineage(record)
    with pytest.raises((LineageValidationError, ConfigurationError)):
        materialize_checkpoint(lineage=record)


def test_redaction_keeps_ordinary_arguments():
    assert redact_argv(BENIGN) == BENIGN


@pytest.mark.parametrize(("argv", "secret", "kept"), SECRET_ARGS, ids=lambda v: str(v)[:24] if isinstance(v, list) else "")
def test_redaction_masks_secrets_by_name_and_by_shape(argv, secret, kept):
    recorded = " ".join(redact_argv(["train.py", "--lr=3e-4", *argv, "bert-base-uncased"]))
    assert secret not in recorded
    assert kept in recorded and recorded.startswith("train.py --lr=3e-4 ") and recorded.endswith(" bert-base-uncased")


def test_secrets_in_the_command_line_reach_no_file(dataset_repo, tmp_path):
    """A real fit started with secrets in its arguments: none of their bytes in any file it made."""
    secrets = {"access-key": "Yx4Vr8Nq2Lz6Tb1Mw9Pc", "wandb": "c2f8d5e1a9b7c3d0e4f6a8b2c1d9e7f5a3b0c6d4",
               "pat": GITHUB, "hydra": "letmein-hydra-1", "plus": "letmein-plus-2", "env": "letmein-env-3",
               "bare": HF, "aws": AWS_SECRET, "url": "letmein-url-4", "query": "Tr0ub4dor&3e2e", "dash": "-Summer2024e2e",
               "nested": "letmein-nested-5"}
    secret_args = ["--access-key", secrets["access-key"], f"--wandb_key={secrets['wandb']}", "--pat", secrets["pat"],
                   f"trainer.api_key={secrets['hydra']}", f"+wandb.key={secrets['plus']}", f"MY_TOKEN={secrets['env']}",
                   secrets["bare"], secrets["aws"], "--hub", f"https://me:{secrets['url']}@hub.oxen.ai/ox/models",
                   "--upload", f"https://h.example/up?client_secret={secrets['query']}", "--token", secrets["dash"],
                   "--extra", f"--password {secrets['nested']} --lr 1"]
    benign_args = ["--lr=3e-4", "--base-model", "bert-base-uncased"]
    cmd = [sys.executable, str(SCRIPT), "--dataset", str(dataset_repo.path), "--revision", dataset_repo.commits[0],
           "--model-repo", str(tmp_path / "models"), "--root", str(tmp_path / "fit"), "--run-name", "secret-run",
           "--epochs", "1", "--mlflow", *benign_args, *secret_args]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]

    recorded = json.loads((tmp_path / "models" / "runs" / "secret-run" / "lineage.json").read_text())["code"]["command"]
    command = " ".join(shlex.split(recorded))
    for arg in ("--lr=3e-4", "--base-model bert-base-uncased", "--run-name secret-run", "--access-key ***",
                "--wandb_key=***", "--pat ***", "trainer.api_key=***", "+wandb.key=***", "MY_TOKEN=***",
                "https://hub.oxen.ai/ox/models", "--upload https://h.example/up?client_secret=***", "--token ***",
                "--extra --password *** --lr 1"):
        assert arg in command, command
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "cache").is_dir()
    leaks = []
    for dirpath, _dirs, names in os.walk(tmp_path):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            data = Path(path).read_bytes()
            leaks += [f"{path}: {label}" for label, secret in secrets.items() if secret.encode() in data]
    leaks += [f"training output: {label}" for label, secret in secrets.items()
              if secret.encode() in proc.stdout + proc.stderr]
    assert not leaks  # model repo (.oxen too), cache, journals, worker logs, MLflow DB and artifacts


def _hostile_record(models, commit: str, *, git_commit: str, command: str, cwd: Path) -> dict:
    return {"schema": "oxen-callbacks/lineage/v1", "dataset": None,
            "model": {"repo": str(models.path), "commit": commit, "path": "runs/r/checkpoints/last.ckpt"},
            "checkpoints": [], "run": {"mlflow_run_id": None, "mlflow_tracking_uri": None},
            "code": {"git_commit": git_commit, "git_dirty": False, "command": command, "cwd": str(cwd)},
            "framework": {"name": "lightning", "version": "2"}}


def test_reproduce_prints_a_tampered_record_as_inert_words(tmp_path, capsys, monkeypatch):
    """A lineage record edited by an attacker: `reproduce` quotes every word and drops a bogus commit."""
    from helpers import make_repo

    from oxen_callbacks.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # the model repository alone
    models = make_repo(tmp_path / "models", [("ckpt", {"runs/r/checkpoints/last.ckpt": "weights"})])
    code_dir, bin_dir = tmp_path / "code dir", tmp_path / "bin"
    code_dir.mkdir()
    bin_dir.mkdir()
    for tool in ("git", "python"):  # stand-ins that log the words they were given
        (bin_dir / tool).write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "{tmp_path}/{tool}.args"\n')
        (bin_dir / tool).chmod(0o755)
    command = "python train.py --name $(touch PWNED1) `touch PWNED2` ; touch PWNED3 && touch PWNED4 | sh"
    runs = {"quoted": ("0123abcd", command), "bad-commit": ("abc; touch PWNED5", "python train.py --lr 0.1"),
            "unparsable": ("0123abcd", 'python train.py "$(touch PWNED6)')}
    for name, (git_commit, cmd) in runs.items():
        (models.path / "runs" / name).mkdir(parents=True)
        (models.path / "runs" / name / "lineage.json").write_text(json.dumps(
            _hostile_record(models, models.head, git_commit=git_commit, command=cmd, cwd=code_dir)))

    def rerun_line(name: str) -> tuple[str, str]:
        assert main(["reproduce", "--model-repo", str(models.path), name, "--to", str(tmp_path / f"kit-{name}")]) == 0
        out = capsys.readouterr().out
        return next(line for line in out.splitlines() if line.startswith("rerun"))[len("rerun"):].strip(), out

    line, out = rerun_line("quoted")
    assert "untrusted input" in out
    subprocess.run(["sh", "-c", line], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, check=True)
    assert (tmp_path / "git.args").read_text().splitlines() == ["checkout", "0123abcd"]
    assert (tmp_path / "python.args").read_text().splitlines() == shlex.split(command)[1:]  # literal words
    assert not list(tmp_path.rglob("PWNED*"))

    line, out = rerun_line("bad-commit")
    assert "checkout" not in line and "PWNED5" not in line
    assert "is not a git commit id" in out and "code commit  (not a commit id" in out
    assert shlex.split(line) == ["cd", str(code_dir), "&&", "python", "train.py", "--lr", "0.1"]

    line, out = rerun_line("unparsable")
    assert "python" not in line and "not printed as runnable" in out
    assert not list(tmp_path.rglob("PWNED*"))


@pytest.mark.parametrize("where, value", [
    (("dataset", "commit"), "main"), (("dataset", "commit"), "/home/user"), (("model", "commit"), "../../x"),
    (("checkpoints", 0, "commit"), "HEAD"), (("checkpoints", 0, "commit"), "ABCDEF0123"),
])
def test_lineage_commit_fields_must_be_commit_ids(where, value, tmp_path):
    """A branch name would reproduce moving data; a path would name a cache folder anywhere."""
    record = {
        "schema": "oxen-callbacks/lineage/v1",
        "dataset": {"repo": str(tmp_path), "revision": "main", "commit": "5d0c4b1e2f3a49586776859a4b3c2d1",
                    "paths": ["."]},
        "model": {"repo": str(tmp_path), "commit": "e3b0c44298fc1c149afbf4c8996fb924", "path": "runs/r/m.ckpt"},
        "checkpoints": [{"commit": "e3b0c44298fc1c149afbf4c8996fb924", "path": "runs/r/m.ckpt", "step": 1,
                         "epoch": 0, "metrics": {}}],
        "run": {"mlflow_run_id": None, "mlflow_tracking_uri": None},
        "code": {"git_commit": None, "git_dirty": None},
        "framework": {"name": "x", "version": "1"},
    }
    read_lineage(record)  # valid as is
    target = record
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    with pytest.raises(LineageValidationError, match="not an Oxen commit id"):
        read_lineage(record)


def test_a_password_in_the_loggers_tracking_uri_appears_nowhere(dataset_repo, tmp_path, caplog):
    """Sharing an ``MLFlowLogger``'s run whose URI holds a password: the callback's MLflow writes (a
    thread of the training process, with that URI) reach the server, and the password no file."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient
    from mlflow_server import MlflowServer

    password = "pw-" + RANDOM
    with MlflowServer(tmp_path / "server") as server:
        uri = server.uri.replace("http://", f"http://alice:{password}@")
        pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
        logger = MLFlowLogger(experiment_name="creds", tracking_uri=uri)
        cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models")
        with caplog.at_level(logging.DEBUG):
            make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb], epochs=1, logger=logger).fit(
                TinyModel(), datamodule=CsvData(pin))
            lineage = cb.lineage  # waits for the thread's MLflow writes
        run = MlflowClient(server.uri).get_run(logger.run_id)
        assert lineage["run"]["mlflow_run_id"] == logger.run_id
        assert run.data.tags["oxen.model.commit"] == lineage["model"]["commit"]  # written through that URI
        assert password not in caplog.text
        leaks = []
        for dirpath, _dirs, names in os.walk(tmp_path):
            for name in names:
                path = os.path.join(dirpath, name)
                try:
                    if password.encode() in open(path, "rb").read():
                        leaks.append(path)
                except OSError:
                    continue
        assert not leaks  # journals, lineage records, commits, MLflow's store and artifacts, logs


def test_under_umask_077_the_run_leaves_nothing_others_can_read(dataset_repo, tmp_path):
    """A private dataset stays private: snapshots were made 0444 / 0555 whatever the umask, so a pin in
    a shared cache or on a scratch disk let every user of the machine read it (its checkpoints' too).
    The commit worker started before the umask was set (a callback built earlier, never fitted, whose
    warm worker the next callback takes over) commits as a worker started at fit start would."""
    from fsspec.implementations.local import get_umask

    earlier = OxenLightningCallback(model_repo=tmp_path / "earlier", mlflow=False)  # noqa: F841 (holds its worker)
    get_umask()  # fsspec keeps the first umask it sees (a save earlier in this process): Lightning's files 0644
    old = os.umask(0o077)
    try:
        pin = PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[0], paths=["train.csv", "val.csv"])
        cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", mlflow=False, run_name="private")
        make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb], epochs=1).fit(
            TinyModel(), datamodule=CsvData(pin))
        PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[1]).pull()
        PinnedDataset(dataset_repo.path, revision=dataset_repo.commits[1], paths=["val.csv"]).pull()  # merged in
        checkpoint = materialize_checkpoint(tmp_path / "models", run="private")
        copy = materialize_checkpoint(tmp_path / "models", run="private", dest=tmp_path / "mine")
        folder_copy = _copy(pin.path, tmp_path / "folder-copy")  # a writable copy of a folder (HF checkpoints)
    finally:
        os.umask(old)
    snapshots = Path(os.environ["OXEN_CALLBACKS_CACHE"]) / "snapshots"  # (the cache itself: made before)
    made = [p for root in (snapshots, tmp_path / "models", checkpoint.path, copy.path, folder_copy)
            for p in (root, *root.rglob("*")) if not p.is_symlink()]
    # the trainer's own files are as private as Lightning made them (not ours to change); the repository's
    # copies of them are its own (no shared inode), as private as the umask says
    trainers = {p.stat().st_ino for p in (tmp_path / "ckpt").iterdir()}
    assert not [p for p in made if p.stat().st_ino in trainers]
    open_to_others = [f"{p} {oct(p.stat().st_mode & 0o777)}" for p in made if p.stat().st_mode & 0o077]
    assert len(made) > 20 and not open_to_others
    assert not pin.file("train.csv").stat().st_mode & 0o222  # still read-only, for the owner too
    assert folder_copy.stat().st_mode & 0o777 == 0o700  # and the copy the owner's to change


@pytest.mark.parametrize(("text", "secret"), [
    ("url: /api?client_secret=Tr0ub4dor&3", "Tr0ub4dor&3"),
    ("after retries: /?access_token=Tr0ub4dor&3xyz&page=2", "Tr0ub4dor&3xyz"),
    ('a query ?access_token="quoted value" said', "quoted value"),
    ("url: /?access_token=QSECRET123/api/2.0/mlflow/runs/get?run_id=x", "QSECRET123"),
])
def test_a_secret_query_parameter_outside_a_whole_url_is_masked_whole(text, secret):
    """urllib3 quotes a request as a bare path (``url: /?access_token=...``): the whole value is masked,
    an ``&`` not starting another parameter or a quoted value included; other parameters stay."""
    from oxen_callbacks._util.redact import redact_text

    shown = redact_text(text)
    assert secret not in shown and not any(part in shown for part in secret.split("&")[1:] if len(part) > 1)
    assert redact_text("?key=val_loss&page=2 pad_token=[PAD]") == "?key=val_loss&page=2 pad_token=[PAD]"


def test_sync_sends_mlflow_credentials_only_to_the_tracking_server_the_user_names(tmp_path, monkeypatch):
    """A journal in the (shared) cache naming another tracking server than ``$MLFLOW_TRACKING_URI``: `sync`
    sent the user's ``MLFLOW_TRACKING_TOKEN`` there (anyone who can write the cache could collect it;
    found by an adversarial review). It is kept, unsent, saying how to send it; once the user names that
    server, it is logged there."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from oxen_callbacks._mlflow.journal import MlflowJournal

    heard: list[tuple[str, str | None]] = []

    class Server(BaseHTTPRequestHandler):
        def _any(self) -> None:
            heard.append((self.path, self.headers.get("Authorization")))
            body = json.dumps({"run": {"info": {"run_id": "a" * 32, "lifecycle_stage": "active"}, "data": {}}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _any

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    theirs = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        journal = MlflowJournal.create(tmp_path / "cache", {"tracking_uri": theirs, "run_id": "a" * 32})
        journal.put(1, {"op": "set_tags", "tags": {"oxen.run": "theirs"}})
        journal.mark_ended()
        journal.release_trainer()
        env = {**os.environ, "MLFLOW_TRACKING_TOKEN": TOKEN, "MLFLOW_TRACKING_URI": "https://mlflow.mine.example",
               "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "HOME": str(tmp_path)}
        cmd = [sys.executable, "-m", "oxen_callbacks.cli", "sync", "--cache-dir", str(tmp_path / "cache")]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert heard == [], heard  # not even asked without the token
        assert done.returncode == 1 and "not sent" in done.stdout and f"MLFLOW_TRACKING_URI={theirs}" in done.stdout, (
            done.stdout + done.stderr)
        assert not journal.is_empty()
        done = subprocess.run(cmd, env={**env, "MLFLOW_TRACKING_URI": theirs}, capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stdout + done.stderr
        assert heard and all(auth == f"Bearer {TOKEN}" for _path, auth in heard)  # the server the user named
    finally:
        server.shutdown()
