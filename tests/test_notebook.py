"""Notebooks: the lineage record renders as safe HTML, every example notebook runs in a real kernel, and
nothing the background processes print reaches a cell after ``fit()`` returned."""

from __future__ import annotations

import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from oxen_callbacks._lineage_html import LineageView
from oxen_callbacks.lineage import new_record

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COMMIT = "ab" * 16
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
# what the HTML may hold: the tables and the lineage picture, nothing that runs or loads
BACKGROUND_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\d+ )?(DEBUG|INFO|WARNING|ERROR) ")
SAFE_TAGS = {"div", "style", "table", "tr", "th", "td", "p", "svg", "defs", "marker", "path", "rect", "text"}


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attributes: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(markup: str) -> _Markup:
    parser = _Markup()
    parser.feed(markup)
    parser.close()
    return parser


def _record(name: str, path: str) -> dict:
    record = new_record(dataset={"repo": f"/data/{name}", "revision": name, "commit": COMMIT, "paths": [path]},
                        model_repo=f"/models/{name}", framework={"name": "lightning", "version": "2"},
                        run={"name": name, "mlflow_run_id": name, "mlflow_tracking_uri": f"sqlite:///{name}"})
    record["checkpoints"] = [{"commit": COMMIT, "path": path, "step": 7, "epoch": 0, "metrics": {}}]
    record["model"].update(commit=COMMIT, path=path)
    record["status"] = name
    return record


def test_lineage_renders_as_a_table_and_the_picture() -> None:
    view = LineageView(_record("nightly", "runs/nightly/checkpoints/epoch=0-step=7.ckpt"))
    markup = view._repr_html_()
    page = _parse(markup)
    text = " ".join(page.text)
    for fact in ("nightly", "/data/nightly @ " + COMMIT, "/models/nightly", "runs/nightly/checkpoints/epoch=0-step=7.ckpt",
                 "sqlite:///nightly", "7"):
        assert fact in text, fact
    assert {"table", "svg"} <= page.tags  # the pointers, then the lineage picture
    assert view == _record("nightly", "runs/nightly/checkpoints/epoch=0-step=7.ckpt")  # still the plain record
    assert json.loads(json.dumps(view))["run"]["name"] == "nightly"


def test_hostile_values_stay_text() -> None:
    """A run name, repository, URI or checkpoint path with markup in it is shown, never run."""
    markup = LineageView(_record(HOSTILE, f"runs/x/{HOSTILE}.ckpt"))._repr_html_()
    page = _parse(markup)
    assert page.tags <= SAFE_TAGS, page.tags - SAFE_TAGS
    assert not [a for a in page.attributes if a.startswith("on") or a in ("href", "src", "xlink:href")]
    assert HOSTILE in "".join(page.text)  # shown as the text it is (escaped in the markup)
    assert "<script" not in markup and "<img" not in markup


def test_a_record_too_incomplete_to_draw_still_renders() -> None:
    markup = LineageView({"schema": "x", "run": {"name": "half"}, "model": {}})._repr_html_()
    assert "half" in markup and "<svg" not in markup


# -- the example notebooks, executed -------------------------------------------------------------
#: cells run after a notebook's own, in its kernel: a fit whose background processes have plenty
#: to say after it returned (a push to a closed port, retried; MLflow at a closed port; the final
#: lineage commit), then cells that give them the time to say it
AFTER_FIT = {"lineage.ipynb": [
    """import socket
closed = socket.socket()
closed.bind(("127.0.0.1", 0))
port = closed.getsockname()[1]
closed.close()
noisy = OxenLightningCallback(dataset=pinned, model_repo=work / "models", remote="origin",
                              remote_url=f"http://127.0.0.1:{port}/ns/models", push_timeout=5,
                              mlflow_tracking_uri=f"http://127.0.0.1:{port}", mlflow_timeout=2)
L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
          default_root_dir=work / "noisy", callbacks=[noisy]).fit(
    Classifier(), DataLoader(load(pinned.file("train.csv")), batch_size=32))""",
    "noisy.lineage['status']",  # waits while the pushes fail and the final commit is made
    "import time\ntime.sleep(2)",
    # a long pull draws its bar here: in this kernel, and in a child process whose stderr the cell shows
    """from oxen_callbacks._oxen import shadow
from oxen_callbacks._util.progress import show_progress
assert show_progress()
oxen_child.run_in_child(shadow.restore_into, show_stderr=True, repo_path=str(dataset_repo), commit=clean,
                        paths=["train.csv"], dest=str(work / "restored"))""",
]}


def _kernel_of_this_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec that runs ``sys.executable`` (a fresh venv's ``python3`` spec says ``python``,
    whichever that is on PATH); Jupyter's and IPython's own files go under ``tmp_path``."""
    name = "oxen-callbacks-tests"
    spec = tmp_path / "jupyter" / "kernels" / name
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": name, "language": "python"}))
    for var, folder in (("JUPYTER_PATH", "jupyter"), ("JUPYTER_RUNTIME_DIR", "jupyter-runtime"),
                        ("JUPYTER_DATA_DIR", "jupyter-data"), ("JUPYTER_CONFIG_DIR", "jupyter-config"),
                        ("IPYTHONDIR", "ipython"), ("TMPDIR", "tmp")):
        (tmp_path / folder).mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(tmp_path / folder))
    # ipykernel forwards what is written to its file descriptors 1 and 2 (by it or by any child) into
    # the running cell, as in a user's notebook, except under pytest: it looks for this variable
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    return name


def _text(cell: dict) -> str:
    """Everything a cell showed: streams, results, errors."""
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.extend(str(v) for v in (out.get("data") or {}).values())
        parts.extend(out.get("traceback") or [])
    return "".join(parts)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("notebook", sorted(EXAMPLES.glob("*.ipynb")), ids=lambda p: p.name)
def test_example_notebook_runs_in_a_fresh_kernel(notebook: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "store the notebook without outputs"
    own = len(nb.cells)
    nb.cells += [nbformat.v4.new_code_cell(source) for source in AFTER_FIT.get(notebook.name, [])]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow at a closed port: fail at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    client = NotebookClient(nb, kernel_name=_kernel_of_this_interpreter(tmp_path, monkeypatch), timeout=180,
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()  # raises on the first cell that fails
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # to read what each cell showed when this fails

    html = [out["data"]["text/html"] for c in nb.cells[:own] for out in c.get("outputs", [])
            if "text/html" in out.get("data", {})]
    assert any("oxen-lineage" in h and "<svg" in h for h in html), "no lineage table with its picture"
    if notebook.name in AFTER_FIT:
        _assert_background_output_stayed_in_logs(nb.cells, tmp_path)
        bar = _text(nb.cells[-1])
        assert "pin dataset@" in bar and "100%" in bar, bar  # the child's bar, in the cell


def _assert_background_output_stayed_in_logs(cells: list, tmp_path: Path) -> None:
    """What the worker, its commit and push processes and the MLflow sink wrote went to their logs,
    none of it into a cell: not even what they wrote after ``fit()`` returned (ipykernel shows in
    the running cell whatever any process writes to the kernel's file descriptors 1 and 2)."""
    logs = [*tmp_path.rglob("worker.log"), *tmp_path.rglob("sink.log")]
    lines = {line.strip() for log in logs for line in log.read_text(errors="replace").splitlines() if line.strip()}
    assert any("lineage (FINISHED)" in line for line in lines), lines  # the final commit, made after fit() returned
    shown = "\n".join(_text(c) for c in cells)
    leaked = sorted(line for line in lines if line in shown)
    assert not leaked, leaked
    # nor anything else in their shape: Oxen's own prints, or a line of a background process's log
    assert "\N{OX}" not in shown
    assert not BACKGROUND_LOG_LINE.search(shown), BACKGROUND_LOG_LINE.search(shown)


# -- progress bars -------------------------------------------------------------------------------
def test_no_progress_bars_where_nobody_watches(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI, logs, captured pipes: stderr is no terminal and this is no kernel, so no bar; a child is
    told to draw only when its stderr reaches the user."""
    from oxen_callbacks._util.progress import child_progress_env, show_progress
    from oxen_callbacks.names import ENV_CHILD_PROGRESS

    monkeypatch.delenv(ENV_CHILD_PROGRESS, raising=False)
    assert not sys.stderr.isatty() and not show_progress()
    assert child_progress_env(True) == child_progress_env(False) == {ENV_CHILD_PROGRESS: "0"}
    monkeypatch.setenv(ENV_CHILD_PROGRESS, "1")  # a child whose parent is a notebook or a terminal
    assert show_progress() and child_progress_env(False) == {ENV_CHILD_PROGRESS: "0"}


def test_a_run_trained_in_a_kernel_records_its_notebook_not_the_kernels_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel's command line (``python -m ipykernel_launcher -f /tmp/kernel-x.json``) reruns nothing:
    the record names the notebook instead, and `reproduce` says to run its cells again."""
    from oxen_callbacks import run
    from oxen_callbacks._ops.reproduce import _rerun_command

    monkeypatch.setattr(sys, "argv", ["/venv/lib/python3.11/site-packages/ipykernel_launcher.py", "-f",
                                      "/tmp/tmpab12cd.json"])
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/ana/work/train.ipynb")
    started = run._how_started()
    assert started == {"command": None, "notebook": "/home/ana/work/train.ipynb"}
    rerun, left_out = _rerun_command({"code": {"git_commit": None, "cwd": "/home/ana/work", **started}})
    assert rerun == "cd /home/ana/work"
    assert any("Jupyter notebook ('/home/ana/work/train.ipynb')" in why and "cells again" in why for why in left_out)
    monkeypatch.setattr(sys, "argv", ["train.py", "--lr", "3e-4"])
    assert run._how_started()["command"].endswith("train.py --lr 3e-4")
