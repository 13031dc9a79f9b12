"""``oxen-callbacks reproduce``, ``diff`` and ``verify``: the commands that read datasets."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigurationError
from .command import Command, Result
from .lineage import finder


def _reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", metavar="RUN_ID")
    parser.add_argument("--to", required=True, metavar="DIR", help="new or empty folder")


def _reproduce(args: argparse.Namespace) -> Result:
    from .._ops.reproduce import reproduce

    return reproduce(finder(args).run(args.run_id), args.to, cache_dir=args.cache_dir)


def _show_reproduce(result: Result) -> str:
    from .._ops.reproduce import is_git_commit

    lines = [f"Reproduction kit in {result['dir']}"]
    if result["dataset"]:
        d = result["dataset"]
        lines.append(f"  data/     {d['files']} files of {d['repo']} @ {d['commit']}")
    if result["model"]:
        m = result["model"]
        lines.append(f"  model/    {Path(m['file']).name}  ({m['path']} @ {m['commit']})")
    lines.append("  lineage.json")
    code = result["code"]
    commit = code["git_commit"]
    shown = commit if is_git_commit(commit) else "(not a commit id, see below)" if commit else None
    lines.append(f"code commit  {shown or '(not recorded: not a git checkout)'}"
                 + (" (the run had uncommitted changes)" if code.get("git_dirty") else ""))
    lines.append(f"rerun        {result['rerun'] or '(no command recorded)'}")
    if result["rerun"]:
        lines.append("             (as the run recorded it: untrusted input, read it before running it)")
    lines.extend(f"left out     {reason}" for reason in result["rerun_left_out"])
    if result.get("note"):
        lines.append(f"note         {result['note']}")
    return "\n".join(lines)


def _diff_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="RUN_A")
    parser.add_argument("run_b", metavar="RUN_B")
    parser.add_argument("--keys", default="", help="comma-separated key columns: changed rows show as 'modified'")
    parser.add_argument("--limit", type=int, default=20, help="changed rows listed per file (all are counted)")


def _diff(args: argparse.Namespace) -> Result:
    from .._ops.reproduce import diff_runs

    if args.limit < 0:
        raise ConfigurationError(f"--limit {args.limit} is negative.", "pass 0 to count changed rows without listing them.")
    runs = finder(args)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    return diff_runs(runs.run(args.run_a), runs.run(args.run_b), keys=keys, limit=args.limit,
                     cache_dir=args.cache_dir)


def _show_diff(result: Result) -> str:
    a, b = result["a"], result["b"]
    lines = [f"A  {a['run']}: {a['repo']} @ {a['commit']}", f"B  {b['run']}: {b['repo']} @ {b['commit']}"]
    files = result["files"]
    if not any(files.values()):
        lines.append("same data" + (" (same commit)" if result["same_commit"] else ""))
    for change, sign in (("added", "+"), ("removed", "-"), ("modified", "M")):
        lines.extend(f"{sign} {path}" for path in files[change])
    for path, rows in result["rows"].items():
        schema = rows.get("schema") or {}
        changed = any(schema.values())
        counts = ", ".join(f"{n} {s}" for s, n in rows["counts"].items()) or (
            "rows the same in the columns both hold" if changed else "no row changes")
        summary = f"rows not compared: {rows['error']}" if rows.get("error") else counts
        lines.append(f"\n{path}: {'columns changed, ' if changed else ''}{summary}")
        for change, sign in (("added", "+"), ("removed", "-"), ("retyped", "~")):
            lines.extend(f"  {sign} column {column}" for column in schema.get(change, []))
        for row in rows["rows"]:
            values = ", ".join(f"{k}={v}" for k, v in row.items() if k != "status")
            lines.append(f"  {row['status']:<9} {values}")
        if rows["total"] > len(rows["rows"]):
            lines.append(f"  ... {rows['total'] - len(rows['rows'])} more (--limit)")
    return "\n".join(lines)


def _verify(args: argparse.Namespace) -> Result:
    from .._data.cache_check import verify_cache
    from .._util.cache import default_cache_dir

    return verify_cache(args.cache_dir or default_cache_dir())


def _show_verify(report: Result) -> str:
    from .._data.snapshot import remake_hint

    lines = []
    for snap in report["snapshots"]:
        lines.append(f"{'DAMAGED' if snap['problems'] else 'ok'} {snap['folder']} "
                     f"({snap['files']} files, {snap['bytes'] / 1e6:.1f} MB)")
        lines += [f"  {problem}" for problem in snap["problems"]]
        lines += [f"  hint: {remake_hint(snap['folder'])}"] if snap["problems"] else []
    lines.append(f"{report['damaged']} of {len(report['snapshots'])} snapshot(s) in {report['cache_dir']} damaged")
    return "\n".join(lines)


COMMANDS = [
    Command("reproduce", "materialize a run's exact dataset and final checkpoint", _reproduce, _show_reproduce,
            _reproduce_arguments, shared=("mlflow", "repos", "cache")),
    Command("diff", "what changed in the data between two runs", _diff, _show_diff, _diff_arguments,
            shared=("mlflow", "repos", "cache")),
    Command("verify", "check the content hash of every file of every cached snapshot", _verify, _show_verify,
            shared=("cache",), failed=lambda report: bool(report["damaged"])),
]
