"""Trainer pieces that need no launcher: checkpoint tags/latest/pruning, RNG capture, the ZeRO-0 fp32
optimizer (clip + skip vs torch's AdamW), weight-decay groups and the metrics file."""
import json
import math
import random

import numpy as np
import pytest
import torch

from megaclm.checkpoint.deepspeed_ckpt import load_checkpoint, mark_best, prune
from megaclm.checkpoint.layout import is_complete, iteration_of, read_best, read_latest, read_meta, tag_for
from megaclm.checkpoint.rng import get_rng_state, set_rng_state
from megaclm.config.logging import LoggingConfig
from megaclm.config.model import ModelConfig
from megaclm.model.gpt import GPTModel
from megaclm.parallel.random import model_parallel_seed, rng_tracker
from megaclm.parallel.state import ParallelState
from megaclm.training.engine import SkipNonFiniteAdamW, param_groups
from megaclm.training.metrics import MetricsLogger
from megaclm.utils.errors import UserError


def fake_checkpoints(root, iterations, complete=True):
    for it in iterations:
        d = root / tag_for(it) / "megaclm"
        d.mkdir(parents=True)
        if complete:
            (d / "meta.json").write_text(json.dumps({"iteration": it}))
    (root / "latest").write_text(tag_for(max(iterations)))


def test_tags_and_latest(tmp_path):
    assert tag_for(100) == "iter_0000100" and iteration_of("iter_0000100") == 100 and iteration_of("latest") is None
    assert read_latest(str(tmp_path)) is None
    fake_checkpoints(tmp_path, [3, 6])
    assert read_latest(str(tmp_path)) == "iter_0000006" and read_meta(str(tmp_path))["iteration"] == 6


def test_incomplete_checkpoint_is_refused(tmp_path):
    fake_checkpoints(tmp_path, [3])
    (tmp_path / "iter_0000006").mkdir()  # a save that died before meta.json
    assert is_complete(str(tmp_path), "iter_0000003") and not is_complete(str(tmp_path), "iter_0000006")
    with pytest.raises(UserError, match="iter_0000006' is incomplete"):
        read_meta(str(tmp_path), "iter_0000006")
    with pytest.raises(UserError, match="no `latest` file"):
        read_meta(str(tmp_path / "nothing"))


def test_prune_keeps_newest_and_best(tmp_path):
    fake_checkpoints(tmp_path, [2, 4, 6, 8, 10])
    mark_best(str(tmp_path), "iter_0000004", 3.5)
    assert read_best(str(tmp_path)) == {"tag": "iter_0000004", "val_loss": 3.5}
    assert prune(str(tmp_path), keep=2) == ["iter_0000002", "iter_0000006"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("iter_")) == [
        "iter_0000004", "iter_0000008", "iter_0000010"]
    assert prune(str(tmp_path), keep=1) == ["iter_0000008"]


def test_rng_state_round_trip():
    model_parallel_seed(7)
    state = get_rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(3), _tracker_draw())
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3), _tracker_draw())
    assert draws[0] == again[0] and draws[1] == again[1]
    assert torch.equal(draws[2], again[2]) and torch.equal(draws[3], again[3])


def _tracker_draw():
    with rng_tracker().fork("model-parallel-rng"):
        return torch.rand(3)


def _params(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]


def test_skip_nonfinite_adamw_matches_torch_with_clipping():
    ours, ref = _params(), _params()
    opt = SkipNonFiniteAdamW([{"params": ours}], clip_grad=0.5, pstate=ParallelState(1, 0), lr=0.1,
                             weight_decay=0.1)
    ref_opt = torch.optim.AdamW([{"params": ref}], lr=0.1, weight_decay=0.1)
    for step in range(3):
        grads = [torch.randn_like(p) * (step + 1) for p in ours]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
        opt.step()
        ref_opt.step()
        assert opt._global_grad_norm == pytest.approx(norm.item()) and not opt.overflow
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q)


def test_skip_nonfinite_adamw_skips_nan_step():
    ours = _params()
    opt = SkipNonFiniteAdamW([{"params": ours}], clip_grad=1.0, pstate=ParallelState(1, 0), lr=0.1)
    before = [p.detach().clone() for p in ours]
    ours[0].grad = torch.full_like(ours[0], float("nan"))
    ours[1].grad = torch.ones_like(ours[1])
    opt.step()
    assert opt.overflow and not math.isfinite(opt._global_grad_norm)
    assert all(torch.equal(p, b) for p, b in zip(ours, before)) and not opt.state
    assert all(p.grad is None for p in ours)


def test_weight_decay_groups_exclude_norms_and_biases():
    model = GPTModel(ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, max_position_embeddings=8), 64)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") and p.dim() == 2 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"final_norm.weight", "final_norm.bias",
                                                           "layers.0.attention.qkv.bias"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("tied", [True, False])
def test_decoupled_lr_group_holds_the_embedding_and_output_layer(tied):
    model = GPTModel(ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, max_position_embeddings=16,
                                 untie_embeddings_and_output_weights=not tied), 64)
    assert len(param_groups(model, 0.1)) == 2
    groups = param_groups(model, 0.1, decoupled_lr=True)
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups[2]["decoupled_lr"] and groups[2]["weight_decay"] == 0.1
    want = {"embedding.word_embeddings.weight"} | (set() if tied else {"output_layer.weight"})
    assert {names[id(p)] for p in groups[2]["params"]} == want
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_metrics_file_records(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    log = MetricsLogger(LoggingConfig(log_interval=1, progress_bar=False), writer=True, metrics_file=str(path),
                        total_iters=10, start_iter=0, run_config={}, default_wandb_dir=None)
    log.train({"iteration": 1, "consumed_samples": 8, "consumed_tokens": 512, "loss": 2.5, "lr": 1e-3,
               "grad_norm": 0.7, "loss_scale": None, "tokens_per_sec": 100.0, "tflops": 0.1, "mfu": None,
               "step_time": 0.2, "memory_gb": 1.0, "skipped_steps": 0})
    log.evaluation(1, "val", 2.0)
    log.close()
    train, val = [json.loads(line) for line in path.read_text().splitlines()]
    assert train["loss"] == 2.5 and train["consumed_tokens"] == 512
    assert val == {"iteration": 1, "val_loss": 2.0, "val_ppl": pytest.approx(math.exp(2.0))}
    silent = MetricsLogger(LoggingConfig(), writer=False, metrics_file=str(tmp_path / "x.jsonl"), total_iters=1,
                           start_iter=0, run_config={}, default_wandb_dir=None)
    silent.evaluation(1, "val", 1.0)
    assert not (tmp_path / "x.jsonl").exists()


def test_non_finite_metrics_are_written_as_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLogger(LoggingConfig(log_interval=1, progress_bar=False), writer=True, metrics_file=str(path),
                        total_iters=10, start_iter=0, run_config={}, default_wandb_dir=None)
    log.train({"iteration": 1, "consumed_samples": 8, "consumed_tokens": 512, "loss": 2.5, "lr": 1e-3,
               "grad_norm": float("nan"), "loss_scale": None, "tokens_per_sec": 100.0, "tflops": 0.1, "mfu": None,
               "step_time": 0.2, "memory_gb": 1.0, "skipped_steps": 0})
    log.evaluation(1, "val", float("inf"))
    log.close()
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    train, val = [json.loads(line) for line in text.splitlines()]
    assert train["grad_norm"] is None and train["loss"] == 2.5
    assert val == {"iteration": 1, "val_loss": None, "val_ppl": None}


@pytest.mark.parametrize("value", ["two", "-1", "0"])
def test_bad_omp_num_threads_is_one_clear_error(value, monkeypatch):
    from megaclm.training import pretrain

    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(UserError, match="OMP_NUM_THREADS"):
        pretrain.set_thread_count()


def test_resume_into_another_layout_needs_layout_independent_state(tmp_path):
    """A checkpoint of another layout is loaded from megaclm's own files (made from DeepSpeed's if it lacks
    them); one without progress (written by an older megaclm), without DeepSpeed's files to convert, or
    without optimizer state is refused before the engine is touched, with what to do instead."""
    d = tmp_path / tag_for(5) / "megaclm"
    d.mkdir(parents=True)
    meta = {"iteration": 5, "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
            "data_parallel_size": 1, "zero_stage": 1}
    (d / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "latest").write_text(tag_for(5))
    with pytest.raises(UserError, match="records no progress in meta.json .* pass --finetune"):
        load_checkpoint(None, str(tmp_path), tag_for(5), layout=(1, 2, 1, 1, 1))
    (d / "meta.json").write_text(json.dumps({**meta, "client": {"progress": {}}}))
    with pytest.raises(UserError, match="neither megaclm's layout-independent files .* nor DeepSpeed's"):
        load_checkpoint(None, str(tmp_path), tag_for(5), layout=(1, 2, 1, 1, 1))
    (d / "model").mkdir()  # weights only (an HF import, or reshard.py of a checkpoint without moments)
    with pytest.raises(UserError, match="no layout-independent optimizer state .* --no-load-optim"):
        load_checkpoint(None, str(tmp_path), tag_for(5), layout=(1, 2, 1, 1, 1))


def test_exit_on_missing_checkpoint(tmp_path):
    from megaclm.training import pretrain

    assert load_checkpoint(None, str(tmp_path), None) is None  # nothing there: a fresh start
    with pytest.raises(UserError, match="no checkpoint there and --exit-on-missing-checkpoint"):
        pretrain.main(["--load", str(tmp_path), "--exit-on-missing-checkpoint", "--validate-only", "--mock-data",
                       "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
                       "--max-position-embeddings", "64", "--micro-batch-size", "1", "--train-iters", "4",
                       "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"])

