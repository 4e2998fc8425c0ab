"""QLoRA's quantized base (megaclm.model.quantize) and LoRA targets by HF module name (megaclm.config.lora)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megaclm.checkpoint.hf.peft import to_peft
from megaclm.config import MegaclmConfig, parse_config
from megaclm.config.lora import LoraConfig, parse_targets
from megaclm.config.model import ModelConfig
from megaclm.model import quantize
from megaclm.model.flops import MemorySetup, estimate_memory
from megaclm.model.gpt import GPTModel
from megaclm.model.lora import freeze_base
from megaclm.model.sharding import shard_state_dict
from megaclm.utils.errors import UserError

pytest.importorskip("torchao")

# Llama-like: GQA, SwiGLU; every block-linear shard a whole number of 64-element blocks at TP=1 and 2.
CONFIG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                     swiglu=True, normalization="RMSNorm", position_embedding_type="rope", add_bias_linear=False,
                     max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)
VOCAB = 128


@pytest.mark.parametrize("target, expected", [
    ("q_proj,v_proj", {"qkv": ("q", "v")}),
    ("q_proj,k_proj,v_proj,o_proj", {"qkv": None, "proj": None}),
    ("gate_proj,up_proj,down_proj", {"fc1": None, "fc2": None}),
    ("up_proj", {"fc1": ("up",)}),
    ("qkv,q_proj,fc2", {"qkv": None, "fc2": None}),  # mixed with megaclm's names; qkv covers q_proj
    ("v_proj,proj", {"qkv": ("v",), "proj": None}),
    ("c_attn,c_proj,c_fc", {"qkv": None, "proj": None, "fc1": None, "fc2": None}),  # GPT-2: c_proj is both
    ("c_proj", {"proj": None, "fc2": None}),
])
def test_hf_target_names_map_to_megaclm_linears(target, expected):
    assert parse_targets(target) == expected
    assert LoraConfig(lora_rank=2, lora_target=target).target_names == tuple(expected)


def test_unknown_target_names_the_choices():
    with pytest.raises(UserError,
                       match=r"lora.lora_target='q_proj,wq'.*q_proj,k_proj,v_proj,o_proj.*\(wq is neither\)"):
        LoraConfig(lora_rank=2, lora_target="q_proj,wq")


def _model(lora: LoraConfig | None, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(CONFIG, VOCAB, lora=lora)


def test_a_fused_subset_adapts_only_its_row_blocks():
    """q_proj,v_proj: the adapter acts on q and v of qkv; B's k rows get no gradient and stay zero through AdamW
    steps with weight decay; the PEFT export has q_proj and v_proj only."""
    lora = LoraConfig(lora_rank=4, lora_target="q_proj,v_proj")
    model = _model(lora)
    freeze_base(model)
    qkv = model.layers[0].attention.qkv
    q, kv = 4 * 16, 2 * 16
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        F.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        opt.step()
        opt.zero_grad()
    b = qkv.lora_b.detach()
    assert torch.count_nonzero(b[q:q + kv]) == 0
    assert torch.count_nonzero(b[:q]) > 0 and torch.count_nonzero(b[q + kv:]) > 0
    # Forward: the base plus the adapter on the q and v rows only, whatever B holds on the k rows.
    with torch.no_grad():
        qkv.lora_b[q:q + kv] = 1.0
        x = torch.randn(2, 5, 64)
        delta = qkv.lora_scale * F.linear(F.linear(x, qkv.lora_a), qkv.lora_b)
        delta[..., q:q + kv] = 0
        torch.testing.assert_close(qkv(x), F.linear(x, qkv.weight) + delta)
    adapters = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    config, tensors = to_peft(CONFIG, adapters, "llama", MegaclmConfig(lora=lora).to_dict()["lora"], "base")
    assert config["target_modules"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert torch.equal(tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"], b[q + kv:])


def _block_max_error_bound(w: torch.Tensor, method: str) -> torch.Tensor:
    """Each element's worst rounding: NF4 half its widest code gap (-1 to -0.696) times its block's absmax, plus
    the double-quantized scale's error; int8 half a step of its row's absmax / 127."""
    if method == "nf4":
        absmax = w.flatten().view(-1, 64).abs().amax(1, keepdim=True).expand(-1, 64).reshape(w.shape)
        return absmax * (0.304 / 2 + 0.02)
    return w.abs().amax(1, keepdim=True) / 127 / 2 * 1.001


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_linear_is_the_dense_one_within_rounding(method):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(192, 64, generator=g) * 0.02
    qw = quantize.quantize_weight(w, method)
    deq = quantize.dequantize(qw, torch.float32)
    error = (deq - w).abs()
    assert (error <= _block_max_error_bound(w, method)).all()
    assert error.max() > 0  # it is quantized
    # nf4: 4-bit codes + an int8 scale per 64 (+ the factors, the code table); int8: a byte + 5 per row
    assert quantize.quantized_bytes(qw) == pytest.approx(w.numel() * (0.5 + 1 / 64), rel=0.02) \
        if method == "nf4" else quantize.quantized_bytes(qw) == w.numel() + 5 * w.shape[0]
    x = torch.randn(3, 7, 64, generator=g, requires_grad=True)
    y = quantize.quantized_linear(x, qw)
    y.backward(torch.ones_like(y))
    ref = x.detach().clone().requires_grad_()
    F.linear(ref, deq).backward(torch.ones_like(y))
    torch.testing.assert_close(y, F.linear(x.detach(), deq))  # the dense matmul with the dequantized weight
    torch.testing.assert_close(x.grad, ref.grad)
    dense = F.linear(x.detach(), w)
    assert (y - dense).abs().max() < (0.1 if method == "nf4" else 0.01) * dense.abs().max()


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantize_base_keeps_adapters_training_on_a_close_model(method):
    lora = LoraConfig(lora_rank=4, lora_target="q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                      base_quantization=method)
    model = _model(lora)
    freeze_base(model)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)
        dense = model(ids)
    keys = set(model.state_dict())
    # What an export merges into: the base quantized and dequantized as a TP=1 fp32 run did.
    reference = _model(lora)
    reference.load_state_dict(quantize.fake_quantize(model.state_dict(), CONFIG, method, 1, torch.float32))
    before, after = quantize.quantize_base(model, method)
    assert after < before * (0.14 if method == "nf4" else 0.27)  # fp32 -> 0.52 or 1 byte (+ scales)
    block_weights = {k for k in keys if k.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight"))}
    assert len(block_weights) == 8 and set(model.state_dict()) == keys - block_weights  # checkpoints: unchanged
    assert not any(k in block_weights for k, _ in model.named_parameters())
    logits = model(ids)
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(ids), atol=1e-5, rtol=0)
    assert (logits - dense).abs().max() < (0.2 if method == "nf4" else 0.02) * dense.abs().max()
    F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(n.endswith(("lora_a", "lora_b")) for n in grads)


def test_fake_quantize_is_what_each_tensor_parallel_shard_trained_against():
    """Export merges into fake_quantize's base: per TP shard, in the run's precision, as quantize_base did."""
    sd = _model(None).state_dict()
    key = "layers.1.mlp.fc2.weight"  # row-parallel: int8's per-row scales differ between TP=1 and TP=2
    for method in ("nf4", "int8"):
        tp2 = quantize.fake_quantize(sd, CONFIG, method, 2, torch.float32)
        for rank in range(2):
            mine = shard_state_dict(sd, CONFIG, 2, rank)
            theirs = shard_state_dict(tp2, CONFIG, 2, rank)
            for k in ("layers.0.attention.qkv.weight", key):
                assert torch.equal(theirs[k], quantize.dequantize(quantize.quantize_weight(mine[k], method),
                                                                  torch.float32))
        assert torch.equal(tp2["embedding.word_embeddings.weight"], sd["embedding.word_embeddings.weight"])
    tp1 = quantize.fake_quantize(sd, CONFIG, "int8", 1, torch.float32)
    assert not torch.equal(tp1[key], quantize.fake_quantize(sd, CONFIG, "int8", 2, torch.float32)[key])
    bf16 = quantize.fake_quantize(sd, CONFIG, "nf4", 1, torch.bfloat16)[key]
    assert bf16.dtype == torch.float32 and torch.equal(
        bf16, quantize.dequantize(quantize.quantize_weight(sd[key].bfloat16(), "nf4"), torch.float32))


def test_missing_torchao_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(quantize.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"--base-quantization needs torchao: pip install 'megaclm\[qlora\]'"):
        quantize.quantize_weight(torch.zeros(64, 64), "nf4")


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_memory_estimate_counts_the_quantized_block_linears(method):
    """The estimate's weights drop by exactly the block linears' bytes (counted here from a real model's state
    dict), bf16 -> nf4's 0.5 byte + a block scale per 64 + a factor per 64 x 256, or int8's byte + 5 per row."""
    sd = _model(None).state_dict()
    blocks = [v for k, v in sd.items() if k.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight"))]
    elements, rows = sum(v.numel() for v in blocks), sum(v.shape[0] for v in blocks)
    setup = MemorySetup(seq_length=32, precision="bf16", lora_rank=4, lora_targets=("qkv",))
    plain = estimate_memory(CONFIG, VOCAB, setup).gpu["weights"]
    quantized = estimate_memory(CONFIG, VOCAB, dataclasses.replace(setup, base_quantization=method)).gpu["weights"]
    stored = elements * (0.5 + 1 / 64 + 4 / 64 / 256) if method == "nf4" else elements + 5 * rows
    assert plain - quantized == pytest.approx(2 * elements - stored)


def _args(*extra):
    return ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", "2", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
            "--load", "base", "--finetune", "--lora-rank", "4", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--lora-rank", "0", "--base-quantization", "nf4"],
     "lora.base_quantization=nf4: a quantized base cannot be trained, only adapters on it; pass --lora-rank R"),
    (["--base-quantization", "nf4", "--zero-stage", "3"], "lora.base_quantization=nf4 with zero.zero_stage=3"),
    (["--base-quantization", "int8", "--fp8-format", "e4m3", "--bf16"],
     "lora.base_quantization=int8 with precision.fp8_format"),
    (["--base-quantization", "nf4", "--torch-compile"], "lora.base_quantization=nf4 with kernels.torch_compile"),
    (["--lora-target", "gate_proj"], "gate_proj names SwiGLU's gate, and this model's MLP has none"),
])
def test_combinations_that_cannot_work_are_refused(extra, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        parse_config(_args(*extra), world_size=1)
    parse_config(_args("--base-quantization", "nf4", "--lora-target", "q_proj,v_proj", "--zero-stage", "2"),
                 world_size=1)
