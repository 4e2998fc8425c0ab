"""Weights only (`--finetune`): a checkpoint's fp32 model, saved with any TP/PP layout, into a running engine.

DeepSpeed's own module-only load needs the checkpoint's layout to equal the run's, and under ZeRO-3 it
reads ZeRO partition files that an HF import (megaclm.checkpoint.offline) or a resharded checkpoint
does not have. megaclm's fp32 shards (<tag>/megaclm/model/, megaclm.checkpoint.shards) are read instead,
made from DeepSpeed's files first where the save did not write them (megaclm.checkpoint.from_deepspeed):

    1. this rank's tensor-parallel shard: the saved shards of the same TP rank when the TP size is
       unchanged (never the whole model in memory), else the full model merged and split again; of the
       routed experts, this expert-parallel rank's (any saved EP size: the files hold global expert ids);
    2. the vocabulary re-padded if the run's padded size differs (padding rows hold no token);
    3. loaded into the module (pipeline stages take their own keys), gathered under ZeRO-3;
    4. the optimizer's fp32 master copies refreshed from the loaded weights.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Callable

import deepspeed
import torch
from deepspeed.pipe import PipelineModule

from megaclm.checkpoint.from_deepspeed import ensure_shards_collective
from megaclm.checkpoint.layout import has_shards, read_meta, shard_name, shards_dir
from megaclm.checkpoint.hf.common import pad_vocab, unpad_vocab, vocab_rows
from megaclm.checkpoint.shards import load_full_state_dict, shard_tensors, torch_load
from megaclm.config.model import ModelConfig
from megaclm.model.pipe import load_plain_state_dict
from megaclm.model.sharding import localize_experts, shard_state_dict
from megaclm.utils.errors import UserError


def _own_tp_shard(ckpt_dir: str, tag: str, tp_rank: int, config: ModelConfig, kind: str,
                  field: str) -> dict[str, torch.Tensor]:
    """GPTModel keys of TP rank `tp_rank`, merged over the saved pipeline stages and expert-parallel ranks."""
    out: dict[str, torch.Tensor] = {}
    prefix = shard_name(tp_rank, 0).split("_pp")[0]
    for path in sorted(glob.glob(os.path.join(ckpt_dir, tag, shards_dir(kind), f"{prefix}_pp*.pt"))):
        shard = torch_load(path, mmap=True)
        for key, tensor in shard_tensors(shard, field, config).items():
            out.setdefault(key, tensor)
    return out


def shard_for(module: Any, ckpt_dir: str, tag: str, kind: str = "model", field: str = "tensors") -> dict[str, torch.Tensor]:
    """This rank's tensor-parallel shard (GPTModel keys) of a checkpoint's per-parameter tensors: the
    weights (model/tensors), or an optimizer state (optim/exp_avg, megaclm.checkpoint.universal)."""
    pstate, config = module.pstate, module.config
    tp, rank, ep, ep_rank = pstate.tp_size, pstate.tp_rank, pstate.ep_size, pstate.ep_rank
    meta = read_meta(ckpt_dir, tag)
    # GPTModel knows its padded vocabulary; a pipeline stage was built with the checkpoint's (pretrain_gpt.py).
    padded_vocab = getattr(module, "vocab_size", None) or meta["padded_vocab_size"]
    if not has_shards(ckpt_dir, tag, kind):
        raise UserError(f"--load {ckpt_dir}/{tag} has no megaclm {kind} shards ({shards_dir(kind)}/); it was not "
                        f"written by this megaclm, so its {'weights' if kind == 'model' else 'optimizer state'} "
                        "cannot be read into another layout")
    if meta["tensor_model_parallel_size"] == tp and meta["padded_vocab_size"] == padded_vocab:
        return localize_experts(_own_tp_shard(ckpt_dir, tag, rank, config, kind, field), config.num_experts, ep,
                                ep_rank)
    full = load_full_state_dict(ckpt_dir, tag, kind=kind, field=field).state_dict
    rows = vocab_rows(full) if "embedding.word_embeddings.weight" in full else padded_vocab  # LoRA: adapters only
    if rows != padded_vocab:  # another TP size pads differently; real rows are unchanged
        full = pad_vocab(unpad_vocab(full, min(rows, padded_vocab)), padded_vocab)
    return shard_state_dict(full, config, tp, rank, ep, ep_rank)


def load_weights(engine: Any, ckpt_dir: str, tag: str, select: Callable[[str], bool] | None = None) -> None:
    """Load checkpoint `tag`'s model weights into `engine.module` (GPTModel or GPTPipelineModule).

    `select(key)` restricts the load to the module's GPTModel keys it accepts (LoRA: the frozen base from
    the base checkpoint, the adapters from a LoRA checkpoint); each of those must be in the checkpoint.
    Collective: a checkpoint saved without megaclm/model/ is converted first (megaclm.checkpoint.from_deepspeed)."""
    ensure_shards_collective(ckpt_dir, tag)
    module = engine.module
    shard = shard_for(module, ckpt_dir, tag)
    # No-op unless ZeRO-3 partitioned the parameters; data-parallel rank 0's copy is kept (all are equal).
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
        if isinstance(module, PipelineModule):
            load_plain_state_dict(module, shard, select)
        elif select is None:
            module.load_state_dict(shard)
        else:
            wanted = [k for k in module.state_dict() if select(k)]
            missing = [k for k in wanted if k not in shard]
            if missing:
                raise UserError(f"{ckpt_dir}/{tag} lacks {len(missing)} weights this model needs "
                                f"(e.g. {', '.join(missing[:3])}); it is not the checkpoint this run expects")
            module.load_state_dict({k: shard[k] for k in wanted}, strict=False)
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)  # fp32 master copies, where there are any
    if refresh is not None:
        refresh()
