"""Requests to stop from outside the run: SIGTERM/SIGUSR1, and a `deepspeed` launcher that is gone. L0: no torch.

    signals.install()         first thing in pretrain_gpt.py, before torch and DeepSpeed are imported
    signals.stop_reason()     "SIGTERM", "the deepspeed launcher (pid 123) is gone", or None

A signal is recorded, never fatal (SIGINT stays Ctrl-C). The run acts on it at its next safe point, agreed
by all ranks with one all-reduce (megaclm.training.callbacks.stop_agreed):
  start-up    once the process group exists, and again before the first step: exit 76, no checkpoint
              written (nothing was trained since the loaded one)
  training    after the current step: save, exit 76
  evaluation  after the current evaluation batch: evaluation abandoned, save, exit 76
Start-up is not cut short on the spot because what it does must not be killed half-way: DeepSpeed
JIT-builds ops under a lock in TORCH_EXTENSIONS_DIR that a killed build leaves behind (every later run then
waits on it), and a rank that leaves during the rendezvous makes its peers wait for the timeout.

The launcher: `deepspeed` (the runner) starts `python -m deepspeed.launcher.launch`, which starts the
ranks. On one node the runner installs no handler: SIGTERM to it alone kills it, launch.py lives on
(reparented) and forwards nothing, and the ranks would train to the end. So when a rank's parent is
DeepSpeed's launch.py, `install` records the parent and the runner above it (pid and start time, so a
reused pid is not mistaken for them) and `stop_reason` reports a stop once either has exited: the
ranks save and exit 76 as on SIGTERM, and launch.py exits after them. Other launchers (torchrun, srun)
forward SIGTERM to their ranks themselves.
"""
from __future__ import annotations

import os
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_DEEPSPEED_LAUNCH = "deepspeed.launcher.launch"


class StopRequests:
    """The process's record of stop requests (one per process: signal handlers are process-wide)."""

    def __init__(self):
        self.received: int | None = None
        self.installed = False
        self.launchers: list[tuple[int, int]] = []  # (pid, start time) of the launcher processes above this rank

    def install(self) -> None:
        if self.installed:
            return
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._record)
        self.installed = True
        self.launchers = deepspeed_launchers(os.getppid())

    def _record(self, signum, frame) -> None:
        self.received = signum

    def stop_reason(self) -> str | None:
        if self.received is not None:
            return signal.Signals(self.received).name
        for pid, start in self.launchers:
            if process_start_time(pid) != start:
                return f"the deepspeed launcher (pid {pid}) is gone"
        return None


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields from the state on (field 3), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # the command name in parentheses may hold spaces


def process_start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None when it is gone or a zombie."""
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def deepspeed_launchers(parent: int) -> list[tuple[int, int]]:
    """[(pid, start time)] of DeepSpeed's launch.py (the parent) and the runner above it; [] otherwise."""
    if _DEEPSPEED_LAUNCH not in _cmdline(parent):
        return []
    fields = _stat(parent)
    found = [(parent, process_start_time(parent))]
    runner = int(fields[1]) if fields else 1
    if runner > 1 and process_start_time(runner) is not None:
        found.append((runner, process_start_time(runner)))
    return [(pid, start) for pid, start in found if start is not None]


requests = StopRequests()
install = requests.install
stop_reason = requests.stop_reason
