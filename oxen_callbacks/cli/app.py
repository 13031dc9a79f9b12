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
    oxen-callbacks auth [--host HOST]       # a token for an Oxen server, from stdin or a prompt
    oxen-callbacks identity [--name N --email E]
    oxen-callbacks remote add NAME URL [--repo PATH] | remote list [--repo PATH]

MLflow is --tracking-uri, else $MLFLOW_TRACKING_URI; without one, lineage is read
from model repositories (--model-repo, or the one the current folder is in).
Every command takes --json. Exit codes: 0 done, 1 failed or nothing found, 2 bad input.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys

from .._util.redact import RedactingFormatter, redact_text
from .._util.terminal import printable, printable_value
from ..errors import ConfigurationError, OxenCallbacksError
from . import data, lineage, registry, setup_oxen, sync
from .command import Command

log = logging.getLogger(__name__)
COMMANDS: dict[str, Command] = {c.name: c for group in (lineage, data, registry, sync, setup_oxen)
                               for c in group.COMMANDS}


def _shared_options() -> dict[str, argparse.ArgumentParser]:
    """Option sets several commands take, by the name a :class:`Command` asks for them."""
    mlflow = argparse.ArgumentParser(add_help=False)
    mlflow.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    repos = argparse.ArgumentParser(add_help=False)
    repos.add_argument("--model-repo", action="append", dest="model_repos", default=[], metavar="PATH",
                       help="model repository to read runs/*/lineage.json from (repeatable)")
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument("--cache-dir", help="snapshot cache (default $OXEN_CALLBACKS_CACHE or ~/.cache/oxen-callbacks)")
    return {"mlflow": mlflow, "repos": repos, "cache": cache}


def build_parser() -> argparse.ArgumentParser:
    paragraphs = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(prog="oxen-callbacks", description=paragraphs[0], epilog=paragraphs[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON (for scripts)")
    shared = _shared_options()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        parents = [common, *(shared[name] for name in command.shared)]
        command.add_arguments(sub.add_parser(command.name, help=command.help, description=command.help,
                                             parents=parents))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit code 0 done, 1 failed or nothing found, 2 bad input.

    ``argv`` ``None`` means this process's own command line: the process ends right after, so
    the garbage collector is told to leave every object alone at exit (``gc.freeze``). Tearing
    down the millions of objects MLflow's import leaves took about 1 s of a 3.5 s
    ``oxen-callbacks trace`` on a SQLite store; the operating system frees them at once.
    """
    code = _main(argv)
    if argv is None:
        gc.freeze()
    return code


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    command = COMMANDS[args.command]
    try:
        result = command.run(args)
    except ConfigurationError as exc:
        return _fail(args, exc, 2)
    except OxenCallbacksError as exc:
        return _fail(args, exc, 1)
    except Exception as exc:
        if not _is_store_error(exc):
            raise
        return _fail(args, exc, 1)
    try:
        print(json.dumps(result, indent=2) if args.json else command.show(printable_value(result)), flush=True)
    except BrokenPipeError:  # `| head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1 if command.failed(result) else 0


def _is_store_error(exc: Exception) -> bool:
    """An error of MLflow or its database layer (a store that cannot be opened or read, a database
    driver not installed): reported in one line, not as a traceback."""
    if isinstance(exc, ModuleNotFoundError):
        return not (exc.name or "").startswith("oxen_callbacks")
    for module, name in (("mlflow.exceptions", "MlflowException"), ("sqlalchemy.exc", "SQLAlchemyError")):
        errors = sys.modules.get(module)
        if errors is not None and isinstance(exc, getattr(errors, name)):
            return True
    return False


class _PrintableFormatter(RedactingFormatter):
    """Warnings quote records, tags and tracking URIs too: their credentials are masked, their control
    characters escaped like the output's."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def _fail(args: argparse.Namespace, exc: Exception, code: int) -> int:
    """Report ``exc`` (credentials masked: MLflow's own errors quote the tracking URI) and return ``code``."""
    message, _, hint = redact_text(str(exc)).partition("\nHINT: ")
    if args.json:
        print(json.dumps({"error": message, "hint": hint or None}))
    print(printable(f"oxen-callbacks {args.command}: error: {message}" + (f"\nhint: {hint}" if hint else "")),
          file=sys.stderr)
    return code
