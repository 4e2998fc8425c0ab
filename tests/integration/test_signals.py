"""Stop requests at any moment, one writer per --save, a stalled rank, a full disk: the real
`deepspeed --num_gpus 2` launcher (helpers from test_pretrain).

  held      run A starts on a --save holding a stale lock of a dead pid and takes it over; run B into the
            same --save is refused (exit 2, one line naming A's host and pid) while A trains on
  runner    SIGTERM to A's `deepspeed` runner alone (the runner dies at once): A's ranks notice their
            launcher is gone, save and exit 76, and no process of A is left
  start-up  SIGTERM to both ranks of a resume as soon as their handlers are installed (during the imports):
            exit 76 before the first step, no new checkpoint, the lock released
  eval      SIGUSR1 to rank 0 during a long evaluation (many --eval-iters): abandoned at the next batch,
            saved, exit 76; then a resume trains on from that checkpoint to the end (exit 0)
  stalled   rank 1 SIGSTOPped: rank 0's hang watchdog fires, the run exits 75, no rank is left
  disk full --save on a small tmpfs that holds one checkpoint, not two (sync and --async-save): one error line
            naming the file that did not fit, exit 1, the partial iter_* removed, no temporary file left,
            `latest` on the previous complete checkpoint
"""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from megaclm.checkpoint.layout import is_complete, read_latest, tag_for
from megaclm.checkpoint.lock import LOCK
from megaclm.utils import exitcodes
from megaclm.utils.signals import process_start_time
from test_pretrain import Launch, corpus, last_iteration_logged, records, remove_shm_buffers  # noqa: F401


LONG = ["--zero-stage", "1", "--train-iters", "100000", "--eval-interval", "1000"]


def rank_processes(launch: Launch) -> list[psutil.Process]:
    """The training processes (launch.py's command line names pretrain_gpt.py too, but no --local_rank)."""
    return [p for p in psutil.Process(launch.proc.pid).children(recursive=True)
            if any(arg.startswith("--local_rank=") for arg in p.cmdline())]


def handles_sigterm(p: psutil.Process) -> bool:
    """The process has installed a SIGTERM handler (bit 15 of SigCgt in /proc/<pid>/status)."""
    try:
        with open(f"/proc/{p.pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def assert_all_gone(procs: list[psutil.Process], timeout: float) -> None:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        p.kill()
    assert not alive, f"left behind: {alive}"


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def held(corpus, tmp_path_factory):
    """A holds --save (after taking over a dead pid's lock), B is refused, then A's runner gets SIGTERM."""
    save = tmp_path_factory.mktemp("held") / "ckpt"
    save.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = {"host": socket.gethostname(), "pid": dead.pid, "pid_start": 1, "slurm_job_id": None,
             "started": time.time() - 60, "heartbeat": time.time() - 30, "token": "stale"}
    (save / LOCK).write_text(json.dumps(stale))
    a = Launch(corpus, save, LONG)
    try:
        a.wait_for(lambda: last_iteration_logged(save) >= 2)
        holder = json.loads((save / LOCK).read_text())
        b = Launch(corpus, save, LONG)
        b_rc = b.wait(timeout=240)
        b_text = b.text()
        assert a.proc.poll() is None, a.text()[-3000:]  # A trains on
        ranks = rank_processes(a)
        launcher = psutil.Process(a.proc.pid).children()[0]  # python -m deepspeed.launcher.launch
        iteration = last_iteration_logged(save)
        os.kill(a.proc.pid, signal.SIGTERM)  # the runner alone: it has no handler and dies at once
        runner_rc = a.wait(timeout=60)
        start = time.time()
        assert_all_gone(ranks + [launcher], timeout=120)
        gone_s = time.time() - start
    finally:
        if a.proc.poll() is None:
            a.kill()
    return dict(save=save, holder=holder, b_rc=b_rc, b_text=b_text, a=a, runner_rc=runner_rc,
                iteration_at_signal=iteration, gone_s=gone_s, stale=stale)


def test_second_writer_is_refused_naming_the_holder(held):
    h = held["holder"]
    assert held["b_rc"] == exitcodes.BAD_INPUT, held["b_text"][-3000:]
    [line] = error_lines(held["b_text"])
    assert line.startswith(f"error: --save {held['save']} is in use by another run (host {h['host']}, pid {h['pid']}, "
                           "since ") and "last heartbeat" in line and "pass another --save" in line
    assert "Traceback" not in held["b_text"]
    # A took the dead pid's lock over, and B wrote nothing: every metrics record is A's, in order.
    assert h["token"] != "stale" and f"pid {held['stale']['pid']} is not running on this host" in held["a"].text()
    iterations = [r["iteration"] for r in records(held["save"]) if "loss" in r]
    assert iterations == list(range(1, len(iterations) + 1))


def test_sigterm_to_the_runner_alone_saves_and_leaves_no_process(held):
    save, text = held["save"], held["a"].text()
    assert held["runner_rc"] == -signal.SIGTERM
    assert held["gone_s"] < 90  # launch.py SIGKILLs after 30 s: the ranks left on their own, well before
    stopped = [line for line in text.splitlines() if "not finished; exit status 76" in line]
    assert len(stopped) == 1 and "the deepspeed launcher (pid" in stopped[0], text[-3000:]
    iteration = int(stopped[0].split("stopped at iteration ")[1].split()[0])
    assert iteration >= held["iteration_at_signal"]
    assert read_latest(str(save)) == tag_for(iteration) and is_complete(str(save), tag_for(iteration))
    assert not (save / LOCK).exists()


@pytest.fixture(scope="module")
def started(held, corpus):
    """A resume of A's checkpoint, SIGTERM to both ranks while they import torch/DeepSpeed."""
    save = held["save"]
    before = sorted((p.name, p.stat().st_size) for p in save.iterdir())
    launch = Launch(corpus, save, LONG)
    try:
        launch.wait_for(lambda: len(rank_processes(launch)) == 2 and all(map(handles_sigterm, rank_processes(launch))),
                        timeout=60)
        ranks = rank_processes(launch)
        for p in ranks:
            p.send_signal(signal.SIGTERM)
        rc = launch.wait(timeout=240)
        assert_all_gone(ranks, timeout=30)
    finally:
        if launch.proc.poll() is None:
            launch.kill()
    return dict(rc=rc, launch=launch, before=before, after=sorted((p.name, p.stat().st_size) for p in save.iterdir()))


def test_signal_during_start_up_stops_before_the_first_step(held, started):
    text = started["launch"].text()
    assert started["rc"] == exitcodes.STOPPED, text[-3000:]
    assert "stopping during start-up (SIGTERM), before the first step: nothing new to save; exit status 76" in text
    assert "Traceback" not in text
    assert started["after"] == started["before"]  # no new checkpoint, no metrics record, the lock released


@pytest.fixture(scope="module")
def evaluated(held, started, corpus):
    """SIGUSR1 to rank 0 during a long evaluation of a resume; then a resume to the end."""
    save = held["save"]
    first = int(read_latest(str(save)).split("_")[1]) + 1
    launch = Launch(corpus, save, ["--zero-stage", "1", "--train-iters", "100000", "--eval-interval", "1",
                                   "--eval-iters", "5000"])
    try:
        launch.wait_for(lambda: last_iteration_logged(save) >= first)
        time.sleep(1)  # inside the evaluation that follows iteration `first`
        launch.signal_rank(0, signal.SIGUSR1)
        start = time.time()
        rc = launch.wait(timeout=120)
        stop_s = time.time() - start
    finally:
        if launch.proc.poll() is None:
            launch.kill()
    latest = read_latest(str(save))
    final = Launch(corpus, save, ["--zero-stage", "1", "--train-iters", str(first + 2), "--eval-interval", "1000"])
    final_rc = final.wait()
    return dict(rc=rc, launch=launch, first=first, stop_s=stop_s, latest=latest, final=final, final_rc=final_rc)


def test_signal_during_evaluation_interrupts_it_saves_and_a_resume_continues(held, evaluated):
    e, save = evaluated, held["save"]
    text = e["launch"].text()
    assert e["rc"] == exitcodes.STOPPED, text[-3000:]
    assert f"iteration {e['first']}: valid evaluation interrupted after " in text and "of 5000 batches (" in text
    assert e["stop_s"] < 60
    assert e["latest"] == tag_for(e["first"])
    assert not any(r.get("iteration") == e["first"] and "val_loss" in r for r in records(save))
    assert e["final_rc"] == exitcodes.FINISHED, e["final"].text()[-3000:]
    logged = [r["iteration"] for r in records(save) if "loss" in r]
    assert logged[-2:] == [e["first"] + 1, e["first"] + 2]
    assert read_latest(str(save)) == tag_for(e["first"] + 2)


def test_stalled_rank_peers_watchdog_fires_and_no_rank_is_left(corpus, tmp_path):
    save = tmp_path / "ckpt"
    launch = Launch(corpus, save, ["--zero-stage", "1", "--train-iters", "100000", "--eval-interval", "1000",
                                   "--hang-timeout-s", "5"])
    try:
        launch.wait_for(lambda: last_iteration_logged(save) >= 2)
        ranks = rank_processes(launch)
        stalled = next(p for p in ranks if "--local_rank=1" in p.cmdline())
        stalled.send_signal(signal.SIGSTOP)
        rc = launch.wait(timeout=120)
        assert_all_gone(ranks, timeout=10)  # the launcher SIGKILLs the stopped rank
    finally:
        if launch.proc.poll() is None:
            launch.kill()
    assert rc == exitcodes.HUNG, launch.text()[-3000:]
    assert (save / "hang/rank0.txt").read_text().startswith("rank 0: no training step finished for ")
    assert not (save / "hang/rank1.txt").exists()  # a stopped process runs nothing, not even its watchdog


# ---- a full disk -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sync", "async"])
def disk_full(request, corpus, tmp_path_factory):
    """--save on a tmpfs with room for the iteration-2 checkpoint, not for the iteration-4 one."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI and the dev machines run tests as root)")
    save = tmp_path_factory.mktemp(f"full_{request.param}") / "ckpt"
    save.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(save)], check=True)
    try:
        extra = ["--zero-stage", "1", "--train-iters", "4", "--save-interval", "2", "--eval-interval", "1000"]
        launch = Launch(corpus, save, extra + (["--async-save"] if request.param == "async" else []))
        rc = launch.wait()
        files = sorted(str(p.relative_to(save)) for p in save.rglob("*"))
        yield dict(rc=rc, text=launch.text(), latest=read_latest(str(save)), files=files,
                   complete=is_complete(str(save), "iter_0000002"))
    finally:
        subprocess.run(["umount", str(save)], check=False)


def test_disk_full_during_save_is_one_line_and_keeps_the_previous_checkpoint(disk_full):
    text = disk_full["text"]
    assert disk_full["rc"] == exitcodes.FAILED, text[-3000:]
    [line] = error_lines(text)
    assert line.startswith("error: checkpoint iter_0000004 was not saved: rank ") and \
        "no space left on device (ENOSPC) writing " in line and "iter_0000004/" in line, line
    assert "its partial files were removed and `latest` still names iter_0000002" in line
    assert "Traceback" not in text
    assert disk_full["latest"] == "iter_0000002" and disk_full["complete"]
    assert not any(f.startswith("iter_0000004") for f in disk_full["files"]), disk_full["files"]
    assert not any(f.endswith(".tmp") for f in disk_full["files"]), disk_full["files"]
    assert LOCK not in disk_full["files"]
