"""More random SIGKILLs than CI runs: ``tests/test_chaos.py`` with N training processes killed.

    python benchmarks/chaos.py [--runs 50]

Each run is a real Lightning fit publishing to one shared model repository, killed with
SIGKILL at a random moment (half the time its publishing worker too); then ``sync``, and
checks: the repository is valid, every checkpoint recorded as committed loads with the
bytes of its step, no scratch files are left, and a rerun resumes from the last committed
checkpoint on the same dataset commit. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="oxen-chaos-") as tmp:
        report = Path(tmp) / "report.json"
        env = {**os.environ, "OXEN_CALLBACKS_CHAOS_RUNS": str(args.runs), "OXEN_CALLBACKS_CHAOS_REPORT": str(report)}
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "7200",
                               "--basetemp", str(Path(tmp) / "pytest"), "tests/test_chaos.py"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        result = json.loads(report.read_text()) if report.exists() else {}
    print(proc.stdout[-2000:], file=sys.stderr)
    print(json.dumps({"passed": proc.returncode == 0, "seconds": round(time.perf_counter() - started, 1),
                      "runs": args.runs, **result}))


if __name__ == "__main__":
    main()
