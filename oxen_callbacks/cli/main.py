"""oxen-callbacks: which data and code trained a model, and what was trained on some data.

    oxen-callbacks lineage RUN_ID [--graph out.svg|png|html]
    oxen-callbacks lineage --model-repo models/reviews RUN_NAME
    oxen-callbacks trace TARGET            # model commit, checkpoint path, endpoint or dataset commit
    oxen-callbacks reproduce RUN_ID --to DIR
    oxen-callbacks diff RUN_A RUN_B [--keys id]
    oxen-callbacks promote MODEL_REPO COMMIT --stage production
    oxen-callbacks record-deploy ENDPOINT --model-commit COMMIT
    oxen-callbacks sync
    oxen-callbacks verify [--cache-dir D]   # deep-check cached dataset snapshots

MLflow is --tracking-uri, else $MLFLOW_TRACKING_URI; without one, lineage is read
from model repositories (--model-repo, or the one the current folder is in).
Every command takes --json. Exit codes: 0 done, 1 failed or nothing found, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError, OxenCallbacksError

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    paragraphs = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(prog="oxen-callbacks", description=paragraphs[0], epilog=paragraphs[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON (for scripts)")
    mlflow = argparse.ArgumentParser(add_help=False)
    mlflow.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    repos = argparse.ArgumentParser(add_help=False)
    repos.add_argument("--model-repo", action="append", dest="model_repos", default=[], metavar="PATH",
                       help="model repository to read runs/*/lineage.json from (repeatable)")
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument("--cache-dir", help="snapshot cache (default $OXEN_CALLBACKS_CACHE or ~/.cache/oxen-callbacks)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common, *parents])

    p = command("lineage", "dataset, model, checkpoints and code of one run", mlflow, repos)
    p.add_argument("run_id", metavar="RUN_ID", help="MLflow run id, or the run's name with --model-repo")
    p.add_argument("--graph", metavar="OUT", help="also draw the lineage picture to OUT (.svg, .png or .html)")
    p = command("trace", "runs, data and models on the other side of TARGET", mlflow, repos)
    p.add_argument("target", metavar="TARGET", help="a model commit, a checkpoint path, an endpoint or a dataset commit")
    p = command("reproduce", "materialize a run's exact dataset and final checkpoint", mlflow, repos, cache)
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--to", required=True, metavar="DIR", help="new or empty folder")
    p = command("diff", "what changed in the data between two runs", mlflow, repos, cache)
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    p.add_argument("--keys", default="", help="comma-separated key columns: changed rows show as 'modified'")
    p.add_argument("--limit", type=int, default=20, help="changed rows listed per file (all are counted)")
    p = command("promote", "move branch stage/STAGE to COMMIT and set the MLflow alias STAGE", mlflow)
    p.add_argument("model_repo", metavar="MODEL_REPO")
    p.add_argument("commit", metavar="COMMIT", help="commit id, unique prefix or branch of MODEL_REPO")
    p.add_argument("--stage", required=True, help="e.g. production, staging")
    p = command("record-deploy", "record which model commit serves ENDPOINT", mlflow)
    p.add_argument("endpoint", metavar="ENDPOINT")
    p.add_argument("--model-commit", required=True, help="commit id, prefix or branch (e.g. stage/production)")
    p.add_argument("--model-repo", help="default: the repository MLflow names for the commit")
    p.add_argument("--run-id", help="MLflow run to tag (default: the run that trained the commit)")
    p = command("sync", "finish journaled commits, pushes and MLflow logging", cache)
    p.add_argument("--push-timeout", type=float, default=300.0, help="seconds one push may take (default 300)")
    command("verify", "check the content hash of every file of every cached snapshot", cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handler, show = _COMMANDS[args.command]
    try:
        result = handler(args)
    except ConfigurationError as exc:
        return _fail(args, exc, 2)
    except OxenCallbacksError as exc:
        return _fail(args, exc, 1)
    except Exception as exc:
        mlflow_errors = sys.modules.get("mlflow.exceptions")
        if mlflow_errors is None or not isinstance(exc, mlflow_errors.MlflowException):
            raise
        return _fail(args, exc, 1)
    try:
        print(json.dumps(result, indent=2) if args.json else show(result), flush=True)
    except BrokenPipeError:  # `| head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if args.command == "trace" and not result["runs"]:
        return 1
    if args.command == "verify" and result["damaged"]:
        return 1
    return 1 if args.command == "sync" and result["pending"] else 0


def _fail(args: argparse.Namespace, exc: Exception, code: int) -> int:
    message, _, hint = str(exc).partition("\nHINT: ")
    if args.json:
        print(json.dumps({"error": message, "hint": hint or None}))
    print(f"oxen-callbacks {args.command}: error: {message}" + (f"\nhint: {hint}" if hint else ""), file=sys.stderr)
    return code


# -- handlers ---------------------------------------------------------------------------------
def _finder(args: argparse.Namespace) -> Any:
    from .._ops.trace import LineageFinder

    return LineageFinder(tracking_uri=args.tracking_uri, model_repos=args.model_repos)


def _lineage(args: argparse.Namespace) -> dict[str, Any]:
    view = _finder(args).run(args.run_id)
    if args.graph:
        from .._mlflow.picture import write_graph

        view["graph"] = str(write_graph(view, args.graph).resolve())
    return view


def _trace(args: argparse.Namespace) -> dict[str, Any]:
    return _finder(args).trace(args.target)


def _reproduce(args: argparse.Namespace) -> dict[str, Any]:
    from .data import reproduce

    return reproduce(_finder(args).run(args.run_id), args.to, cache_dir=args.cache_dir)


def _diff(args: argparse.Namespace) -> dict[str, Any]:
    from .data import diff_runs

    if args.limit < 0:
        raise ConfigurationError(f"--limit {args.limit} is negative.", "pass 0 to count changed rows without listing them.")
    finder = _finder(args)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    return diff_runs(finder.run(args.run_a), finder.run(args.run_b), keys=keys, limit=args.limit,
                     cache_dir=args.cache_dir)


def _promote(args: argparse.Namespace) -> dict[str, Any]:
    from .._mlflow.query import tracking_uri
    from .._mlflow.registry import promote

    return promote(args.model_repo, args.commit, args.stage, tracking_uri=tracking_uri(args.tracking_uri))


def _record_deploy(args: argparse.Namespace) -> dict[str, Any]:
    from .._mlflow.query import tracking_uri
    from .._mlflow.registry import record_deploy

    return record_deploy(args.endpoint, args.model_commit, model_repo=args.model_repo, run_id=args.run_id,
                         tracking_uri=tracking_uri(args.tracking_uri))


def _sync(args: argparse.Namespace) -> dict[str, Any]:
    from .._ops.sync import sync_all

    return sync_all(Path(args.cache_dir) if args.cache_dir else None, push_timeout=args.push_timeout)


def _verify(args: argparse.Namespace) -> dict[str, Any]:
    from .._data.snapshot import default_cache_dir, verify_cache

    return verify_cache(args.cache_dir or default_cache_dir())


# -- human output -----------------------------------------------------------------------------
def _c(commit: str | None) -> str:
    return commit or "(none yet)"


def _run_lines(view: dict[str, Any], indent: str = "") -> list[str]:
    run, dataset, model, code = view["run"], view.get("dataset"), view["model"], view.get("code") or {}
    lines = [f"{indent}run          {run.get('name') or '?'}  (MLflow {run.get('mlflow_run_id') or 'none'})  "
             f"{view.get('status') or ''}".rstrip()]
    if dataset:
        asked = f"  asked for {dataset['revision']!r}" if dataset.get("revision") not in (None, dataset["commit"]) else ""
        lines.append(f"{indent}dataset      {dataset['repo']} @ {dataset['commit']}{asked}")
        lines.append(f"{indent}             paths: {', '.join(dataset['paths'])}")
    else:
        lines.append(f"{indent}dataset      (none recorded)")
    lines.append(f"{indent}model        {model['repo']} @ {_c(model['commit'])}")
    if model.get("path"):
        lines.append(f"{indent}             {model['path']}")
    dirty = {True: " (uncommitted changes)", False: ""}.get(code.get("git_dirty"), "")
    lines.append(f"{indent}code         git {code.get('git_commit') or '(not a git checkout)'}{dirty}")
    for version in view.get("registered") or []:
        aliases = "".join(f" @{a}" for a in version.get("aliases") or [])
        lines.append(f"{indent}registered   {version['name']} v{version['version']}{aliases}")
    for endpoint in view.get("endpoints") or []:
        serves = f" serves {endpoint['model_commit']}" if endpoint.get("model_commit") else ""
        lines.append(f"{indent}endpoint     {endpoint['endpoint']}{serves}")
    return lines


def _show_lineage(view: dict[str, Any]) -> str:
    lines = _run_lines(view)
    checkpoints = view["checkpoints"]
    lines.append(f"checkpoints  {len(checkpoints)} committed" + (":" if checkpoints else
                 (" (read from MLflow tags: the model repository is not on this machine)"
                  if view.get("source") == "mlflow-tags" else "")))
    for c in checkpoints:
        where = " ".join(f"{k} {c[k]}" for k in ("epoch", "step") if c.get(k) is not None)
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted((c.get("metrics") or {}).items()))
        gone = "" if c.get("kept", True) else "  (rotated out)"
        lines.append(f"  {_c(c['commit'])}  {where:<16} {c['path']}{gone}  {metrics}".rstrip())
    if view.get("graph"):
        lines.append(f"graph        {view['graph']}")
    return "\n".join(lines)


def _show_trace(result: dict[str, Any]) -> str:
    runs = result["runs"]
    kind = result["kind"].replace("-", " ")
    head = f"{kind} {result['target']}: " + (f"{len(runs)} run{'s' if len(runs) != 1 else ''}" if runs else
                                             "no run found (is MLFLOW_TRACKING_URI set, or pass --model-repo?)")
    lines = [head] + ([f"note: {result['note']}"] if result.get("note") else [])
    for view in runs:
        lines.append("")
        lines.extend(_run_lines(view, "  "))
        for c in view.get("matched_checkpoints") or []:
            lines.append(f"  checkpoint   {c['path']} @ {_c(c['commit'])}")
    return "\n".join(lines)


def _show_reproduce(result: dict[str, Any]) -> str:
    from .data import is_git_commit

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


def _show_diff(result: dict[str, Any]) -> str:
    a, b = result["a"], result["b"]
    lines = [f"A  {a['run']}: {a['repo']} @ {a['commit']}", f"B  {b['run']}: {b['repo']} @ {b['commit']}"]
    files = result["files"]
    if not any(files.values()):
        lines.append("same data" + (" (same commit)" if result["same_commit"] else ""))
    for change, sign in (("added", "+"), ("removed", "-"), ("modified", "M")):
        lines.extend(f"{sign} {path}" for path in files[change])
    for path, rows in result["rows"].items():
        counts = ", ".join(f"{n} {s}" for s, n in rows["counts"].items()) or "no row changes"
        lines.append(f"\n{path}: {counts}")
        for row in rows["rows"]:
            values = ", ".join(f"{k}={v}" for k, v in row.items() if k != "status")
            lines.append(f"  {row['status']:<9} {values}")
        if rows["total"] > len(rows["rows"]):
            lines.append(f"  ... {rows['total'] - len(rows['rows'])} more (--limit)")
    return "\n".join(lines)


def _show_promote(result: dict[str, Any]) -> str:
    moved = f"(was {result['previous']})" if result["previous"] else "(new branch)"
    lines = [f"{result['branch']} -> {result['commit']} in {result['model_repo']} {moved}"]
    lines.extend(f"MLflow alias @{a['alias']} -> {a['name']} v{a['version']}" for a in result["aliases"])
    if not result["aliases"]:
        lines.append("no registered MLflow model version names this commit: no alias set")
    return "\n".join(lines)


def _show_deploy(result: dict[str, Any]) -> str:
    model = result["model"]
    lines = [f"{result['endpoint']} serves {model['commit']}", f"  {model['path']} in {model['repo']}",
             f"  recorded in {model['repo']}/deployments/{result['slug']}.json"
             + (f" (commit {result['record_commit']})" if result["record_commit"] else " (unchanged)")]
    if result["previous_commit"] and result["previous_commit"] != model["commit"]:
        lines.append(f"  previously {result['previous_commit']}")
    lines.append(f"  MLflow run {result['run']['mlflow_run_id']} tagged" if result["mlflow_tagged"]
                 else "  no MLflow run tagged (no tracking URI or run known)")
    return "\n".join(lines)


def _show_sync(report: dict[str, Any]) -> str:
    lines = []
    for repo in report["model_repos"]:
        line = f"{repo['repo']}: {repo['committed']} checkpoint(s) committed"
        if repo["push"]:
            push = repo["push"]
            line += f", push to {push['remote']} " + ("done" if push["ok"] else f"failed ({push.get('error', '')})")
        lines.append(line)
        lines += [f"  {q['pending']} job(s) still pending in queue {q['queue']} (log: {q['log']})" for q in repo["failed"]]
        lines += [f"  {q['pending']} job(s) left to the live training process of queue {q['queue']}"
                  for q in repo["busy"]]
    for entry in report["mlflow"]:
        where = f"MLflow run {entry.get('run_id') or '(new)'} at {entry.get('tracking_uri')}"
        if entry["status"] == "done":
            lines.append(f"{where}: {entry['done']} operation(s) logged")
            if entry.get("abandoned"):
                a = entry["abandoned"]
                how = ("its training process died without ending it" if a.get("trainer_died", True)
                       else "its final lineage commit had stalled; finished from the model repository")
                lines.append(f"  {how}: lineage status {a['status']}, "
                             f"{a['checkpoints']} committed checkpoint(s)"
                             + (f", model {a['model_path']} @ {a['model_commit']}" if a["model_commit"] else "")
                             + (f"; run terminated {a['terminated']}" if a["terminated"] else ""))
        elif entry.get("waiting_for"):
            lines.append(f"MLflow run {entry.get('run_id')}: its training process died; finished once "
                         f"{entry['waiting_for']} are done (a worker is still committing)")
        elif entry["status"] == "busy":
            lines.append(f"MLflow journal {entry['journal']}: left to its live training process")
        else:
            lines.append(f"{where}: still failing, {entry['pending']} operation(s) kept ({entry['error']})")
    lines.append("nothing left to do" if report["pending"] == 0
                 else f"{report['pending']} item(s) still pending: run `oxen-callbacks sync` again once the "
                      "remote / MLflow server is reachable")
    return "\n".join(lines)


def _show_verify(report: dict[str, Any]) -> str:
    from .._data.snapshot import remake_hint

    lines = []
    for snap in report["snapshots"]:
        lines.append(f"{'DAMAGED' if snap['problems'] else 'ok'} {snap['folder']} "
                     f"({snap['files']} files, {snap['bytes'] / 1e6:.1f} MB)")
        lines += [f"  {problem}" for problem in snap["problems"]]
        lines += [f"  hint: {remake_hint(snap['folder'])}"] if snap["problems"] else []
    lines.append(f"{report['damaged']} of {len(report['snapshots'])} snapshot(s) in {report['cache_dir']} damaged")
    return "\n".join(lines)


_COMMANDS = {
    "lineage": (_lineage, _show_lineage), "trace": (_trace, _show_trace), "reproduce": (_reproduce, _show_reproduce),
    "diff": (_diff, _show_diff), "promote": (_promote, _show_promote), "record-deploy": (_record_deploy, _show_deploy),
    "sync": (_sync, _show_sync), "verify": (_verify, _show_verify),
}

if __name__ == "__main__":
    sys.exit(main())
