"""Fault injection for the tests: training-loop callbacks (megaclm.training.callbacks), passed to a run as
`--callbacks faults:FACTORY=ARG`; the launch harnesses put tests/ on PYTHONPATH (tests/integration/test_pretrain.py
`with_tests_on_path`).

    faults:nan_iters=3,5          the losses of iterations 3 and 5 (1-based) are NaN: each step is skipped
    faults:poison_samples=96,112  the global batches starting at these samples have their loss x POISON_SCALE: a
                                  deterministic spike, tied to the data (a replay after a rollback that skipped it
                                  never sees it again)
    faults:sleep_at=4@1           rank 1 sleeps for an hour before iteration 4: a hang for the watchdog
    faults:step_pause=0.25        every rank waits 0.25 s before each step: steps slow enough for a test that
                                  polls metrics.jsonl to act between two given iterations
    faults:save_pause=3           every save holds 3 s once this rank's files are written, before the checkpoint is
                                  complete and `latest` moves (with --async-save in the writer thread): a window
                                  for kill -9 mid-save
"""
import time

POISON_SCALE = 10.0


def _ints(arg: str) -> set[int]:
    return {int(x) for x in arg.split(",") if x}


class NanIters:
    def __init__(self, iters: set[int]):
        self.iters = iters

    def pre_step(self, trainer) -> None:
        if trainer.progress.iteration + 1 in self.iters:
            trainer.train_step.loss_factor = float("nan")


class PoisonSamples:
    def __init__(self, samples: set[int]):
        self.samples = samples

    def pre_step(self, trainer) -> None:
        if trainer.progress.consumed_samples in self.samples:
            trainer.train_step.loss_factor = POISON_SCALE


class SleepAt:
    def __init__(self, iteration: int, rank: int):
        self.iteration, self.rank = iteration, rank

    def pre_step(self, trainer) -> None:
        if trainer.progress.iteration + 1 == self.iteration and trainer.pstate.rank == self.rank:
            time.sleep(3600)


class StepPause:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def pre_step(self, trainer) -> None:
        time.sleep(self.seconds)


class SavePause:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def checkpoint_files_written(self, tag: str) -> None:
        time.sleep(self.seconds)


def nan_iters(arg: str) -> NanIters:
    return NanIters(_ints(arg))


def poison_samples(arg: str) -> PoisonSamples:
    return PoisonSamples(_ints(arg))


def sleep_at(arg: str) -> SleepAt:
    """ITERATION@RANK (rank 0 without @RANK)."""
    iteration, _, rank = arg.partition("@")
    return SleepAt(int(iteration), int(rank or 0))


def step_pause(arg: str) -> StepPause:
    return StepPause(float(arg))


def save_pause(arg: str) -> SavePause:
    return SavePause(float(arg))
