"""Llama, Mistral, Qwen2 and their MoE siblings Mixtral, Qwen2-MoE (`{Llama,Mistral,Qwen2,Mixtral,Qwen2Moe}ForCausalLM`)
<-> megaclm.

The three share one architecture in transformers: RMSNorm, SwiGLU, RoPE in the rotate-half layout (as
megaclm's), separate q/k/v projections, grouped-query attention. They differ in config only:
    llama    optional biases on q/k/v/o (`attention_bias`) and the MLP (`mlp_bias`); Llama-3 RoPE scaling
    mistral  no biases; a sliding attention window (`sliding_window`)
    qwen2    bias on q/k/v only; sliding window only with `use_sliding_window` (on layers >= max_window_layers)
    mixtral    mistral's attention; every MLP is `num_local_experts` experts, top-k renormalised (= megaclm's
               default top-k-then-softmax); its sliding window as mistral's
    qwen2_moe  qwen2's attention; experts of `moe_intermediate_size`, top-k of the softmax renormalised only
               with `norm_topk_prob` (else megaclm's --moe-router-pre-softmax), a shared expert with a
               sigmoid gate; dense layers only via decoder_sparse_step/mlp_only_layers (refused)
megaclm fuses q/k/v into `attention.qkv` as [q heads; k heads; v heads] and gate/up into `mlp.fc1` as
[gate; up], so conversion is concatenation and splitting, no permutation. megaclm keeps one fc1 [gate; up]
and fc2 per expert (`mlp.deepspeed_moe.experts.deepspeed_experts.{j}.fc1/fc2`, megaclm.model.moe);
transformers 5 stores the experts fused in memory (`mlp.experts.gate_up_proj` (E, 2F, H) rows [gate; up],
`mlp.experts.down_proj` (E, H, F)), but the published files (and save_pretrained) keep one tensor per
expert: mixtral `block_sparse_moe.experts.{j}.w1/w3/w2` (gate/up/down) and `block_sparse_moe.gate`,
qwen2_moe `mlp.experts.{j}.gate_proj/up_proj/down_proj` and `mlp.gate`. Import reads either; export
writes the per-expert files. The router aux-loss
coefficient is carried over as is (HF averages one loss over all layers, megaclm adds one per layer).
"""
from __future__ import annotations

from typing import Mapping

import torch

from megaclm.checkpoint.hf.common import Config, Keys, rope_parameters
from megaclm.config.model import ModelConfig
from megaclm.model.moe import EXPERTS_PREFIX
from megaclm.utils.errors import UserError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
MOE_FAMILIES = ("mixtral", "qwen2_moe")
# Defaults of each transformers config class, for keys an older config.json may lack.
DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False),
    "mistral": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096 * 32,
                    tie_word_embeddings=False),
    "qwen2": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768, tie_word_embeddings=False),
    "mixtral": dict(rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=4096 * 32, tie_word_embeddings=False),
    "qwen2_moe": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768,
                      tie_word_embeddings=False),
}
IGNORED = (r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"(model\.)?rotary_emb\.inv_freq")


def _window(c: Config) -> int | None:
    """The sliding window megaclm applies to every layer, or None for full causal attention."""
    if c.model_type in ("mistral", "mixtral"):
        return c.get("sliding_window")
    if c.model_type in ("qwen2", "qwen2_moe") and c.get("use_sliding_window", False) and c.get("sliding_window") is not None:
        first = c.get("max_window_layers", 28)
        if first <= 0:
            return c.get("sliding_window")
        if first < c.need("num_hidden_layers"):
            raise UserError(f"config.json: qwen2 with use_sliding_window and max_window_layers={first} mixes windowed "
                            "and full-attention layers; megaclm applies one window to all layers")
    return None


def config_from_hf(c: Config) -> ModelConfig:
    d = DEFAULTS[c.model_type]
    c.require("hidden_act", ("silu",), "silu", "megaclm's SwiGLU gates with SiLU")
    rope = rope_parameters(c, d["rope_theta"])
    if rope["rope_type"] not in ("default", "llama3"):
        raise UserError(f"config.json: RoPE scaling '{rope['rope_type']}' is not supported; supported: none "
                        "('default') and Llama-3's 'llama3'")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError("config.json: partial_rotary_factor != 1 is not supported for this family")
    if c.model_type == "llama":
        attention_bias, mlp_bias = c.get("attention_bias", False), c.get("mlp_bias", False)
        if attention_bias != mlp_bias:
            raise UserError(f"config.json: llama with attention_bias={attention_bias} and mlp_bias={mlp_bias}; "
                            "megaclm has biases on all linear layers or none (plus an optional qkv bias)")
        bias_linear, qkv_bias = attention_bias, False
    else:
        bias_linear, qkv_bias = False, c.model_type in ("qwen2", "qwen2_moe")
    hidden, heads = c.need("hidden_size"), c.need("num_attention_heads")
    head_dim = c.get("head_dim", hidden // heads)
    max_pos = c.get("max_position_embeddings", d["max_position_embeddings"])
    llama3 = rope["rope_type"] == "llama3"
    return ModelConfig(
        num_layers=c.need("num_hidden_layers"), hidden_size=hidden, ffn_hidden_size=c.need("intermediate_size"),
        num_attention_heads=heads, num_query_groups=c.get("num_key_value_heads", heads),
        kv_channels=None if head_dim * heads == hidden else head_dim, max_position_embeddings=max_pos,
        position_embedding_type="rope", rotary_base=float(rope["rope_theta"]), use_rope_scaling=llama3,
        rope_scaling_factor=float(rope.get("factor", 8.0)) if llama3 else 8.0,
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)) if llama3 else 1.0,
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)) if llama3 else 4.0,
        rope_original_max_position_embeddings=int(rope.get("original_max_position_embeddings", max_pos))
        if llama3 else 8192,
        window_size=_window(c), normalization="RMSNorm", norm_epsilon=c.get("rms_norm_eps", d["rms_norm_eps"]),
        swiglu=True, add_bias_linear=bias_linear, add_qkv_bias=qkv_bias,
        untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", d["tie_word_embeddings"]),
        hidden_dropout=0.0, attention_dropout=c.get("attention_dropout", 0.0),
        init_method_std=c.get("initializer_range", 0.02), **_moe_config_from_hf(c))


def _moe_config_from_hf(c: Config) -> dict:
    """The ModelConfig MoE fields of a mixtral / qwen2_moe config ({} for the dense families)."""
    if c.model_type == "mixtral":
        if c.get("router_jitter_noise", 0.0):
            raise UserError("config.json: mixtral with router_jitter_noise != 0 is not supported (megaclm's router "
                            "adds no noise)")
        return dict(num_experts=c.need("num_local_experts"), moe_router_topk=c.get("num_experts_per_tok", 2),
                    moe_aux_loss_coeff=c.get("router_aux_loss_coef", 0.0))
    if c.model_type == "qwen2_moe":
        if c.get("decoder_sparse_step", 1) != 1 or c.get("mlp_only_layers", []):
            raise UserError("config.json: qwen2_moe with decoder_sparse_step != 1 or mlp_only_layers mixes dense "
                            "and MoE layers differently from megaclm's --moe-layer-freq (layers 0, N, 2N, ...)")
        shared = c.get("shared_expert_intermediate_size", 0) or None
        return dict(num_experts=c.need("num_experts"), moe_router_topk=c.get("num_experts_per_tok", 4),
                    moe_ffn_hidden_size=c.need("moe_intermediate_size"),
                    moe_router_pre_softmax=not c.get("norm_topk_prob", False),
                    moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=shared is not None,
                    moe_aux_loss_coeff=c.get("router_aux_loss_coef", 0.0))
    return {}


def from_hf(state_dict: Mapping[str, torch.Tensor], c: Config) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    mc = config_from_hf(c)
    H, F, hd = mc.hidden_size, mc.ffn_size, mc.head_dim
    q_rows, kv_rows = mc.num_attention_heads * hd, mc.num_kv_heads * hd
    keys = Keys(state_dict, c.model_type, IGNORED, strip_prefixes=("model.",))
    embed = keys.take("embed_tokens.weight")
    out = {"embedding.word_embeddings.weight": embed}
    for i in range(mc.num_layers):
        h, m = f"layers.{i}.", f"layers.{i}."
        out[m + "input_norm.weight"] = keys.take(h + "input_layernorm.weight", (H,))
        out[m + "post_attention_norm.weight"] = keys.take(h + "post_attention_layernorm.weight", (H,))
        a = h + "self_attn."
        out[m + "attention.qkv.weight"] = torch.cat([keys.take(a + "q_proj.weight", (q_rows, H)),
                                                     keys.take(a + "k_proj.weight", (kv_rows, H)),
                                                     keys.take(a + "v_proj.weight", (kv_rows, H))])
        if mc.qkv_bias:
            out[m + "attention.qkv.bias"] = torch.cat([keys.take(a + "q_proj.bias", (q_rows,)),
                                                       keys.take(a + "k_proj.bias", (kv_rows,)),
                                                       keys.take(a + "v_proj.bias", (kv_rows,))])
        out[m + "attention.proj.weight"] = keys.take(a + "o_proj.weight", (H, q_rows))
        f = h + "mlp."
        if mc.is_moe_layer(i):
            out.update(_moe_from_hf(keys, h, m + "mlp.", mc))
        else:
            out[m + "mlp.fc1.weight"] = torch.cat([keys.take(f + "gate_proj.weight", (F, H)),
                                                   keys.take(f + "up_proj.weight", (F, H))])
            out[m + "mlp.fc2.weight"] = keys.take(f + "down_proj.weight", (H, F))
        if mc.add_bias_linear:
            out[m + "attention.proj.bias"] = keys.take(a + "o_proj.bias", (H,))
            out[m + "mlp.fc1.bias"] = torch.cat([keys.take(f + "gate_proj.bias", (F,)),
                                                 keys.take(f + "up_proj.bias", (F,))])
            out[m + "mlp.fc2.bias"] = keys.take(f + "down_proj.bias", (H,))
    out["final_norm.weight"] = keys.take("norm.weight", (H,))
    if mc.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = keys.take("lm_head.weight", tuple(embed.shape))
    elif keys.has("lm_head.weight") and not torch.equal(keys.take("lm_head.weight"), embed):
        raise UserError("config.json says tie_word_embeddings but lm_head.weight differs from embed_tokens.weight; "
                        "set tie_word_embeddings=false in config.json")
    keys.finish()
    return mc, out


# Per-expert names of the published checkpoints (what save_pretrained writes): (block, gate, up, down).
_EXPERT_NAMES = {"mixtral": ("block_sparse_moe.", "w1", "w3", "w2"),
                 "qwen2_moe": ("mlp.", "gate_proj", "up_proj", "down_proj")}


def _moe_from_hf(keys: Keys, layer: str, m: str, mc: ModelConfig) -> dict[str, torch.Tensor]:
    """One MoE layer's HF tensors (under `layer`) as megaclm's (prefix m). Reads either the published per-expert
    files or transformers 5's in-memory fused `mlp.experts.gate_up_proj` / `down_proj`."""
    E, H, Fe = mc.num_experts, mc.hidden_size, mc.moe_ffn_size
    block, gate, up, down = _EXPERT_NAMES[keys.model_type]
    if keys.has(layer + "mlp.experts.gate_up_proj"):
        block = "mlp."
        fc1 = keys.take(layer + "mlp.experts.gate_up_proj", (E, 2 * Fe, H)).unbind()
        fc2 = keys.take(layer + "mlp.experts.down_proj", (E, H, Fe)).unbind()
    else:
        e = layer + block + "experts."
        fc1 = [torch.cat([keys.take(f"{e}{j}.{gate}.weight", (Fe, H)), keys.take(f"{e}{j}.{up}.weight", (Fe, H))])
               for j in range(E)]
        fc2 = [keys.take(f"{e}{j}.{down}.weight", (H, Fe)) for j in range(E)]
    f = layer + block
    out = {m + "router.weight": keys.take(f + "gate.weight", (E, H))}
    for j in range(E):
        out.update({f"{m}{EXPERTS_PREFIX}{j}.fc1": fc1[j].clone(), f"{m}{EXPERTS_PREFIX}{j}.fc2": fc2[j].clone()})
    if mc.moe_shared_expert_intermediate_size:
        S = mc.moe_shared_expert_intermediate_size
        out[m + "shared.fc1.weight"] = torch.cat([keys.take(f + "shared_expert.gate_proj.weight", (S, H)),
                                                  keys.take(f + "shared_expert.up_proj.weight", (S, H))])
        out[m + "shared.fc2.weight"] = keys.take(f + "shared_expert.down_proj.weight", (H, S))
        out[m + "shared_gate.weight"] = keys.take(f + "shared_expert_gate.weight", (1, H))
    return out


def _moe_to_hf(sd: Mapping[str, torch.Tensor], m: str, layer: str, mc: ModelConfig,
               family: str) -> dict[str, torch.Tensor]:
    """One MoE layer in the published per-expert layout (transformers fuses it again on load)."""
    block, gate, up, down = _EXPERT_NAMES[family]
    f = layer + block
    out = {f + "gate.weight": sd[m + "router.weight"]}
    for j in range(mc.num_experts):
        g, u = sd[f"{m}{EXPERTS_PREFIX}{j}.fc1"].chunk(2)
        out.update({f"{f}experts.{j}.{gate}.weight": g, f"{f}experts.{j}.{up}.weight": u,
                    f"{f}experts.{j}.{down}.weight": sd[f"{m}{EXPERTS_PREFIX}{j}.fc2"]})
    if mc.moe_shared_expert_intermediate_size:
        g, u = sd[m + "shared.fc1.weight"].chunk(2)
        out.update({f + "shared_expert.gate_proj.weight": g, f + "shared_expert.up_proj.weight": u,
                    f + "shared_expert.down_proj.weight": sd[m + "shared.fc2.weight"],
                    f + "shared_expert_gate.weight": sd[m + "shared_gate.weight"]})
    return out


def family_of(mc: ModelConfig) -> str:
    """The HF family that expresses `mc`: Qwen2(-MoE) for a qkv-only bias, Mistral/Mixtral for the others
    with a window, else Llama (Mixtral for MoE)."""
    if mc.add_qkv_bias and not mc.add_bias_linear:
        return "qwen2_moe" if mc.num_experts is not None else "qwen2"
    if mc.num_experts is not None:
        return "mixtral"
    return "mistral" if mc.window_size is not None else "llama"


def check_exportable(mc: ModelConfig, family: str) -> None:
    problems = [why for bad, why in (
        (mc.position_embedding_type != "rope", "RoPE"),
        (mc.rotary_percent != 1.0, "RoPE on the whole head (rotary_percent 1)"),
        (mc.normalization != "RMSNorm", "RMSNorm"),
        (not mc.swiglu, "a SwiGLU MLP"),
        (family == "mistral" and (mc.add_bias_linear or mc.add_qkv_bias), "no biases"),
        (family == "qwen2" and (mc.add_bias_linear or not mc.add_qkv_bias), "a bias on q/k/v only"),
        (family == "llama" and mc.add_qkv_bias and not mc.add_bias_linear, "biases on all linear layers or none"),
        (family == "llama" and mc.window_size is not None, "full causal attention"),
        (family in MOE_FAMILIES and mc.num_experts is None, "Mixture-of-Experts layers"),
        (family not in MOE_FAMILIES and mc.num_experts is not None, "dense MLPs (this model has experts)"),
        (family in MOE_FAMILIES and mc.num_experts is not None and mc.num_moe_layers != mc.num_layers,
         "MoE in every layer (--moe-layer-freq 1)"),
        (family == "mixtral" and mc.moe_router_pre_softmax, "top-k then softmax routing"),
        (family == "mixtral" and (mc.add_bias_linear or mc.add_qkv_bias), "no biases"),
        (family == "mixtral" and mc.moe_shared_expert_intermediate_size is not None, "no shared expert"),
        (family == "mixtral" and mc.moe_ffn_size != mc.ffn_size, "experts of --ffn-hidden-size"),
        (family == "qwen2_moe" and (mc.add_bias_linear or not mc.add_qkv_bias), "a bias on q/k/v only"),
        (family == "qwen2_moe" and (mc.moe_shared_expert_intermediate_size is not None)
         != mc.moe_shared_expert_gate, "a gated shared expert, or none"),
        (mc.num_experts is not None and mc.moe_expert_capacity_factor is not None, "dropless routing"),
    ) if bad]
    if problems:
        raise UserError(f"this model cannot be exported as {family}, which needs {', '.join(problems)}; "
                        "pick another --family")


def to_hf(mc: ModelConfig, sd: Mapping[str, torch.Tensor], vocab_size: int,
          family: str) -> tuple[dict, dict[str, torch.Tensor]]:
    check_exportable(mc, family)
    H, F, hd = mc.hidden_size, mc.ffn_size, mc.head_dim
    q_rows, kv_rows = mc.num_attention_heads * hd, mc.num_kv_heads * hd
    rope = {"rope_type": "default", "rope_theta": mc.rotary_base}
    if mc.use_rope_scaling:
        rope.update(rope_type="llama3", factor=mc.rope_scaling_factor, low_freq_factor=mc.rope_low_freq_factor,
                    high_freq_factor=mc.rope_high_freq_factor,
                    original_max_position_embeddings=mc.rope_original_max_position_embeddings)
    cfg = dict(model_type=family, architectures=[ARCHITECTURES[family]], vocab_size=vocab_size, hidden_size=H,
               intermediate_size=F, num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_attention_heads,
               num_key_value_heads=mc.num_kv_heads, head_dim=hd, hidden_act="silu",
               max_position_embeddings=mc.max_position_embeddings, rms_norm_eps=mc.norm_epsilon,
               initializer_range=mc.init_method_std, attention_dropout=mc.attention_dropout,
               tie_word_embeddings=not mc.untie_embeddings_and_output_weights,
               # transformers 5 reads rope_parameters; 4.x reads rope_theta + rope_scaling (5 accepts both).
               rope_parameters=rope, rope_theta=mc.rotary_base,
               rope_scaling=None if rope["rope_type"] == "default" else rope)
    if family == "llama":
        cfg.update(attention_bias=mc.add_bias_linear, mlp_bias=mc.add_bias_linear)
    elif family in ("mistral", "mixtral"):
        cfg.update(sliding_window=mc.window_size)
    else:
        window = mc.window_size is not None
        cfg.update(use_sliding_window=window, sliding_window=mc.window_size, max_window_layers=0)
    if family == "mixtral":
        cfg.update(num_local_experts=mc.num_experts, num_experts_per_tok=mc.moe_router_topk,
                   router_aux_loss_coef=mc.moe_aux_loss_coeff, router_jitter_noise=0.0)
    elif family == "qwen2_moe":
        cfg.update(num_experts=mc.num_experts, num_experts_per_tok=mc.moe_router_topk,
                   moe_intermediate_size=mc.moe_ffn_size, norm_topk_prob=not mc.moe_router_pre_softmax,
                   shared_expert_intermediate_size=mc.moe_shared_expert_intermediate_size or 0,
                   router_aux_loss_coef=mc.moe_aux_loss_coeff, decoder_sparse_step=1, mlp_only_layers=[])
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"]}
    for i in range(mc.num_layers):
        h, m = f"model.layers.{i}.", f"layers.{i}."
        out[h + "input_layernorm.weight"] = sd[m + "input_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[m + "post_attention_norm.weight"]
        q, k, v = sd[m + "attention.qkv.weight"].split([q_rows, kv_rows, kv_rows])
        a = h + "self_attn."
        out.update({a + "q_proj.weight": q, a + "k_proj.weight": k, a + "v_proj.weight": v,
                    a + "o_proj.weight": sd[m + "attention.proj.weight"]})
        if mc.qkv_bias:
            qb, kb, vb = sd[m + "attention.qkv.bias"].split([q_rows, kv_rows, kv_rows])
            out.update({a + "q_proj.bias": qb, a + "k_proj.bias": kb, a + "v_proj.bias": vb})
        f = h + "mlp."
        if mc.is_moe_layer(i):
            out.update(_moe_to_hf(sd, m + "mlp.", h, mc, family))
        else:
            gate, up = sd[m + "mlp.fc1.weight"].split([F, F])
            out.update({f + "gate_proj.weight": gate, f + "up_proj.weight": up,
                        f + "down_proj.weight": sd[m + "mlp.fc2.weight"]})
        if mc.add_bias_linear:
            gb, ub = sd[m + "mlp.fc1.bias"].split([F, F])
            out.update({a + "o_proj.bias": sd[m + "attention.proj.bias"], f + "gate_proj.bias": gb,
                        f + "up_proj.bias": ub, f + "down_proj.bias": sd[m + "mlp.fc2.bias"]})
    out["model.norm.weight"] = sd["final_norm.weight"]
    if mc.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = sd["output_layer.weight"]
    return cfg, {k: v.contiguous() for k, v in out.items()}
