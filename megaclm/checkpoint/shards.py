"""Per-(tp, pp) fp32 model shards beside the DeepSpeed files, and the full model rebuilt from them.

DeepSpeed's own files hold 16-bit module weights and ZeRO-partitioned fp32 master weights whose
layout depends on the ZeRO stage and data-parallel size. To make "the full fp32 model of any
checkpoint" a single call, megaclm keeps, per model-parallel rank, its parameters as fp32 (the
optimizer's master copy when there is one) under their module names: gathered from data-parallel
rank 0 by a save with --save-layout-independent-interval (`model_shard_file`), else made from
DeepSpeed's files the first time a reader needs them (megaclm.checkpoint.from_deepspeed):

    <tag>/megaclm/model/tp{TP:02d}_pp{PP:03d}.pt = {"tensors": {name: fp32 tensor},
        "tp_rank", "tp_size", "pp_rank", "pp_size", "pipeline": bool, "ep_rank", "ep_size"}
    <tag>/megaclm/model/tp{TP:02d}_pp{PP:03d}_ep{EP:03d}.pt   expert parallel, EP rank > 0: its routed experts only

Routed experts are saved under their global ids (megaclm.model.sharding.globalize_experts) by the first
data-parallel rank holding them (expert-data-parallel rank 0): the files of one (tp, pp) rank together
hold every expert once, whatever the EP size.

`load_full_state_dict(ckpt_dir)` maps pipeline names back to GPTModel's (megaclm.model.pipe),
merges tensor-parallel shards (megaclm.model.sharding) and returns GPTModel's full state dict with
the padded vocabulary, plus the run's config and meta.json:

    ckpt = load_full_state_dict("runs/x")
    model = GPTModel(ModelConfig(**ckpt.config["model"]), ckpt.meta["padded_vocab_size"])
    model.load_state_dict(ckpt.state_dict)
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, NamedTuple

import torch
from deepspeed.utils import safe_get_full_fp32_param

from megaclm.checkpoint.hf.files import DTYPES
from megaclm.checkpoint.from_deepspeed import ensure_shards
from megaclm.checkpoint.layout import CONFIG, MODEL, read_latest, read_meta, shard_name, shards_dir
from megaclm.checkpoint.manifest import torch_load
from megaclm.config.model import ModelConfig
from megaclm.model.pipe import pipe_to_plain_key
from megaclm.model.quantize import fake_quantize
from megaclm.model.sharding import expert_id, globalize_experts, split_stacked_experts, unshard_state_dicts
from megaclm.parallel.state import ParallelState
from megaclm.utils.errors import UserError


def shard_file(folder: str, fields: dict[str, dict[str, torch.Tensor]], module: torch.nn.Module,
               pstate: ParallelState, **extra: Any) -> tuple[str, dict] | None:
    """(path, payload) of this rank's per-(tp, pp, ep) file in `folder`, or None where another rank writes it.

    `fields` {payload field: {module name: tensor}} (model: "tensors"; optim: "exp_avg", "exp_avg_sq") are
    written with global expert ids: by data-parallel rank 0 whole, by the first replica of each other EP
    rank (expert-data-parallel rank 0) its experts only. `extra` joins the payload (e.g. Adam's step)."""
    if pstate.edp_rank != 0:
        return None
    payload = dict(extra, tp_rank=pstate.tp_rank, tp_size=pstate.tp_size, pp_rank=pstate.pp_rank,
                   pp_size=pstate.pp_size, pipeline=pstate.pp_size > 1, ep_rank=pstate.ep_rank, ep_size=pstate.ep_size)
    for field, tensors in fields.items():
        tensors = globalize_experts(tensors, module.config.num_experts, pstate.ep_size, pstate.ep_rank)
        payload[field] = {k: v for k, v in tensors.items() if pstate.ep_rank == 0 or expert_id(k) is not None}
    return os.path.join(folder, shard_name(pstate.tp_rank, pstate.pp_rank, pstate.ep_rank)), payload


def model_shard_file(module: torch.nn.Module, out_dir: str, pstate: ParallelState,
                     trainable_only: bool = False) -> tuple[str, dict] | None:
    """Collective over the data-parallel group (ZeRO gathers fp32 partitions): (path, payload) of this
    rank's fp32 shard on data-parallel rank 0 (and the other EP ranks' first replicas), None on the
    others. The tensors are on the CPU and may be the live fp32 parameters themselves: save them before
    the next optimizer step, or copy them. `trainable_only` (LoRA): the adapters, not the frozen base the
    checkpoint refers to."""
    tensors = {}
    for name, param in module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param)  # None without a mixed-precision/ZeRO optimizer
        tensors[name] = (param.detach() if full is None else full).float().cpu()
    return shard_file(os.path.join(out_dir, MODEL), {"tensors": tensors}, module, pstate)


def shard_tensors(shard: dict, field: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    """One shard file's `field` tensors under GPTModel's keys (pipeline names mapped back; the stacked experts
    of checkpoints written before expert-parallel sharding split per expert)."""
    tensors = shard[field]
    if shard["pipeline"]:
        tensors = {pipe_to_plain_key(name, config): t for name, t in tensors.items()}
    return split_stacked_experts(tensors) if config.num_experts is not None else tensors


class FullCheckpoint(NamedTuple):
    config: dict  # the resolved config tree (MegaclmConfig.to_dict())
    meta: dict  # megaclm/meta.json: iteration, sizes, padded_vocab_size, ...
    state_dict: dict[str, torch.Tensor]  # GPTModel keys, full (unsharded) fp32 tensors


def load_full_state_dict(ckpt_dir: str, tag: str | None = None, *, kind: str = "model",
                         field: str = "tensors") -> FullCheckpoint:
    """GPTModel's full fp32 state dict of a checkpoint of any TP/PP layout (default tag: `latest`).

    `kind`/`field` read another set of per-(tp, pp) files keyed like the parameters: "optim" with
    "exp_avg" / "exp_avg_sq" gives the full Adam moments (megaclm.checkpoint.universal)."""
    tag = tag or read_latest(ckpt_dir)
    if tag is None:
        raise UserError(f"{ckpt_dir!r} holds no `latest` checkpoint; pass a --save directory of pretrain_gpt.py")
    meta = read_meta(ckpt_dir, tag)
    ckpt_dir = ensure_shards(ckpt_dir, tag)  # made from DeepSpeed's files if the save did not write them
    with open(os.path.join(ckpt_dir, tag, CONFIG)) as f:
        tree = json.load(f)
    model_cfg = ModelConfig(**tree["model"])
    files = sorted(glob.glob(os.path.join(ckpt_dir, tag, shards_dir(kind), "tp*_pp*.pt")))
    shards = [torch_load(p) for p in files]
    tp, pp = meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]
    ep = meta.get("expert_model_parallel_size", 1)
    if len(shards) != tp * pp * ep:
        raise UserError(f"checkpoint {os.path.join(ckpt_dir, tag)} has {len(shards)} {kind} shards, expected "
                        f"tp {tp} x pp {pp} x ep {ep}; it is incomplete")
    per_tp: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for shard in shards:
        for key, tensor in shard_tensors(shard, field, model_cfg).items():
            # A tied embedding lives on the first and the last stage; both copies are equal. Expert-parallel
            # ranks' files hold disjoint experts (global ids).
            per_tp[shard["tp_rank"]].setdefault(key, tensor)
    return FullCheckpoint(tree, meta, unshard_state_dicts(per_tp, model_cfg))


def load_lora_checkpoint(ckpt_dir: str, tag: str | None = None) -> tuple[FullCheckpoint, FullCheckpoint]:
    """(the LoRA run's checkpoint, with the full adapter state dict; the base checkpoint it names)."""
    adapters = load_full_state_dict(ckpt_dir, tag)
    ref = adapters.meta.get("lora_base")
    if ref is None:
        raise UserError(f"{ckpt_dir}/{adapters.meta['tag']} holds no LoRA adapters (it is a full checkpoint); "
                        "drop the --lora-* export flags")
    return adapters, load_full_state_dict(ref["dir"], ref["tag"])


def lora_trained_base(adapters: FullCheckpoint, base: FullCheckpoint) -> dict[str, torch.Tensor]:
    """The base weights a LoRA run trained against: a QLoRA run's (--base-quantization) quantized and dequantized
    shard by shard as the run did (its TP size and precision), since its adapters learned to correct that base and
    not the original (QLoRA merges into the dequantized weights); any other run's as they are."""
    method = adapters.config["lora"].get("base_quantization", "none")
    if method == "none":
        return base.state_dict
    meta = adapters.meta
    return fake_quantize(base.state_dict, ModelConfig(**base.config["model"]), method,
                         meta["tensor_model_parallel_size"], DTYPES[meta["precision"]])
