"""``oxen-callbacks promote`` and ``record-deploy``: stages and endpoints, each named by a model commit."""

from __future__ import annotations

import argparse

from .command import Command, Result


def _promote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_repo", metavar="MODEL_REPO")
    parser.add_argument("commit", metavar="COMMIT", help="commit id, unique prefix or branch of MODEL_REPO")
    parser.add_argument("--stage", required=True, help="e.g. production, staging")


def _promote(args: argparse.Namespace) -> Result:
    from .._mlflow.query import tracking_uri
    from .._mlflow.registry import promote

    return promote(args.model_repo, args.commit, args.stage, tracking_uri=tracking_uri(args.tracking_uri))


def _show_promote(result: Result) -> str:
    moved = f"(was {result['previous']})" if result["previous"] else "(new branch)"
    lines = [f"{result['branch']} -> {result['commit']} in {result['model_repo']} {moved}"]
    lines.extend(f"MLflow alias @{a['alias']} -> {a['name']} v{a['version']}" for a in result["aliases"])
    lines.extend(f"MLflow alias @{a['alias']} taken off {a['name']} v{a['version']} (its model is commit {a['commit']})"
                 for a in result.get("aliases_removed") or [])
    if not result["aliases"]:
        lines.append("no registered MLflow model version names this commit: no alias set")
    return "\n".join(lines)


def _deploy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("endpoint", metavar="ENDPOINT")
    parser.add_argument("--model-commit", required=True, help="commit id, prefix or branch (e.g. stage/production)")
    parser.add_argument("--model-repo", help="default: the repository MLflow names for the commit")
    parser.add_argument("--run-id", help="MLflow run to tag (default: the run that trained the commit)")


def _record_deploy(args: argparse.Namespace) -> Result:
    from .._mlflow.query import tracking_uri
    from .._mlflow.registry import record_deploy

    return record_deploy(args.endpoint, args.model_commit, model_repo=args.model_repo, run_id=args.run_id,
                         tracking_uri=tracking_uri(args.tracking_uri))


def _show_deploy(result: Result) -> str:
    model = result["model"]
    lines = [f"{result['endpoint']} serves {model['commit']}", f"  {model['path']} in {model['repo']}",
             f"  recorded in {model['repo']}/deployments/{result['slug']}.json"
             + (f" (commit {result['record_commit']})" if result["record_commit"] else " (unchanged)")]
    if result["previous_commit"] and result["previous_commit"] != model["commit"]:
        lines.append(f"  previously {result['previous_commit']}")
    lines.append(f"  MLflow run {result['run']['mlflow_run_id']} tagged" if result["mlflow_tagged"]
                 else "  no MLflow run tagged (no tracking URI or run known)")
    return "\n".join(lines)


COMMANDS = [
    Command("promote", "move branch stage/STAGE to COMMIT and set the MLflow alias STAGE", _promote, _show_promote,
            _promote_arguments, shared=("mlflow",)),
    Command("record-deploy", "record which model commit serves ENDPOINT", _record_deploy, _show_deploy,
            _deploy_arguments, shared=("mlflow",)),
]
