"""Runs that survive, under the real `deepspeed --num_gpus 2` launcher (helpers from test_pretrain):

  hang      rank 1 sleeps before iteration 4 (--callbacks faults:sleep_at): every rank's watchdog
            (--hang-timeout-s) writes its stacks to <save>/hang/rank<R>.txt and the run exits 75;
            the steps before it logged every rank's step time and the slowest rank.
  async     --async-save with every write held open 4 s (faults:save_pause, in the writer
            thread): training runs past the save while `latest` stays on the previous tag; kill -9
            then, and the resume loads the previous checkpoint and replays the killed run's losses
            bit for bit; a later async save completes with meta.json and `latest`.
  spike     the global batches of iterations 7 and 8 are poisoned (faults:poison_samples: loss x 10):
            the guard skips both updates, then (--spike-rollback-after 2) rolls back to iteration 4,
            replays 5-6 bit for bit and passes over the two batches (logged with their samples);
            tools/inspect_batch.py decodes the samples of a step as the training data holds them.
  reshard   TP x PP x DP 1x1x2 (ZeRO-1): tools/checkpoint/reshard.py turns its iteration-4 checkpoint
            into TP=2, which resumes to iteration 8; a plain --load of that into PP=2 resumes to 12. With
            the Adam moments, step count and data position carried over, the losses equal an
            uninterrupted DP=2 run's (fp32, no dropout: up to float reduction order); a control resumed
            with --no-load-optim does not.
  moe       an MoE model at expert parallel 2 (ZeRO-2, --async-save): its checkpoint holds each expert once
            (DeepSpeed's per-expert files; megaclm's shards split by EP rank); reshard.py turns iteration 4 into TP=2
            (EP=1), which resumes to 6; a plain --load of that into DP=2 at EP=2 (ZeRO-1) resumes to 8, and
            the losses equal the uninterrupted EP=2 run's.
"""
import json
import signal
import subprocess
import sys

import pytest
import torch

from megaclm.checkpoint.layout import read_latest
from megaclm.config import MegaclmConfig
from megaclm.data.builder import build_train_valid_test
from megaclm.tokenizer import build_tokenizer
from test_pretrain import (REPO, SP_MODEL, Launch, corpus, last_iteration_logged, records,  # noqa: F401
                           remove_shm_buffers, run, train_losses)


def test_hang_watchdog_dumps_every_rank_and_exits(corpus, tmp_path):
    save = tmp_path / "ckpt"
    launch = Launch(corpus, save, ["--zero-stage", "1", "--train-iters", "50", "--hang-timeout-s", "5",
                                   "--eval-interval", "1000", "--callbacks", "faults:sleep_at=4@1"])
    rc = launch.wait(timeout=200)
    assert rc == 75, launch.text()[-3000:]
    stacks = {r: (save / f"hang/rank{r}.txt").read_text() for r in (0, 1)}
    for r, text in stacks.items():
        assert text.startswith(f"rank {r}: no training step finished for ") and "last finished iteration 3" in text
        assert "Current thread 0x" in text and "\nThread 0x" in text  # the watchdog's and the main thread's
    assert "faults.py" in stacks[1] and "in pre_step" in stacks[1]  # the sleeping rank is caught where it sleeps ...
    assert "faults.py" not in stacks[0] and "training/step.py" in stacks[0]  # ... its peer waits in a collective
    logged = [r for r in records(save) if "loss" in r]
    assert [r["iteration"] for r in logged] == [1, 2, 3]
    for r in logged:
        assert len(r["rank_step_time"]) == 2 and r["step_time_max"] == max(r["rank_step_time"])
        assert r["rank_step_time"][r["slowest_rank"]] == r["step_time_max"]


def test_async_save_survives_kill_9(corpus, tmp_path):
    save = tmp_path / "ckpt"
    extra = ["--zero-stage", "1", "--train-iters", "12", "--save-interval", "3", "--async-save"]
    killed = Launch(corpus, save, [*extra, "--callbacks", "faults:save_pause=4"])
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


def test_spike_guard_skips_then_rolls_back_and_replays(corpus, tmp_path):
    save = tmp_path / "ckpt"
    launch = run(corpus, save, ["--zero-stage", "1", "--train-iters", "12", "--save-interval", "4",
                                "--spike-zscore", "4", "--spike-window", "4", "--spike-action", "rollback",
                                "--spike-rollback-after", "2",
                                "--callbacks", "faults:poison_samples=96,112"])  # iterations 7 and 8 (global batch 16)
    text = launch.text()
    assert "iteration 7: loss" in text and "update skipped (1 in a row; samples 96..111)" in text
    assert "iteration 8: loss" in text and "update skipped (2 in a row; samples 112..127)" in text
    recs = records(save)
    [event] = [r for r in recs if "rollback" in r]
    assert event["rollback"] == 1 and event["rollback_to"] == "iter_0000004" and event["iteration"] == 4
    assert [(b["iteration"], b["samples"]) for b in event["skipped_batches"]] == [(7, [96, 111]), (8, [112, 127])]
    steps = [r for r in recs if "loss" in r]
    assert [r["iteration"] for r in steps] == list(range(1, 9)) + list(range(5, 13))
    first, replay = steps[:8], steps[8:]
    assert [r["loss"] for r in first[4:6]] == [r["loss"] for r in replay[:2]]  # the replay is bit-identical
    assert first[6]["loss"] is None and first[7]["loss"] is None  # the spikes are not in the averages
    assert first[7]["skipped_steps"] == 2 and replay[-1]["skipped_steps"] == 0  # progress rolled back too
    assert replay[2]["consumed_samples"] == 7 * 16 + 32 and replay[-1]["consumed_samples"] == 12 * 16 + 32
    assert "rollback 1 to iter_0000004 after loss spikes at iterations 7, 8" in text
    meta = json.loads((save / "iter_0000012/megaclm/meta.json").read_text())
    assert meta["client"]["data"]["sampler"]["skipped"] == [96, 112] and meta["rollbacks"] == 1

    def inspect(*args: str) -> list[dict]:
        r = subprocess.run([sys.executable, "tools/inspect_batch.py", "--load", str(save), "--tokens", *args],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]

    header, *samples = inspect("--iteration", "7")
    assert header["first_sample"] == 128 and [s["sample"] for s in samples] == list(range(128, 144))
    header, *poisoned = inspect("--first-sample", "96")
    # An independent read of the training dataset, sized as the trainer sizes it (+ 2 x 3 batches of room).
    cfg = MegaclmConfig.from_dict(json.loads((save / "iter_0000012/megaclm/config.json").read_text()))
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(SP_MODEL))
    train, _, _ = build_train_valid_test(cfg.data, seed=cfg.training.seed, train_samples=(12 + 6) * 16,
                                         valid_samples=32, test_samples=32, eod_id=tok.eod, global_batch_size=16)
    for s in poisoned:
        assert s["tokens"] == train[s["sample"]]["tokens"].tolist() and s["text"] == tok.detokenize(s["tokens"])
    assert [s["sample"] for s in poisoned] == list(range(96, 112))


def test_reshard_with_optimizer_continues_with_equal_losses(corpus, tmp_path):
    common = ["--zero-stage", "1", "--train-iters", "12", "--hidden-dropout", "0", "--attention-dropout", "0",
              "--eval-interval", "1000", "--eval-iters", "0"]
    run(corpus, tmp_path / "dp2", common + ["--save-interval", "4"])  # the reference; its iteration 4 is resharded
    r = subprocess.run([sys.executable, "tools/checkpoint/reshard.py", "--load", str(tmp_path / "dp2"), "--ckpt-step",
                        "4", "--out", str(tmp_path / "a_tp2"), "--tensor-model-parallel-size", "2"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "with the Adam moments and step" in r.stderr, r.stderr
    tp2 = run(corpus, tmp_path / "b", common + ["--tensor-model-parallel-size", "2", "--load", str(tmp_path / "a_tp2"),
                                                "--exit-interval", "8"])
    assert "saved as TP x PP x DP = 2 x 1 x 1, ZeRO-1 into TP x PP x DP = 2 x 1 x 1" in tp2.text()
    pp2 = run(corpus, tmp_path / "c", common + ["--pipeline-model-parallel-size", "2", "--load", str(tmp_path / "b")])
    assert "saved as TP x PP x DP = 2 x 1 x 1, ZeRO-1 into TP x PP x DP = 1 x 2 x 1" in pp2.text()
    full = train_losses(tmp_path / "dp2")
    got = {**train_losses(tmp_path / "b"), **train_losses(tmp_path / "c")}
    assert sorted(got) == list(range(5, 13))
    for it in range(5, 13):
        assert got[it] == pytest.approx(full[it], rel=1e-5, abs=1e-5), (it, got[it], full[it])
    assert [r["consumed_samples"] for r in records(tmp_path / "c") if "loss" in r] == [16 * i for i in range(9, 13)]
    # Control: the same TP=2 resume without the Adam moments drifts away from the reference at once.
    fresh = run(corpus, tmp_path / "d", common + ["--tensor-model-parallel-size", "2", "--load",
                                                  str(tmp_path / "a_tp2"), "--no-load-optim", "--exit-interval", "6"])
    assert "(weights, progress, data position" in fresh.text()
    drift = train_losses(tmp_path / "d")
    # (iteration 5's loss is the loaded weights' own; the moments shape the update after it)
    assert abs(drift[6] - full[6]) > 100 * max(abs(got[6] - full[6]), 1e-6), (drift[6], got[6], full[6])


MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001",
       "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-interval", "1000", "--eval-iters", "0",
       "--train-iters", "8"]


def test_moe_checkpoint_splits_experts_by_ep_rank_and_reshards(corpus, tmp_path):
    ref = tmp_path / "ep2"
    run(corpus, ref, MOE + ["--expert-model-parallel-size", "2", "--zero-stage", "2", "--save-interval", "4",
                            "--async-save"])
    ckpt = ref / "iter_0000004"
    # DeepSpeed's MoE layout: one file per (MoE layer, global expert), written by the rank holding it.
    assert sorted(p.name for p in ckpt.glob("layer_*_expert_*")) == sorted(
        f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in (0, 1) for e in range(4))
    assert not (ckpt / "megaclm/model").exists()  # a save writes DeepSpeed's files only
    assert json.loads((ckpt / "megaclm/meta.json").read_text())["expert_model_parallel_size"] == 2
    r = subprocess.run([sys.executable, "tools/checkpoint/reshard.py", "--load", str(ref), "--ckpt-step", "4",
                        "--out", str(tmp_path / "tp2_ckpt"), "--tensor-model-parallel-size", "2"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "with the Adam moments and step" in r.stderr, r.stderr
    # megaclm's fp32 shards, made from DeepSpeed's files in place by reshard.py: EP rank 0's file has everything it
    # holds, EP rank 1's only its experts 2 and 3.
    ep0, ep1 = (torch.load(ckpt / "megaclm/model" / name, weights_only=False)["tensors"]
                for name in ("tp00_pp000.pt", "tp00_pp000_ep001.pt"))
    ids = [sorted({int(k.split("deepspeed_experts.")[1].split(".")[0]) for k in t if "deepspeed_experts" in k})
           for t in (ep0, ep1)]
    assert ids == [[0, 1], [2, 3]] and all("deepspeed_experts" in k for k in ep1)
    tp2 = run(corpus, tmp_path / "tp2", MOE + ["--tensor-model-parallel-size", "2", "--zero-stage", "1", "--load",
                                               str(tmp_path / "tp2_ckpt"), "--exit-interval", "6"])
    back = run(corpus, tmp_path / "back", MOE + ["--expert-model-parallel-size", "2", "--zero-stage", "1", "--load",
                                                 str(tmp_path / "tp2")])
    assert "saved as TP x PP x DP = 2 x 1 x 1, ZeRO-1, EP 1 into TP x PP x DP = 1 x 1 x 2, ZeRO-1, EP 2" in back.text()
    full = train_losses(ref)
    got = {**train_losses(tmp_path / "tp2"), **train_losses(tmp_path / "back")}
    assert sorted(got) == list(range(5, 9))
    for it in range(5, 9):
        assert got[it] == pytest.approx(full[it], rel=1e-5, abs=1e-5), (it, got[it], full[it])
