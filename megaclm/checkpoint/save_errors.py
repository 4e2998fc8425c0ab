"""A checkpoint write that fails on one rank fails the save on every rank, in one line, leaving nothing half-written.

A full disk (or a quota, or a file system gone read-only) shows on one rank, somewhere inside DeepSpeed's
save, which has barriers of its own: a rank that raised there would leave its peers waiting in them. So
during a save every file is written through `AtomicCheckpointEngine` (as DeepSpeed's checkpoint engine,
`recorded_write_errors`) or `write_files`, which write under a temporary name and rename (a truncated file never appears under
its final name); a rank whose write failed records the error, skips its remaining writes and goes on
through the same collectives. Then `agree_saved` (collective) compares notes: if any rank failed, rank 0
removes the partial `iter_*` directory (never the one `latest` names) and every rank raises
`CheckpointSaveError`, whose message names the first failure:

    checkpoint iter_0000004 was not saved: rank 1: no space left on device (ENOSPC) writing
    /ckpt/iter_0000004/mp_rank_00_model_states.pt; its partial files were removed and `latest` still names
    iter_0000002; free space in /ckpt (or lower --save-total-limit) and resume
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from megaclm.checkpoint.layout import read_latest
from megaclm.checkpoint.manifest import HashingFile
from megaclm.parallel.device import rank_device
from megaclm.utils.fileio import atomic_write, remove_quietly

RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # what DeepSpeed 0.19 copies into every save directory


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written on some rank; the message is one line for the user."""


def describe(error: BaseException) -> str:
    """e.g. "no space left on device (ENOSPC) writing /ckpt/iter_0000004/rng/rank_00001.pt"."""
    if isinstance(error, OSError):
        what = ("no space left on device (ENOSPC)" if error.errno == errno.ENOSPC
                else error.strerror or type(error).__name__)
        path = error.filename2 or error.filename  # shutil.copyfile names the source first, the target second
        return f"{what} writing {path}" if path else what
    return f"{type(error).__name__}: {error}"


def write_file(path: str, obj) -> dict:
    """torch.save `obj` to `path` atomically (temporary name, fsync, rename); returns its manifest entry (size,
    checksum of the bytes as they were written). A failed write raises OSError."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with atomic_write(path) as f:
            hashed = HashingFile(f)
            torch.save(obj, hashed)
        return hashed.entry()
    except RuntimeError as e:
        # torch's zip writer turns the OSError of a failed write into "RuntimeError: [enforce fail at
        # inline_container.cc] unexpected pos ..." while closing; the OSError is its context.
        cause = e.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, path) from e


@contextlib.contextmanager
def recorded_write_errors(engine: Any) -> Iterator["AtomicCheckpointEngine"]:
    """Within, `engine.save_checkpoint` writes every file through an AtomicCheckpointEngine (yielded: its `error`
    is the first failed write), including the recovery scripts rank 0 copies into the save directory."""
    atomic = AtomicCheckpointEngine(engine.checkpoint_engine)
    original, copy = engine.checkpoint_engine, engine._copy_recovery_script
    engine.checkpoint_engine, engine._copy_recovery_script = atomic, atomic.guarded_copy(copy)
    try:
        yield atomic
    finally:
        engine.checkpoint_engine = original
        del engine._copy_recovery_script  # the class's method again


class AtomicCheckpointEngine(CheckpointEngine):
    """DeepSpeed's file writes, each atomic and checksummed (`entries`: {path: manifest entry}); the first failure
    is kept in `error` and later writes are skipped."""

    def __init__(self, inner: CheckpointEngine):
        super().__init__()
        self.inner, self.error, self.entries = inner, None, {}

    def create(self, info):
        self.inner.create(info)

    def save(self, state_dict, path: str):
        if self.error is not None:
            return
        try:
            self.entries[path] = write_file(path, state_dict)
        except OSError as e:
            self.error = describe(e)

    def guarded_copy(self, copy: Callable[[str], None]) -> Callable[[str], None]:
        """DeepSpeed's `_copy_recovery_script(save_dir)` (zero_to_fp32.py, ...: shutil.copyfile to the final
        names), with a failure recorded and its partial copies removed (the next save copies them again)."""
        def guarded(save_dir: str) -> None:
            if self.error is not None:
                return
            try:
                copy(save_dir)
            except OSError as e:
                self.error = describe(e)
                remove_quietly(*(os.path.join(save_dir, name) for name in RECOVERY_SCRIPTS))
        return guarded

    def load(self, path: str, map_location=None):
        return self.inner.load(path, map_location)

    def commit(self, info):
        return self.inner.commit(info)

    def is_data_parallel_writer(self, dp_rank):
        return self.inner.is_data_parallel_writer(dp_rank)

    def preserves_storage_sharing(self):
        return self.inner.preserves_storage_sharing()  # torch.save, as the inner engine's


def agree_saved(error: str | None, save_dir: str, tag: str) -> None:
    """Collective: return if every rank's writes of `tag` succeeded; else remove the partial checkpoint (rank 0)
    and raise CheckpointSaveError on every rank."""
    device = rank_device()
    failed = torch.tensor([float(error is not None)], device=device)
    world = 1
    if dist.is_initialized():
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        world = dist.get_world_size()
    if not failed.item():
        return
    errors = [error]
    if dist.is_initialized():
        errors = [None] * world
        dist.all_gather_object(errors, error)
    failures = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    latest = read_latest(save_dir)
    removed = ""
    if tag != latest:
        if not dist.is_initialized() or dist.get_rank() == 0:
            shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
        removed = "its partial files were removed and "
    rank, first = failures[0]
    more = f" (and on {len(failures) - 1} more rank(s))" if len(failures) > 1 else ""
    raise CheckpointSaveError(f"checkpoint {tag} was not saved: rank {rank}: {first}{more}; {removed}`latest` still "
                              f"names {latest or 'no checkpoint'}; free space in {save_dir} (or lower "
                              "--save-total-limit) and resume")
