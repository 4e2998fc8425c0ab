"""Process groups, the model, the optimizer and `deepspeed.initialize` (the only call site in megaclm).

    init_distributed(cfg)                      -> ParallelState (groups created, seeds set)
    build_model(cfg, padded_vocab, pstate, ds) -> GPTModel, or GPTPipelineModule when pp > 1
    build_engine(cfg, model, pstate, ds)       -> DeepSpeed engine (PipelineEngine when pp > 1)

Optimizer: AdamW with two parameter groups, weight decay on matrices and embeddings, none on norms
and biases (any parameter with fewer than 2 dims), as Megatron does. DeepSpeed builds it from the
JSON (FusedAdam on GPU, torch AdamW on CPU via "torch_adam") and wraps it in its ZeRO / bf16 / fp16
optimizer, each of which skips a step whose gradients are not finite. The one path without such a
wrapper - ZeRO-0 in fp32 - gets `SkipNonFiniteAdamW`, which clips and skips itself and reports both
through the attributes DeepSpeed's engine reads (`overflow` -> engine.was_step_applied(),
`_global_grad_norm` -> engine.get_global_grad_norm()). ZeRO-0 in 16-bit without CUDA (DeepSpeed's unfused
optimizer) gets the same norm, `model_grad_norm`, through `correct_unfused_grad_norm`.
"""
from __future__ import annotations

import datetime
import math
import os
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.utils import is_invalid_grad_norm

from megaclm.config import MegaclmConfig
from megaclm.logging import get_logger
from megaclm.model.fp8 import convert_to_fp8
from megaclm.model.gpt import GPTModel
from megaclm.model.lora import init_adapters
from megaclm.model.pipe import GPTPipelineModule, pipe_to_plain_key
from megaclm.parallel.layers import all_reduce_sequence_parallel_grads
from megaclm.parallel.random import model_parallel_seed
from megaclm.parallel.state import ParallelState

log = get_logger("megaclm.train")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous on this host)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """`python pretrain_gpt.py ...` without a launcher: a world of one on this host."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


def init_distributed(cfg: MegaclmConfig) -> ParallelState:
    """torch.distributed from the launcher's environment (deepspeed, torchrun, srun + env://)."""
    _single_process_env()
    backend = cfg.training.distributed_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        # A GPU launch script (Megatron's examples pass --distributed-backend nccl) rehearsed on CPU.
        if os.environ.get("RANK", "0") == "0":
            log.warning("--distributed-backend nccl needs CUDA, which this machine lacks: using gloo")
        backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(minutes=cfg.training.distributed_timeout_minutes))
    pstate = ParallelState.from_env(cfg.parallel, experts=cfg.model.num_experts is not None)
    model_parallel_seed(cfg.training.seed, pstate.tp_rank, pstate.pp_rank, pstate.cp_rank)
    return pstate


def build_model(cfg: MegaclmConfig, padded_vocab_size: int, pstate: ParallelState, ds_config: dict) -> torch.nn.Module:
    # ZeRO-3 partitions each parameter as soon as its module is built, so a model larger than one
    # device's memory never exists whole (every data-parallel replica builds the same init: same seed).
    # Partitioned over seq x dp (= dp without a sequence split): the group DeepSpeed's engine shards ZeRO over.
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=cfg.zero.zero_stage == 3, mpu=pstate,
                             data_parallel_group=pstate.cp_dp_group):
        if pstate.pp_size > 1:
            model = GPTPipelineModule(cfg.model, padded_vocab_size, pstate, cfg.kernels,
                                      partition_method=cfg.parallel.pipeline_partition_method, lora=cfg.lora)
        else:
            model = GPTModel(cfg.model, padded_vocab_size, pstate, cfg.kernels, lora=cfg.lora)
    # Adapters drawn per name: the same at any TP/PP layout and ZeRO stage.
    if cfg.lora.enabled:
        plain = (lambda name: pipe_to_plain_key(name, cfg.model)) if pstate.pp_size > 1 else (lambda name: name)
        init_adapters(model, cfg.training.seed, pstate.tp_size, pstate.tp_rank, plain)
    if cfg.precision.fp8_format is not None:  # checked by check_fp8 at start-up
        converted = convert_to_fp8(model, cfg.precision.fp8_format, cfg.precision.fp8_recipe)
        if pstate.rank == 0:
            log.info(f"fp8 ({cfg.precision.fp8_format}, {cfg.precision.fp8_recipe}): {len(converted)} block linears")
    return model


def param_groups(model: torch.nn.Module, weight_decay: float, decoupled_lr: bool = False) -> list[dict]:
    """Weight matrices decay, norms and biases do not; with `decoupled_lr` the input embedding and output
    layer (parameters marked `embedding_or_output` by megaclm.model) get a third group of their own, its
    lr set by the trainer from --decoupled-lr. Routed experts (megaclm.model.moe) go into groups of their
    own marked `moe` (DeepSpeed's split): ZeRO partitions those over the expert-data-parallel group."""
    decay, no_decay, decoupled = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        # ZeRO-3 partitions parameters into 1-d shards; ds_shape keeps the real one.
        ndim = len(getattr(p, "ds_shape", p.shape))
        if decoupled_lr and getattr(p, "embedding_or_output", False):
            decoupled.append(p)
        else:
            (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    if decoupled:
        groups.append({"name": "decoupled", "params": decoupled, "weight_decay": weight_decay, "decoupled_lr": True})
    if any(is_moe_param(p) for g in groups for p in g["params"]):
        groups = [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]
    return groups


def model_grad_norm(params: list[torch.nn.Parameter], pstate: ParallelState) -> torch.Tensor:
    """The global L2 norm of the gradients of `params` (each with a .grad), as Megatron counts it: parameters
    replicated across tensor-parallel ranks once (tp rank 0), tied pipeline copies once (DeepSpeed marks the
    others `ds_pipe_replicated`), then a sum over the model-parallel group (tp x pp). Data-parallel ranks
    already hold identical, reduced gradients, except for routed experts, which each expert-parallel rank holds
    its own of (summed over the expert-parallel group first)."""
    device = params[0].grad.device if params else "cpu"
    sq, expert_sq = torch.zeros((), dtype=torch.float32, device=device), torch.zeros((), device=device)
    for p in params:
        replicated = not getattr(p, "tensor_model_parallel", False)
        if (replicated and pstate.tp_rank != 0) or getattr(p, "ds_pipe_replicated", False):
            continue
        if is_moe_param(p):
            expert_sq += p.grad.detach().float().pow(2).sum()
        else:
            sq += p.grad.detach().float().pow(2).sum()
    if pstate.ep_size > 1:  # each expert-parallel rank holds other experts
        dist.all_reduce(expert_sq, group=pstate.ep_group)
    sq += expert_sq
    if pstate.tp_size * pstate.pp_size > 1:
        dist.all_reduce(sq, group=pstate.get_model_parallel_group())
    return sq.sqrt()


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW that clips by the global gradient norm and skips a step whose norm is NaN/inf.

    Used only for ZeRO-0 fp32, where DeepSpeed calls the optimizer directly and would neither skip
    nor report a norm. The norm is `model_grad_norm`. DeepSpeed reads `overflow` (step skipped) and
    `_global_grad_norm`.
    """

    def __init__(self, params, *, clip_grad: float, pstate: ParallelState, **kwargs):
        super().__init__(params, **kwargs)
        self.clip_grad, self.pstate = clip_grad, pstate
        self.overflow, self._global_grad_norm = False, None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._global_grad_norm = model_grad_norm(params, self.pstate).item()  # the step's one host sync
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            self.zero_grad(set_to_none=True)
            return None
        if self.clip_grad > 0 and self._global_grad_norm > self.clip_grad:
            scale = self.clip_grad / (self._global_grad_norm + 1e-6)
            for p in params:
                p.grad.mul_(scale)
        return super().step(closure)


def build_engine(cfg: MegaclmConfig, model: torch.nn.Module, pstate: ParallelState, ds_config: dict) -> Any:
    groups = param_groups(model, cfg.optimizer.weight_decay, decoupled_lr=cfg.optimizer.decoupled_lr is not None)
    optimizer = None
    ds_config = dict(ds_config)
    if cfg.zero.zero_stage == 0 and cfg.precision.name == "fp32":
        params = ds_config.pop("optimizer")["params"]
        clip = ds_config["gradient_clipping"]
        ds_config["gradient_clipping"] = 0.0  # the optimizer clips, with the norm it reports (DeepSpeed's default is 1)
        optimizer = SkipNonFiniteAdamW(groups, clip_grad=clip, pstate=pstate, lr=params["lr"],
                                       betas=tuple(params["betas"]), eps=params["eps"],
                                       weight_decay=params["weight_decay"], fused=torch.cuda.is_available() or None)
    if pstate.pp_size > 1:
        # The pipeline engine counts the seq ranks as data-parallel replicas (ParallelState.pipeline_topology).
        ds_config["train_batch_size"] = ds_config["train_batch_size"] * pstate.cp_size
        # Send activations whole where they differ across TP ranks (SP), or where a second float tensor needs a
        # gradient (MoE's router losses, megaclm.model.pipe): DeepSpeed's partitioning handles outputs[0] only.
        if pstate.sequence_parallel or cfg.model.num_experts is not None:
            ds_config.setdefault("pipeline", {}).update({"pipe_partitioned": False, "grad_partitioned": False})
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                               config=ds_config)
        # Under its bf16 optimizer DeepSpeed's tied-gradient all-reduce reads `_hp_grad` of every tied weight, which
        # that optimizer gives to trainable weights only: a frozen tied embedding (LoRA) has no gradient to reduce.
        for weight, _ in engine.module.get_tied_weights_and_groups():
            if not weight.requires_grad and not hasattr(weight, "_hp_grad"):
                weight._hp_grad = None
    else:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                               config=ds_config, mpu=pstate)
    defer_sequence_parallel_grads(engine, pstate, cfg.zero.zero_stage)
    if isinstance(engine.optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        forget_initial_step(engine.optimizer)
    if isinstance(engine.optimizer, FP16_UnfusedOptimizer):
        correct_unfused_grad_norm(engine.optimizer, pstate)
    return engine


@torch.no_grad()
def forget_initial_step(opt: FP16_Optimizer | FP16_UnfusedOptimizer) -> None:
    """Undo the step DeepSpeed's ZeRO-0 16-bit optimizers take at construction to create their inner
    optimizer's state: it runs Adam once on zero gradients, which counts as Adam's first step (and applies
    weight decay to the fp32 master weights). The first real update then has step 2's bias correction,
    (1 - b1) / (1 - b1^2) / sqrt((1 - b2) / (1 - b2^2)) = 0.73 x the lr at betas (0.9, 0.95): measured
    0.0073 at lr 0.01 against ZeRO-1's 0.0100, found by tools/check_layout.py. Here the inner state is
    dropped (Adam creates it again on the first real step) and the masters are copied from the weights."""
    opt.optimizer.state.clear()
    for group in opt.optimizer.param_groups:
        group.pop("step", None)  # DeepSpeed's FusedAdam also counts per group
    if isinstance(opt, FP16_UnfusedOptimizer):
        for master, param in _unfused_masters(opt):
            master.copy_(param.float())
    else:
        for master, flat in zip(opt.fp32_groups_flat, opt.fp16_groups_flat):
            master.copy_(flat.float())


def _unfused_masters(opt: FP16_UnfusedOptimizer):
    """(fp32 master, 16-bit parameter) pairs of DeepSpeed's unfused optimizer."""
    for fp32_group, group in zip(opt.fp32_groups, opt.fp16_groups):
        yield from zip(fp32_group, group)


def correct_unfused_grad_norm(opt: FP16_UnfusedOptimizer, pstate: ParallelState) -> None:
    """Give DeepSpeed's unfused 16-bit optimizer (ZeRO-0 bf16/fp16 without FusedAdam, i.e. on CPU) the right
    clip norm. Its own step reads the tensor-parallel marks off the gradients, which carry none, so TP ranks > 0
    add nothing (15-22% low at TP=2, found by tools/check_layout.py), and it leaves routed experts' gradients
    out. This step is DeepSpeed's (overflow check, fp32 master copy, loss scale, clip, update, copy back) with
    `model_grad_norm` in place of that sum; `_global_grad_norm` is the unscaled norm, as its fused optimizer
    reports it."""
    def step(closure=None):
        opt.overflow = opt.overflow_checker.check()
        if opt.overflow:
            return opt._skip_invalid_grad_norm()
        params = [p for group in opt.fp16_groups for p in group if p.grad is not None]
        scaled_norm = model_grad_norm(params, pstate).item()  # the step's one host sync
        if is_invalid_grad_norm(scaled_norm):
            return opt._skip_invalid_grad_norm()
        for master, param in _unfused_masters(opt):
            master.grad = torch.zeros_like(master) if param.grad is None else param.grad.to(master.dtype)
        opt._global_grad_norm = scaled_norm / opt.loss_scale_config.cur_scale
        opt._update_scale(False)
        opt.unscale_and_clip_grads(scaled_norm)
        opt.optimizer.step()
        for master, param in _unfused_masters(opt):
            master.grad = None
            param.data.copy_(master.data)
        return opt.overflow

    assert not opt.fused_lamb_legacy, "megaclm's optimizer is AdamW"
    opt.step = step


def defer_sequence_parallel_grads(engine: Any, pstate: ParallelState, zero_stage: int) -> bool:
    """Sum the SP-replicated gradients (norms, row-parallel biases, LoRA factors) over the TP group once per
    optimizer step, in one all-reduce of them all, instead of one hook per parameter per micro-batch.

    The sum is linear, so it can run on the accumulated gradients wherever DeepSpeed keeps them whole until
    the accumulation boundary, just before its own data-parallel reduction (and so before clipping):
    - in `param.grad` (ZeRO 0 with an fp32/fp16 optimizer, ZeRO-1 without overlap_comm; both engines),
      before `allreduce_gradients`, which the pipeline engine calls too;
    - in BF16_Optimizer's fp32 buffers (`param._hp_grad`, the pipeline engine's bf16 at ZeRO-0), before the
      pipeline engine's `_bf16_reduce_grads`.
    ZeRO 2/3 reduce-scatter each gradient during backward into partitions: those keep the per-micro-batch
    hook (returns False).
    """
    params = [p for p in engine.module.parameters() if getattr(p, "sequence_parallel", False) and p.requires_grad]
    opt = engine.optimizer
    if isinstance(opt, BF16_Optimizer):
        where = "_bf16_reduce_grads"
        grads_wait = hasattr(engine, where) and not opt.immediate_grad_update

        def accumulated():
            return [p._hp_grad for p in params if getattr(p, "_hp_grad", None) is not None]
    else:
        where = "allreduce_gradients"
        grads_wait = zero_stage == 0 or (zero_stage == 1 and not getattr(opt, "overlap_comm", True))

        def accumulated():
            return [p.grad for p in params if p.grad is not None]
    if not params or not grads_wait:
        return False
    for p in params:
        p.sequence_parallel_deferred = True
    reduce, group = getattr(engine, where), pstate.tp_group

    def reduce_with_sequence_parallel(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            all_reduce_sequence_parallel_grads(accumulated(), group)
        return reduce(*args, **kwargs)

    setattr(engine, where, reduce_with_sequence_parallel)
    return True
