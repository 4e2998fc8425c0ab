"""Quiet by default and no /dev/shm leftovers: the real `deepspeed --num_gpus 2` launcher (helpers from test_pretrain).

  quiet    launched as examples/demo.sh launches (DS_ACCELERATOR=cpu exported, `deepspeed --log_level error`):
           no line says warn/error/unable/fail, the datasets line comes once (rank 0), and the ranks' 66 MiB
           /dev/shm/deepspeed_allreduce_buffer_* files of the run are gone when it has finished
  sigterm  with --verbose, SIGTERM to both ranks after the first step: the hidden lines are back (DeepSpeed's
           all_gather FutureWarning, the datasets line of each rank), the run stops (exit 76), and its buffer
           files are gone too
"""
import re
import signal
from pathlib import Path

import psutil
import pytest

from megaclm.utils import exitcodes
from test_pretrain import Launch, corpus, last_iteration_logged, remove_shm_buffers  # noqa: F401


ALARM = re.compile(r"warn|error|unable|fail", re.IGNORECASE)
DEMO_LAUNCH = dict(env={"DS_ACCELERATOR": "cpu"}, launcher_args=("--log_level", "error"))


def buffers(port: int) -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def rank_processes(launch: Launch) -> list[psutil.Process]:
    return [p for p in psutil.Process(launch.proc.pid).children(recursive=True)
            if any(arg.startswith("--local_rank=") for arg in p.cmdline())]


@pytest.fixture(scope="module")
def quiet(corpus, tmp_path_factory):
    launch = Launch(corpus, tmp_path_factory.mktemp("quiet") / "ckpt", ["--train-iters", "3", "--zero-stage", "1",
                                                                        "--eval-interval", "3"], **DEMO_LAUNCH)
    rc = launch.wait()
    return dict(rc=rc, text=launch.text(), left=buffers(launch.port))


@pytest.fixture(scope="module")
def sigterm(corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("sigterm") / "ckpt"
    launch = Launch(corpus, save, ["--train-iters", "100000", "--zero-stage", "1", "--verbose"], **DEMO_LAUNCH)
    try:
        launch.wait_for(lambda: last_iteration_logged(save) >= 1)
        during = buffers(launch.port)
        ranks = rank_processes(launch)
        for p in ranks:
            p.send_signal(signal.SIGTERM)
        rc = launch.wait(timeout=120)
        psutil.wait_procs(ranks, timeout=30)
    finally:
        if launch.proc.poll() is None:
            launch.kill()
    return dict(rc=rc, text=launch.text(), during=during, left=buffers(launch.port))


def test_a_launch_prints_no_alarming_line_and_the_datasets_line_once(quiet):
    assert quiet["rc"] == exitcodes.FINISHED, quiet["text"][-4000:]
    assert [line for line in quiet["text"].splitlines() if ALARM.search(line)] == []
    assert sum("megaclm.data INFO] datasets:" in line for line in quiet["text"].splitlines()) == 1
    assert "done at iteration 3 (finished)" in quiet["text"]


def test_a_finished_run_leaves_no_shm_buffer(quiet):
    assert quiet["rc"] == exitcodes.FINISHED
    assert quiet["left"] == []


def test_verbose_shows_the_hidden_lines_and_a_sigterm_stopped_run_leaves_no_shm_buffer(sigterm):
    text = sigterm["text"]
    assert sigterm["rc"] == exitcodes.STOPPED, text[-4000:]
    assert len(sigterm["during"]) == 2  # one per rank while it ran: the files the run must remove
    assert sigterm["left"] == []
    assert "FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated" in text
    assert sum("megaclm.data INFO] datasets:" in line for line in text.splitlines()) == 2
