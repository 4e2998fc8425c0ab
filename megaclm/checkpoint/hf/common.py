"""What the Hugging Face family converters share: config access, key bookkeeping, vocabulary padding.

A converter reads an HF `config.json` (a dict, or a transformers config object) and an HF state dict,
and must account for every tensor: `Keys.take` pops what it maps, `Keys.finish` refuses leftovers, so a
checkpoint with a feature we do not convert (an extra bias, a different layout) fails loudly instead of
loading half its weights.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from megaclm.utils.errors import UserError


def config_dict(hf_config: Any) -> dict:
    """A plain dict from a config.json dict or a transformers `PretrainedConfig`."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"hf_config must be a dict or a transformers config, got {type(hf_config).__name__}")


class Config:
    """Typed reads from an HF config dict; errors name the key and the model type."""

    def __init__(self, cfg: dict, model_type: str):
        self.cfg, self.model_type = cfg, model_type

    def get(self, key: str, default: Any = None) -> Any:
        value = self.cfg.get(key)
        return default if value is None else value

    def need(self, key: str) -> Any:
        if self.cfg.get(key) is None:
            raise UserError(f"config.json of this {self.model_type} model has no '{key}'; "
                            "is it a complete Hugging Face config?")
        return self.cfg[key]

    def require(self, key: str, allowed: tuple, default: Any, why: str) -> Any:
        value = self.get(key, default)
        if value not in allowed:
            raise UserError(f"config.json: {self.model_type} with {key}={value!r} is not supported ({why}); "
                            f"supported: {', '.join(repr(a) for a in allowed)}")
        return value


def rope_parameters(cfg: Config, default_theta: float) -> dict:
    """RoPE settings from either transformers 5's `rope_parameters` or 4.x's `rope_theta` + `rope_scaling`."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", default_theta))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return rope


class Keys:
    """The HF state dict being converted, with every tensor to be consumed exactly once."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], model_type: str, ignore: tuple[str, ...] = (),
                 strip_prefixes: tuple[str, ...] = ()):
        self.model_type = model_type
        self.left: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            if any(re.fullmatch(p, key) for p in ignore):  # buffers some exports carry (causal masks, inv_freq)
                continue
            for prefix in strip_prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    break
            self.left[key] = value

    def has(self, key: str) -> bool:
        return key in self.left

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if key not in self.left:
            raise UserError(f"the {self.model_type} weights have no '{key}'; the checkpoint is incomplete or "
                            "does not match its config.json")
        value = self.left.pop(key)
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise UserError(f"'{key}' has shape {tuple(value.shape)}, config.json implies {tuple(shape)}; "
                            "the weights do not match their config")
        return value

    def finish(self) -> None:
        if self.left:
            names = sorted(self.left)
            raise UserError(f"{len(names)} {self.model_type} weights are not understood by the converter "
                            f"(e.g. {', '.join(names[:4])}); the model has a feature megaclm does not convert")


def vocab_rows(state_dict: Mapping[str, torch.Tensor]) -> int:
    return state_dict["embedding.word_embeddings.weight"].shape[0]


VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def pad_vocab(state_dict: Mapping[str, torch.Tensor], padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """Zero rows appended to the embedding/output matrices up to `padded_vocab_size` (Megatron's padding).

    Zero rows give padded ids a logit of exactly 0; they are never targets, and eval_perplexity and the
    exported model drop them, so the loss over the real vocabulary is unchanged.
    """
    out = dict(state_dict)
    for key in VOCAB_KEYS:
        if key in out:
            w = out[key]
            if w.shape[0] > padded_vocab_size:
                raise UserError(f"{key} has {w.shape[0]} rows, more than the padded vocabulary {padded_vocab_size}")
            out[key] = torch.cat([w, w.new_zeros(padded_vocab_size - w.shape[0], *w.shape[1:])])
    return out


def unpad_vocab(state_dict: Mapping[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """The first `vocab_size` rows of the embedding/output matrices (the inverse of `pad_vocab`)."""
    out = dict(state_dict)
    for key in VOCAB_KEYS:
        if key in out:
            if out[key].shape[0] < vocab_size:
                raise UserError(f"{key} has {out[key].shape[0]} rows, fewer than the vocabulary size {vocab_size}")
            out[key] = out[key][:vocab_size]
    return out
