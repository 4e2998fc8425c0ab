"""Runs that survive, under the real `deepspeed --num_gpus 2` launcher (helpers from test_pretrain):

  hang      rank 1 sleeps before iteration 4 (MEGACLM_TEST_SLEEP_AT_ITER): every rank's watchdog
            (--hang-timeout-s) writes its stacks to <save>/hang/rank<R>.txt and the run exits 75;
            the steps before it logged every rank's step time and the slowest rank.
"""
import pytest

from test_pretrain import Launch, corpus, records, remove_shm_buffers  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


def test_hang_watchdog_dumps_every_rank_and_exits(corpus, tmp_path):
    save = tmp_path / "ckpt"
    launch = Launch(corpus, save, ["--zero-stage", "1", "--train-iters", "50", "--hang-timeout-s", "5",
                                   "--eval-interval", "1000"],
                    env={"MEGACLM_TEST_SLEEP_AT_ITER": "4", "MEGACLM_TEST_SLEEP_RANK": "1"})
    rc = launch.wait(timeout=200)
    assert rc == 75, launch.text()[-3000:]
    stacks = {r: (save / f"hang/rank{r}.txt").read_text() for r in (0, 1)}
    for r, text in stacks.items():
        assert text.startswith(f"rank {r}: no training step finished for ") and "last finished iteration 3" in text
        assert "Current thread 0x" in text and "\nThread 0x" in text  # the watchdog's and the main thread's
    assert "in _test_hang" in stacks[1]  # the sleeping rank is caught where it sleeps ...
    assert "in _test_hang" not in stacks[0] and "in train_step" in stacks[0]  # ... its peer waits in a collective
    logged = [r for r in records(save) if "loss" in r]
    assert [r["iteration"] for r in logged] == [1, 2, 3]
    for r in logged:
        assert len(r["rank_step_time"]) == 2 and r["step_time_max"] == max(r["rank_step_time"])
        assert r["rank_step_time"][r["slowest_rank"]] == r["step_time_max"]
