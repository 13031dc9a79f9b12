"""``oxen-callbacks sync``: finish what training runs journaled but could not do."""

from __future__ import annotations

import argparse
from pathlib import Path

from .command import Command, Result


def _sync_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--push-timeout", type=float, default=300.0, help="seconds one push may take (default 300)")


def _sync(args: argparse.Namespace) -> Result:
    from .._ops.sync import sync_all

    return sync_all(Path(args.cache_dir) if args.cache_dir else None, push_timeout=args.push_timeout)


def _queue_lines(repo: Result) -> list[str]:
    line = f"{repo['repo']}: {repo['committed']} checkpoint(s) committed"
    if repo["push"]:
        push = repo["push"]
        line += f", push to {push['remote']} " + ("done" if push["ok"] else f"failed ({push.get('error', '')})")
    return ([line]
            + [f"  {q['pending']} job(s) still pending in queue {q['queue']} (log: {q['log']})" for q in repo["failed"]]
            + [f"  {q['pending']} job(s) left to the live training process of queue {q['queue']}"
               for q in repo["busy"]]
            + [_damaged_line(d) for d in repo.get("damaged", ())])


def _damaged_line(item: Result) -> str:
    return (f"  damaged: {item['path']}: {item['error']}. Skipped and left as it is: look at it, then move it "
            "away or delete it")


def _mlflow_lines(entry: Result) -> list[str]:
    where = f"MLflow run {entry.get('run_id') or '(new)'} at {entry.get('tracking_uri')}"
    if entry["status"] == "done":
        lines = [f"{where}: {entry['done']} operation(s) logged"]
        if entry.get("abandoned"):
            a = entry["abandoned"]
            how = ("its training process died without ending it" if a.get("trainer_died", True)
                   else "its final lineage commit had stalled; finished from the model repository")
            lines.append(f"  {how}: lineage status {a['status']}, "
                         f"{a['checkpoints']} committed checkpoint(s)"
                         + (f", model {a['model_path']} @ {a['model_commit']}" if a["model_commit"] else "")
                         + (f"; run terminated {a['terminated']}" if a["terminated"] else "")
                         + (f"; fit {a['continued_by']} went on in this MLflow run: its status, tags and "
                            "lineage stay that fit's" if a.get("continued_by") else ""))
        return lines
    if entry.get("waiting_for"):
        return [f"MLflow run {entry.get('run_id')}: its training process died; finished once "
                f"{entry['waiting_for']} are done (a worker is still committing)"]
    if entry["status"] == "damaged":
        return [f"MLflow journal {_damaged_line(entry).strip()}"]
    if entry["status"] == "dropped":
        return [f"{where}: {entry['pending']} operation(s) dropped: {entry['why']} (the lineage stays in the "
                "model repository)"]
    if entry["status"] == "held":
        return [f"{where}: {entry['pending']} operation(s) kept, not sent: {entry['why']}"]
    if entry["status"] == "busy":
        return [f"MLflow journal {entry['journal']}: held by a live process (its training process, or another `sync`): left to it"]
    return [f"{where}: still failing, {entry['pending']} operation(s) kept ({entry['error']})"]


def _show_sync(report: Result) -> str:
    lines = [line for repo in report["model_repos"] for line in _queue_lines(repo)]
    lines += [line for entry in report["mlflow"] for line in _mlflow_lines(entry)]
    if report.get("damaged"):
        lines.append(f"{report['damaged']} damaged queue(s), result(s), journal(s) or push marker(s) skipped: "
                     "nothing of theirs is done until they are repaired or removed")
    lines.append(("nothing else left to do" if report.get("damaged") else "nothing left to do") if report["pending"] == 0
                 else f"{report['pending']} item(s) still pending: run `oxen-callbacks sync` again once the "
                      "remote / MLflow server is reachable")
    return "\n".join(lines)


COMMANDS = [
    Command("sync", "finish journaled commits, pushes and MLflow logging", _sync, _show_sync, _sync_arguments,
            shared=("cache",), failed=lambda report: bool(report["pending"] or report.get("damaged"))),
]
