"""Hang detection: a thread per rank that dumps every thread's stack and exits when no step finishes in time.

    dog = HangWatchdog(timeout_s=600, out_dir="<save>/hang", rank=rank)   # starts the thread
    after every step, evaluation batch and save:    dog.beat(iteration)
    at the end:                                       dog.close()

A rank stuck in a collective (a peer died, NCCL wedged) or in I/O never raises: the job just sits
until the scheduler's time limit. After `timeout_s` seconds without a beat, the watchdog writes

    <out_dir>/rank<R>.txt   a header (rank, last iteration, seconds idle) + faulthandler's stacks of all threads

fsyncs it, waits `GRACE_S` and ends the process with `HANG_EXIT_CODE` through os._exit (no atexit
handlers, no destructors: those could block on the same hang). Every rank runs its own watchdog, and
the ranks' last beats are close together (each step ends in a collective), so the stuck rank and the
ranks waiting for it in a collective all fire within one poll interval; the grace keeps the first one
alive until the others have written theirs (its exit would make their collectives fail, or the
launcher kill them, before they dump). The stuck rank is the one whose stack is not in a collective. slurm/pretrain_multinode.sbatch requeues on this exit code.

The thread needs the GIL to run; collectives, sleeps and file I/O release it. A C extension that
hangs while holding the GIL would also stop the watchdog.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

from megaclm.logging import get_logger
from megaclm.utils import exitcodes

log = get_logger("megaclm.train")

HANG_EXIT_CODE = exitcodes.HUNG
POLL_S = 1.0  # at most; shorter for short timeouts
GRACE_S = 3 * POLL_S  # > the spread of the ranks' firing times (one poll) plus the time to write a dump


class HangWatchdog:
    def __init__(self, timeout_s: float, out_dir: str | None, rank: int):
        self.timeout_s, self.out_dir, self.rank = timeout_s, out_dir, rank
        self.iteration = 0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="megaclm-hang-watchdog", daemon=True)
        self._thread.start()

    def beat(self, iteration: int) -> None:
        self.iteration, self._last = iteration, time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        poll = min(POLL_S, self.timeout_s / 4)
        while not self._stop.wait(poll):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._dump_and_exit(idle)

    def _dump_and_exit(self, idle: float) -> None:
        header = (f"rank {self.rank}: no training step finished for {idle:.1f} s (--hang-timeout-s {self.timeout_s:g}); "
                  f"last finished iteration {self.iteration}; pid {os.getpid()}; stacks of all threads:\n")
        if self.out_dir is None:  # no --save: stderr, where the launcher's log keeps it
            sys.stderr.write(header)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
        else:
            os.makedirs(self.out_dir, exist_ok=True)
            path = os.path.join(self.out_dir, f"rank{self.rank}.txt")
            with open(path, "w") as f:
                f.write(header)
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
                f.flush()
                os.fsync(f.fileno())
            sys.stderr.write(f"{header.splitlines()[0]}; stacks written to {path}; exiting with {HANG_EXIT_CODE}\n")
            sys.stderr.flush()
        time.sleep(GRACE_S)
        os._exit(HANG_EXIT_CODE)
