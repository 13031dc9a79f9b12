"""The naive baseline the benchmarks compare with: what a user writes by hand in ~15 lines.

After each checkpoint save, synchronously in the training process: hard-link the file into
``runs/<uuid>/`` of a local Oxen model repository, ``oxen add`` + ``oxen commit`` it with
oxenai's Python API and, when a Lightning ``MLFlowLogger`` is given, log the commit id as the
``oxen.model.commit`` tag of the logger's run through the logger's own MLflow client.
The repository is created when missing. Needs an Oxen identity (``$OXEN_CONFIG_DIR``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any


def naive_checkpoint(repo_dir: Path, logger: Any = None, **checkpoint_args: Any) -> Any:
    """A ``ModelCheckpoint`` that commits every file it saves; ``.commits`` lists the commit ids."""
    import oxen
    from lightning.pytorch.callbacks import ModelCheckpoint

    repo = oxen.Repo(str(repo_dir), mkdir=True)
    if not (repo_dir / ".oxen").is_dir():
        repo.init()
    run_dir = repo_dir / "runs" / uuid.uuid4().hex  # earlier runs' identical bytes would make "no changes"

    class NaiveOxenCheckpoint(ModelCheckpoint):
        def _save_checkpoint(self, trainer, filepath):  # type: ignore[no-untyped-def]
            super()._save_checkpoint(trainer, filepath)
            run_dir.mkdir(parents=True, exist_ok=True)
            target = run_dir / Path(filepath).name
            target.unlink(missing_ok=True)  # last.ckpt is saved again every epoch
            os.link(filepath, target)
            repo.add(str(target))
            commit_id = repo.commit(f"{target.name} at step {trainer.global_step}").id
            self.commits.append(commit_id)  # type: ignore[attr-defined]
            if logger is not None:
                logger.experiment.set_tag(logger.run_id, "oxen.model.commit", commit_id)

    checkpoint = NaiveOxenCheckpoint(**checkpoint_args)
    checkpoint.commits = []
    return checkpoint
