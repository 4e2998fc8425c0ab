"""Per-token loss normalisation over the whole global batch (Megatron-LM's per-token loss).

The loss of one optimizer step is

    L = sum over every token of the global batch of loss x loss_mask  /  sum of loss_mask over the global batch

(all micro-batches, all data-parallel ranks, all sequence ranks). A mean of per-micro-batch means would
instead weight a token by 1 / (its micro-batch's loss tokens): with --eod-mask-loss or any mask that
varies, the result and its gradient would depend on how tokens fall into micro-batches and ranks.

DeepSpeed's engines scale what `backward` gets: divided by the accumulation steps, gradients averaged
over the data-parallel ranks (and summed over the sequence ranks, which megaclm's ParallelState tells
the plain engine; the pipeline engine averages over them too). So each rank's loss mask is scaled once
per step by

    replicas x accumulation / N        replicas: dp (plain engine), dp x seq (pipeline engine)

after one all-reduce of its count N; a micro-batch's loss is then sum(loss x scaled mask), and the
engines' own averaging turns the sum of those into L, gradient included. The mean over micro-batches and
data-parallel ranks the loop logs (and the pipeline engine reports) is L as well.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megaclm.parallel.state import ParallelState


def _mask(micro: Any) -> torch.Tensor:
    """A micro-batch's loss mask: a dict's "loss_mask", or the pipeline engine's ((inputs), (labels, mask))."""
    return micro["loss_mask"] if isinstance(micro, dict) else micro[1][1]


def _with_mask(micro: Any, mask: torch.Tensor) -> Any:
    if isinstance(micro, dict):
        return {**micro, "loss_mask": mask}
    inputs, (labels, _) = micro
    return inputs, (labels, mask)


def normalise_loss_masks(micro_batches: list, pstate: ParallelState, accum: int,
                         pipeline: bool) -> tuple[list, torch.Tensor]:
    """The step's micro-batches with their loss masks scaled for a per-token loss over the global batch,
    and N, the global batch's loss-token count (a 0-dim tensor on the masks' device: no host sync).
    Collective over `pstate.cp_dp_group`."""
    # float64: a global batch may hold more than 2^24 loss tokens, past which float32 counts are inexact
    count = torch.stack([_mask(m).double().sum() for m in micro_batches]).sum()
    if pstate.cp_size * pstate.dp_size > 1:
        dist.all_reduce(count, group=pstate.cp_dp_group)
    replicas = pstate.dp_size * (pstate.cp_size if pipeline else 1)
    scale = (replicas * accum / count.clamp(min=1.0)).float()
    return [_with_mask(m, _mask(m).float() * scale) for m in micro_batches], count
