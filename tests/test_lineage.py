"""The lineage record: schema oxen-callbacks/lineage/v1, validated on read and write."""

from __future__ import annotations

import copy
import json
import re

import pytest

from oxen_callbacks import read_lineage, validate_lineage
from oxen_callbacks.errors import LineageValidationError
from oxen_callbacks.lineage import SCHEMA, LineageRecord, fill_commit, new_record, write_lineage


def _record() -> dict:
    record = new_record(
        dataset={"repo": "/data/reviews", "revision": "main", "commit": "abc123", "paths": ["train.csv"]},
        model_repo="https://user:secret@hub.oxen.ai/ox/models",
        framework={"name": "lightning", "version": "2.6"},
        code={"git_commit": "f00", "git_dirty": False},
        run={"mlflow_run_id": "r1", "mlflow_tracking_uri": "sqlite:///m.db"},
    )
    record["checkpoints"].append({"commit": None, "path": "runs/r/checkpoints/a.ckpt", "step": 3, "epoch": 0,
                                  "metrics": {"val_loss": 0.5}})
    record["model"].update(path="runs/r/checkpoints/a.ckpt")
    return record


def test_new_record_is_valid_and_drops_credentials():
    record = validate_lineage(_record())
    assert record["schema"] == SCHEMA == "oxen-callbacks/lineage/v1"
    assert record["model"]["repo"] == "https://hub.oxen.ai/ox/models"
    assert "secret" not in json.dumps(record)


def test_read_fills_pending_commit_and_round_trips(tmp_path):
    path = write_lineage(_record(), tmp_path / "lineage.json")
    read = read_lineage(path, at_commit="c0ffee")
    assert read["checkpoints"][0]["commit"] == "c0ffee" and read["model"]["commit"] == "c0ffee"
    assert read_lineage(path.read_text())["checkpoints"][0]["commit"] is None
    assert fill_commit(read, "other") == read  # nothing pending any more


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.update(schema="v0"), "Unknown lineage schema"),
        (lambda r: r.pop("model"), "lacks the 'model' section"),
        (lambda r: r["dataset"].pop("commit"), "'dataset.commit' is missing"),
        (lambda r: r["dataset"].update(paths="train.csv"), "'dataset.paths' must be list"),
        (lambda r: r["dataset"].update(paths=["../../etc/passwd"]), "unsafe path"),
        (lambda r: r["checkpoints"][0].update(path="/abs/a.ckpt"), "unsafe path"),
        (lambda r: r["checkpoints"][0].update(step="3"), "'checkpoints[0].step' must be int"),
        (lambda r: r["code"].update(git_dirty="no"), "'code.git_dirty' must be bool"),
        (lambda r: r.update(checkpoints={}), "'checkpoints' must be a list"),
        (lambda r: r["model"].update(path="runs/../../x"), "unsafe path"),
    ],
)
def test_invalid_records_are_rejected(mutate, message, tmp_path):
    record = copy.deepcopy(_record())
    mutate(record)
    with pytest.raises(LineageValidationError, match=re.escape(message)):
        validate_lineage(record)
    with pytest.raises(LineageValidationError):
        write_lineage(record, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_dataset_may_be_absent():
    record = _record()
    record["dataset"] = None
    assert validate_lineage(record)["dataset"] is None


def test_typed_record_round_trips_byte_for_byte():
    record = _record()
    record["checkpoints"][0]["source"] = "a.ckpt"  # keys beyond the schema are kept, in place
    record.update(status="RUNNING", fit_id="f1")
    typed = LineageRecord.from_json(record)
    assert typed.dataset.commit == "abc123" and typed.checkpoints[0].path == "runs/r/checkpoints/a.ckpt"
    assert typed.status == "RUNNING" and typed.checkpoints[0].extra == {"source": "a.ckpt"}
    assert json.dumps(typed.to_json(), indent=2) == json.dumps(record, indent=2)


def test_typed_record_uses_the_same_validator():
    record = _record()
    record["checkpoints"][0].update(step="3")
    with pytest.raises(LineageValidationError, match=re.escape("'checkpoints[0].step' must be int")):
        LineageRecord.from_json(record)
