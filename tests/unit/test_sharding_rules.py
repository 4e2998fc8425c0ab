"""megaclm.model.sharding's rules, derived from the parameters' own declarations (megaclm.parallel.layers:
partition_dim, partition_blocks), against the layout documented in megaclm.model.gpt's docstring, written out
below as the key-suffix table megaclm used before the rules were derived: the same answer for every key of
every preset and family (dense, MoE with a shared expert, GQA, SwiGLU or GELU, biases, tied or untied, LoRA)."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from megaclm.config.lora import LoraConfig
from megaclm.config.model import ModelConfig
from megaclm.config.presets import MODEL_PRESETS, model_preset
from megaclm.model.gpt import GPTModel
from megaclm.model.sharding import tp_partition

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from parallel_checks import FAMILIES, family_config  # noqa: E402


def documented_rule(key: str, config: ModelConfig, shape: torch.Size) -> tuple[int, list[int]] | None:
    """The layout as a suffix table (megaclm's rules before they were read off the parameters)."""
    hd = config.head_dim
    if key.endswith(("word_embeddings.weight", "output_layer.weight")):
        return 0, [shape[0]]
    if key.endswith(("attention.qkv.weight", "attention.qkv.bias", "attention.qkv.lora_b")):
        return 0, [config.num_attention_heads * hd, config.num_kv_heads * hd, config.num_kv_heads * hd]
    if key.endswith(("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc1.lora_b")):
        return 0, [config.ffn_size] * (2 if config.swiglu else 1)
    if key.endswith(("mlp.shared.fc1.weight", "mlp.shared.fc1.bias", "mlp.shared.fc1.lora_b")):
        return 0, [config.moe_shared_expert_intermediate_size] * (2 if config.swiglu else 1)
    if key.endswith(("attention.proj.weight", "mlp.fc2.weight", "mlp.shared.fc2.weight", "attention.proj.lora_a",
                     "mlp.fc2.lora_a", "mlp.shared.fc2.lora_a")):
        return 1, [shape[1]]
    return None


MOE_SHARED = dict(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                  max_position_embeddings=32, position_embedding_type="rope", normalization="RMSNorm",
                  swiglu=True, ffn_hidden_size=48, add_bias_linear=False, untie_embeddings_and_output_weights=True,
                  num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24, moe_layer_freq=2,
                  moe_shared_expert_intermediate_size=40, moe_shared_expert_gate=True)
CONFIGS = {**{name: lambda name=name: model_preset(name) for name in MODEL_PRESETS},
           **{f"family-{name}": lambda name=name: family_config(name) for name in FAMILIES},
           "moe-shared-gelu-bias": lambda: ModelConfig(**{**MOE_SHARED, "swiglu": False, "add_bias_linear": True}),
           "moe-shared-swiglu-tied": lambda: ModelConfig(**{**MOE_SHARED, "untie_embeddings_and_output_weights": False})}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_declared_rules_equal_the_documented_layout(name):
    config = CONFIGS[name]()
    # Two layers (one dense, one MoE where the preset has both) cover every key the rules see.
    config = dataclasses.replace(config, num_layers=min(config.num_layers, 2), num_experts=(
        None if config.num_experts is None else min(config.num_experts, 4)), moe_router_topk=min(
        config.moe_router_topk, 2))
    with torch.device("meta"):
        model = GPTModel(config, 128, lora=LoraConfig(lora_rank=2))
    keys = dict(model.state_dict(keep_vars=True))
    assert any(k.endswith("lora_b") for k in keys) and any(k.endswith("qkv.weight") for k in keys)
    for key, tensor in keys.items():
        assert tp_partition(key, config, tensor.shape) == documented_rule(key, config, tensor.shape), key

