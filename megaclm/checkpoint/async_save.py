"""Asynchronous checkpoint writes (`--async-save`): the step loop goes on while a CPU copy is written.

    writer = AsyncCheckpointWriter()
    save_checkpoint(engine, ..., writer=writer)    # collective; returns once the CPU copy is taken
    every step: status = all-reduce MAX of writer.status()   (the loop's existing per-step all-reduce)
                status == DONE -> writer.finish()  (rank 0 writes meta.json, then `latest`)
    before the next save, a rollback, the exit:  writer.wait()   (collective)

What is copied: everything DeepSpeed would write (captured by `CapturingCheckpointEngine`, which
DeepSpeed calls for every model, optimizer and pipeline-layer file), this rank's RNG states and its
fp32 model shard: tensors are copied to CPU buffers (the optimizer updates its states in place right
after) that stay allocated and are reused by the next save, so `--async-save` costs one host-memory
copy of the rank's checkpoint for the whole run (pinned, on GPU, for fast device-to-host copies). A background thread writes
each file under a temporary name, fsyncs it and renames it (megaclm.utils.fileio.atomic_write), then
fsyncs the directories; each file is checksummed as it is written (`write_files` returns the
manifest entries, megaclm.checkpoint.manifest). A synchronous save writes DeepSpeed's files the same
way, through megaclm.checkpoint.save_errors.AtomicCheckpointEngine.

Completion is agreed on before anything points to the new tag: `latest` moves only after every
rank's thread has written and fsynced its files (MAX over the ranks' status), so a crash at any
moment (kill -9 included) leaves `latest` on the previous, complete checkpoint, and a write that
failed on any rank fails the run on every rank instead of marking an incomplete tag complete.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from megaclm.checkpoint.save_errors import agree_saved, describe, write_file
from megaclm.parallel.device import rank_device

DONE, BUSY, FAILED = 0, 1, 2  # ordered: MAX over the ranks is the worst


def cpu_copy(obj: Any, staging: dict[str, torch.Tensor], key: str) -> Any:
    """`obj` with every tensor replaced by a CPU copy in `staging[key/...]` (containers rebuilt).

    The staging buffers are reused from one save to the next: a fresh allocation is paid in page
    faults (first touch of GBs of memory, slower than the copy itself), a reused buffer only in the copy."""
    if torch.is_tensor(obj):
        buf = staging.get(key)
        if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
            buf = torch.empty(obj.shape, dtype=obj.dtype, device="cpu", pin_memory=obj.is_cuda)
            staging[key] = buf
        return buf.copy_(obj.detach())
    if isinstance(obj, OrderedDict):  # module state dicts
        return OrderedDict((k, cpu_copy(v, staging, f"{key}/{k}")) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: cpu_copy(v, staging, f"{key}/{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v, staging, f"{key}/{i}") for i, v in enumerate(obj))
    return obj


class CapturingCheckpointEngine(CheckpointEngine):
    """A DeepSpeed checkpoint engine that keeps CPU copies of what it is asked to save, writing nothing."""

    def __init__(self, inner: CheckpointEngine, staging: dict[str, torch.Tensor]):
        super().__init__()
        self.inner, self.staging, self.files = inner, staging, []

    def create(self, info):
        pass

    def save(self, state_dict, path: str):
        # Staging keys without the tag: the next save's files of the same kind reuse these buffers.
        self.files.append((path, cpu_copy(state_dict, self.staging, os.path.basename(path))))

    def load(self, path: str, map_location=None):
        return self.inner.load(path, map_location)

    def commit(self, info):
        return True

    def preserves_storage_sharing(self):
        return False  # cpu_copy already gives every tensor its own storage


def capture_deepspeed_files(engine: Any, save_dir: str, tag: str, client_state: dict,
                            staging: dict[str, torch.Tensor],
                            exclude_frozen_parameters: bool = False) -> list[tuple[str, Any]]:
    """Run DeepSpeed's save (collective, as usual) with the capturing engine; returns (path, object) pairs."""
    original = engine.checkpoint_engine
    engine.checkpoint_engine = CapturingCheckpointEngine(original, staging)
    try:
        engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=exclude_frozen_parameters)
        return engine.checkpoint_engine.files
    finally:
        engine.checkpoint_engine = original


def write_files(files: list[tuple[str, Any]]) -> dict[str, dict]:
    """torch.save each object atomically (temp name, fsync, rename), then fsync the directories; returns
    {path: manifest entry (size, checksum)}, computed from the bytes as they were written."""
    entries = {}
    for path, obj in files:
        entries[path] = write_file(path, obj)
    for d in sorted({os.path.dirname(p) for p, _ in files}):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)  # the renames themselves
        finally:
            os.close(fd)
    return entries


class AsyncCheckpointWriter:
    """One checkpoint write in flight at a time, in a background thread."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._finalize: Callable[[dict[str, dict]], None] | None = None
        self._error: BaseException | None = None
        self._entries: dict[str, dict] = {}  # manifest entries of the files this rank wrote
        self.tag: str | None = None
        self.save_dir: str | None = None
        self.staging: dict[str, torch.Tensor] = {}  # CPU buffers reused by every save (capture_deepspeed_files)

    @property
    def pending(self) -> bool:
        """A write was submitted and not yet finished (its tag is not `latest` yet)."""
        return self._finalize is not None

    def status(self) -> int:
        if self._thread is not None and self._thread.is_alive():
            return BUSY
        return FAILED if self._error is not None else DONE

    def submit(self, tag: str, files: list[tuple[str, Any]], finalize: Callable[[dict[str, dict]], None],
               after_write: Callable[[], None] | None = None, save_dir: str | None = None):
        """Write `files` in the background, then run `after_write` in that thread; `finalize(entries)` runs on
        every rank once all are written."""
        assert not self.pending, f"a save of {self.tag} is still pending; wait() for it first"
        self.tag, self._finalize, self._error, self.save_dir = tag, finalize, None, save_dir
        self._thread = threading.Thread(target=self._write, args=(files, after_write), name="megaclm-async-save",
                                        daemon=True)
        self._thread.start()

    def _write(self, files: list[tuple[str, Any]], after_write: Callable[[], None] | None) -> None:
        try:
            self._entries = write_files(files)
            if after_write is not None:
                after_write()
        except BaseException as e:  # reported to every rank through status()
            self._error = e

    def finish(self, agreed_status: int) -> None:
        """Complete the pending write once the ranks agreed on `agreed_status` (MAX of their status())."""
        assert agreed_status != BUSY and self.pending
        self._thread.join()
        tag, finalize, self._finalize = self.tag, self._finalize, None
        if agreed_status == FAILED:  # raises CheckpointSaveError on every rank, naming the first failure
            agree_saved(describe(self._error) if self._error else None, self.save_dir, tag)
        finalize(self._entries)

    def wait(self) -> None:
        """Collective: block until every rank's pending write is done, then finish it."""
        if not self.pending:
            return
        self._thread.join()
        status = torch.tensor([float(self.status())], device=rank_device())
        if dist.is_initialized():
            dist.all_reduce(status, op=dist.ReduceOp.MAX)
        self.finish(int(status.item()))
