"""``oxen-callbacks lineage`` and ``trace``: one run's lineage, and the runs on the other side of a target."""

from __future__ import annotations

import argparse
from typing import Any

from ..names import LINEAGE_ARTIFACT
from .command import Command, Result, commit_or_none


def finder(args: argparse.Namespace) -> Any:
    """The lineage finder over MLflow (``--tracking-uri``) and model repositories (``--model-repo``)."""
    from .._ops.trace import LineageFinder

    return LineageFinder(tracking_uri=args.tracking_uri, model_repos=args.model_repos)


def _lineage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", metavar="RUN_ID", help="MLflow run id, or the run's name with --model-repo")
    parser.add_argument("--graph", metavar="OUT", help="also draw the lineage picture to OUT (.svg, .png or .html)")


def _lineage(args: argparse.Namespace) -> Result:
    view = finder(args).run(args.run_id)
    if args.graph:
        from .._mlflow.picture import write_graph

        view["graph"] = str(write_graph(view, args.graph).resolve())
    return view


def _trace_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="TARGET",
                        help="a model commit, a checkpoint path, an endpoint or a dataset commit")


def _trace(args: argparse.Namespace) -> Result:
    return finder(args).trace(args.target)


def run_lines(view: Result, indent: str = "") -> list[str]:
    """One run's dataset, model, code, registered versions and endpoints, a line each."""
    run, dataset, model, code = view["run"], view.get("dataset"), view["model"], view.get("code") or {}
    lines = [f"{indent}run          {run.get('name') or '?'}  (MLflow {run.get('mlflow_run_id') or 'none'})  "
             f"{view.get('status') or ''}".rstrip()]
    if view.get("status_note"):
        lines.append(f"{indent}             ({view['status_note']})")
    if view.get("fit_note"):
        lines.append(f"{indent}             ({view['fit_note']})")
    if dataset:
        asked = f"  asked for {dataset['revision']!r}" if dataset.get("revision") not in (None, dataset["commit"]) else ""
        lines.append(f"{indent}dataset      {dataset['repo']} @ {dataset['commit']}{asked}")
        listed = ", ".join(dataset["paths"]) if dataset["paths"] is not None else (
            f"too many for a tag; listed in the run's {LINEAGE_ARTIFACT}, which could not be read")
        lines.append(f"{indent}             paths: {listed}")
    else:
        lines.append(f"{indent}dataset      (none recorded)")
    lines.append(f"{indent}model        {model['repo']} @ {commit_or_none(model['commit'])}")
    if model.get("path"):
        lines.append(f"{indent}             {model['path']}")
    dirty = {True: " (uncommitted changes)", False: ""}.get(code.get("git_dirty"), "")
    lines.append(f"{indent}code         git {code.get('git_commit') or '(not a git checkout)'}{dirty}")
    resumed = view.get("resumed_from")
    if isinstance(resumed, dict):
        where = (f"{resumed.get('model_repo')} @ {resumed['commit']}  {resumed.get('path')}" if resumed.get("commit")
                 else f"{resumed.get('file') or '?'} (no committed checkpoint found for it)")
        step = f"  step {resumed['step']}" if resumed.get("step") is not None else ""
        lines.append(f"{indent}resumed from {where}{step}  run {resumed.get('run_name') or '?'}")
    for version in view.get("registered") or []:
        aliases = "".join(f" @{a}" for a in version.get("aliases") or [])
        lines.append(f"{indent}registered   {version['name']} v{version['version']}{aliases}")
    for endpoint in view.get("endpoints") or []:
        serves = f" serves {endpoint['model_commit']}" if endpoint.get("model_commit") else ""
        lines.append(f"{indent}endpoint     {endpoint['endpoint']}{serves}")
    return lines


def _show_lineage(view: Result) -> str:
    lines = run_lines(view)
    checkpoints = view["checkpoints"]
    lines.append(f"checkpoints  {len(checkpoints)} committed" + (":" if checkpoints else
                 (f" (read from MLflow tags: {view.get('source_note')})" if view.get("source") == "mlflow-tags" else "")))
    for c in checkpoints:
        where = " ".join(f"{k} {c[k]}" for k in ("epoch", "step") if c.get(k) is not None)
        metrics = " ".join(f"{k}={_number(v)}" for k, v in sorted((c.get("metrics") or {}).items()))
        gone = "" if c.get("kept", True) else "  (rotated out)"
        lines.append(f"  {commit_or_none(c['commit'])}  {where:<16} {c['path']}{gone}  {metrics}".rstrip())
        lines.extend(f"               ({note})" for note in entry_notes(c))
    if view.get("graph"):
        lines.append(f"graph        {view['graph']}")
    return "\n".join(lines)


def entry_notes(entry: dict[str, Any]) -> list[str]:
    """What a checkpoint entry says about its commit not holding the bytes of its own save."""
    from ..lineage import LATER_REPORT_KEY, NOT_COMMITTED_KEY  # (here: the CLI's import floors stay low)

    notes = []
    if entry.get("changed_after_save"):
        notes.append(f"written over after it was saved: its commit holds the new bytes of {entry['changed_after_save']}")
    if isinstance(left_out := entry.get(NOT_COMMITTED_KEY), list) and left_out:
        notes.append(f"not in its commit (tables Oxen could not parse): {', '.join(map(str, left_out[:5]))}"
                     + (f" (+{len(left_out) - 5} more)" if len(left_out) > 5 else ""))
    later = entry.get(LATER_REPORT_KEY)
    if isinstance(later, dict):
        notes.append(f"may hold the bytes of the later report at step {later.get('step')} written to the same folder")
    return notes


def _number(value: Any) -> str:
    """A metric as 4 significant digits; a record may hold something else, shown as it is."""
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _show_trace(result: Result) -> str:
    runs = result["runs"]
    kind = result["kind"].replace("-", " ")
    head = f"{kind} {result['target']}: " + (f"{len(runs)} run{'s' if len(runs) != 1 else ''}" if runs else
                                             "no run found (is MLFLOW_TRACKING_URI set, or pass --model-repo?)")
    lines = [head] + ([f"note: {result['note']}"] if result.get("note") else [])
    for view in runs:
        lines.append("")
        lines.extend(run_lines(view, "  "))
        for c in view.get("matched_checkpoints") or []:
            lines.append(f"  checkpoint   {c['path']} @ {commit_or_none(c['commit'])}")
            lines.extend(f"               ({note})" for note in entry_notes(c))
    return "\n".join(lines)


COMMANDS = [
    Command("lineage", "dataset, model, checkpoints and code of one run", _lineage, _show_lineage,
            _lineage_arguments, shared=("mlflow", "repos")),
    Command("trace", "runs, data and models on the other side of TARGET", _trace, _show_trace,
            _trace_arguments, shared=("mlflow", "repos"), failed=lambda result: not result["runs"]),
]
