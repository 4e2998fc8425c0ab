"""`--finetune` weights (megaclm.checkpoint.weights) on 2 gloo ranks: a checkpoint saved as TP=2 loads into
DeepSpeed engines of other layouts and ZeRO stages, and the optimizer continues from the loaded weights.

The checkpoint is written by megaclm.checkpoint.offline from a random full state dict (what an HF import
writes); each engine's parameters, gathered, must equal that state dict split for its own layout, also
after one optimizer step with lr 0 (which copies the fp32 master weights back: stale masters would
restore the random init).
"""
import os

import pytest
import torch

from mp_harness import run_ranks

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", "..", ".cache",
                                                           "torch_extensions"))

from megaclm.config import MegaclmConfig  # noqa: E402
from megaclm.config.model import ModelConfig  # noqa: E402

MODEL = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                    max_position_embeddings=32, position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                    add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0)
VOCAB = 256  # padded for TP=2 (divisible by 128 x 2)


def _engine(pstate, zero: int):
    import deepspeed

    from megaclm.model.gpt import GPTModel
    from megaclm.model.pipe import GPTPipelineModule

    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": zero, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "weight_decay": 0.0, "torch_adam": True}}}
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=zero == 3, mpu=pstate):
        model = GPTPipelineModule(MODEL, VOCAB, pstate) if pstate.pp_size > 1 else GPTModel(MODEL, VOCAB, pstate)
    kw = {} if pstate.pp_size > 1 else {"mpu": pstate}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds, **kw)
    return engine


def _max_diff(engine, expected) -> float:
    import deepspeed

    from megaclm.model.pipe import pipe_to_plain_key

    module, pipeline = engine.module, engine.module.__class__.__name__ == "GPTPipelineModule"
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return max((p.detach().float() - expected[pipe_to_plain_key(n, MODEL) if pipeline else n]).abs().max().item()
                   for n, p in module.named_parameters())


def _step(engine, pstate) -> None:
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    if pstate.pp_size > 1:
        engine.train_batch(data_iter=iter([((ids, pos), (ids, torch.ones(2, 16)))]))
    else:
        engine.backward(engine(ids, labels=ids).mean())
        engine.step()


def worker(rank, world, ckpt, full):
    import deepspeed

    from megaclm.checkpoint.weights import load_weights
    from megaclm.model.sharding import shard_state_dict
    from megaclm.parallel.random import model_parallel_seed
    from megaclm.parallel.state import ParallelState

    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for name, tp, pp, zero in (("zero3 dp2", 1, 1, 3), ("zero1 tp2", 2, 1, 1), ("zero1 pp2", 1, 2, 1)):
        pstate = ParallelState(world, rank, tp, pp)
        pstate.init_process_groups()
        model_parallel_seed(1, pstate.tp_rank, pstate.pp_rank)
        engine = _engine(pstate, zero)
        load_weights(engine, ckpt, "iter_0000000")
        expected = shard_state_dict(full, MODEL, tp, pstate.tp_rank)
        loaded = _max_diff(engine, expected)
        _step(engine, pstate)
        out[name] = (loaded, _max_diff(engine, expected))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from megaclm.checkpoint.offline import write_checkpoint
    from megaclm.model.gpt import GPTModel

    torch.manual_seed(0)
    full = {k: v.detach().clone() for k, v in GPTModel(MODEL, VOCAB).state_dict().items()}
    ckpt = str(tmp_path_factory.mktemp("finetune") / "ckpt")
    write_checkpoint(ckpt, MegaclmConfig(model=MODEL).to_dict(), full, tp=2, pp=1)
    return run_ranks(2, worker, ckpt, full, timeout=500)


@pytest.mark.parametrize("layout", ["zero3 dp2", "zero1 tp2", "zero1 pp2"])
def test_finetune_loads_a_tp2_checkpoint_into_another_layout(results, layout):
    for rank_result in results:
        loaded, after_step = rank_result[layout]
        assert loaded == 0.0
        assert after_step == 0.0  # lr 0: the fp32 master weights were refreshed from the loaded ones
