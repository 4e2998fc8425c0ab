"""Full (unsharded) GPTModel state dicts <-> tensor- and expert-parallel shards.

`shard_state_dict(full, config, tp, rank, ep, ep_rank)` gives what `GPTModel(config, V, pstate)` of
tensor rank `rank` and expert-parallel rank `ep_rank` loads with `load_state_dict`;
`unshard_state_dicts([shard_0, ..., shard_tp-1], config)` is its inverse over TP (the shards with global
expert ids: `globalize_experts` of each EP rank's, merged). Keys are GPTModel's (a pipeline stage's convert
with megaclm.model.pipe.pipe_to_plain_key). The rule for each key is the one its parameter declares
(megaclm.parallel.layers: `partition_dim`, `partition_blocks`), read off a GPTModel of `config` built once on
the meta device. Replicated tensors (norms, row-parallel biases, position embeddings, MoE routers and
routed experts) are copied; unshard takes rank 0's copy. An MoE layer's shared expert is split like the
dense MLP. Routed experts are split by EP instead: EP rank r holds experts [r E/ep, (r+1) E/ep), numbered
from 0 in its module (megaclm.model.moe).
"""
import functools
import re
from typing import Mapping, Sequence

import torch

from megaclm.config.kernels import KernelsConfig
from megaclm.config.lora import LoraConfig
from megaclm.config.model import ModelConfig
from megaclm.model.gpt import model_pieces
from megaclm.model.moe import EXPERTS_PREFIX
from megaclm.ops import build_ops
from megaclm.parallel.layers import shard_blocks, unshard_blocks
from megaclm.parallel.state import ParallelState

_LAYER = re.compile(r"^layers\.\d+\.")


@functools.lru_cache(maxsize=32)
def declared_partitions(config: ModelConfig) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{GPTModel key, `layers.{i}.` dropped: (split dim, full block sizes)} of every tensor-parallel parameter,
    as the layers declare them. Read off GPTModel's pieces (megaclm.model.gpt.model_pieces) built on the meta
    device (no memory, no init): the embedding, the output layer and one transformer layer of each kind (dense,
    MoE), with adapters on every linear so that LoRA keys are covered. The vocabulary size is any: its one
    block is sized from the tensor."""
    pieces = model_pieces(config, 128, ParallelState.single(), build_ops(KernelsConfig()), KernelsConfig(),
                          LoraConfig(lora_rank=1))
    kinds = {config.is_moe_layer(i): f"layers.{i}" for i in reversed(range(config.num_layers))}  # the first of each
    rules: dict[str, tuple[int, tuple[int, ...]]] = {}
    with torch.device("meta"):
        for piece in pieces:
            if piece.name.startswith("layers.") and piece.name not in kinds.values():
                continue
            for name, param in piece.build().named_parameters(prefix="" if piece.name.startswith("layers.")
                                                               else piece.name):
                if getattr(param, "tensor_model_parallel", False):
                    rules[name] = (param.partition_dim, param.partition_blocks)
    return rules


def tp_partition(key: str, config: ModelConfig, shape: torch.Size) -> tuple[int, list[int]] | None:
    """(split dim, blocks split separately) for a GPTModel parameter key, or None if it is replicated. A single
    block is the whole of `shape` along the dim (a shard's or the full tensor's)."""
    rule = declared_partitions(config).get(_LAYER.sub("", key))
    if rule is None:
        return None
    dim, blocks = rule
    return dim, list(blocks) if len(blocks) > 1 else [shape[dim]]


_EXPERT_KEY = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..*)?$")


def expert_id(key: str) -> int | None:
    """The expert number in a routed expert's key (global or local, as the dict holds it), else None."""
    m = _EXPERT_KEY.match(key)
    return None if m is None else int(m.group(2))


def _renumber(key: str, offset: int) -> str:
    m = _EXPERT_KEY.match(key)
    return f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3) or ''}"


def split_stacked_experts(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints of megaclm before expert-parallel sharding stacked each MoE layer's experts as
    `mlp.experts.fc1` (E, 2F, H) and `mlp.experts.fc2` (E, H, F): those as today's per-expert keys."""
    out = {}
    for key, value in sd.items():
        if key.endswith((".mlp.experts.fc1", ".mlp.experts.fc2")):
            prefix, name = key[:-len("experts.fc1")], key[-3:]
            out.update({f"{prefix}{EXPERTS_PREFIX}{e}.{name}": w.clone() for e, w in enumerate(value.unbind())})
        else:
            out[key] = value
    return out


def localize_experts(sd: Mapping[str, torch.Tensor], num_experts: int | None, ep_size: int,
                     ep_rank: int) -> dict[str, torch.Tensor]:
    """Global expert ids -> EP rank `ep_rank`'s: its experts renumbered from 0, the other ranks' dropped."""
    if num_experts is None or ep_size == 1:
        return dict(sd)
    local = num_experts // ep_size
    first = ep_rank * local
    return {(key if e is None else _renumber(key, -first)): value for key, value in sd.items()
            if (e := expert_id(key)) is None or first <= e < first + local}


def globalize_experts(sd: Mapping, num_experts: int | None, ep_size: int, ep_rank: int) -> dict:
    """EP rank `ep_rank`'s local expert ids -> global ones (the inverse of localize_experts on its keys)."""
    if num_experts is None or ep_size == 1:
        return dict(sd)
    first = ep_rank * (num_experts // ep_size)
    return {(key if expert_id(key) is None else _renumber(key, first)): value for key, value in sd.items()}


def shard_state_dict(full: Mapping[str, torch.Tensor], config: ModelConfig, tp_size: int, tp_rank: int,
                     ep_size: int = 1, ep_rank: int = 0) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in localize_experts(full, config.num_experts, ep_size, ep_rank).items():
        part = tp_partition(key, config, value.shape)
        out[key] = value.clone() if part is None else shard_blocks(value, part[0], part[1], tp_size, tp_rank).clone()
    return out


def unshard_state_dicts(shards: Sequence[Mapping[str, torch.Tensor]], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in shards[0].items():
        full_shape = list(value.shape)
        part = tp_partition(key, config, value.shape)
        if part is None:
            out[key] = value.clone()
            continue
        dim, _ = part
        full_shape[dim] *= len(shards)
        # Recompute the blocks from the full shape: the embedding/output rules read it from `shape`.
        _, blocks = tp_partition(key, config, torch.Size(full_shape))
        out[key] = unshard_blocks([s[key] for s in shards], dim, blocks)
    return out
