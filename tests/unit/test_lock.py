"""The --save lock (megaclm.checkpoint.lock): who is refused, who takes a stale lock over, what is left behind.

The launcher-level cases (a second `deepspeed` run refused, a dead pid's lock taken over) are in
tests/integration/test_signals.py; here every rule on its own, in-process.
"""
import json
import os
import socket
import subprocess
import time

import pytest

from megaclm.checkpoint import lock as lock_module
from megaclm.checkpoint.lock import LOCK, SaveDirLock
from megaclm.utils.errors import UserError
from megaclm.utils.signals import process_start_time


def plant(directory, **fields):
    record = {"host": socket.gethostname(), "pid": os.getppid(), "pid_start": process_start_time(os.getppid()),
              "slurm_job_id": None, "started": time.time() - 100, "heartbeat": time.time() - 5, "token": "theirs"}
    record.update(fields)
    (directory / LOCK).write_text(json.dumps(record))
    return record


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def test_acquire_writes_the_holder_and_release_removes_it(tmp_path):
    lock = SaveDirLock.acquire(str(tmp_path / "save"))
    record = json.loads((tmp_path / "save" / LOCK).read_text())
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    assert record["pid_start"] == process_start_time(os.getpid()) and record["token"] == lock.record["token"]
    lock.release()
    assert os.listdir(tmp_path / "save") == []


def test_a_live_holder_refuses_in_one_line_and_nothing_is_written(tmp_path):
    holder = plant(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UserError) as e:
        SaveDirLock.acquire(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"--save {tmp_path} is in use by another run (host {holder['host']}, pid {holder['pid']}, "
                          "since ") and "last heartbeat 5 s ago" in msg and "pass another --save" in msg
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_the_refusal_names_the_slurm_job_and_the_flag(tmp_path):
    plant(tmp_path, slurm_job_id="4242")
    with pytest.raises(UserError, match=r"^--out \S+ is in use by another run \(host .*, pid \d+, SLURM job 4242, "):
        SaveDirLock.acquire(str(tmp_path), what="--out")


def test_a_dead_pid_on_this_host_is_taken_over(tmp_path):
    plant(tmp_path, pid=dead_pid(), pid_start=12345)
    lock = SaveDirLock.acquire(str(tmp_path))
    assert json.loads((tmp_path / LOCK).read_text())["token"] == lock.record["token"]
    lock.release()
    assert os.listdir(tmp_path) == []  # no stale copy left behind


def test_a_reused_pid_is_not_the_holder(tmp_path):
    plant(tmp_path, pid_start=process_start_time(os.getppid()) - 1)  # same pid number, another process
    SaveDirLock.acquire(str(tmp_path)).release()


def test_the_same_slurm_job_takes_over_a_requeued_run(tmp_path, monkeypatch):
    plant(tmp_path, host="node-that-ran-it-before", slurm_job_id="77")  # alive as far as anyone can tell
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    lock = SaveDirLock.acquire(str(tmp_path))
    assert json.loads((tmp_path / LOCK).read_text())["slurm_job_id"] == "77"
    lock.release()


def test_another_host_is_refused_until_its_heartbeat_is_stale(tmp_path):
    plant(tmp_path, host="other-node", pid=1, heartbeat=time.time() - lock_module.STALE_S + 60)
    with pytest.raises(UserError, match="host other-node"):
        SaveDirLock.acquire(str(tmp_path))
    plant(tmp_path, host="other-node", pid=1, heartbeat=time.time() - lock_module.STALE_S - 60)
    SaveDirLock.acquire(str(tmp_path)).release()


def test_a_foreign_file_under_the_lock_name_is_refused(tmp_path):
    (tmp_path / LOCK).write_text("not json")
    with pytest.raises(UserError, match=r"is not a megaclm lock .* remove it"):
        SaveDirLock.acquire(str(tmp_path))


def test_the_heartbeat_moves(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "HEARTBEAT_S", 0.05)
    lock = SaveDirLock.acquire(str(tmp_path))
    first = json.loads((tmp_path / LOCK).read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((tmp_path / LOCK).read_text())["heartbeat"] > first
    lock.release()


def test_release_leaves_a_lock_another_run_has_taken(tmp_path):
    lock = SaveDirLock.acquire(str(tmp_path))
    plant(tmp_path, token="someone-else")  # e.g. removed by hand, then taken by another run
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "someone-else"


def test_an_unwritable_directory_is_one_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^--save \S+/file/save: cannot create the lock file there \(.*\); pass a "
                                        "writable directory"):
        SaveDirLock.acquire(str(tmp_path / "file" / "save"))
