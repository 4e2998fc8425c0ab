"""LoRA on GPTModel: which parameters train, the adapter state dict, and merging into the base weights.

The adapters live in the Column/Row-parallel linears (megaclm.parallel.layers) as `lora_a` (r, in) and
`lora_b` (out, r). Everything else is frozen: `requires_grad=False`, so it has no gradient and, since
the trainer's optimizer groups take trainable parameters only, no optimizer state (Adam moments and the
fp32 master copy are the adapters' alone). A LoRA checkpoint keeps the adapters and names its base.

Merging is W' = W + (alpha / r) B A on full (unsharded) state dicts: `merge_lora_state_dict(sd, scale)`.
"""
import math
import zlib
from typing import Callable, Mapping

import deepspeed
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


def init_adapters(module: nn.Module, seed: int, tp_size: int, tp_rank: int,
                  plain_name: Callable[[str], str] = lambda k: k) -> int:
    """Redraw every adapter's A whole from a generator of its own (the run's seed and the adapter's GPTModel
    name, `plain_name` maps pipeline names), then keep this rank's shard; returns how many were drawn.

    The linears draw A from the default generator while the model is built, where it stands wherever the
    layers built before left it: pipeline stages build only their own layers, and ZeRO-3 builds them
    partitioned, so the adapters would start differently at PP=2 or ZeRO-3 than at PP=1 and ZeRO 0-2. Drawn
    per name they start the same at any layout (B is zero), as the base weights do when loaded from one
    checkpoint (tools/check_layout.py compares layouts this way). Collective under ZeRO-3: every rank gathers
    the A matrices (all ranks draw the same; the first rank's copy is kept)."""
    adapters = [(name, param) for name, param in module.named_parameters() if name.endswith(".lora_a")]
    with deepspeed.zero.GatheredParameters([param for _, param in adapters], modifier_rank=0):
        for name, param in adapters:
            split = getattr(param, "tensor_model_parallel", False)  # a row-parallel linear's A: split along its input
            full = torch.empty(param.shape[0], param.shape[1] * (tp_size if split else 1))
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(plain_name(name).encode()))
            nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)  # PEFT's init (lora_a_init)
            if split:
                full = full.chunk(tp_size, dim=1)[tp_rank]
            with torch.no_grad():
                param.copy_(full)
    return len(adapters)


def merge_lora_state_dict(sd: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A full GPTModel state dict with every adapter folded into its weight: `<m>.weight += scale * B @ A`."""
    out = {k: v for k, v in sd.items() if not is_lora_key(k)}
    for key in sd:
        if key.endswith(".lora_a"):
            module = key[:-len(".lora_a")]
            a, b, w = sd[key].double(), sd[module + ".lora_b"].double(), sd[module + ".weight"]
            out[module + ".weight"] = (w.double() + scale * b @ a).to(w.dtype)  # (out, r) @ (r, in)
    return out
