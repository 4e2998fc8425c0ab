"""Runs that survive, under the real `deepspeed --num_gpus 2` launcher (helpers from test_pretrain):

  hang      rank 1 sleeps before iteration 4 (MEGACLM_TEST_SLEEP_AT_ITER): every rank's watchdog
            (--hang-timeout-s) writes its stacks to <save>/hang/rank<R>.txt and the run exits 75;
            the steps before it logged every rank's step time and the slowest rank.
  async     --async-save with every write held open 4 s (MEGACLM_TEST_SAVE_PAUSE_S, in the writer
            thread): training runs past the save while `latest` stays on the previous tag; kill -9
            then, and the resume loads the previous checkpoint and replays the killed run's losses
            bit for bit; a later async save completes with meta.json and `latest`.
"""
import signal

import pytest

from megaclm.checkpoint.layout import read_latest
from test_pretrain import (Launch, corpus, last_iteration_logged, records, remove_shm_buffers,  # noqa: F401
                           run, train_losses)

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


def test_async_save_survives_kill_9(corpus, tmp_path):
    save = tmp_path / "ckpt"
    extra = ["--zero-stage", "1", "--train-iters", "12", "--save-interval", "3", "--async-save"]
    killed = Launch(corpus, save, extra, env={"MEGACLM_TEST_SAVE_PAUSE_S": "4"})
    # The save of iteration 6 is being written (its directory exists, `latest` is still iteration 3) while
    # training has gone on to iteration 8: the step loop did not wait for the write.
    killed.wait_for(lambda: last_iteration_logged(save) >= 8)
    during = {"latest": read_latest(str(save)), "iter6": (save / "iter_0000006").is_dir(),
              "iter6_complete": (save / "iter_0000006/megaclm/meta.json").exists()}
    killed.kill(signal.SIGKILL)
    killed.wait()
    assert during == {"latest": "iter_0000003", "iter6": True, "iter6_complete": False}, killed.text()[-3000:]
    assert read_latest(str(save)) == "iter_0000003" and not (save / "iter_0000006/megaclm/meta.json").exists()
    before = train_losses(save)  # the killed run's iterations 1..8 (or a little more)
    resumed = run(corpus, save, extra)
    assert "loaded checkpoint" in resumed.text() and "iter_0000003" in resumed.text()
    after = train_losses(save)
    for it in range(4, 9):
        assert after[it] == before[it], (it, after[it], before[it])
    assert read_latest(str(save)) == "iter_0000012" and (save / "iter_0000012/megaclm/meta.json").exists()
    assert (save / "iter_0000009/megaclm/meta.json").exists()
