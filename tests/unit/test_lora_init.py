"""LoRA across layouts. Adapters start the same at any layout: init_adapters draws each A whole from the run's seed and the
adapter's GPTModel name (not from wherever the default generator stands after the layers built before it), and
a row-parallel A keeps its rank's columns of that whole draw. Found by the layout fuzzer: at PP=2 the second
stage's adapters started differently from PP=1's (tests/fuzz/regressions.txt)."""
import dataclasses

import torch

from megaclm.config.lora import LoraConfig
from megaclm.config.model import ModelConfig
from megaclm.model.gpt import GPTModel
from megaclm.model.lora import freeze_base, init_adapters

CONFIG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=16)
LORA = LoraConfig(lora_rank=4)


def _adapters(model):
    return {k: p.detach().clone() for k, p in model.named_parameters() if k.endswith(".lora_a")}


def test_adapters_do_not_depend_on_the_generator_state_at_build():
    torch.manual_seed(1)
    first = GPTModel(CONFIG, 64, lora=LORA)
    torch.manual_seed(2)
    second = GPTModel(CONFIG, 64, lora=LORA)
    before = _adapters(second)
    assert init_adapters(first, 7, 1, 0) == init_adapters(second, 7, 1, 0) == 8  # qkv, proj, fc1, fc2 x 2 layers
    a, b = _adapters(first), _adapters(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], before[k]) for k in a)  # redrawn, not kept
    init_adapters(second, 8, 1, 0)  # another seed, other adapters
    assert not torch.equal(_adapters(second)["layers.0.attention.qkv.lora_a"], a["layers.0.attention.qkv.lora_a"])


def test_a_split_adapter_keeps_its_columns_of_the_whole_draw():
    torch.manual_seed(0)
    whole = GPTModel(CONFIG, 64, lora=LORA)
    init_adapters(whole, 7, 1, 0)
    key = "layers.1.mlp.fc2.lora_a"  # row-parallel: A (r, in) is split along its input at TP > 1
    shard = torch.nn.Parameter(torch.empty(4, whole.get_parameter(key).shape[1] // 2))
    shard.tensor_model_parallel = True
    holder = torch.nn.Module()
    holder.fc2 = torch.nn.Module()
    holder.fc2.register_parameter("lora_a", shard)
    assert init_adapters(holder, 7, 2, 1, plain_name=lambda name: key) == 1
    assert torch.equal(shard.detach(), whole.get_parameter(key).detach().chunk(2, dim=1)[1])


def test_full_recomputation_trains_adapters_behind_a_frozen_embedding():
    """The first layers' input (the frozen embedding's output) needs no grad: recomputation must still give the
    adapters their gradients (the reentrant checkpoint gave none, and the loss no grad_fn: found by the fuzzer,
    TP=2 + SP, ZeRO-2, LoRA, full recomputation)."""
    ids = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = {}
    for granularity, method in ((None, "uniform"), ("full", "uniform"), ("full", "block")):
        torch.manual_seed(0)
        config = dataclasses.replace(CONFIG, hidden_dropout=0.0, attention_dropout=0.0,
                                     recompute_granularity=granularity, recompute_method=method)
        model = GPTModel(config, 64, lora=LORA)
        freeze_base(model)
        loss = model(ids, labels=ids).mean()
        assert loss.grad_fn is not None, (granularity, method)
        loss.backward()
        grads[granularity, method] = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    plain = grads[None, "uniform"]
    assert plain and all(k.endswith(".lora_b") or k.endswith(".lora_a") for k in plain)
    assert any(g.abs().max() > 0 for g in plain.values())
    for key in (("full", "uniform"), ("full", "block")):
        assert sorted(grads[key]) == sorted(plain)
        assert all(torch.allclose(grads[key][k], plain[k], atol=1e-6) for k in plain), key
