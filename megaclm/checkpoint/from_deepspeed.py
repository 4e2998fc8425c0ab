"""DeepSpeed's files of a tag -> megaclm's layout-independent files, offline (no engine, no process group).

A save writes DeepSpeed's own files (the resume fast path, and what DeepSpeed's zero_to_fp32.py and
ds_to_universal read) and megaclm's small ones; the per-(tp, pp) fp32 weights (<tag>/megaclm/model/,
megaclm.checkpoint.shards) and full Adam moments (<tag>/megaclm/optim/, megaclm.checkpoint.universal)
that a load into another layout, reshard.py and the offline readers need are made from DeepSpeed's files
here, the first time something needs them (`ensure_shards`), in exactly the format a gathering save
writes (`--save-layout-independent-interval`), tensor for tensor.

What is read, per model-parallel rank MP (one (tp, pp) rank; `mp_rank_{MP:02d}`):
  - its model-states file (ZeRO-3: `zero_pp_rank_{DP}_mp_rank_{MP:02d}_model_states.pt`, one per data-parallel
    rank) for the client state's PARAM_NAMES_KEY entry that megaclm's save adds: this rank's tp/pp/ep
    coordinates and, group by group in the optimizer's order, the name and shape of every parameter it steps;
  - ZeRO-1/2 and DeepSpeed's bf16 optimizer: `[bf16_]zero_pp_rank_{DP}_mp_rank_{MP:02d}_optim_states.pt`, one
    per data-parallel rank DP. Each holds, per parameter group, its contiguous slice of the group's flat fp32
    master buffer ("single_partition_of_fp32_groups") and Adam's flat moments of that slice
    (base_optimizer_state["state"][group]), and `param_slice_mappings`: {name: (start, numel)} of the part of
    each parameter inside the slice. A parameter is the concatenation of its parts over DP = 0, 1, ...;
  - ZeRO-3: the same per-DP files; "fp32_flat_groups" (sub-groups, concatenated) hold every parameter's
    1/DP part, ceil(numel / DP) elements each (the last part padded), in the order of `param_shapes`;
  - ZeRO-0: the model-states file's "optimizer": the torch optimizer's own state dict (fp32; the weights are
    the module's), DeepSpeed's FP16_Optimizer ("fp32_groups_flat": one flat master per group) or
    FP16_UnfusedOptimizer ("fp32_groups": one master per parameter); parameters in the recorded order.
Pipeline runs' module weights (ZeRO-0 fp32) are in `layer_{L:02d}-model_{TP:02d}-model_states.pt`.
MoE (DeepSpeed's engine._save_moe_checkpoint; one model-states file per MP rank, from data-parallel rank 0):
  - the model-states file holds everything but the routed experts; its PARAM_NAMES_KEY and param_shapes name
    the experts by EP rank 0's local ids (0..E/ep-1), which are every EP rank's names for its own experts;
  - ZeRO-1/2: the experts are in groups of their own (DeepSpeed's `moe` groups), partitioned over the
    expert-data-parallel ranks: file DP holds EP rank DP % ep's experts (local ids), part DP // ep of them;
  - ZeRO-0: `layer_{L}_expert_{e}_mp_rank_{MP:02d}_model_states.pt`, the module weights of expert e (global id)
    of the L-th MoE layer, and `expp_rank_{EP}_mp_rank_{MP:02d}_optim_states.pt` per EP rank: {"optimizer":
    its optimizer's state dict}, parameters in the recorded order (its experts under local ids).
  - pipeline stages: the same files per stage (MP rank), under the stage's parameter names; the model-states
    file's module holds the stage's weights (DeepSpeed writes no per-layer files for an MoE pipeline).
Out come the files a gathering save writes: per EP rank r, `tp.._pp..[_ep{r:03d}].pt` (r > 0: its experts only,
by global id).
A conversion works in `<tag>/megaclm/.convert.<host>.<pid>.<pid start>.<random>.tmp`; one killed midway leaves
it behind for `remove_stale_conversions`.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import socket
import tempfile
import time
import uuid
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from megaclm.checkpoint.layout import (CONFIG, DS_EXPERT_STATES, DS_MODEL_STATES, DS_OPTIM_STATES, MANIFEST, META,
                                      MODEL, OPTIM, OWN, convert_tmp_name, convert_tmp_owner, ds_expert_optim_states,
                                      ds_layer_states, has_shards, shard_name, shards_dir)
from megaclm.checkpoint.manifest import file_entry, read_manifest, torch_load
from megaclm.config.model import ModelConfig
from megaclm.model.sharding import expert_id, globalize_experts, localize_experts
from megaclm.utils.errors import UserError
from megaclm.utils.fileio import atomic_write
from megaclm.utils.signals import process_start_time

PARAM_NAMES_KEY = "megaclm_params"  # beside CLIENT_KEY in DeepSpeed's client state (see the module docstring)
MOMENTS = ("exp_avg", "exp_avg_sq")


def optimizer_param_names(engine: Any) -> dict:
    """This rank's PARAM_NAMES_KEY entry: its coordinates and [[(name, shape), ...] per optimizer group]."""
    pstate, opt = engine.module.pstate, engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    if engine.zero_optimization():
        groups = []  # ZeRO-1/2/3 files name their parameters themselves (param_shapes)
    else:
        # 16-bit ZeRO-0: DeepSpeed's FP16_(Unfused)Optimizer lists the model's parameters in fp16_groups, its bf16
        # optimizer (pipeline runs) in bf16_groups (their param_groups hold fp32 masters); a plain torch optimizer
        # (fp32) steps them itself.
        groups = (getattr(opt, "fp16_groups", None) or getattr(opt, "bf16_groups", None)
                  or [g["params"] for g in opt.param_groups])
    return {"tp_rank": pstate.tp_rank, "tp_size": pstate.tp_size, "pp_rank": pstate.pp_rank, "pp_size": pstate.pp_size,
            "ep_rank": pstate.ep_rank, "ep_size": pstate.ep_size,
            "groups": [[(names[id(p)], list(p.shape)) for p in g if id(p) in names] for g in groups]}


class _Experts(NamedTuple):
    """Routed experts' ids: DeepSpeed's files of expert-parallel rank r name its experts 0..E/ep-1 (the module's
    local ids), megaclm's layout-independent files by global id (megaclm.model.sharding)."""
    num_experts: int | None
    ep_size: int

    def globalize(self, local: dict, ep_rank: int) -> dict:
        return globalize_experts(local, self.num_experts, self.ep_size, ep_rank)

    def localize(self, full: dict, ep_rank: int) -> dict:
        return localize_experts(full, self.num_experts, self.ep_size, ep_rank)

    def every_rank(self, local: dict) -> dict:
        """Keys of one rank's dict (local ids) -> those of all ranks (global ids; the other keys once)."""
        return {k: v for r in range(self.ep_size) for k, v in self.globalize(local, r).items()}

    def of_rank(self, full: dict, ep_rank: int) -> dict:
        """What rank `ep_rank`'s layout-independent file holds (megaclm.checkpoint.shards.shard_file): rank 0
        everything but the other ranks' experts, rank r > 0 its experts only; global ids."""
        mine = self.globalize(self.localize(full, ep_rank), ep_rank)
        return {k: v for k, v in mine.items() if ep_rank == 0 or expert_id(k) is not None}


def _split_flat(flat: torch.Tensor, shapes: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    """A flat buffer holding `shapes`' parameters one after another (no padding between them)."""
    out, offset = {}, 0
    for name, shape in shapes:
        n = math.prod(shape)
        out[name] = flat[offset:offset + n].view(shape).clone()
        offset += n
    return out


def _zero12(files: list[dict], shapes: list[dict], experts: _Experts) -> tuple[dict, dict, int]:
    """ZeRO-1/2 or DeepSpeed's bf16 optimizer: (weights, moments, step) from the data-parallel ranks' files.
    Routed experts come back under their global ids: file DP holds expert-parallel rank DP % ep's, and the
    ranks holding the same experts (DP % ep equal) partition their groups in DP order (expert-data-parallel rank
    DP // ep, megaclm.parallel.state)."""
    parts: dict[str, list[list[torch.Tensor]]] = {}  # name -> [fp32, exp_avg, exp_avg_sq] parts, DP order
    step = 0
    for dp, f in enumerate(files):
        opt = f["optimizer_state_dict"]
        state = opt["base_optimizer_state"]["state"]
        for g, local in enumerate(opt["param_slice_mappings"]):
            mapping = experts.globalize(local, dp % experts.ep_size)
            flats = [opt["single_partition_of_fp32_groups"][g]] + [state[g][m] for m in MOMENTS]
            step = max(step, int(float(state[g]["step"])))
            for name, frag in mapping.items():
                got = parts.setdefault(name, [[], [], []])
                for i, flat in enumerate(flats):
                    got[i].append(flat.narrow(0, frag.start, frag.numel))
    out: list[dict] = [{}, {}, {}]
    for group in shapes:
        for name, shape in experts.every_rank(group).items():
            for i in range(3):
                out[i][name] = torch.cat(parts[name][i]).view(shape).clone()
    return out[0], {"exp_avg": out[1], "exp_avg_sq": out[2]}, step


def _zero3(files: list[dict], shapes: list[dict]) -> tuple[dict, dict, int]:
    """ZeRO-3: every parameter split evenly over the data-parallel ranks, in param_shapes' order."""
    dp = len(files)
    flats, step = [[], [], []], 0
    for f in files:
        opt = f["optimizer_state_dict"]
        state = opt["optimizer_state_dict"]["state"]
        keys = sorted(state)
        step = max([step] + [int(float(state[k]["step"])) for k in keys])
        flats[0].append(torch.cat(opt["fp32_flat_groups"]))
        for i, m in enumerate(MOMENTS, start=1):
            flats[i].append(torch.cat([state[k][m] for k in keys]))
    out: list[dict] = [{}, {}, {}]
    offset = 0
    for group in shapes:
        for name, shape in group.items():
            numel = math.prod(shape)
            part = math.ceil(numel / dp)
            for i in range(3):
                out[i][name] = torch.cat([r.narrow(0, offset, part) for r in flats[i]])[:numel].view(shape).clone()
            offset += part
    return out[0], {"exp_avg": out[1], "exp_avg_sq": out[2]}, step


def _zero0(states: dict, groups: list[list], module: dict[str, torch.Tensor]) -> tuple[dict, dict, int]:
    """ZeRO-0: the model-states file's optimizer (torch's own, FP16_Optimizer or FP16_UnfusedOptimizer)."""
    opt = states["optimizer"]
    ordered = [(name, shape) for g in groups for name, shape in g]
    if "fp32_groups_flat" in opt or "fp32_groups" in opt:
        inner = opt["optimizer_state_dict"]["state"]
        if "fp32_groups_flat" in opt:  # one flat master and one flat state per group
            weights = {k: v for g, flat in zip(groups, opt["fp32_groups_flat"]) for k, v in _split_flat(flat, g).items()}
            moments = {m: {k: v for g, i in zip(groups, sorted(inner)) for k, v in _split_flat(inner[i][m], g).items()}
                       for m in MOMENTS}
        else:  # one master and one state per parameter, numbered across the groups
            masters = [t for g in opt["fp32_groups"] for t in g]
            weights = {name: t.clone() for (name, _), t in zip(ordered, masters)}
            keys = sorted(inner)
            moments = {m: {name: inner[k][m].clone() for (name, _), k in zip(ordered, keys)} for m in MOMENTS}
        return weights, moments, max(int(float(st["step"])) for st in inner.values())
    inner = opt["state"]
    index = [i for g in opt["param_groups"] for i in g["params"]]
    weights = {name: module[name].float().clone() for name, _ in ordered}
    moments = {m: {name: inner[i][m].clone() for (name, _), i in zip(ordered, index) if i in inner} for m in MOMENTS}
    if len(moments["exp_avg"]) < len(ordered):  # torch creates the state at the first step
        moments = {m: {name: moments[m].get(name, torch.zeros_like(weights[name])) for name, _ in ordered}
                   for m in MOMENTS}
    return weights, moments, max((int(float(st["step"])) for st in inner.values()), default=0)


def _pipeline_module(ckpt: str, tp_rank: int, names: list[str]) -> dict[str, torch.Tensor]:
    """A pipeline stage's weights under its parameter names, from DeepSpeed's per-layer files."""
    wanted: dict[int, dict[str, str]] = {}  # layer -> {key in its file: parameter name}
    for name in names:
        head, rest = name.split(".", 1)
        layer, key = (0, rest.split(".", 1)[1]) if head == "tied_modules" else (int(head), rest)  # tied: the embedding
        wanted.setdefault(layer, {})[key] = name
    out = {}
    for layer, keys in wanted.items():
        tensors = torch_load(os.path.join(ckpt, ds_layer_states(layer, tp_rank)))
        out.update({name: tensors[key] for key, name in keys.items()})
    return out


def _moe_zero0(ckpt: str, mp_rank: int, states: dict, groups: list[list],
               experts: _Experts) -> tuple[dict, dict, int]:
    """MoE without ZeRO: expert-parallel rank r's optimizer is in a file of its own (`ds_expert_optim_states`), the
    routed experts' weights in one file per (MoE layer, expert) under global ids, the rest in the model-states
    file. The ranks' replicated parameters are equal; rank 0's are kept, as a gathering save does."""
    routed = {}
    for name in sorted(os.listdir(ckpt)):
        if (m := DS_EXPERT_STATES.match(name)) and int(m.group(1)) == mp_rank:
            routed.update(torch_load(os.path.join(ckpt, name)))
    weights: dict = {}
    moments: dict = {m: {} for m in MOMENTS}
    step = 0
    for r in range(experts.ep_size):
        opt = torch_load(os.path.join(ckpt, ds_expert_optim_states(r, mp_rank)))["optimizer"]
        w, mo, st = _zero0({"optimizer": opt}, groups, {**states["module"], **experts.localize(routed, r)})
        for out, got in ((weights, w), *((moments[m], mo[m]) for m in MOMENTS)):
            for k, v in experts.globalize(got, r).items():
                out.setdefault(k, v)
        step = max(step, st)
    return weights, moments, step


def _payload(entry: dict, ep_rank: int, tensors: dict[str, dict[str, torch.Tensor]], **extra) -> dict:
    """The per-(tp, pp, ep) file megaclm.checkpoint.shards.shard_file writes."""
    payload = dict(extra, tp_rank=entry["tp_rank"], tp_size=entry["tp_size"], pp_rank=entry["pp_rank"],
                   pp_size=entry["pp_size"], pipeline=entry["pp_size"] > 1, ep_rank=ep_rank, ep_size=entry["ep_size"])
    for field, values in tensors.items():  # detached: DeepSpeed saves some masters as Parameters
        payload[field] = {k: v.detach() for k, v in values.items()}
    return payload


def convert_rank(ckpt: str, mp_rank: int, config: ModelConfig) -> list[tuple[str, dict, dict]]:
    """[(file name, model payload, optim payload)] of model-parallel rank `mp_rank` of the tag folder `ckpt`: one
    per expert-parallel rank (one without experts)."""
    model_files = sorted(os.path.join(ckpt, name) for name in os.listdir(ckpt)
                         if (m := DS_MODEL_STATES.match(name)) and int(m.group(1)) == mp_rank)
    if not model_files:
        raise UserError(f"{ckpt} has no DeepSpeed model-states file of model-parallel rank {mp_rank}; the checkpoint "
                        "is incomplete")
    states = torch_load(model_files[0])
    entry = states.get(PARAM_NAMES_KEY)
    if entry is None:
        raise UserError(f"{model_files[0]} does not record its parameters (written by an older megaclm, which saved "
                        "megaclm/model/ itself); resume it on its own layout, or restore its megaclm/ folder")
    experts = _Experts(config.num_experts, entry["ep_size"])
    optim = sorted((int(m.group(1)), os.path.join(ckpt, name)) for name in os.listdir(ckpt)
                   if (m := DS_OPTIM_STATES.match(name)) and int(m.group(2)) == mp_rank)
    if optim:
        files = [torch_load(path) for _, path in optim]
        # DeepSpeed records the shapes under ZeRO only; its bf16 optimizer at ZeRO-0 (pipeline runs): megaclm's record
        shapes = states.get("param_shapes") or [dict(group) for group in entry["groups"]]
        if "fp32_flat_groups" in files[0]["optimizer_state_dict"]:  # ZeRO-3 (never MoE: refused by the config)
            weights, moments, step = _zero3(files, shapes)
        else:
            weights, moments, step = _zero12(files, shapes, experts)
    elif os.path.isfile(os.path.join(ckpt, ds_expert_optim_states(0, mp_rank))):
        # DeepSpeed MoE layers (not those of a LoRA run: its experts are frozen, plain modules to DeepSpeed)
        weights, moments, step = _moe_zero0(ckpt, mp_rank, states, entry["groups"], experts)
    else:
        module = states["module"] or _pipeline_module(ckpt, entry["tp_rank"],
                                                      [n for g in entry["groups"] for n, _ in g])
        weights, moments, step = _zero0(states, entry["groups"], module)
    return [(shard_name(entry["tp_rank"], entry["pp_rank"], r),
             _payload(entry, r, {"tensors": experts.of_rank(weights, r)}),
             _payload(entry, r, {m: experts.of_rank(moments[m], r) for m in MOMENTS}, step=step))
            for r in range(experts.ep_size)]


def _mp_ranks(ckpt: str) -> list[int]:
    return sorted({int(m.group(1)) for name in os.listdir(ckpt) if (m := DS_MODEL_STATES.match(name))})


def convert(ckpt_dir: str, tag: str, out_dir: str | None = None) -> str:
    """Write `tag`'s layout-independent files (megaclm/model/, megaclm/optim/) from its DeepSpeed files.

    In place (`out_dir` None): into the tag, its manifest extended; files are written under a unique temporary
    folder and renamed into place (optim/ first, model/ last: `has_shards` means both are whole), so a reader or
    a second converter racing this one never sees half a folder (the loser's copy is dropped). With `out_dir`:
    a copy of the tag's megaclm/ files plus the new ones under out_dir/<tag> (a read-only checkpoint).
    Returns the directory that now holds them."""
    ckpt = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(ckpt) or not _mp_ranks(ckpt):
        raise UserError(f"{ckpt} holds neither megaclm's layout-independent files ({shards_dir(MODEL)}/) nor "
                        "DeepSpeed's model-states files to make them from; it is incomplete or not a megaclm checkpoint")
    with open(os.path.join(ckpt, CONFIG)) as f:
        config = ModelConfig(**json.load(f)["model"])
    target = ckpt if out_dir is None else os.path.join(out_dir, tag)
    own = os.path.join(target, OWN)
    os.makedirs(own, exist_ok=True)
    if out_dir is not None:
        for rel in (CONFIG, META):
            shutil.copyfile(os.path.join(ckpt, rel), os.path.join(target, rel))
    remove_stale_conversions(own)
    work = os.path.join(own, convert_tmp_name(socket.gethostname(), os.getpid(),
                                              process_start_time(os.getpid()) or 0, uuid.uuid4().hex))
    try:
        for kind in (MODEL, OPTIM):
            os.makedirs(os.path.join(work, kind))
        for mp in _mp_ranks(ckpt):
            for name, model, optim in convert_rank(ckpt, mp, config):
                for kind, payload in ((MODEL, model), (OPTIM, optim)):
                    torch.save(payload, os.path.join(work, kind, name))  # the folders appear whole, by rename
        for kind in (OPTIM, MODEL):
            try:
                os.rename(os.path.join(work, kind), os.path.join(target, shards_dir(kind)))
            except OSError:
                if not os.path.isdir(os.path.join(target, shards_dir(kind))):
                    raise
                # another converter got there first: its files are equal to ours
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if out_dir is None:
        _extend_manifest(ckpt)
    return ckpt_dir if out_dir is None else out_dir


STALE_CONVERSION_S = 3600.0  # another host's work folder untouched that long: its converter is gone


def remove_stale_conversions(own: str) -> list[str]:
    """Remove the work folders that killed conversions left in a tag's megaclm/ folder `own`; returns their names.

    A folder of this host is stale when its converter's pid no longer runs (or now is another process: another
    start time); one of another host, whose processes cannot be seen from here, when nothing in it changed for
    STALE_CONVERSION_S (so is one whose maker's start time is unknown). A live converter's folder stays: it is
    still writing into it."""
    try:
        names = os.listdir(own)
    except FileNotFoundError:
        return []
    host, removed = socket.gethostname(), []
    for name in names:
        owner = convert_tmp_owner(name)
        if owner is None:
            continue
        path = os.path.join(own, name)
        if owner[0] == host and owner[2]:  # start time 0: unknown where it was made (no /proc), judged by age
            stale = process_start_time(owner[1]) != owner[2]
        else:
            stale = time.time() - _last_change(path) > STALE_CONVERSION_S
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def _last_change(folder: str) -> float:
    """The newest modification time in `folder` (itself included); now if it is gone meanwhile."""
    try:
        times = [os.path.getmtime(folder)]
        for root, dirs, files in os.walk(folder):
            times += [os.path.getmtime(os.path.join(root, n)) for n in dirs + files]
        return max(times)
    except FileNotFoundError:
        return time.time()


def _extend_manifest(ckpt: str) -> None:
    """Add the converted files to the tag's manifest (when it has one), so that integrity checks cover them."""
    path = os.path.join(ckpt, MANIFEST)
    entries = read_manifest(ckpt)
    if entries is None:
        return
    for kind in (MODEL, OPTIM):
        folder = os.path.join(ckpt, shards_dir(kind))
        for name in sorted(os.listdir(folder)):
            entries[os.path.join(shards_dir(kind), name)] = file_entry(os.path.join(folder, name))
    with open(path) as f:
        manifest = json.load(f)
    manifest["files"] = dict(sorted(entries.items()))
    with atomic_write(path, "w") as f:
        json.dump(manifest, f, indent=1)


_temp_copies: dict[tuple[str, str], str] = {}  # (checkpoint, tag) -> its converted copy, removed at exit


def ensure_shards(ckpt_dir: str, tag: str) -> str:
    """The directory whose `tag` holds megaclm's layout-independent files: `ckpt_dir` itself when they are there
    or can be written there (converted in place), else a temporary copy (a read-only checkpoint; converted once
    per process)."""
    if has_shards(ckpt_dir, tag, MODEL):
        return ckpt_dir
    if os.access(os.path.join(ckpt_dir, tag, OWN), os.W_OK):
        return convert(ckpt_dir, tag)
    key = (os.path.abspath(ckpt_dir), tag)
    if key not in _temp_copies:
        out = tempfile.mkdtemp(prefix="megaclm-converted.")
        atexit.register(shutil.rmtree, out, True)
        _temp_copies[key] = convert(ckpt_dir, tag, out)
    return _temp_copies[key]


def ensure_shards_collective(ckpt_dir: str, tag: str) -> None:
    """Collective: rank 0 converts `tag` in place if it lacks the layout-independent files, the others wait;
    a failure is raised on every rank."""
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        if not has_shards(ckpt_dir, tag, MODEL):
            if not os.access(os.path.join(ckpt_dir, tag, OWN), os.W_OK):
                error = (f"--load {ckpt_dir}/{tag} must be converted to load into another layout, but "
                         f"{os.path.join(ckpt_dir, tag, OWN)} is not writable; make it writable, or convert it "
                         "with tools/checkpoint/reshard.py --out NEW and --load NEW")
            else:
                try:
                    convert(ckpt_dir, tag)
                except (UserError, OSError) as e:
                    error = str(e)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(error)
