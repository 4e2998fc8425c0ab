"""Hugging Face <-> megaclm weights: pure functions, verified by the logits they give (tests/integration).

    model_cfg, sd = from_hf(hf_state_dict, hf_config)         # hf_config: config.json dict or transformers config
    hf_config, hf_sd = to_hf(model_cfg, sd, vocab_size=50257)  # family inferred from model_cfg, or family="llama"

`sd` is GPTModel's full (unsharded) state dict (keys: megaclm.model.gpt). from_hf returns the HF
vocabulary unpadded; `pad_vocab(sd, padded)` adds Megatron's padding rows and to_hf drops rows beyond
`vocab_size`. Families: gpt2 (GPT2LMHeadModel), llama, mistral, qwen2 ({Llama,Mistral,Qwen2}ForCausalLM), and
the Mixture-of-Experts mixtral, qwen2_moe ({Mixtral,Qwen2Moe}ForCausalLM).
Anything the converter does not map (an activation, a RoPE scaling, an extra tensor) is a UserError.
"""
from __future__ import annotations

import dataclasses

from typing import Any, Mapping

import torch

from megaclm.checkpoint.hf import gpt2, llama
from megaclm.checkpoint.hf.common import Config, config_dict, pad_vocab, unpad_vocab, vocab_rows
from megaclm.config.model import ModelConfig
from megaclm.utils.errors import UserError

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "mixtral", "qwen2_moe")
_BY_ARCHITECTURE = {"GPT2LMHeadModel": "gpt2", **{arch: fam for fam, arch in llama.ARCHITECTURES.items()}}


def hf_family(hf_config: Any) -> str:
    """The supported family of an HF config (by model_type, else by architectures), or a UserError."""
    cfg = config_dict(hf_config)
    model_type = cfg.get("model_type")
    if model_type in FAMILIES:
        return model_type
    for arch in cfg.get("architectures") or ():
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    raise UserError(f"unsupported architecture: config.json has model_type={model_type!r}, architectures="
                    f"{cfg.get('architectures')}; megaclm converts {', '.join(FAMILIES)}")


def config_from_hf(hf_config: Any) -> ModelConfig:
    """The ModelConfig of an HF config alone (cheap: validate a conversion before reading any weights)."""
    family = hf_family(hf_config)
    return (gpt2 if family == "gpt2" else llama).config_from_hf(Config(config_dict(hf_config), family))


def from_hf(state_dict: Mapping[str, torch.Tensor], hf_config: Any) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, GPTModel full state dict with the HF vocabulary, unpadded) of an HF causal LM."""
    family = hf_family(hf_config)
    c = Config(config_dict(hf_config), family)
    mc, sd = (gpt2 if family == "gpt2" else llama).from_hf(state_dict, c)
    vocab = c.get("vocab_size")
    if vocab is not None and vocab_rows(sd) != vocab:
        raise UserError(f"the embedding has {vocab_rows(sd)} rows but config.json says vocab_size={vocab}; "
                        "the weights do not match their config")
    return mc, sd


def infer_family(mc: ModelConfig) -> str:
    return "gpt2" if mc.position_embedding_type == "learned_absolute" else llama.family_of(mc)


def to_hf(mc: ModelConfig, state_dict: Mapping[str, torch.Tensor], vocab_size: int | None = None,
          family: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, HF state dict) for GPTModel weights; `vocab_size` drops padding rows (default: keep all).

    The config holds the architecture only; the caller adds token ids (bos/eos) and dtype.
    """
    family = family or infer_family(mc)
    if family not in FAMILIES:
        raise UserError(f"--family {family!r} is not one of {', '.join(FAMILIES)}")
    vocab_size = vocab_size or vocab_rows(state_dict)
    sd = unpad_vocab(state_dict, vocab_size)
    if mc.apply_layernorm_1p:  # HF norms scale by the weight itself: store 1 + w
        sd = {k: v + 1 if k.endswith("norm.weight") else v for k, v in sd.items()}
        mc = dataclasses.replace(mc, apply_layernorm_1p=False)
    if family == "gpt2":
        return gpt2.to_hf(mc, sd, vocab_size)
    return llama.to_hf(mc, sd, vocab_size, family)


__all__ = ["FAMILIES", "config_from_hf", "from_hf", "hf_family", "infer_family", "pad_vocab", "to_hf", "unpad_vocab", "vocab_rows"]
