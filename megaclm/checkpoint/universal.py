"""Layout-independent optimizer state: resume a run on another TP/PP/DP layout or ZeRO stage with Adam intact.

DeepSpeed's own optimizer files are partitioned by the saving run's ZeRO stage and data-parallel
size and its TP ranks know nothing of megaclm's fused qkv layout. So megaclm keeps, per (tp, pp)
rank, the full (unpartitioned) Adam moments of its parameters, keyed like megaclm's fp32 model
shards (megaclm.checkpoint.shards): gathered by a save with --save-layout-independent-interval
(`optimizer_shard_file`), else made from DeepSpeed's files when needed (megaclm.checkpoint.from_deepspeed):

    <tag>/megaclm/optim/tp{TP:02d}_pp{PP:03d}[_ep{EP:03d}].pt = {"exp_avg": {name: fp32},
        "exp_avg_sq": {name: fp32}, "step": Adam's step count, "tp_rank", "tp_size", "pp_rank", "pp_size",
        "pipeline", "ep_rank", "ep_size"}   (routed experts by global id, as the model shards)

Moments have their parameter's shape, so the same merge/split rules move them to any TP/PP layout
(megaclm.model.sharding, megaclm.checkpoint.weights.shard_for, tools/checkpoint/reshard.py). They
are read from and written to the engine's optimizer with DeepSpeed's tensor-fragment API
(`safe_get/set_full_optimizer_state`: ZeRO 1-3 and the bf16 optimizer; the same per-parameter
mapping DeepSpeed's universal checkpoints are built on), or from the torch optimizer's state for
ZeRO-0 fp32. A resume on another layout then loads (`load_resharded`):
    1. the fp32 weights from megaclm's model shards into the new layout (megaclm.checkpoint.weights,
       which also refreshes the optimizer's fp32 master copies);
    2. exp_avg / exp_avg_sq of every local parameter, and the step count;
    3. progress, data position and spike-guard state from meta.json ("client", the same dict the
       DeepSpeed client state holds).
The learning rate is set by megaclm every step from the progress, so there is no scheduler state.
RNG states are not carried over (their per-rank meaning changes with the layout): a dropout-free
run continues with the same losses up to float reduction order; one with dropout does not replay
the same masks.

Why not DeepSpeed's universal checkpoint (ds_to_universal + load_universal)? It is an offline
conversion from DeepSpeed's ZeRO files whose TP merge rules are Megatron-DeepSpeed's parameter
patterns, not megaclm's fused qkv/swiglu blocks, and it needs ZeRO >= 1 files; megaclm already
writes per-parameter fp32 shards with its own merge rules, so the moments ride along with them.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from deepspeed.pipe import PipelineModule
from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

from megaclm.checkpoint.from_deepspeed import ensure_shards_collective
from megaclm.checkpoint.layout import OPTIM, has_shards, read_meta, shards_dir
from megaclm.checkpoint.shards import shard_file, torch_load
from megaclm.checkpoint.weights import load_weights, shard_for
from megaclm.model.pipe import pipe_to_plain_key
from megaclm.parallel.state import ParallelState
from megaclm.utils.errors import UserError

MOMENTS = ("exp_avg", "exp_avg_sq")


def _torch_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer that holds Adam's state (inside DeepSpeed's ZeRO / bf16 wrappers, if any)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _ensure_adam_state(engine: Any) -> None:
    """Give every tensor the torch optimizer steps an Adam state (zeros at step 0 if it has none yet:
    torch creates it lazily at the first step), and have DeepSpeed re-link its per-parameter views of it.

    The re-link works around DeepSpeed 0.19.8: ZeRO-1/2 and the bf16 optimizer link the views once,
    after the *first parameter group's* step, when the other groups' states do not exist yet, so those
    parameters never get views (safe_get_full_optimizer_state then fails with "exp_avg not found")."""
    opt, wrapper = _torch_optimizer(engine), engine.optimizer
    # ZeRO-3 steps its flat fp32 sub-groups by swapping them into param_groups one at a time.
    stepped = [p for group in opt.param_groups for p in group["params"]]
    stepped += list(getattr(wrapper, "fp32_partitioned_groups_flat", []))
    for p in stepped:
        st = opt.state[p]
        if "exp_avg" not in st:
            st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


def _partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "_hp_mapping") or hasattr(param, "ds_id")


def _state_keys(engine: Any) -> dict[int, torch.Tensor]:
    """id(model parameter) -> the tensor the torch optimizer keeps its state under, for the optimizers that
    step a parameter itself (ZeRO-0 fp32) or an fp32 master copy of it (ZeRO-0 bf16/fp16: DeepSpeed's
    FP16_(Unfused)Optimizer keeps `fp32_groups` parallel to the model's `fp16_groups`)."""
    wrapper = engine.optimizer
    keys = {id(p): p for group in _torch_optimizer(engine).param_groups for p in group["params"]}
    for low, high in zip(getattr(wrapper, "fp16_groups", []), getattr(wrapper, "fp32_groups", [])):
        if isinstance(low, (list, tuple)):
            keys.update({id(lp): hp for lp, hp in zip(low, high)})
    return keys


def adam_step(engine: Any) -> int:
    steps = [st["step"] for st in _torch_optimizer(engine).state.values() if "step" in st]
    return int(max((float(s) for s in steps), default=0))


def optimizer_shard_file(engine: Any, out_dir: str, pstate: ParallelState) -> tuple[str, dict] | None:
    """Collective over the data-parallel group (ZeRO gathers each state): (path, payload) of this rank's
    full Adam moments on data-parallel rank 0 (and the other EP ranks' first replicas: their experts'),
    None elsewhere. The tensors are on the CPU and may be the optimizer's live states (ZeRO-0): save
    them before the next step, or copy them."""
    moments: dict[str, dict[str, torch.Tensor]] = {k: {} for k in MOMENTS}
    _ensure_adam_state(engine)
    state, keys = _torch_optimizer(engine).state, _state_keys(engine)
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:  # LoRA's frozen base has no optimizer state
            continue
        for key in MOMENTS:
            # ZeRO-0: the torch optimizer steps the parameters themselves, or their fp32 masters.
            value = (safe_get_full_optimizer_state(param, key) if _partitioned(param)
                     else state[keys[id(param)]][key])
            moments[key][name] = value.detach().float().cpu()
    return shard_file(os.path.join(out_dir, OPTIM), moments, engine.module, pstate, step=adam_step(engine))


def _set_moments(engine: Any, moments: dict[str, dict[str, torch.Tensor]], step: int) -> None:
    module = engine.module
    pipeline = isinstance(module, PipelineModule)
    _ensure_adam_state(engine)
    opt, keys = _torch_optimizer(engine), _state_keys(engine)
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        key = pipe_to_plain_key(name, module.config) if pipeline else name
        if _partitioned(param):
            for m in MOMENTS:
                safe_set_full_optimizer_state(param, moments[m][key].to(param.device), m)
        else:
            for m in MOMENTS:
                opt.state[keys[id(param)]][m].copy_(moments[m][key])
    for st in opt.state.values():  # ZeRO's flat partitions and plain parameters alike
        if "step" in st:
            st["step"] = torch.tensor(float(step)) if torch.is_tensor(st["step"]) else step


def saved_adam_step(ckpt_dir: str, tag: str) -> int:
    folder = os.path.join(ckpt_dir, tag, shards_dir(OPTIM))
    return max(torch_load(os.path.join(folder, f), mmap=True)["step"] for f in os.listdir(folder))


def has_optimizer_shards(ckpt_dir: str, tag: str) -> bool:
    return has_shards(ckpt_dir, tag, OPTIM)


def load_resharded(engine: Any, ckpt_dir: str, tag: str, *, load_optim: bool = True) -> dict:
    """Load checkpoint `tag` of any layout into `engine` (weights, Adam state unless not `load_optim`);
    returns megaclm's client state (progress, data, spike) without RNG states."""
    meta = read_meta(ckpt_dir, tag)
    client = meta.get("client")
    if client is None:
        raise UserError(f"--load {ckpt_dir}/{tag} records no progress in meta.json (written by an older megaclm); "
                        "resume it on its own layout, or pass --finetune to load its weights only")
    ensure_shards_collective(ckpt_dir, tag)  # made from DeepSpeed's files by rank 0 if the save did not write them
    if load_optim and not has_optimizer_shards(ckpt_dir, tag):
        raise UserError(f"--load {ckpt_dir}/{tag} has no layout-independent optimizer state (megaclm/optim/); "
                        "resume it on its own layout, or pass --no-load-optim to restart Adam's moments")
    load_weights(engine, ckpt_dir, tag)
    if load_optim:
        moments = {m: shard_for(engine.module, ckpt_dir, tag, kind="optim", field=m) for m in MOMENTS}
        _set_moments(engine, moments, saved_adam_step(ckpt_dir, tag))
    engine.global_steps = meta["iteration"]
    engine.global_samples = client["progress"]["consumed_samples"]
    return dict(client, rng=None)
