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
