"""megaclm.utils.signals: the ranks' view of their `deepspeed` launcher (the launcher-level test, SIGTERM to the
real runner, is in tests/integration/test_signals.py)."""
import os
import subprocess
import sys
import time

from megaclm.utils.signals import StopRequests, deepspeed_launchers, process_start_time


def test_a_rank_under_deepspeeds_launch_py_watches_it_and_the_runner_above_it():
    # Stands in for `python -u -m deepspeed.launcher.launch ...`, started by this process (the runner).
    launch = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "deepspeed.launcher.launch"])
    try:
        end = time.time() + 10
        while not (watched := deepspeed_launchers(launch.pid)) and time.time() < end:  # until exec() is done
            time.sleep(0.01)
        assert watched == [(launch.pid, process_start_time(launch.pid)), (os.getpid(), process_start_time(os.getpid()))]
        requests = StopRequests()
        requests.launchers = watched
        assert requests.stop_reason() is None
        launch.kill()
        launch.wait()
        assert requests.stop_reason() == f"the deepspeed launcher (pid {launch.pid}) is gone"
    finally:
        launch.kill()


def test_other_parents_are_not_watched():
    assert deepspeed_launchers(os.getppid()) == []  # pytest's parent: a shell or CI runner, not launch.py


def test_a_zombie_counts_as_gone():
    child = subprocess.Popen(["sleep", "0.2"])
    assert process_start_time(child.pid) is not None
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped: a zombie
    assert process_start_time(child.pid) is None
    child.wait()
