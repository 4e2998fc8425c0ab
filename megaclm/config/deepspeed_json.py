"""The DeepSpeed JSON, generated from the config, or a user's JSON checked against it.

Generated (`deepspeed_config(cfg, derived, cuda=...)`):
    batch        train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps
    optimizer    AdamW with the config's betas/eps/weight decay; on CPU `"torch_adam": true` INSIDE
                 "params" (at the optimizer level DeepSpeed ignores it and JIT-builds FusedAdam); on GPU
                 DeepSpeed's FusedAdam. The trainer passes weight-decay parameter groups.
    precision    bf16 / fp16 (dynamic loss scaling unless --loss-scale), else fp32
    zero         stage, CPU offload, stage-3 persistence threshold, overlap_comm (--overlap-grad-reduce at
                 ZeRO-1/2 without pipeline parallelism: `overlaps_grad_reduce`)
    clipping     gradient_clipping
No "scheduler": megaclm sets the lr itself each step from (iteration, tokens) - see
megaclm.training.schedules.

With `--deepspeed_config FILE` (`load_user_config`), keys the file leaves out are filled from the
generated JSON, and the ones that must agree with the flags (batch sizes, precision, clipping, ZeRO
stage, lr) raise one UserError each when they differ. A "scheduler" block is refused.
"""
from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any

from megaclm.config.derived import Derived
from megaclm.utils.errors import UserError

if TYPE_CHECKING:  # the package imports this module
    from megaclm.config import MegaclmConfig

# Elements per ZeRO gradient-reduction bucket (DeepSpeed's default, stated): ZeRO-3 allocates one such buffer per
# gradient dtype up front (1 GB in bf16), which megaclm.model.flops counts; ZeRO-1/2 fill theirs bucket by bucket.
ZERO_REDUCE_BUCKET = 500_000_000


def overlap_comm_runs(zero_stage: int, pipeline_parallel: int) -> bool:
    """Where --overlap-grad-reduce takes effect: ZeRO-1/2 without a pipeline (DeepSpeed's pipeline engine turns
    overlap_comm off; ZeRO-3 has it on whatever the flag says)."""
    return zero_stage in (1, 2) and pipeline_parallel == 1


def overlaps_grad_reduce(cfg: MegaclmConfig) -> bool:
    """Whether this run's --overlap-grad-reduce takes effect (`overlap_comm_runs`)."""
    return cfg.zero.overlap_grad_reduce and overlap_comm_runs(cfg.zero.zero_stage,
                                                              cfg.parallel.pipeline_model_parallel_size)


def deepspeed_config(cfg: MegaclmConfig, derived: Derived, cuda: bool) -> dict:
    z, p, o = cfg.zero, cfg.precision, cfg.optimizer
    zero: dict[str, Any] = {"stage": z.zero_stage}
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if z.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    if z.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = z.zero_param_persistence_threshold
        if derived.seq_split_size > 1:
            # ZeRO-3's reduce-scatter path averages gradients over seq x dp (deepspeed 0.19.8 applies its
            # sequence-parallel correction, sum over seq, only on the all-reduce path): take that one.
            zero["reduce_scatter"] = False
    if z.zero_stage > 0:
        zero["reduce_bucket_size"] = ZERO_REDUCE_BUCKET
    if overlaps_grad_reduce(cfg):
        zero["overlap_comm"] = True
    params: dict[str, Any] = {"lr": o.lr, "betas": [o.adam_beta1, o.adam_beta2], "eps": o.adam_eps,
                              "weight_decay": o.weight_decay}
    if not cuda:
        params["torch_adam"] = True
    ds: dict[str, Any] = {
        "train_batch_size": derived.global_batch_size,
        "train_micro_batch_size_per_gpu": derived.micro_batch_size,
        "gradient_accumulation_steps": derived.grad_accum_steps,
        "gradient_clipping": o.clip_grad,
        "optimizer": {"type": "AdamW", "params": params},
        "zero_optimization": zero,
        # Skip a step with non-finite gradients under bf16 too (DeepSpeed's bf16 default does not check):
        # the NaN-loss skip and the loss-spike guard (megaclm.training.spike) rely on it.
        "bf16": {"enabled": p.bf16, "check_grad_overflow": True},
        "fp16": {"enabled": p.fp16},
        "steps_per_print": 2 ** 31 - 1,  # megaclm logs; keep DeepSpeed's own step lines quiet
        "wall_clock_breakdown": False,
    }
    if p.fp16:
        ds["fp16"].update({
            "loss_scale": 0 if p.loss_scale is None else p.loss_scale,  # 0 = dynamic
            "initial_scale_power": int(round(math.log2(p.initial_loss_scale))),
            "loss_scale_window": p.loss_scale_window,
            "hysteresis": p.hysteresis,
            "min_loss_scale": p.min_loss_scale,
        })
    return ds


def _get(d: dict, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def check_consistency(user: dict, generated: dict, source: str) -> None:
    """Raise UserError on the first setting where the user's JSON contradicts the flags."""
    checks = [  # (json key, flag that sets it)
        ("train_batch_size", "--global-batch-size"),
        ("train_micro_batch_size_per_gpu", "--micro-batch-size"),
        ("gradient_accumulation_steps", "--global-batch-size / (--micro-batch-size x data-parallel size)"),
        ("gradient_clipping", "--clip-grad"),
        ("zero_optimization.stage", "--zero-stage"),
        ("optimizer.params.lr", "--lr"),
    ]
    for key, flag in checks:
        mine, theirs = _get(generated, key), _get(user, key)
        if theirs is None or theirs == "auto":
            continue
        if isinstance(mine, float) or isinstance(theirs, float):
            same = math.isclose(float(theirs), float(mine), rel_tol=1e-9, abs_tol=0.0)
        else:
            same = theirs == mine
        if not same:
            raise UserError(f"{source}: {key}={theirs!r} contradicts {flag} (= {mine!r}); "
                            f"make them agree or drop the key from the JSON")
    for prec, flag in (("bf16", "--bf16"), ("fp16", "--fp16")):
        theirs = bool(_get(user, f"{prec}.enabled"))
        if prec in user and theirs != generated[prec]["enabled"]:
            state = "enables" if theirs else "disables"
            raise UserError(f"{source}: {prec}.enabled={str(theirs).lower()} {state} {prec} but {flag} is "
                            f"{'given' if generated[prec]['enabled'] else 'not given'}; make them agree")
    if "scheduler" in user:
        raise UserError(f"{source}: a 'scheduler' block is not supported (megaclm sets the lr each step); "
                        "remove it and use --lr-decay-style / --lr-warmup-iters")


def load_user_config(path: str, generated: dict) -> dict:
    """The user's JSON, checked against the generated one, with missing keys filled from it."""
    if not os.path.isfile(path):
        raise UserError(f"--deepspeed_config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as fh:
            user = json.load(fh)
    except json.JSONDecodeError as e:
        raise UserError(f"--deepspeed_config {path}: not valid JSON: {e}")
    if not isinstance(user, dict):
        raise UserError(f"--deepspeed_config {path}: the top level must be a JSON object")
    check_consistency(user, generated, f"--deepspeed_config {path}")
    return _deep_merge(generated, user)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if value == "auto":  # HF-style placeholder: keep the generated value
            continue
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
