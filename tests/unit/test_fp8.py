"""FP8 (torchao.float8) on CPU through torchao's emulation: which modules convert, the configs, numerics
against bf16, and that checkpoints are unchanged. Real FP8 matmuls: tests/gpu/test_fp8_gpu.py."""
import dataclasses

import pytest
import torch

pytest.importorskip("torchao.float8")

from megaclm.config import parse_config  # noqa: E402
from megaclm.config.megatron_compat import translate  # noqa: E402
from megaclm.config.model import ModelConfig  # noqa: E402
from megaclm.model.fp8 import Float8Matmul, check_fp8, convert_to_fp8, float8_config  # noqa: E402
from megaclm.model.gpt import GPTModel  # noqa: E402
from megaclm.utils.errors import UserError  # noqa: E402

CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, max_position_embeddings=32,
                  position_embedding_type="rope", normalization="RMSNorm", swiglu=True, ffn_hidden_size=128,
                  add_bias_linear=False, untie_embeddings_and_output_weights=True, hidden_dropout=0.0,
                  attention_dropout=0.0)
VOCAB = 128


def model(seed=0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(CFG, VOCAB).to(torch.bfloat16)


def test_only_the_block_linears_are_converted():
    m = model()
    names = convert_to_fp8(m, "hybrid", "tensorwise", emulate=True)
    assert names == [f"layers.{i}.{n}" for i in range(2) for n in ("attention.qkv", "attention.proj", "mlp.fc1",
                                                                     "mlp.fc2")]
    assert isinstance(m.layers[0].attention.qkv.linear, Float8Matmul)
    assert m.output_layer.linear is torch.nn.functional.linear  # the head stays bf16


@pytest.mark.parametrize("fmt, recipe, grad, granularity", [
    ("hybrid", "tensorwise", torch.float8_e5m2, "TENSORWISE"), ("e4m3", "tensorwise", torch.float8_e4m3fn, "TENSORWISE"),
    ("hybrid", "rowwise", torch.float8_e5m2, "AXISWISE"), ("e4m3", "rowwise", torch.float8_e4m3fn, "AXISWISE")])
def test_formats_and_recipes_map_to_torchao(fmt, recipe, grad, granularity):
    c = float8_config(fmt, recipe)
    assert c.cast_config_input.target_dtype == torch.float8_e4m3fn and c.cast_config_weight.target_dtype == torch.float8_e4m3fn
    assert c.cast_config_grad_output.target_dtype == grad == c.cast_config_grad_output_for_grad_weight.target_dtype
    assert c.cast_config_weight.scaling_granularity.name == granularity


def test_emulated_fp8_trains_close_to_bf16_and_checkpoints_are_unchanged():
    ids, labels = torch.randint(0, VOCAB, (2, 32)), torch.randint(0, VOCAB, (2, 32))
    ref, fp8 = model(), model()
    keys = set(fp8.state_dict())
    convert_to_fp8(fp8, "hybrid", "tensorwise", emulate=True)
    assert set(fp8.state_dict()) == keys  # the matmul changed, not the parameters
    losses = {}
    for name, m in (("bf16", ref), ("fp8", fp8)):
        loss = m(ids, labels=labels).mean()
        loss.backward()
        losses[name] = loss.item()
    assert abs(losses["fp8"] - losses["bf16"]) < 0.05 * losses["bf16"], losses
    g_ref, g_fp8 = ref.layers[0].mlp.fc1.weight.grad.float(), fp8.layers[0].mlp.fc1.weight.grad.float()
    assert torch.isfinite(g_fp8).all() and (g_fp8 - g_ref).norm() < 0.2 * g_ref.norm()
    # Round trip: a converted model loads an fp8 run's state dict and computes what the fp8 run computes.
    again = model(seed=1)
    convert_to_fp8(again, "hybrid", "tensorwise", emulate=True)
    again.load_state_dict(fp8.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(ids), fp8(ids), atol=0, rtol=0)


def test_fp8_flags_are_native_and_round_trip():
    argv = ["--fp8-format", "hybrid", "--fp8-recipe", "rowwise", "--fp8-amax-history-len", "16"]
    translated, notes = translate(argv)
    assert translated[:4] == argv[:4] and any("--fp8-amax-history-len" in n for n in notes)
    cfg, _ = parse_config(["--bf16", "--mock-data", "--train-iters", "1", "--tokenizer-type", "NullTokenizer",
                           "--vocab-size", "100", *argv[:4]])
    assert (cfg.precision.fp8_format, cfg.precision.fp8_recipe) == ("hybrid", "rowwise")
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="needs --bf16"):
        dataclasses.replace(cfg.precision, bf16=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusal on machines without an FP8 GPU")
def test_refused_without_an_fp8_gpu():
    check_fp8(None)
    with pytest.raises(UserError, match="--fp8-format hybrid: there is no CUDA GPU"):
        check_fp8("hybrid")
