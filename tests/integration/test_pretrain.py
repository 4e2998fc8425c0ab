"""pretrain_gpt.py under the real `deepspeed` launcher, 2 CPU processes, a tiny GPT on real text.

One launch per configuration, shared by every assertion about it (module fixtures):
  zero0   ZeRO-0 fp32; a NaN loss injected at iteration 3 is skipped and counted
  zero1   ZeRO-1 bf16; SIGUSR1 to one rank mid-run -> both save at the same iteration, exit status 76 (stopped)
  zero2   ZeRO-2; --save-total-limit 2 + --save-best; --exit-interval stops early with a save (exit status 76)
  zero3   ZeRO-3 with stage3_param_persistence_threshold 0 (every parameter partitioned)
  tp2/pp2/moe_ep2
          TP=2 / PP=2 / a MoE model (4 experts, top-2, dropless) at expert parallel 2 in bf16: an
          uninterrupted run; a run killed with SIGKILL while saving its second checkpoint
          (the test callback faults:save_pause holds the save open); its resume from the previous
          checkpoint, whose losses must equal the uninterrupted run's bit for bit. The PP=2 runs
          also blend two datasets with a data-mixing schedule and warm the sequence length up.
Every run's loss must fall; the fp32 weights rebuilt from each layout's checkpoint
(megaclm.checkpoint.shards) must reproduce the validation loss the run logged.
"""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from megaclm.checkpoint.layout import read_best, read_latest
from megaclm.checkpoint.shards import load_full_state_dict
from megaclm.config import MegaclmConfig
from megaclm.data.builder import build_train_valid_test
from megaclm.data.indexed_dataset import IndexedDatasetBuilder
from megaclm.model.gpt import GPTModel
from megaclm.tokenizer import build_tokenizer
from megaclm.utils import exitcodes


REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SP_MODEL = REPO / "tests/data/sp_test_model.model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Hamlet + 500 Wikipedia summaries, SentencePiece (1000 pieces), one document each, eod appended."""
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(SP_MODEL))
    docs = [json.loads(line)["text"] for line in open(REPO / "tests/data/wiki_summaries_500.jsonl")]
    docs.append((REPO / "tests/data/hamlet.txt").read_text())
    prefix = str(tmp_path_factory.mktemp("corpus") / "text_document")
    builder = IndexedDatasetBuilder(prefix, np.uint16)
    for ids in tok.tokenize_batch(docs):
        builder.add_document(np.array(ids + [tok.eod]))
    builder.finalize()
    return prefix


@pytest.fixture(scope="module")
def corpus_pair(tmp_path_factory) -> tuple[str, str]:
    """Two datasets for blending: Wikipedia summaries 0-249, and 250-499 + Hamlet."""
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(SP_MODEL))
    docs = [json.loads(line)["text"] for line in open(REPO / "tests/data/wiki_summaries_500.jsonl")]
    parts = (docs[:250], docs[250:] + [(REPO / "tests/data/hamlet.txt").read_text()])
    prefixes = []
    for name, part in zip("ab", parts):
        prefix = str(tmp_path_factory.mktemp("pair") / f"{name}_text_document")
        builder = IndexedDatasetBuilder(prefix, np.uint16)
        for ids in tok.tokenize_batch(part):
            builder.add_document(np.array(ids + [tok.eod]))
        builder.finalize()
        prefixes.append(prefix)
    return prefixes[0], prefixes[1]


def base_args(corpus: str, save: Path) -> list[str]:
    return ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "64", "--max-position-embeddings", "64",
            "--micro-batch-size", "4", "--global-batch-size", "16", "--lr", "3e-3", "--lr-warmup-iters", "2",
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(SP_MODEL),
            "--data-path", corpus, "--split", "90,8,2", "--num-workers", "0",
            "--eval-interval", "6", "--eval-iters", "2", "--log-interval", "1",
            "--save", str(save), "--load", str(save)]


def with_tests_on_path(env: dict) -> dict:
    """`env` with tests/ first on PYTHONPATH: the runs import the fault-injection callbacks (tests/faults.py)."""
    path = os.pathsep.join(p for p in (str(REPO / "tests"), env.get("PYTHONPATH")) if p)
    return dict(env, PYTHONPATH=path)


class Launch:
    """`deepspeed --num_gpus 2 pretrain_gpt.py ...` in its own session (so it can be SIGKILLed whole)."""

    def __init__(self, corpus: str, save: Path, extra: list[str], env: dict | None = None,
                 launcher_args: tuple[str, ...] = ()):
        self.save, self.log, self.port = save, save.parent / f"{save.name}.{time.time_ns()}.log", free_port()
        cmd = [str(BIN / "deepspeed"), *launcher_args, "--num_gpus", "2", "--master_port", str(self.port),
               "pretrain_gpt.py", *base_args(corpus, save), *extra]
        full_env = dict(with_tests_on_path(os.environ), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions")),
                        **(env or {}))
        self.fh = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self.fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.fh.close()

    def text(self) -> str:
        return self.log.read_text()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.killpg(self.proc.pid, sig)

    def signal_rank(self, local_rank: int, sig: int) -> None:
        """Signal one training process (not the launcher, which would kill its children itself)."""
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            cmd = child.cmdline()
            if "pretrain_gpt.py" in cmd and f"--local_rank={local_rank}" in cmd:
                child.send_signal(sig)
                return
        raise AssertionError(f"no rank {local_rank} process found")

    def wait_for(self, predicate, timeout: float = 240) -> None:
        end = time.time() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (rc {self.proc.returncode}) before the expected moment:\n"
                                     + self.text()[-3000:])
            if time.time() > end:
                raise AssertionError("timed out:\n" + self.text()[-3000:])
            time.sleep(0.1)


def run(corpus: str, save: Path, extra: list[str], env: dict | None = None, rc: int | None = None) -> Launch:
    """Launch and wait; the exit status must be `rc` (default: 76, stopped, with --exit-interval; else 0)."""
    launch = Launch(corpus, save, extra, env)
    got = launch.wait()
    expected = rc if rc is not None else exitcodes.STOPPED if "--exit-interval" in extra else exitcodes.FINISHED
    assert got == expected, launch.text()[-5000:]
    return launch


def records(save: Path) -> list[dict]:
    return [json.loads(line) for line in open(save / "metrics.jsonl")]


def train_losses(save: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in records(save) if "loss" in r}


def last_iteration_logged(save: Path) -> int:
    path = save / "metrics.jsonl"
    return max((r["iteration"] for r in records(save) if "loss" in r), default=0) if path.exists() else 0


def assert_learns(save: Path) -> None:
    losses = [v for _, v in sorted(train_losses(save).items()) if v is not None]
    assert losses[0] == pytest.approx(math.log(1024), abs=0.3)  # ~ln(vocab) at init
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses


@pytest.fixture(scope="module", autouse=True)
def remove_shm_buffers():
    """Each launched rank leaves a 66 MiB /dev/shm/deepspeed_allreduce_buffer_*; remove the ones we made."""
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    yield
    for path in set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - before:
        path.unlink(missing_ok=True)


def valid_loss_from_checkpoint(save: Path) -> float:
    """The logged validation loss, recomputed from the checkpoint's rebuilt full fp32 model in this process."""
    ckpt = load_full_state_dict(str(save))
    cfg = MegaclmConfig.from_dict(ckpt.config)
    model = GPTModel(cfg.model, ckpt.meta["padded_vocab_size"]).eval()
    model.load_state_dict(ckpt.state_dict)
    gbs, eval_iters = cfg.training.global_batch_size, cfg.training.eval_iters
    _, valid, _ = build_train_valid_test(cfg.data, seed=cfg.training.seed, train_samples=1,
                                         valid_samples=eval_iters * gbs, eod_id=2, global_batch_size=gbs)
    mbs, total, count = cfg.training.micro_batch_size, 0.0, 0.0
    with torch.no_grad():
        for start in range(0, eval_iters * gbs, mbs):  # per token over every evaluated sample
            batch = [valid[i] for i in range(start, start + mbs)]
            tokens = torch.from_numpy(np.stack([b["tokens"] for b in batch]))
            labels = torch.from_numpy(np.stack([b["labels"] for b in batch]))
            mask = torch.from_numpy(np.stack([b["loss_mask"] for b in batch]))
            total += (model(tokens, labels=labels) * mask).sum().item()
            count += mask.sum().item()
    return total / count


# ---- ZeRO stages -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero0(corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("zero0") / "ckpt"
    return run(corpus, save, ["--zero-stage", "0", "--train-iters", "24", "--callbacks", "faults:nan_iters=3"])


@pytest.fixture(scope="module")
def zero1_bf16_preempted(corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("zero1") / "ckpt"
    launch = Launch(corpus, save, ["--zero-stage", "1", "--bf16", "--train-iters", "100000", "--eval-interval", "1000"])
    launch.wait_for(lambda: last_iteration_logged(save) >= 20)
    # SLURM's --signal=USR1@T warning; here it reaches rank 0 only: the ranks must still agree to stop.
    launch.signal_rank(0, signal.SIGUSR1)
    rc = launch.wait()
    assert rc == exitcodes.STOPPED, launch.text()[-5000:]
    return launch


@pytest.fixture(scope="module")
def zero2(corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("zero2") / "ckpt"
    return run(corpus, save, ["--zero-stage", "2", "--train-iters", "30", "--save-interval", "4",
                              "--save-total-limit", "2", "--save-best", "--exit-interval", "22"])


@pytest.fixture(scope="module")
def zero3(corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("zero3") / "ckpt"
    return run(corpus, save, ["--zero-stage", "3", "--zero-param-persistence-threshold", "0", "--train-iters", "24",
                              "--tensorboard-dir", str(save.parent / "tb"), "--wandb-project", "megaclm-test",
                              "--wandb-save-dir", str(save.parent / "wandb")], env={"WANDB_MODE": "offline"})


@pytest.fixture(scope="module")
def finetuned(corpus, zero3, tmp_path_factory):
    """Weights of the ZeRO-3 run, loaded into a ZeRO-1 run with --finetune: progress restarts."""
    save = tmp_path_factory.mktemp("finetune") / "ckpt"
    return run(corpus, save, ["--zero-stage", "1", "--train-iters", "4", "--load", str(zero3.save), "--finetune"])


def test_zero0_trains_and_skips_a_nan_step(zero0):
    save = zero0.save
    assert_learns(save)
    recs = {r["iteration"]: r for r in records(save) if "loss" in r}
    assert recs[3]["loss"] is None and recs[3]["skipped_steps"] == 1 and recs[24]["skipped_steps"] == 1
    assert "iteration 3: loss is nan; step skipped" in zero0.text()
    assert all(math.isfinite(recs[i]["grad_norm"]) for i in recs if i != 3)
    for key in ("iteration", "loss", "lr", "grad_norm", "tokens_per_sec", "tflops", "mfu", "consumed_samples",
                "consumed_tokens"):
        assert key in recs[5]
    assert recs[5]["consumed_samples"] == 5 * 16 and recs[5]["consumed_tokens"] == 5 * 16 * 64
    evals = [r for r in records(save) if "val_loss" in r]
    assert [r["iteration"] for r in evals] == [6, 12, 18, 24]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in evals)
    assert any("test_loss" in r for r in records(save))


def test_zero1_bf16_preemption_signal_saves_and_exits_cleanly(zero1_bf16_preempted):
    save = zero1_bf16_preempted.save
    assert_learns(save)
    stopped = last_iteration_logged(save)
    assert read_latest(str(save)) == f"iter_{stopped:07d}"
    meta = json.loads((save / f"iter_{stopped:07d}/megaclm/meta.json").read_text())
    assert meta["precision"] == "bf16" and meta["iteration"] == stopped and meta["zero_stage"] == 1
    assert f"stopping at iteration {stopped}: SIGUSR1" in zero1_bf16_preempted.text()  # rank 0 got it


def test_zero2_save_total_limit_best_and_exit_interval(zero2):
    save = zero2.save
    assert_learns(save)
    assert last_iteration_logged(save) == 22 and read_latest(str(save)) == "iter_0000022"
    best = read_best(str(save))
    evals = {r["iteration"]: r["val_loss"] for r in records(save) if "val_loss" in r}
    assert best["val_loss"] == min(evals.values()) and best["tag"] == f"iter_{min(evals, key=evals.get):07d}"
    tags = sorted(p.name for p in save.iterdir() if p.name.startswith("iter_"))
    assert tags == sorted({"iter_0000020", "iter_0000022", best["tag"]})


def test_zero3_trains_partitioned_and_logs_everywhere(zero3):
    assert_learns(zero3.save)
    assert valid_loss_from_checkpoint(zero3.save) == pytest.approx(
        [r["val_loss"] for r in records(zero3.save) if "val_loss" in r][-1], abs=2e-4)
    assert list((zero3.save.parent / "tb").glob("events.out.tfevents.*"))
    assert list((zero3.save.parent / "wandb/wandb").glob("offline-run-*"))


def test_finetune_starts_from_weights_only(zero3, finetuned):
    first = records(finetuned.save)[0]
    assert first["iteration"] == 1 and first["consumed_samples"] == 16  # progress restarted
    # ... from the trained weights: nowhere near ln(vocab), close to where the ZeRO-3 run ended
    assert first["loss"] < train_losses(zero3.save)[24] + 0.3 < math.log(1024) - 0.5
    assert "loaded checkpoint" in finetuned.text() and "(weights only)" in finetuned.text()


# ---- TP=2 / PP=2: kill -9 during a save, then resume bit-exactly ------------------------------------------


def kill_during_second_save(corpus: str, save: Path, extra: list[str]) -> Launch:
    launch = Launch(corpus, save, [*extra, "--callbacks", "faults:save_pause=3"])
    launch.wait_for(lambda: (save / "iter_0000006").is_dir() and read_latest(str(save)) == "iter_0000003")
    time.sleep(0.5)  # inside the save's pause: DeepSpeed files of iter 6 written, `latest` not yet
    launch.kill(signal.SIGKILL)
    launch.wait()
    return launch


# PP=2 also runs the data curriculum: a sequence-length warmup 32 -> 64 over 6 steps and a blend of two
# datasets whose weights switch after 3,000 tokens, so the resume covers the curriculum state too.
CURRICULUM = ["--curriculum-seqlen-start", "32", "--curriculum-seqlen-steps", "6", "--data-mixing-schedule",
              "0:0.8,0.2", "3000:0.3,0.7"]


# MoE: both ranks are one expert-parallel group, each holds and runs 2 of the 4 experts on tokens of both ranks;
# bf16 at ZeRO-1 is DeepSpeed's BF16_Optimizer, with its MoE parameter groups and per-expert checkpoint files.
MOE_EP2 = ["--num-experts", "4", "--moe-router-topk", "2", "--expert-model-parallel-size", "2",
           "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001", "--bf16"]


@pytest.fixture(scope="module", params=["tp2", "pp2", "moe_ep2"])
def layout(request, corpus, corpus_pair, tmp_path_factory):
    extra = {"tp2": ["--tensor-model-parallel-size", "2"],
             "pp2": ["--pipeline-model-parallel-size", "2", "--data-path", "0.5", corpus_pair[0], "0.5",
                     corpus_pair[1], *CURRICULUM],
             "moe_ep2": MOE_EP2}[request.param]
    extra = extra + ["--zero-stage", "1", "--train-iters", "12", "--save-interval", "3"]
    root = tmp_path_factory.mktemp(request.param)
    uninterrupted = run(corpus, root / "a", extra)
    killed = kill_during_second_save(corpus, root / "b", extra)
    after_kill = {"latest": read_latest(str(root / "b")),
                  "partial_has_meta": (root / "b/iter_0000006/megaclm/meta.json").exists(),
                  "partial_exists": (root / "b/iter_0000006").exists()}
    resumed = run(corpus, root / "b", extra)
    return request.param, uninterrupted, killed, after_kill, resumed


def test_kill_during_save_leaves_previous_checkpoint(layout):
    _, _, _, after_kill, resumed = layout
    assert after_kill == {"latest": "iter_0000003", "partial_has_meta": False, "partial_exists": True}
    assert "loaded checkpoint" in resumed.text() and "iter_0000003" in resumed.text()


def test_resume_after_kill_is_bit_identical(layout):
    name, uninterrupted, _, _, resumed = layout
    full = train_losses(uninterrupted.save)
    # The resumed run dropped the killed run's rows past its checkpoint (iterations 4..6) before logging 4..12
    # (megaclm.logging.metrics_file): each iteration once, in order.
    resumed_losses = train_losses(resumed.save)
    assert [r["iteration"] for r in records(resumed.save) if "loss" in r] == list(range(1, 13))
    for it in range(4, 13):
        assert resumed_losses[it] == full[it], (name, it, resumed_losses[it], full[it])
    assert_learns(uninterrupted.save)
    if name == "moe_ep2":  # the router losses (part of the training loss) resume exactly as well
        full_router, resumed_router = ({r["iteration"]: (r["router_loss"], r["moe_aux_loss"], r["moe_z_loss"])
                                        for r in records(save) if "loss" in r}
                                       for save in (uninterrupted.save, resumed.save))
        assert all(resumed_router[it] == full_router[it] for it in range(4, 13))
        assert full_router[1][1] == pytest.approx(1.0, abs=0.1)  # 4 experts, balanced at init


def test_consumed_tokens_follow_the_sequence_length_schedule(layout):
    name, uninterrupted, _, _, resumed = layout
    # PP=2: 32 + (64 - 32) * step / 6, rounded down to a multiple of 8, until step 6 reaches 64; TP=2: 64
    lengths = [32, 32, 40, 48, 48, 56] + [64] * 6 if name == "pp2" else [64] * 12
    expected = {i + 1: 16 * sum(lengths[: i + 1]) for i in range(12)}
    for save in (uninterrupted.save, resumed.save):
        got = {r["iteration"]: r["consumed_tokens"] for r in records(save) if "loss" in r}
        assert got == expected


def test_layout_checkpoint_rebuilds_full_model(layout):
    _, uninterrupted, _, _, _ = layout
    logged = [r["val_loss"] for r in records(uninterrupted.save) if "val_loss" in r][-1]
    assert valid_loss_from_checkpoint(uninterrupted.save) == pytest.approx(logged, abs=2e-4)
