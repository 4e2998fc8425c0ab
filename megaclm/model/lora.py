"""LoRA on GPTModel: which parameters train, the adapter state dict, and merging into the base weights.

The adapters live in the Column/Row-parallel linears (megaclm.parallel.layers) as `lora_a` (r, in) and
`lora_b` (out, r). Everything else is frozen: `requires_grad=False`, so it has no gradient and, since
the trainer's optimizer groups take trainable parameters only, no optimizer state (Adam moments and the
fp32 master copy are the adapters' alone). A LoRA checkpoint keeps the adapters and names its base.

Merging is W' = W + (alpha / r) B A on full (unsharded) state dicts: `merge_lora_state_dict(sd, scale)`.
"""
from typing import Mapping

import torch
import torch.nn as nn

LORA_SUFFIXES = (".lora_a", ".lora_b")


def is_lora_key(key: str) -> bool:
    return key.endswith(LORA_SUFFIXES)


def freeze_base(module: nn.Module) -> int:
    """Train only the adapters; returns the number of trainable elements (this rank's shards)."""
    trainable = 0
    for name, p in module.named_parameters():
        p.requires_grad_(is_lora_key(name))
        trainable += p.numel() if p.requires_grad else 0
    return trainable


def adapter_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if is_lora_key(k)}


def merge_lora_state_dict(sd: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A full GPTModel state dict with every adapter folded into its weight: `<m>.weight += scale * B @ A`."""
    out = {k: v for k, v in sd.items() if not is_lora_key(k)}
    for key in sd:
        if key.endswith(".lora_a"):
            module = key[:-len(".lora_a")]
            a, b, w = sd[key].double(), sd[module + ".lora_b"].double(), sd[module + ".weight"]
            out[module + ".weight"] = (w.double() + scale * b @ a).to(w.dtype)  # (out, r) @ (r, in)
    return out
