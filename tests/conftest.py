"""Shared fixtures: every test runs in its own folder with its own Oxen config, cache and MLflow store."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_repo  # noqa: E402


def isolate(mp: pytest.MonkeyPatch, root: Path, tracking_uri: str) -> None:
    """Oxen identity (none) and snapshot cache under ``root``, MLflow at ``tracking_uri``, no inherited
    run, experiment, author or token; for ``isolated`` and for module-scoped fixtures."""
    mp.setenv("OXEN_CONFIG_DIR", str(root / "oxen-config"))
    mp.setenv("OXEN_CALLBACKS_CACHE", str(root / "cache"))
    mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    for var in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",
                "OXEN_CALLBACKS_AUTHOR_NAME", "OXEN_CALLBACKS_AUTHOR_EMAIL", "OXEN_API_KEY"):
        # set, then deleted: an absent variable is recorded too, so what a test sets (mlflow.set_experiment
        # exports MLFLOW_EXPERIMENT_ID) is undone after it, not left to the next test or to a Ray cluster
        mp.setenv(var, "")
        mp.delenv(var)


@pytest.fixture(scope="session", autouse=True)
def temp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temp dir of this process and every process it starts, under pytest's own: what libraries
    leave there (torchelastic, MLflow's SQLite init locks, Ray's Lightning callback) goes with it."""
    import tempfile

    folder = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(folder))
        mp.setattr(tempfile, "tempdir", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd, Oxen identity (none), snapshot cache and MLflow store all under ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    isolate(monkeypatch, tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    if "mlflow" in sys.modules:  # an earlier test's mlflow.set_tracking_uri / set_experiment outlive it
        import mlflow
        import mlflow.tracking.fluent

        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        mlflow.tracking.fluent._active_experiment_id = None
    yield tmp_path
    if "mlflow" in sys.modules:
        import mlflow

        while mlflow.active_run() is not None:
            mlflow.end_run()


@pytest.fixture
def hanging_port():
    """A loopback server that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    yield srv.getsockname()[1]
    srv.close()


@pytest.fixture
def dataset_repo(tmp_path: Path):
    """:func:`moved_dataset` in ``tmp_path / "dataset"``."""
    return moved_dataset(tmp_path / "dataset")


def moved_dataset(path: Path):  # type: ignore[no-untyped-def]
    """A dataset repository whose branch moved: commit A (labels 0), then commit B (labels 1)."""
    return make_repo(
        path,
        [
            ("A", {"train.csv": table(label=0, seed=0), "val.csv": table(label=0, seed=1, rows=32)}),
            ("B", {"train.csv": table(label=1, seed=0)}),
        ],
    )


def table(label: int, seed: int, rows: int = 96) -> str:
    import random

    rng = random.Random(seed)
    lines = ["x0,x1,x2,x3,label"]
    for i in range(rows):
        lines.append(",".join(f"{rng.gauss(0, 1):.4f}" for _ in range(4)) + f",{label}")
    return "\n".join(lines) + "\n"
