"""A real ``mlflow server`` on 127.0.0.1 for tests and benchmarks (SQLite store, proxied artifacts).

In a test module::

    from mlflow_server import mlflow_server  # noqa: F401  (module-scoped fixture)

    def test_x(mlflow_server):
        client = MlflowClient(mlflow_server.uri)

Elsewhere: ``with MlflowServer(folder) as server: ...``. The server takes a few
seconds to start; it is stopped (its whole process group) on exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import free_port

START_TIMEOUT_S = 90.0


class MlflowServer:
    """``mlflow server`` with its store and artifacts under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MlflowServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        self.log = open(self.folder / "server.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.folder, start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.uri} within {START_TIMEOUT_S:.0f}s")

    def stop(self) -> None:
        if self.proc is not None:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):  # its own group: workers go too
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    continue
            self.log.close()

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """One real tracking server per test module, stopped after it."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server
