"""GPT-2 (`GPT2LMHeadModel`) <-> megaclm.

HF GPT-2 stores its linear layers as `Conv1D`, i.e. weights (in, out) applied as x @ W: each is
transposed into megaclm's (out, in). `c_attn` is already the fused [q; k; v] projection megaclm uses
(heads in order within each block). Activation: GPT-2's tanh-approximated GELU, which is megaclm's.
"""
from __future__ import annotations

from typing import Mapping

import torch

from megaclm.checkpoint.hf.common import Config, Keys
from megaclm.config.model import ModelConfig
from megaclm.utils.errors import UserError

# Buffers of older GPT-2 exports: the causal-mask "bias" (1, 1, n, n) and masked_bias.
IGNORED = (r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)",)
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # three spellings of the same approximation


def config_from_hf(c: Config) -> ModelConfig:
    c.require("activation_function", TANH_GELUS, "gelu_new", "megaclm's GPT MLP uses the tanh-approximated GELU")
    c.require("scale_attn_weights", (True,), True, "megaclm scales attention scores by 1/sqrt(head_dim)")
    c.require("scale_attn_by_inverse_layer_idx", (False,), False, "no per-layer attention scaling in megaclm")
    hidden = c.need("n_embd")
    return ModelConfig(
        num_layers=c.need("n_layer"), hidden_size=hidden, ffn_hidden_size=c.get("n_inner", 4 * hidden),
        num_attention_heads=c.need("n_head"), max_position_embeddings=c.get("n_positions", 1024),
        position_embedding_type="learned_absolute", normalization="LayerNorm",
        norm_epsilon=c.get("layer_norm_epsilon", 1e-5), swiglu=False, add_bias_linear=True,
        untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", True),
        hidden_dropout=c.get("resid_pdrop", 0.1), attention_dropout=c.get("attn_pdrop", 0.1),
        init_method_std=c.get("initializer_range", 0.02))


def from_hf(state_dict: Mapping[str, torch.Tensor], c: Config) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    mc = config_from_hf(c)
    H, F, L = mc.hidden_size, mc.ffn_size, mc.num_layers
    keys = Keys(state_dict, "gpt2", IGNORED, strip_prefixes=("transformer.",))
    wte = keys.take("wte.weight")
    out = {"embedding.word_embeddings.weight": wte,
           "embedding.position_embeddings.weight": keys.take("wpe.weight", (mc.max_position_embeddings, H))}
    for i in range(L):
        h, m = f"h.{i}.", f"layers.{i}."
        for hf_norm, norm in (("ln_1", "input_norm"), ("ln_2", "post_attention_norm")):
            out[m + norm + ".weight"] = keys.take(h + hf_norm + ".weight", (H,))
            out[m + norm + ".bias"] = keys.take(h + hf_norm + ".bias", (H,))
        out[m + "attention.qkv.weight"] = keys.take(h + "attn.c_attn.weight", (H, 3 * H)).t().contiguous()
        out[m + "attention.qkv.bias"] = keys.take(h + "attn.c_attn.bias", (3 * H,))
        out[m + "attention.proj.weight"] = keys.take(h + "attn.c_proj.weight", (H, H)).t().contiguous()
        out[m + "attention.proj.bias"] = keys.take(h + "attn.c_proj.bias", (H,))
        out[m + "mlp.fc1.weight"] = keys.take(h + "mlp.c_fc.weight", (H, F)).t().contiguous()
        out[m + "mlp.fc1.bias"] = keys.take(h + "mlp.c_fc.bias", (F,))
        out[m + "mlp.fc2.weight"] = keys.take(h + "mlp.c_proj.weight", (F, H)).t().contiguous()
        out[m + "mlp.fc2.bias"] = keys.take(h + "mlp.c_proj.bias", (H,))
    out["final_norm.weight"] = keys.take("ln_f.weight", (H,))
    out["final_norm.bias"] = keys.take("ln_f.bias", (H,))
    if mc.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = keys.take("lm_head.weight", tuple(wte.shape))
    elif keys.has("lm_head.weight"):  # a tied head saved anyway must be the embedding itself
        if not torch.equal(keys.take("lm_head.weight"), wte):
            raise UserError("config.json says tie_word_embeddings but lm_head.weight differs from wte.weight; "
                            "set tie_word_embeddings=false in config.json")
    keys.finish()
    return mc, out


def check_exportable(mc: ModelConfig) -> None:
    problems = [why for bad, why in (
        (mc.position_embedding_type != "learned_absolute", "learned absolute positions"),
        (mc.normalization != "LayerNorm", "LayerNorm"),
        (mc.swiglu, "a GELU MLP"),
        (not mc.add_bias_linear, "biases in every linear layer"),
        (mc.num_kv_heads != mc.num_attention_heads, "multi-head attention (no grouped-query attention)"),
        (mc.head_dim * mc.num_attention_heads != mc.hidden_size, "head_dim = hidden_size / heads"),
        (mc.window_size is not None, "full causal attention"),
    ) if bad]
    if problems:
        raise UserError(f"this model cannot be exported as GPT-2, which needs {', '.join(problems)}; "
                        "pick another --family")


def to_hf(mc: ModelConfig, sd: Mapping[str, torch.Tensor], vocab_size: int) -> tuple[dict, dict[str, torch.Tensor]]:
    check_exportable(mc)
    cfg = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=vocab_size, n_embd=mc.hidden_size,
               n_layer=mc.num_layers, n_head=mc.num_attention_heads, n_inner=mc.ffn_size,
               n_positions=mc.max_position_embeddings, activation_function="gelu_new",
               layer_norm_epsilon=mc.norm_epsilon, resid_pdrop=mc.hidden_dropout, embd_pdrop=mc.hidden_dropout,
               attn_pdrop=mc.attention_dropout, initializer_range=mc.init_method_std, scale_attn_weights=True,
               tie_word_embeddings=not mc.untie_embeddings_and_output_weights)
    out = {"transformer.wte.weight": sd["embedding.word_embeddings.weight"],
           "transformer.wpe.weight": sd["embedding.position_embeddings.weight"]}
    for i in range(mc.num_layers):
        h, m = f"transformer.h.{i}.", f"layers.{i}."
        for hf_norm, norm in (("ln_1", "input_norm"), ("ln_2", "post_attention_norm")):
            out[h + hf_norm + ".weight"] = sd[m + norm + ".weight"]
            out[h + hf_norm + ".bias"] = sd[m + norm + ".bias"]
        out[h + "attn.c_attn.weight"] = sd[m + "attention.qkv.weight"].t().contiguous()
        out[h + "attn.c_attn.bias"] = sd[m + "attention.qkv.bias"]
        out[h + "attn.c_proj.weight"] = sd[m + "attention.proj.weight"].t().contiguous()
        out[h + "attn.c_proj.bias"] = sd[m + "attention.proj.bias"]
        out[h + "mlp.c_fc.weight"] = sd[m + "mlp.fc1.weight"].t().contiguous()
        out[h + "mlp.c_fc.bias"] = sd[m + "mlp.fc1.bias"]
        out[h + "mlp.c_proj.weight"] = sd[m + "mlp.fc2.weight"].t().contiguous()
        out[h + "mlp.c_proj.bias"] = sd[m + "mlp.fc2.bias"]
    out["transformer.ln_f.weight"] = sd["final_norm.weight"]
    out["transformer.ln_f.bias"] = sd["final_norm.bias"]
    if mc.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = sd["output_layer.weight"]
    return cfg, out
