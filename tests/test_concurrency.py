"""Two training processes publishing into one model repository at the same time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from oxen_callbacks.oxen_repo import LocalRepo

SCRIPT = Path(__file__).parent / "fit_script.py"


def test_two_fits_into_one_model_repo_both_complete(dataset_repo, tmp_path):
    procs = []
    for name in ("alpha", "beta"):
        root = tmp_path / name
        root.mkdir()
        cmd = [sys.executable, str(SCRIPT), "--dataset", str(dataset_repo.path), "--revision", dataset_repo.commits[0],
               "--model-repo", str(tmp_path / "models"), "--root", str(root), "--run-name", name,
               "--every-n-steps", "1", "--out", str(root / "out.json")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]

    repo = LocalRepo(tmp_path / "models")
    commits = set(repo.commit_ids())
    for name in ("alpha", "beta"):
        out = json.loads((tmp_path / name / "out.json").read_text())
        lineage = out["lineage"]
        assert lineage["status"] == "FINISHED"
        # 3 epochs x 6 steps, one save per step (+ last.ckpt each time)
        assert len(lineage["checkpoints"]) == 18 * 2
        assert all(c["commit"] in commits for c in lineage["checkpoints"])
        names = {Path(c["path"]).name for c in lineage["checkpoints"] if c["kept"]}
        assert names == set(out["saved"])
        assert all(c["path"].startswith(f"runs/{name}/") for c in lineage["checkpoints"])
    on_disk = {p.name for p in (repo.path / "runs").iterdir()}
    assert on_disk == {"alpha", "beta"}
