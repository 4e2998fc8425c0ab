"""One writer per `--save` directory: a lock file, `<save>/megaclm.lock`.

Two runs writing into one directory interleave metrics.jsonl and, worse, mix their files into one
checkpoint that is then marked complete. So a run takes the lock before anything writes into --save
(pretrain: rank 0, right after the process group exists; the other ranks follow its decision) and
removes it at exit (normal, error or signal). The file holds JSON:

    {"host", "pid", "pid_start" (the holder's start time, /proc), "slurm_job_id" (or null),
     "started", "heartbeat" (Unix times), "token" (a random id: whose lock this is)}

It is created whole and atomically: written under a temporary name, then hard-linked to the final name
(link() fails if the name exists, also on NFS, where O_EXCL was not reliable; a lost NFS reply is caught
by the temporary file's link count). A thread rewrites the heartbeat every HEARTBEAT_S seconds.

A run that finds the lock held takes it over, logging why, when the holder is certainly gone:
  - same host and its pid is not running (or was reused: another start time);
  - another host and the heartbeat is older than STALE_S (that host is down or cut off);
  - the same SLURM_JOB_ID: a requeued job (SLURM requeues under the same id; the old run is gone).
Otherwise it is refused with one line naming the holder. A takeover renames the stale file away first,
so of two runs racing for one stale lock only one gets it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid

from megaclm.logging import get_logger
from megaclm.utils.errors import UserError
from megaclm.utils.signals import process_start_time

log = get_logger("megaclm.checkpoint")

LOCK = "megaclm.lock"
HEARTBEAT_S = 30.0
STALE_S = 600.0  # 20 missed heartbeats: a host that long silent is down or cut off from the file system


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def _holder_text(h: dict) -> str:
    job = f", SLURM job {h['slurm_job_id']}" if h.get("slurm_job_id") else ""
    return (f"host {h['host']}, pid {h['pid']}{job}, since {_when(h['started'])}, last heartbeat "
            f"{max(time.time() - h['heartbeat'], 0):.0f} s ago")


class SaveDirLock:
    """`SaveDirLock.acquire(directory, what)` takes the lock or raises UserError; `release()` gives it back."""

    def __init__(self, path: str, record: dict):
        self.path, self.record = path, record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="megaclm-lock-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, directory: str, what: str = "--save") -> "SaveDirLock":
        """`what` names the directory's flag in the refusal (e.g. "--save", "--out")."""
        path = os.path.join(directory, LOCK)
        now = time.time()
        record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start_time(os.getpid()),
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None, "started": now, "heartbeat": now,
                  "token": uuid.uuid4().hex}
        for _ in range(3):  # a lock that vanishes or is taken over under our feet: look again
            try:
                os.makedirs(directory, exist_ok=True)
                created = _create(path, record)
            except OSError as e:
                raise UserError(f"{what} {directory}: cannot create the lock file there ({e}); pass a writable "
                                "directory") from None
            if created:
                return cls(path, record)
            holder = _read(path)
            if holder is None:
                continue
            why = _takeover_reason(holder, record)
            if why is None:
                raise UserError(f"{what} {directory} is in use by another run ({_holder_text(holder)}; lock file "
                                f"{path}): wait for it to end or stop it, or pass another {what}; if that run is "
                                "gone (its host down), remove the lock file")
            if _steal(path, holder):
                log.warning(f"{what} {directory}: taking over the lock of a run that is gone ({_holder_text(holder)}):"
                            f" {why}")
        raise UserError(f"{what} {directory}: could not take the lock {path}: other runs keep taking it; "
                        "make sure only one run writes there")

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if (_read(self.path) or {}).get("token") == self.record["token"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                current = _read(self.path)
            except UserError:
                current = None
            if current is None or current.get("token") != self.record["token"]:
                log.error(f"the lock {self.path} was removed or taken over by another run "
                          f"({_holder_text(current) if current else 'removed'}); this run no longer holds it")
                return
            self.record["heartbeat"] = time.time()
            with contextlib.suppress(OSError):  # a full disk must not kill the thread; the next beat retries
                _write_replacing(self.path, self.record)


def _temp_name(path: str) -> str:
    return f"{path}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def _create(path: str, record: dict) -> bool:
    """Create the lock file with `record` if no lock file exists; False if one does."""
    tmp = _temp_name(path)
    try:
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except OSError as e:
            if os.stat(tmp).st_nlink != 2:  # NFS: the link may exist although the reply was lost
                if e.errno == errno.EEXIST:
                    return False
                raise
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _write_replacing(path: str, record: dict) -> None:
    tmp = _temp_name(path)
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def _read(path: str) -> dict | None:
    """The holder's record; None if the lock is gone. An unreadable lock is refused (never guessed stale)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        for key in ("host", "pid", "started", "heartbeat", "token"):
            record[key]
        return record
    except (ValueError, KeyError, TypeError):
        raise UserError(f"the lock file {path} is not a megaclm lock (unreadable JSON: {text[:80]!r}); if no run "
                        "writes into that directory, remove it") from None


def _takeover_reason(holder: dict, me: dict) -> str | None:
    """Why the holder is certainly gone, or None if it may still be running."""
    if me["slurm_job_id"] is not None and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return f"SLURM job {me['slurm_job_id']} was requeued"
    if holder["host"] == me["host"]:
        if process_start_time(holder["pid"]) != holder.get("pid_start"):
            return f"pid {holder['pid']} is not running on this host"
        return None
    age = time.time() - holder["heartbeat"]
    if age > STALE_S:
        return f"no heartbeat from host {holder['host']} for {age:.0f} s (> {STALE_S:.0f} s)"
    return None


def _steal(path: str, holder: dict) -> bool:
    """Move the stale lock out of the way; False if another run did first or the lock changed meanwhile."""
    stale = f"{path}.stale.{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, stale)  # atomic: of two runs racing, one moves it, the other gets ENOENT
    except FileNotFoundError:
        return False
    try:
        with open(stale) as f:
            moved = json.load(f)
    except (OSError, ValueError):
        moved = {}
    if moved.get("token") != holder["token"]:  # a new holder took it between our read and the rename
        with contextlib.suppress(OSError):
            os.link(stale, path)
        os.remove(stale)
        return False
    os.remove(stale)
    return True
