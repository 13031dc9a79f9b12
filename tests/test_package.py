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
