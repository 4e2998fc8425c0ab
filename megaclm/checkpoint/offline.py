"""Write a megaclm checkpoint from a full state dict, without processes or an engine (HF import, reshard).

`write_checkpoint(out, config_tree, full_sd, tp=2, pp=2)` produces, for that TP/PP layout, the files
`pretrain_gpt.py --load OUT --finetune` reads (layout: megaclm.checkpoint):

    OUT/latest                                         "iter_0000000" (or the given iteration)
    OUT/<tag>/mp_rank_{MP:02d}_model_states.pt         DeepSpeed: the TP shard as `module` (pp = 1), or
                                                       module=None with one file per model-parallel rank (pp > 1)
    OUT/<tag>/layer_{L:02d}-model_{TP:02d}-model_states.pt   pp > 1: DeepSpeed's per-layer files
    OUT/<tag>/layer_{M}_expert_{E}_mp_rank_{TP:02d}_model_states.pt   MoE: DeepSpeed's per-expert files (routed
                                                       expert E of the M-th MoE layer), left out of `module`
    OUT/<tag>/megaclm/model/tp{TP:02d}_pp{PP:03d}.pt   megaclm's fp32 shards (megaclm.checkpoint.shards)
    OUT/<tag>/megaclm/config.json, manifest.json (every file's size and checksum), meta.json

No optimizer files: a run continues from it with --finetune (weights only, read from megaclm's shards
by megaclm.checkpoint.weights, for any layout and ZeRO stage) or, when `client_state` carries megaclm's
progress, with --no-load-optim (DeepSpeed's module load: the same TP/PP, ZeRO 0-2). Everything is written under a temporary sibling
directory that is renamed to OUT at the end, so an interrupted write leaves no OUT behind.

The pipeline files follow DeepSpeed's naming: layer index = position in the flat LayerSpec list
(megaclm.model.pipe: 0 embedding, 1..L transformer layers, L+1 final norm, L+2 head); a tied head is
not saved (DeepSpeed re-ties it from the embedding). Which stage holds which layer does not enter the
DeepSpeed file names; megaclm's shards put layers on stages uniformly, which only matters for reading
them back, and `load_full_state_dict` merges them whatever the split.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import deepspeed
import torch

from megaclm.checkpoint.layout import (CLIENT_KEY, CONFIG, LATEST, META, MODEL, OPTIM, ds_expert_states, ds_layer_states,
                                      ds_model_states, shard_name, shards_dir, tag_for)
from megaclm.checkpoint.manifest import write_manifest
from megaclm.checkpoint.universal import MOMENTS
from megaclm.config.model import ModelConfig
from megaclm.config.parallel import ParallelConfig
from megaclm.config.validate import validate_layout
from megaclm.model.pipe import plain_to_pipe_key
from megaclm.model.sharding import expert_id, shard_state_dict
from megaclm.utils.errors import UserError
from megaclm.utils.fileio import temp_path_for


def check_fresh_output(out_dir: str, flag: str = "--out") -> None:
    """Refuse to write over an existing non-empty directory (or a file), before any heavy work."""
    if os.path.isfile(out_dir) or (os.path.isdir(out_dir) and os.listdir(out_dir)):
        raise UserError(f"{flag} {out_dir} already exists and is not empty; choose a new directory or remove it")
    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):  # missing parents are created; the nearest existing one must allow it
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {out_dir}: cannot create it, {parent} is not a writable directory")


def _pipe_layer(pipe_key: str) -> tuple[int, str]:
    """(DeepSpeed layer index, key inside that layer) of a PipelineModule state-dict key."""
    if pipe_key.startswith("tied_modules.embed."):
        return 0, pipe_key[len("tied_modules.embed."):]
    index, rest = pipe_key.split(".", 1)
    return int(index), rest


def _stage_of_layer(index: int, num_layers: int, pp: int) -> int:
    """Stage of flat layer `index` in megaclm's shards: transformer layers uniformly, embedding first, head last."""
    if index == 0:
        return 0
    if index > num_layers:
        return pp - 1
    return (index - 1) * pp // num_layers


def _deepspeed_states(module: Any, mp_world_size: int, iteration: int, client_state: dict | None) -> dict:
    """The keys DeepSpeed's engine.load_checkpoint reads from mp_rank_XX_model_states.pt."""
    state = dict(module=module, buffer_names=[], optimizer=None, lr_scheduler=None, data_sampler=None,
                 random_ltd=None, sparse_tensor_module_names=set(), skipped_steps=0, global_steps=iteration,
                 global_samples=0, dp_world_size=1, mp_world_size=mp_world_size, ds_config={},
                 ds_version=deepspeed.__version__)
    if client_state is not None:
        state[CLIENT_KEY] = client_state
    return state


def _save_experts(ckpt: str, shard: Mapping[str, torch.Tensor], model_cfg: ModelConfig, tp_rank: int,
                  states: dict) -> None:
    """MoE: DeepSpeed's per-expert files for TP rank `tp_rank`, and its MoE keys in `states` (whose module
    keeps the other tensors), as its engine saves an MoE model (megaclm.model.moe)."""
    moe_layers = [i for i in range(model_cfg.num_layers) if model_cfg.is_moe_layer(i)]
    files: dict[str, dict[str, torch.Tensor]] = {}
    for key in [k for k in shard if expert_id(k) is not None]:
        layer = moe_layers.index(int(key.split(".")[1]))  # keys: layers.{i}.mlp.deepspeed_moe...
        name = ds_expert_states(layer, expert_id(key), tp_rank)
        files.setdefault(name, {})[key] = states["module"].pop(key)
    for name, tensors in files.items():
        torch.save(tensors, os.path.join(ckpt, name))
    states["num_experts"] = [model_cfg.num_experts] * len(moe_layers)


def _stages(shard: Mapping[str, torch.Tensor], model_cfg: ModelConfig, pp: int) -> list[dict[str, torch.Tensor]]:
    """A TP shard (GPTModel keys) split into its pipeline stages' tensors under pipeline keys."""
    stages: list[dict[str, torch.Tensor]] = [{} for _ in range(pp)]
    for key, value in shard.items():
        pipe_key = plain_to_pipe_key(key, model_cfg)
        stages[_stage_of_layer(_pipe_layer(pipe_key)[0], model_cfg.num_layers, pp)][pipe_key] = value
        if pipe_key.startswith("tied_modules."):
            stages[pp - 1][pipe_key] = value  # the tied head is the embedding module again on the last stage
    return stages


def write_checkpoint(out_dir: str, config_tree: dict, full_sd: Mapping[str, torch.Tensor], *, tp: int, pp: int,
                     meta: dict | None = None, client_state: dict | None = None, iteration: int = 0,
                     optimizer_state: Mapping[str, Any] | None = None,
                     extra_files: Mapping[str, str] | None = None, extra_texts: Mapping[str, str] | None = None) -> str:
    """Write `full_sd` (GPTModel keys, vocabulary already padded for `tp`) as a TP x PP checkpoint; returns the tag.

    `config_tree` is MegaclmConfig.to_dict() of the run the checkpoint describes; its parallel section
    is overwritten with tp/pp. `meta` adds keys to meta.json (e.g. tokenizer_vocab_size).
    `optimizer_state` {"exp_avg": full, "exp_avg_sq": full (GPTModel keys, padded like full_sd), "step"}
    is written as megaclm's layout-independent optimizer shards (megaclm.checkpoint.universal), which
    `pretrain_gpt.py --load OUT` of that layout (or any other) loads with the Adam moments.
    `extra_files` {path relative to OUT: source file} are copied in, and `extra_texts` {path: text}
    written, before OUT appears (tokenizer files, a --config YAML).
    """
    model_cfg = ModelConfig(**config_tree["model"])
    padded_vocab = full_sd["embedding.word_embeddings.weight"].shape[0]
    validate_layout(model_cfg, ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                    padded_vocab, "the state dict's embedding")
    if model_cfg.num_experts is not None and pp > 1:
        raise UserError(f"an MoE checkpoint is written at pipeline_model_parallel_size 1, not {pp} (DeepSpeed's "
                        "pipeline engine stores MoE models in other files than these); a run of any PP loads it")
    check_fresh_output(out_dir)
    tree = json.loads(json.dumps(config_tree))
    tree.setdefault("parallel", {}).update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tag = tag_for(iteration)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    tmp = temp_path_for(out_dir)  # a unique sibling name; replaced by a directory of the same name
    os.remove(tmp)
    try:
        ckpt = os.path.join(tmp, tag)
        os.makedirs(os.path.join(ckpt, shards_dir(MODEL)))
        for r in range(tp):
            shard = shard_state_dict(full_sd, model_cfg, tp, r)
            if optimizer_state is not None:
                _save_optimizer_shards(ckpt, optimizer_state, model_cfg, r, tp, pp)
            if pp == 1:
                states = _deepspeed_states(dict(shard), tp, iteration, client_state)
                if model_cfg.num_experts is not None:
                    _save_experts(ckpt, shard, model_cfg, r, states)
                torch.save(states, os.path.join(ckpt, ds_model_states(r)))
                _save_shard(ckpt, shard, r, tp, 0, 1)
                continue
            layers: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in shard.items():
                index, local = _pipe_layer(plain_to_pipe_key(key, model_cfg))
                layers.setdefault(index, {})[local] = value
            for index, tensors in layers.items():
                torch.save(tensors, os.path.join(ckpt, ds_layer_states(index, r)))
            for s, stage in enumerate(_stages(shard, model_cfg, pp)):
                _save_shard(ckpt, stage, r, tp, s, pp)
        if pp > 1:
            for m in range(tp * pp):
                torch.save(_deepspeed_states(None, tp * pp, iteration, client_state),
                           os.path.join(ckpt, ds_model_states(m)))
        sizes = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "data_parallel_size": 1,
                 "world_size": tp * pp, "padded_vocab_size": padded_vocab, "precision": "fp32"}
        with open(os.path.join(ckpt, CONFIG), "w") as f:
            json.dump(tree, f, indent=1)
        # written_by: `--load` takes megaclm's layout-independent files, not DeepSpeed's (module-only) ones.
        meta_text = json.dumps({**(meta or {}), **sizes, "tag": tag, "iteration": iteration, "written_by": "offline"},
                               indent=1)
        write_manifest(ckpt, {}, {META: meta_text.encode()})  # every file hashed from disk: no ranks to share it
        with open(os.path.join(ckpt, META), "w") as f:
            f.write(meta_text)
        for rel, src in (extra_files or {}).items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            shutil.copyfile(src, os.path.join(tmp, rel))
        for rel, text in (extra_texts or {}).items():
            with open(os.path.join(tmp, rel), "w", encoding="utf-8") as f:
                f.write(text)
        with open(os.path.join(tmp, LATEST), "w") as f:
            f.write(tag)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (check_fresh_output): make room for the rename
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tag


def _save_optimizer_shards(ckpt: str, optimizer_state: Mapping[str, Any], model_cfg: ModelConfig, tp_rank: int,
                           tp: int, pp: int) -> None:
    """TP rank `tp_rank`'s moments, per pipeline stage, as megaclm/optim/ files (megaclm.checkpoint.universal)."""
    per_moment = {m: shard_state_dict(optimizer_state[m], model_cfg, tp, tp_rank) for m in MOMENTS}
    staged = {m: [v] if pp == 1 else _stages(v, model_cfg, pp) for m, v in per_moment.items()}
    os.makedirs(os.path.join(ckpt, shards_dir(OPTIM)), exist_ok=True)
    for s in range(pp):
        payload = {m: staged[m][s] for m in MOMENTS}
        payload.update(step=optimizer_state["step"], tp_rank=tp_rank, tp_size=tp, pp_rank=s, pp_size=pp,
                       pipeline=pp > 1)
        torch.save(payload, os.path.join(ckpt, shards_dir(OPTIM), shard_name(tp_rank, s)))


def _save_shard(ckpt: str, tensors: dict, tp_rank: int, tp: int, pp_rank: int, pp: int) -> None:
    payload = {"tensors": {k: v.float().contiguous() for k, v in tensors.items()}, "tp_rank": tp_rank, "tp_size": tp,
               "pp_rank": pp_rank, "pp_size": pp, "pipeline": pp > 1}
    torch.save(payload, os.path.join(ckpt, shards_dir(MODEL), shard_name(tp_rank, pp_rank)))
