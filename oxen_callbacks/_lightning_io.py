"""How the Lightning adapter sees each checkpoint a fit writes or deletes, through public extension points.

:class:`CheckpointWatch` wraps the strategy's ``CheckpointIO`` for the fit (Lightning's plugin
point, as ``AsyncCheckpointIO`` does): every checkpoint written through it, by any
``ModelCheckpoint`` or ``trainer.save_checkpoint``, is published once written (on global rank 0,
where the strategy calls it), and every deletion is recorded. A strategy that writes sharded
folders from every rank itself (FSDP/DeepSpeed style) bypasses its ``CheckpointIO``: such a save
is published at the first callback hook after it (after the save's barrier, so every rank has
written), as the ``ModelCheckpoint`` paths whose files changed since the save began. Once the
``CheckpointIO`` has seen a save, the strategy writes through it, and saves are no longer looked for on disk.
``ModelCheckpoint(save_last="link")`` makes ``last.ckpt`` a link to the file it just saved, without the
``CheckpointIO``: a link made or moved since the last save is published at the next hook as well.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import lightning.pytorch as pl
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class PublishingCheckpointIO(CheckpointIO):
    """The strategy's own ``CheckpointIO``, wrapped: each save and removal is delegated, then reported.

    ``on_save(path, write)`` calls ``write()`` (the delegated save) itself, so it can act before and after.
    """

    def __init__(self, wrapped: CheckpointIO, *, on_save: Callable[[str, Callable[[], None]], None],
                 on_remove: Callable[[str], None]) -> None:
        self.wrapped, self._on_save, self._on_remove = wrapped, on_save, on_remove

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self._on_save(os.fspath(path), functools.partial(self.wrapped.save_checkpoint, checkpoint, path,
                                                         storage_options=storage_options))

    def remove_checkpoint(self, path: Any) -> None:
        self.wrapped.remove_checkpoint(path)
        self._on_remove(os.fspath(path))

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.wrapped.load_checkpoint(*args, **kwargs)

    def teardown(self) -> None:
        self.wrapped.teardown()


class Run(Protocol):
    """What the watch calls on :class:`~oxen_callbacks.run.LineageRun`."""

    publisher: Any

    def before_overwrite(self, path: str) -> Any: ...
    def checkpoint_saved(self, path: str, *, step: int, epoch: int, metrics: dict[str, float],
                         copy: bool = False, same_model_as: str | None = None) -> int: ...
    def checkpoint_removed(self, path: str) -> None: ...


@dataclass
class _SaveBegun:
    """A save the ``CheckpointIO`` has not seen yet: the trainer's position then, and what the
    ``ModelCheckpoint`` paths held before it."""

    step: int
    epoch: int
    metrics: dict[str, float]
    before: dict[str, tuple[Any, ...]]


@dataclass
class _Save:
    """A checkpoint this fit published: its path, the trainer's position then, and whether it was
    frozen as a copy (a strategy writing it itself may rewrite it in place)."""

    path: str
    step: int
    epoch: int
    metrics: dict[str, float]
    copy: bool


class CheckpointWatch:
    """Tells ``run`` of each checkpoint ``trainer`` writes or deletes, from :meth:`install` to :meth:`uninstall`.

    ``stall_seconds`` gets the time the training process spent here per published save.
    """

    def __init__(self, trainer: pl.Trainer, run: Run, stall_seconds: list[float]) -> None:
        self.trainer, self.run, self.stall_seconds = trainer, run, stall_seconds
        io = trainer.strategy.checkpoint_io
        wrapped = io.wrapped if isinstance(io, PublishingCheckpointIO) else io  # left by a fit that raised
        self.io = PublishingCheckpointIO(wrapped, on_save=self._save, on_remove=self._removed)
        self._begun: _SaveBegun | None = None
        self._io_sees_saves = False  # once it has: the strategy writes through it, no need to look on disk
        self._saved_at: tuple[int, list[str]] = (-1, [])  # a global step, and the paths published at it
        # ModelCheckpoint(save_last="link") links last.ckpt past the CheckpointIO: after each save, look for it
        self._links_last = any(isinstance(cb, ModelCheckpoint) and cb.save_last == "link"
                               for cb in trainer.checkpoint_callbacks)
        self._look_for_links = False  # a save since the last look
        self._links: dict[str, tuple[str, int, int]] = {}  # each published link: its target (real path, inode, mtime)
        self._saves: dict[str, _Save] = {}  # each file or folder this fit published, by its real path

    def install(self) -> None:
        try:
            self.trainer.strategy.checkpoint_io = self.io
        except TypeError:  # a strategy that takes only its own kind of CheckpointIO (XLA)
            log.info("%s takes no wrapped CheckpointIO: its saves are published at the hook after each save.",
                     type(self.trainer.strategy).__name__)

    def uninstall(self) -> None:
        if self.trainer.strategy.checkpoint_io is self.io:
            self.trainer.strategy.checkpoint_io = self.io.wrapped

    def _save(self, path: str, write: Callable[[], None]) -> None:
        publishing = self.trainer.is_global_zero and self.run.publisher is not None
        started = time.perf_counter()
        # a fresh inode keeps the rewrite off a frozen copy; the previous file comes back if the write fails
        aside = self.run.before_overwrite(path) if publishing else None
        ours = time.perf_counter() - started
        try:
            write()
        except BaseException:
            if aside is not None:
                aside.put_back()
            raise
        if aside is not None:
            aside.drop()
        self._begun = None  # this save went through the CheckpointIO
        self._io_sees_saves = True
        if publishing:
            trainer = self.trainer
            self._publish(path, trainer.global_step, trainer.current_epoch, _scalar_metrics(trainer.callback_metrics),
                          ours)
            self._look_for_links = self._links_last

    def _removed(self, path: str) -> None:
        if self.trainer.is_global_zero:
            self.run.checkpoint_removed(path)

    def _publish(self, path: str, step: int, epoch: int, metrics: dict[str, float], ours: float = 0.0, *,
                 copy: bool = False, same_model_as: str | None = None) -> None:
        started = time.perf_counter()
        if self._saved_at[0] != step:
            self._saved_at = (step, [])
        same = same_model_as or _top_k_twin(self.trainer, path, self._saved_at[1])
        self.run.checkpoint_saved(path, step=step, epoch=epoch, metrics=metrics, copy=copy, same_model_as=same)
        self._saved_at[1].append(path)
        if not os.path.islink(path):
            self._saves[os.path.realpath(path)] = _Save(path, step, epoch, metrics, copy)
        self.stall_seconds.append(ours + time.perf_counter() - started)

    def save_begins(self) -> None:
        """From ``Callback.on_save_checkpoint`` (before the write)."""
        self.publish_unseen_save()  # a save earlier in the same hook (top-k, then last) is complete
        trainer = self.trainer
        if trainer.is_global_zero and self.run.publisher is not None and not self._io_sees_saves:
            self._begun = _SaveBegun(trainer.global_step, trainer.current_epoch,
                                     _scalar_metrics(trainer.callback_metrics), _model_checkpoint_files(trainer))

    def publish_unseen_save(self) -> None:
        """From the first hook after a save (or the next save): if it bypassed the ``CheckpointIO``, publish
        what it wrote. As a copy: such a strategy rewrites a file such as ``last.ckpt`` in place, with no
        chance to give the rewrite a fresh inode first. Then the ``last.ckpt`` links made since."""
        begun, self._begun = self._begun, None
        if begun is not None:
            self._publish_written(begun)
            self._look_for_links = self._links_last
        self._publish_new_links()

    def _publish_new_links(self) -> None:
        """Publish each ``ModelCheckpoint``'s ``last.ckpt`` that is a link to a checkpoint this fit saved
        and had not linked to yet (``save_last="link"``): it is that checkpoint (with no top-k file saved
        at this step, Lightning links to an earlier one), published as that save. A link to a file of
        another fit (a resumed or repeated fit's ``last.ckpt``) is not this fit's save: left out."""
        if not self._look_for_links:  # (no save since the last look: every hook of every batch comes here)
            return
        self._look_for_links = False
        for cb in self.trainer.checkpoint_callbacks:
            path = cb.last_model_path if isinstance(cb, ModelCheckpoint) else None
            if not path or not os.path.islink(path):
                continue
            target = os.path.realpath(path)
            save = self._saves.get(target)
            try:
                info = os.stat(target)
            except OSError:  # (rotated away since: its save is committed under its own name)
                continue
            if save is not None and self._links.get(os.path.abspath(path)) != (target, info.st_ino, info.st_mtime_ns):
                self._links[os.path.abspath(path)] = (target, info.st_ino, info.st_mtime_ns)
                self._publish(path, save.step, save.epoch, save.metrics, copy=save.copy, same_model_as=save.path)

    def _publish_written(self, begun: _SaveBegun) -> None:
        written = [p for p, files in _model_checkpoint_files(self.trainer).items() if files != begun.before.get(p)]
        if not written:
            log.warning("A checkpoint was written without the strategy's CheckpointIO and outside every "
                        "ModelCheckpoint path: it is not committed to the model repository.")
        lasts = {os.path.abspath(cb.last_model_path) for cb in self.trainer.checkpoint_callbacks
                 if isinstance(cb, ModelCheckpoint) and cb.last_model_path}
        for path in sorted(written, key=lambda p: os.path.abspath(p) in lasts):  # (a top-k file before its last.ckpt)
            self._publish(path, begun.step, begun.epoch, begun.metrics, copy=True)


def _model_checkpoint_files(trainer: pl.Trainer) -> dict[str, tuple[Any, ...]]:
    """Each existing path a ``ModelCheckpoint`` names, with (name, inode, size, mtime) of each file in it."""
    paths = {p for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
             for p in (cb.best_model_path, cb.last_model_path, *cb.best_k_models) if p and not os.path.islink(p)}
    found = {}
    for path in paths:
        files = [os.path.join(d, n) for d, _, names in os.walk(path) for n in names] if os.path.isdir(path) else [path]
        try:
            found[path] = tuple(sorted((f, s.st_ino, s.st_size, s.st_mtime_ns) for f in files for s in [os.stat(f)]))
        except FileNotFoundError:
            continue
    return found


def _top_k_twin(trainer: pl.Trainer, path: str, published_at_step: list[str]) -> str | None:
    """When ``path`` is a ``ModelCheckpoint``'s ``last.ckpt`` (``save_last``): the top-k file that
    callback saved at the same step, of those ``published_at_step``. It holds the same model (same
    callback, so the same ``save_weights_only``), and MLflow gets one logged model for both.
    Another callback's file, or one outside its top-k (an EMA copy), is never taken for it. (Paths
    compared absolute: a strategy may hand its CheckpointIO another spelling of the callback's path.)"""
    this = os.path.abspath(path)
    for cb in trainer.checkpoint_callbacks:
        if not (isinstance(cb, ModelCheckpoint) and cb.last_model_path and os.path.abspath(cb.last_model_path) == this):
            continue
        top_k = {os.path.abspath(p) for p in (*cb.best_k_models, cb.best_model_path) if p} - {this}
        if twin := next((p for p in reversed(published_at_step) if os.path.abspath(p) in top_k), None):
            return twin
    return None


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Lightning's logged metrics (tensors or numbers) as floats; others are left out."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        try:
            out[name] = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError, RuntimeError):
            continue
    return out
