"""Named model shapes: `model_preset("llama-7b", num_layers=2)` -> ModelConfig.

Shapes are those of the published checkpoints (GPT-3 paper table 2.1 for the gpt2-* sizes, with GPT-2's
vocabulary; Meta's Llama-2 7B/13B and Llama-3.2-1B; Mistral-7B-v0.1; Qwen2 0.5B/7B; the MoE Mixtral-8x7B-v0.1 and Qwen1.5-MoE-A2.7B, whose HF router
aux-loss coefficients they keep; moe-tiny for the demo). Dropout follows
each family's training recipe (0.1 for GPT, none for the others). `PRESET_VOCAB_SIZE` is the size of
the tokenizer each was released with (before padding), for parameter counts and conversions.
"""
from megaclm.config.model import ModelConfig
from megaclm.utils.errors import UserError

_GPT = dict(position_embedding_type="learned_absolute", normalization="LayerNorm", norm_epsilon=1e-5,
            swiglu=False, add_bias_linear=True, untie_embeddings_and_output_weights=False,
            hidden_dropout=0.1, attention_dropout=0.1, max_position_embeddings=2048)
_LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False,
              untie_embeddings_and_output_weights=True, hidden_dropout=0.0, attention_dropout=0.0)

MODEL_PRESETS: dict[str, dict] = {
    "gpt2-125m": dict(_GPT, num_layers=12, hidden_size=768, num_attention_heads=12),
    "gpt2-350m": dict(_GPT, num_layers=24, hidden_size=1024, num_attention_heads=16),
    "gpt2-760m": dict(_GPT, num_layers=24, hidden_size=1536, num_attention_heads=16),
    "gpt2-1.3b": dict(_GPT, num_layers=24, hidden_size=2048, num_attention_heads=16),
    "gpt2-2.7b": dict(_GPT, num_layers=32, hidden_size=2560, num_attention_heads=32),
    # Llama-3.2-1B: GQA 32/8, tied head, theta 5e5 with Llama-3.1 frequency scaling.
    "llama-1b": dict(_LLAMA, num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                     num_query_groups=8, max_position_embeddings=131072, rotary_base=500000.0, norm_epsilon=1e-5,
                     untie_embeddings_and_output_weights=False, use_rope_scaling=True, rope_scaling_factor=32.0,
                     rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                     rope_original_max_position_embeddings=8192),
    "llama-7b": dict(_LLAMA, num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
                     max_position_embeddings=4096, norm_epsilon=1e-5),
    "llama-13b": dict(_LLAMA, num_layers=40, hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40,
                      max_position_embeddings=4096, norm_epsilon=1e-5),
    # Mistral-7B-v0.1: GQA 32/8 and a 4096-token sliding window.
    "mistral-7b": dict(_LLAMA, num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                       num_query_groups=8, max_position_embeddings=32768, window_size=4096, norm_epsilon=1e-5),
    # Qwen2: Llama with a qkv bias, theta 1e6, eps 1e-6; 0.5B ties its head. 32k pre-training context.
    "qwen2-0.5b": dict(_LLAMA, num_layers=24, hidden_size=896, ffn_hidden_size=4864, num_attention_heads=14,
                       num_query_groups=2, max_position_embeddings=32768, rotary_base=1000000.0, norm_epsilon=1e-6,
                       add_qkv_bias=True, untie_embeddings_and_output_weights=False),
    "qwen2-7b": dict(_LLAMA, num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28,
                     num_query_groups=4, max_position_embeddings=32768, rotary_base=1000000.0, norm_epsilon=1e-6,
                     add_qkv_bias=True),
    # Mixtral-8x7B-v0.1: Mistral-7B's attention, 8 SwiGLU experts, top-2 (top-k logits then softmax), no window.
    "mixtral-8x7b": dict(_LLAMA, num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                         num_query_groups=8, max_position_embeddings=32768, rotary_base=1000000.0, norm_epsilon=1e-5,
                         num_experts=8, moe_router_topk=2, moe_aux_loss_coeff=0.02),
    # Qwen1.5-MoE-A2.7B: 60 experts of 1408, top-4 of softmax (not renormalised), a gated shared expert of 5632.
    "qwen2-moe-a2.7b": dict(_LLAMA, num_layers=24, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
                            max_position_embeddings=8192, rotary_base=1000000.0, norm_epsilon=1e-6, add_qkv_bias=True,
                            num_experts=60, moe_router_topk=4, moe_ffn_hidden_size=1408, moe_router_pre_softmax=True,
                            moe_shared_expert_intermediate_size=5632, moe_shared_expert_gate=True,
                            moe_aux_loss_coeff=0.001),
    # A few-million-parameter Mixtral for CPU demos and tests: 8 experts, top-2, both router losses.
    "moe-tiny": dict(_LLAMA, num_layers=4, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
                     num_query_groups=2, max_position_embeddings=1024, num_experts=8, moe_router_topk=2,
                     moe_ffn_hidden_size=128, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001),
}

PRESET_VOCAB_SIZE: dict[str, int] = {
    **{name: 50257 for name in MODEL_PRESETS if name.startswith("gpt2-")},
    "llama-1b": 128256, "llama-7b": 32000, "llama-13b": 32000, "mistral-7b": 32000,
    "qwen2-0.5b": 151936, "qwen2-7b": 152064, "mixtral-8x7b": 32000, "qwen2-moe-a2.7b": 151936, "moe-tiny": 32000,
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """The preset's ModelConfig with `overrides` (field=value) applied on top."""
    if name not in MODEL_PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
    unknown = set(overrides) - set(ModelConfig.__dataclass_fields__)
    if unknown:
        raise UserError(f"model preset {name!r}: unknown model field(s) {', '.join(sorted(unknown))}")
    return ModelConfig(**{**MODEL_PRESETS[name], **overrides})
