"""Notebooks: the lineage record renders as safe HTML, every example notebook runs in a real kernel, and
nothing the background processes print reaches a cell after ``fit()`` returned."""

from __future__ import annotations

import json
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
