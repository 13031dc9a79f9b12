"""Setting Oxen up with only what pip installed, and a token from the environment that reaches no file.

Every command runs as a real process in a fresh HOME, without ``$OXEN_CONFIG_DIR`` and with no
``oxen`` binary on PATH; remotes are the loopback stand-in of :mod:`oxen_stand_in`, which
records the Authorization header of each request.
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import table
from helpers import make_repo
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_model import CsvData, TinyModel, make_trainer
from oxen_stand_in import StandInOxen, StandInRepo

from oxen_callbacks import PinnedDataset
from oxen_callbacks._oxen import child as oxen_child
from oxen_callbacks._publish.push import pending_push
from oxen_callbacks.lightning import OxenLightningCallback

TOKEN = "oxtok_from_argv_or_stdin_9d2e"
ENV_TOKEN = "oxtok_from_the_environment_4b7c"
COMMIT = "5d0c4b1e2f3a49586776859a4b3c2d1"


@pytest.fixture
def server() -> Iterator[StandInOxen]:
    """The stand-in with a dataset ``ox/reviews`` and an empty model repository ``ox/models``."""
    stand_in = StandInOxen()
    stand_in.repos["ox/reviews"] = StandInRepo()
    stand_in.repos["ox/reviews"].commit(COMMIT, {"train.csv": table(label=0, seed=0).encode(),
                                                 "val.csv": table(label=0, seed=1, rows=32).encode()})
    stand_in.repos["ox/models"] = StandInRepo()
    yield stand_in.start()
    stand_in.stop()


def holders(root: Path, secret: str) -> list[str]:
    """Every file under ``root`` whose bytes hold ``secret``."""
    found = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                if not os.path.islink(path) and secret.encode() in Path(path).read_bytes():
                    found.append(path)
            except OSError:
                continue
    return found


def fresh_world(tmp_path: Path) -> dict[str, str]:
    """A user's environment: a new HOME and TMPDIR, no Oxen config folder, no token, no `oxen` binary."""
    for folder in ("home", "tmp"):
        (tmp_path / folder).mkdir(exist_ok=True)
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if d and shutil.which("oxen", path=d) is None)
    env = {k: v for k, v in os.environ.items()
           if k not in ("OXEN_CONFIG_DIR", "OXEN_API_KEY", "XDG_CONFIG_HOME") and not k.startswith("GIT_")}
    env.update(HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"), PATH=path, GIT_CONFIG_NOSYSTEM="1")
    assert shutil.which("oxen", path=path) is None and shutil.which("git", path=path)
    return env


def run(env: dict[str, str], *args: str, stdin: str = "", expect: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "oxen_callbacks.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == expect, proc.stderr
    return proc


def test_every_setup_command_works_without_the_oxen_binary(tmp_path, server):
    env = fresh_world(tmp_path)
    config = tmp_path / "home" / ".config" / "oxen"

    # auth: never from argv (and the refusal does not echo it), from stdin otherwise, the file the user's alone
    for argv in (["auth", TOKEN], ["auth", "--token", TOKEN], ["auth", f"--token={TOKEN}", "--json"]):
        refused = run(env, *argv, stdin=TOKEN, expect=2)
        assert TOKEN not in refused.stdout + refused.stderr and "command line" in refused.stderr
    assert not config.exists()
    saved = json.loads(run(env, "auth", "--json", stdin=f"  {TOKEN}\n").stdout)
    auth = config / "auth_config.toml"
    assert saved == {"host": "hub.oxen.ai", "auth_config": str(auth), "mode": "0600", "hosts": ["hub.oxen.ai"]}
    assert auth.stat().st_mode & 0o777 == 0o600 and config.stat().st_mode & 0o077 == 0
    assert f'auth_token = "{TOKEN}"' in auth.read_text()
    os.chmod(auth, 0o644)  # a file left readable by others is made private again
    other = json.loads(run(env, "auth", "--host", server.host, "--json", stdin="second-token").stdout)
    assert other["hosts"] == sorted(["hub.oxen.ai", server.host]) and auth.stat().st_mode & 0o777 == 0o600
    assert "Hosts with a token" in run(env, "auth", "--host", server.host, stdin="second-token").stdout
    for bad, says in ((["auth"], "No token"), (["auth", "--host", "https://hub.oxen.ai/ox"], "not a host"),
                      (["auth", "--host", "a b"], "not a host"), (["auth", "--host", TOKEN], "not shown"),
                      (["auth", "--host", "me:S3cretPW@hub.oxen.ai"], "'***@hub.oxen.ai' is not a host[:port]")):
        failed = run(env, *bad, stdin="" if bad == ["auth"] else TOKEN, expect=2)
        assert says in failed.stderr and not any(s in failed.stdout + failed.stderr for s in ("S3cretPW", TOKEN))

    # identity: git's by default, flags win, a clear error when there is neither
    assert "--name" in run(env, "identity", expect=2).stderr
    for key, value in (("user.name", "Git Person"), ("user.email", "git@example.com")):
        subprocess.run(["git", "config", "--global", key, value], env=env, check=True)
    from_git = json.loads(run(env, "identity", "--json").stdout)
    assert (from_git["name"], from_git["email"], from_git["source"], from_git["written"]) == \
        ("Git Person", "git@example.com", "git", True)
    assert (config / "user_config.toml").read_text() == 'name = "Git Person"\nemail = "git@example.com"\n'
    run(env, "identity", "--name", "Ada Lovelace", "--email", "ada@example.com")
    shown = run(env, "identity").stdout
    assert "Ada Lovelace <ada@example.com>" in shown and "unchanged" in shown
    assert "is not an email" in run(env, "identity", "--email", "ada at example", expect=2).stderr
    assert "--name" in run(env, "identity", "--name", "\t", expect=2).stderr

    # remote: add (the server is asked, with the per-host token from the environment) and list
    models = tmp_path / "models"
    oxen_child.init_repo(models)
    assert json.loads(run(env, "remote", "list", "--repo", str(models), "--json").stdout)["remotes"] == []
    per_host = {**env, f"OXEN_API_KEY_{server.host.replace('.', '_').replace(':', '_')}": ENV_TOKEN}
    run(per_host, "remote", "add", "origin", server.url("ox/models"), "--repo", str(models))
    assert server.authorizations == [f"Bearer {ENV_TOKEN}"]  # the environment's token wins over the file's
    listed = json.loads(subprocess.run([sys.executable, "-m", "oxen_callbacks.cli", "remote", "list", "--json"],
                                       cwd=models, capture_output=True, text=True, env=env, timeout=60).stdout)
    assert listed["remotes"] == [{"name": "origin", "url": server.url("ox/models")}]
    for bad, says in ((["origin", f"http://me:{ENV_TOKEN}@{server.host}/ox/models"], "oxen-callbacks auth"),
                      (["bad name", server.url("ox/models")], "not a plain name"),
                      (["backup", server.url("ox/missing")], "has no repository")):
        refused = run(env, "remote", "add", *bad, "--repo", str(models), expect=2)
        assert says in refused.stderr and ENV_TOKEN not in refused.stderr
    assert "not in an Oxen repository" in run(env, "remote", "list", "--repo", str(tmp_path), expect=2).stderr
    assert holders(tmp_path, ENV_TOKEN) == [] and os.listdir(tmp_path / "tmp") == []


def _repo_config(tmp_path: Path) -> tuple[Path, Path, str]:
    """A model repository with a commit, its config.toml and what Oxen wrote there."""
    models = make_repo(tmp_path / "models", [("first", {"a.txt": "1"})]).path
    return models, models / ".oxen" / "config.toml", (models / ".oxen" / "config.toml").read_text()


def test_remote_on_a_damaged_config_is_a_one_line_error(tmp_path):
    env = fresh_world(tmp_path)
    models, config, made = _repo_config(tmp_path)
    for damage, says in (("[[[ not toml\n", "config.toml cannot be read"), ('remotes = "origin"\n', "remotes as a string"),
                         ('remotes = [{name = "origin"}]\n', "not a name and a url")):
        config.write_text(made.replace("remotes = []\n", damage))
        for action in (["list"], ["add", "origin", "http://127.0.0.1:9/ox/models", "--timeout", "5"]):
            failed = run(env, "remote", *action, "--repo", str(models), expect=2).stderr
            assert says in failed and str(config) in failed and len(failed.splitlines()) == 2, failed  # error, hint


def test_a_token_in_a_remote_written_without_its_scheme_is_masked(tmp_path):
    """config.toml edited by hand: its token is not shown (nor echoed by a refused `add` of the same URL)."""
    env = fresh_world(tmp_path)
    models, config, made = _repo_config(tmp_path)
    config.write_text(made.replace("remotes = []", f'remotes = [{{name = "origin", url = "me:{TOKEN}@h.example/ox/m"}}]'))
    for args in (["list"], ["list", "--json"]):
        listed = run(env, "remote", *args, "--repo", str(models)).stdout
        assert "h.example/ox/m" in listed and TOKEN not in listed, listed
    refused = run(env, "remote", "add", "backup", f"me:{TOKEN}@h.example/ox/m", "--repo", str(models), expect=2)
    assert TOKEN not in refused.stdout + refused.stderr


def at_a_terminal(env: dict[str, str], args: list[str], answers: list[str]) -> tuple[int, str]:
    """Run a command whose stdin is a terminal, typing each answer once its prompt (``...: ``) shows."""
    terminal, keyboard = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "oxen_callbacks.cli", *args], stdin=keyboard,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)  # no /dev/tty of ours: the prompts use the pty
    os.close(keyboard)
    try:
        for answer in answers:
            seen = b""
            while not seen.endswith(b": ") and (char := proc.stderr.read(1)):
                seen += char
            os.write(terminal, answer.encode() + b"\n")
        out, _ = proc.communicate(timeout=120)
    finally:
        os.close(terminal)
    return proc.returncode, out.decode()


def test_on_a_terminal_the_token_and_the_identity_are_asked_for(tmp_path):
    env = fresh_world(tmp_path)
    for key, value in (("user.name", "Git Person"), ("user.email", "git@example.com")):
        subprocess.run(["git", "config", "--global", key, value], env=env, check=True)
    code, out = at_a_terminal(env, ["auth", "--json"], [TOKEN])
    assert code == 0 and json.loads(out)["hosts"] == ["hub.oxen.ai"] and TOKEN not in out
    code, out = at_a_terminal(env, ["identity", "--json"], ["Ada Lovelace", ""])  # Enter: git's email
    assert code == 0 and json.loads(out)["source"] == "prompt"  # the prompts went to stderr
    config = tmp_path / "home" / ".config" / "oxen"
    assert f'auth_token = "{TOKEN}"' in (config / "auth_config.toml").read_text()
    assert (config / "user_config.toml").read_text() == 'name = "Ada Lovelace"\nemail = "git@example.com"\n'


def command_lines_holding(secret: str, stop: threading.Event, found: list[str]) -> None:
    """Until ``stop``: the command line of every process on the machine that holds ``secret``."""
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and secret.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                continue
        time.sleep(0.02)


def test_a_fit_pulls_and_pushes_with_the_token_from_the_environment_and_writes_it_nowhere(
        tmp_path, server, monkeypatch, caplog):
    for key, value in fresh_world(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("OXEN_CONFIG_DIR")
    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read again
    monkeypatch.setenv("OXEN_API_KEY", ENV_TOKEN)

    stop, in_argv = threading.Event(), []
    watcher = threading.Thread(target=command_lines_holding, args=(ENV_TOKEN, stop, in_argv), daemon=True)
    watcher.start()
    try:
        pin = PinnedDataset(server.url("ox/reviews"), revision=COMMIT, paths=["train.csv", "val.csv"])
        cb = OxenLightningCallback(dataset=pin, model_repo=tmp_path / "models", remote_url=server.url("ox/models"),
                                   push_timeout=30, experiment_name="env-token")
        make_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt"), cb], epochs=1).fit(
            TinyModel(), datamodule=CsvData(pin))
        lineage = cb.lineage  # waits for the final commit and the push
    finally:
        stop.set()
        watcher.join()
    assert in_argv == []  # no process ever had the token on its command line

    assert lineage["dataset"]["commit"] == COMMIT and lineage["checkpoints"]  # training went on
    paths = [r.path for r in server.requests]
    assert any("/file/" in p for p in paths) and "/api/repos/ox/models" in paths  # pulled, then pushed
    assert set(server.authorizations) == {f"Bearer {ENV_TOKEN}"}
    # the stand-in cannot take a push: journaled for `oxen-callbacks sync`, without the token
    assert lineage["push"]["pushed"] is False and pending_push(tmp_path / "models") is not None
    assert not (tmp_path / "home" / ".config").exists() and os.listdir(tmp_path / "tmp") == []
    assert ENV_TOKEN not in caplog.text
    assert holders(tmp_path, ENV_TOKEN) == []  # home, model repo, journals, MLflow store, caches, logs


def test_a_killed_process_private_token_folder_is_removed_by_the_next(tmp_path, monkeypatch):
    """A process SIGKILLed while a child used its private config folder leaves the token on disk;
    the next private config removes such folders of dead processes (and only those)."""
    from oxen_callbacks._oxen.auth import _scope, private_config

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    here = f"oxen-callbacks-auth-{{}}-{_scope()}-x"
    stale, alive = tmp_path / here.format(victim.pid), tmp_path / here.format(os.getpid())
    # the same dead pid in another PID namespace or on another node sharing this TMPDIR: that
    # process may well live (and be pushing with this token), so its folder is not ours to judge
    elsewhere = tmp_path / f"oxen-callbacks-auth-{victim.pid}-{'0' * 12}-x"
    for folder in (stale, alive, elsewhere):
        folder.mkdir(mode=0o700)
        (folder / "auth_config.toml").write_text('auth_token = "tok-left-behind"\n')
    victim.kill()
    victim.wait()
    monkeypatch.setenv("OXEN_API_KEY", "tok-now")
    with private_config("hub.oxen.ai") as overrides:
        assert Path(overrides["OXEN_CONFIG_DIR"]).parent == tmp_path
    assert not stale.exists() and alive.exists() and elsewhere.exists()  # a live process's folder stays
    assert not Path(overrides["OXEN_CONFIG_DIR"]).exists()


def test_an_unreadable_identity_is_named_not_blamed_on_the_temporary_folder(tmp_path, monkeypatch):
    """The private config copies the user's ``user_config.toml``: when it cannot be read, the error
    names that file and its fix (not TMPDIR), shows no token and leaves no folder behind."""
    from oxen_callbacks._oxen.auth import private_config
    from oxen_callbacks.errors import ConfigurationError

    token = "tok-" + "Zp8rK2vQ5n"
    config = tmp_path / "config"
    config.mkdir()
    (config / "user_config.toml").symlink_to("/proc/self/mem")  # a file even root cannot read (EIO at offset 0)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("OXEN_CONFIG_DIR", str(config))
    monkeypatch.setenv("OXEN_API_KEY", token)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", None)
    with pytest.raises(ConfigurationError) as caught, private_config("hub.oxen.ai"):
        pass
    message = str(caught.value)
    assert str(config / "user_config.toml") in message and "OXEN_CONFIG_DIR" in message
    assert "TMPDIR" not in message and token not in message
    assert os.listdir(tmp_path / "tmp") == []


def test_an_unwritable_temporary_folder_is_named_not_reported_as_a_process_that_could_not_start(tmp_path, monkeypatch):
    """A call to a remote with a token in the environment writes a private config under TMPDIR
    first: when that folder cannot take it, the error names the folder and the fix, and never the token."""
    from oxen_callbacks._oxen import child as oxen_child
    from oxen_callbacks._oxen.repo import branches_at
    from oxen_callbacks.errors import ConfigurationError

    token = "tok-" + "9fQ2xLr7Wm4"
    monkeypatch.setenv("OXEN_API_KEY", token)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "gone"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))  # (a missing TMPDIR Python would skip)
    with pytest.raises(ConfigurationError) as caught:
        oxen_child.run_in_child(branches_at, remote_host="hub.oxen.ai", path=str(tmp_path))
    message = str(caught.value)
    assert "private Oxen config for hub.oxen.ai" in message and str(tmp_path / "gone") in message
    assert "TMPDIR" in message and "helper process" not in message and token not in message


def test_a_host_variable_other_host_names_share_never_serves_a_server_a_record_names(monkeypatch, caplog):
    """``OXEN_API_KEY_<HOST>`` spells every character other than a letter or digit as ``_``: a record
    naming ``hub-oxen.ai`` (anyone's) got the token the user set for ``hub.oxen.ai``. A server the
    user names keeps the variable (it is theirs to spell); a look-alike a record names gets nothing."""
    from oxen_callbacks._oxen.auth import host_variable, private_config, token_from_environment

    assert host_variable("hub-oxen.ai") == host_variable("hub.oxen.ai") == host_variable("hub_oxen.ai")
    monkeypatch.setenv(host_variable("hub.oxen.ai"), "tok-for-hub")
    monkeypatch.setenv(host_variable("127.0.0.1:3000"), "tok-for-local")
    assert token_from_environment("hub.oxen.ai", any_host_key=False) == "tok-for-hub"
    assert token_from_environment("127.0.0.1:3000", any_host_key=False) == "tok-for-local"
    for look_alike in ("hub-oxen.ai", "hub_oxen.ai", "Hub.Oxen_AI"):
        assert token_from_environment(look_alike) is not None  # (named by the user: their variable)
        assert token_from_environment(look_alike, any_host_key=False) is None
        with private_config(look_alike, any_host_key=False) as overrides:
            assert overrides == {}  # (no config folder holding the token for that host)
    assert "Not sending OXEN_API_KEY_HUB_OXEN_AI to hub-oxen.ai" in caplog.text
    assert "also the variable of other host names" in caplog.text


def test_a_server_a_record_names_over_plain_http_gets_no_token_at_all(monkeypatch, caplog):
    """A record naming ``http://hub.oxen.ai/...`` got that host's own token (its variable, or the user's
    ``auth_config.toml`` entry) in clear text on the network. Such a child gets a config folder holding
    no token; https, a server on this machine, or a server the user names keep theirs."""
    from oxen_callbacks._oxen.auth import host_variable, private_config

    config = Path(os.environ["OXEN_CONFIG_DIR"])
    config.mkdir(parents=True, exist_ok=True)
    (config / "auth_config.toml").write_text('[[host_configs]]\nhost = "hub.oxen.ai"\nauth_token = "tok-in-config"\n')
    for host in ("hub.oxen.ai", "127.0.0.1:3000"):
        monkeypatch.setenv(host_variable(host), f"tok-in-env-{host}")

    def tokens(host: str, **how: bool) -> str | None:  # what the child's config holds (None: the user's own)
        with private_config(host, **how) as overrides:
            if not overrides:
                return None
            auth = Path(overrides["OXEN_CONFIG_DIR"]) / "auth_config.toml"
            return auth.read_text() if auth.exists() else ""

    assert tokens("hub.oxen.ai", any_host_key=False, plain_http=True) == ""  # neither token
    assert "tok-in-env-hub.oxen.ai" in tokens("hub.oxen.ai", any_host_key=False)  # https
    assert "tok-in-env-127.0.0.1:3000" in tokens("127.0.0.1:3000", any_host_key=False, plain_http=True)
    assert "tok-in-env-hub.oxen.ai" in tokens("hub.oxen.ai", plain_http=True)  # (the user named it)
    assert "Not sending a token to hub.oxen.ai: a record named it over plain http" in caplog.text


def test_a_pin_a_record_names_over_plain_http_sends_no_token_on_the_wire(monkeypatch):
    """The same, end to end: oxenai's requests to ``http://hub.oxen.ai`` go through a proxy on loopback
    (oxenai honours ``HTTP_PROXY``), which records what each carried. A pin the user names sends the
    host's token; the same pin named by a record sends none."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from oxen_callbacks._oxen.auth import host_variable
    from oxen_callbacks.errors import ConfigurationError

    seen: list[str | None] = []

    class Proxy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            self.send_response(404)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *_args: object) -> None:
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        for variable in ("HTTP_PROXY", "http_proxy"):
            monkeypatch.setenv(variable, f"http://127.0.0.1:{proxy.server_address[1]}")
        for variable in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setenv(host_variable("hub.oxen.ai"), "tok-for-hub")
        sent = {}
        for named_by_record in (False, True):
            seen.clear()
            with pytest.raises(ConfigurationError, match="does not exist"):
                PinnedDataset("http://hub.oxen.ai/ox/reviews", revision="a" * 32, named_by_record=named_by_record,
                              remote_timeout=10)
            sent[named_by_record] = set(seen)
        assert sent == {False: {"Bearer tok-for-hub"}, True: {None}}
    finally:
        proxy.shutdown()
