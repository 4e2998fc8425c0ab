"""Resuming with another --global-batch-size, under the real `deepspeed --num_gpus 2` launcher (helpers from
test_pretrain): a run saved at global batch 16 resumes at 32 with an info line that names the change (not a
curriculum change), reads on from the checkpoint's consumed samples and keeps its iteration-based lr curve;
a schedule given in samples, or a sequence-length warmup, is refused before anything starts."""
import math
import os
import subprocess
import sys

import pytest

from megaclm.utils import exitcodes
from test_pretrain import REPO, base_args, corpus, records, remove_shm_buffers, run  # noqa: F401


COMMON = ["--zero-stage", "1", "--train-iters", "6", "--lr-decay-style", "cosine", "--lr-decay-iters", "10",
          "--eval-interval", "1000", "--eval-iters", "0"]


def lr_at(iteration: int) -> float:
    """base_args' schedule: --lr 3e-3, 2 warmup iterations, cosine to 0 over 10 (the lr of step `iteration`)."""
    x = iteration - 1  # the lr of a step is the schedule's at the iteration count before it
    return 3e-3 * x / 2 if x <= 2 else 3e-3 * (1 + math.cos(math.pi * (x - 2) / 8)) / 2


@pytest.fixture(scope="module")
def saved_at_16(corpus, tmp_path_factory):
    """Stopped (and saved) at iteration 4 of 6 by --exit-interval, at global batch 16."""
    save = tmp_path_factory.mktemp("gbs") / "ckpt"
    run(corpus, save, COMMON + ["--exit-interval", "4"])
    return save


def test_resume_with_a_larger_global_batch_continues(corpus, saved_at_16):
    resumed = run(corpus, saved_at_16, COMMON + ["--global-batch-size", "32"])
    log = resumed.text()
    assert ("resuming with global batch size 32 (the checkpoint's: 16, --load " f"{saved_at_16}/iter_0000004): the "
            "data continues at the checkpoint's consumed samples, each step now reads 32; iteration 4, consumed "
            "samples and tokens carry over; the lr schedule counts iterations: it continues from iteration 4 on the "
            "same curve, each iteration now 32 samples") in log, log[-3000:]
    assert "curriculum" not in log
    steps = {r["iteration"]: r for r in records(saved_at_16) if "loss" in r}
    assert sorted(steps) == list(range(1, 7))
    assert [steps[i]["consumed_samples"] for i in range(1, 7)] == [16, 32, 48, 64, 96, 128]
    assert [steps[i]["consumed_tokens"] for i in range(1, 7)] == [16 * 64 * i for i in range(1, 5)] + [96 * 64, 128 * 64]
    for i in range(1, 7):  # one lr curve across the change
        assert steps[i]["lr"] == pytest.approx(lr_at(i), rel=1e-6), (i, steps[i]["lr"])


@pytest.mark.parametrize("extra, message", [
    (["--lr-decay-iters", "0", "--lr-decay-samples", "160"],  # 10 iterations of 16 samples, 5 of 32
     "the lr schedule counts iterations but its lengths are given in samples or tokens (decay 10 -> 5 iterations)"),
    (["--curriculum-seqlen-start", "16", "--curriculum-seqlen-steps", "4"],
     "the sequence-length warmup and data-mixing phases are placed at steps of 16 samples"),
])
def test_resume_with_another_global_batch_is_refused_when_inexact(corpus, saved_at_16, extra, message):
    # --ckpt-step 4: the run at 16 (the test above may have saved iteration 6 at 32 since)
    argv = base_args(corpus, saved_at_16) + COMMON + ["--global-batch-size", "32", "--ckpt-step", "4",
                                                      "--validate-only", *extra]
    r = subprocess.run([sys.executable, "pretrain_gpt.py", *argv], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, WORLD_SIZE="2"))
    assert r.returncode == exitcodes.BAD_INPUT, r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].startswith(
        f"error: --global-batch-size 32 differs from the checkpoint's 16 (--load {saved_at_16}/iter_0000004): "
        f"{message}") and error[0].endswith("resume with --global-batch-size 16"), r.stderr
