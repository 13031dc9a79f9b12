"""Packaging promises: a light import, the console script, and nothing heavy imported by accident."""

from __future__ import annotations

import json
import subprocess
import sys


def test_import_pulls_no_framework():
    code = ("import sys, oxen_callbacks, oxen_callbacks.pin, oxen_callbacks.lineage, oxen_callbacks.run; "
            "import json; print(json.dumps(sorted(m for m in ('torch', 'lightning', 'transformers', 'mlflow', 'oxen') "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_public_names_resolve():
    import oxen_callbacks

    for name in oxen_callbacks.__all__:
        assert getattr(oxen_callbacks, name) is not None


def test_the_entry_points_a_script_may_call_keep_their_names():
    """What scripts written against earlier releases import: the CLI's main() and the oxenai child calls."""
    from oxen_callbacks import oxen_child
    from oxen_callbacks.cli import main

    assert callable(main)
    assert callable(oxen_child.init_repo) and callable(oxen_child.commit_paths) and callable(oxen_child.log)
    out = subprocess.run([sys.executable, "-m", "oxen_callbacks.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "trace" in out.stdout


def test_commit_processes_load_oxenai_core_alone(tmp_path):
    """Every commit process and Oxen child pays oxenai's import on the trainer's cores: only its
    compiled core (~10 ms), not polars and requests (~0.2 s). ``import oxen`` afterwards still works."""
    from helpers import make_repo

    repo = make_repo(tmp_path / "data", [("first", {"a.txt": "a"})])
    code = ("import sys, json; from oxen_callbacks._oxen.repo import LocalRepo; "
            "branches = LocalRepo(sys.argv[1]).branches(); "
            "loaded = sorted(m for m in ('oxen', 'polars', 'requests') if m in sys.modules); "
            "import oxen; same = oxen.PyRepo is sys.modules['oxen.oxen_py'].PyRepo; "
            "print(json.dumps([branches, loaded, same, [c.id for c in oxen.Repo(sys.argv[1]).log()]]))")
    out = subprocess.run([sys.executable, "-c", code, str(repo.path)], capture_output=True, text=True, check=True)
    branches, loaded, same, log = json.loads(out.stdout.splitlines()[-1])
    assert branches == {"main": repo.commits[0]} and log == [repo.commits[0]]
    assert loaded == [] and same


def test_another_oxenai_layout_falls_back_to_the_full_import():
    """An oxenai whose compiled module is named otherwise still works, through ``import oxen``."""
    code = ("import sys; from oxen_callbacks._oxen import native; native.CORE = 'renamed_core'; "
            "print(native.core().PyRepo is __import__('oxen').PyRepo)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "True"
