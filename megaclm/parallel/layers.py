"""Tensor-parallel layers (Megatron's ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding).

Weights are initialised whole and then sliced, so a model built from one seed has the same full
weights for every tensor-parallel size (Megatron's CPU-initialisation path). Sharded parameters carry
`tensor_model_parallel=True` and `partition_dim`, which DeepSpeed's gradient-norm code reads to count
them once per shard and replicated ones once per group, and `partition_blocks`, the full sizes of the blocks
split separately along that dim: the one declaration of the layout, which megaclm.model.sharding reads.

Sequence parallel (`pstate.sequence_parallel`): activations outside the column->row pairs are split
along the sequence (dim 1), so ColumnParallelLinear all-gathers its input and RowParallelLinear
reduce-scatters its output instead of all-reducing it. The column-parallel matmul keeps only the local
(B, T/tp, in) input for backward and all-gathers it again there (`_SequenceParallelLinear`). Replicated
parameters that then see only a sequence chunk (norms, the row-parallel bias, LoRA factors) get
`sequence_parallel_grad_hook`: their gradients are summed over the group before any optimizer sees them,
per micro-batch, or once per step in one all-reduce where the trainer defers it (ZeRO 0/1, pipeline).

LoRA (`lora=LoraConfig`): y = W x + (alpha / r) B A dropout(x), with the factor that touches W's split
axis split the same way, so that the adapted TP=t model equals the adapted TP=1 model:
    column-parallel  A (r, in) replicated, B (out/tp, r) split along out like W's rows ([q; k; v] blocks kept);
                     `lora_blocks` limits the adapter to some of the output blocks (q and v of [q; k; v]): the
                     other rows of B are multiplied by zero, so they get no gradient and stay at their zero init
    row-parallel     A (r, in/tp) split along in like W's columns, B (out, r) replicated
The rank-r activation u = A x is what crosses ranks: copied (its gradient all-reduced) or SP-gathered before
a column B, summed (or SP reduce-scattered) after a row A - r numbers per token instead of `out`.
"""
import math
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megaclm.config.lora import LoraConfig
from megaclm.parallel import mappings
from megaclm.parallel.mappings import (copy_to_tp, gather_from_sp, gather_from_tp, reduce_from_tp,
                                       reduce_scatter_to_sp)
from megaclm.parallel.random import tp_rng_fork
from megaclm.parallel.state import ParallelState

InitMethod = Callable[[torch.Tensor], None]


def tp_info(pstate: ParallelState) -> tuple[int, int, bool]:
    """(tp size, tp rank, sequence parallel) of `pstate`."""
    return pstate.tp_size, pstate.tp_rank, pstate.sequence_parallel


def tp_group(pstate: ParallelState):
    """The tensor-parallel process group, or None when there is nothing to communicate.

    Layers look it up at forward time, so a sharded model can be built (e.g. to convert a checkpoint)
    in a process that never created the groups.
    """
    return None if pstate.tp_size == 1 else pstate.tp_group


def shard_blocks(full: torch.Tensor, dim: int, block_sizes: Sequence[int], tp_size: int, tp_rank: int) -> torch.Tensor:
    """Rank `tp_rank`'s shard of `full`: each block of `block_sizes` along `dim` split tp-ways, mine concatenated.

    One block is the plain Megatron split; several blocks keep e.g. [q; k; v] or [gate; up] paired per rank.
    """
    blocks = torch.split(full, list(block_sizes), dim=dim)
    return torch.cat([b.chunk(tp_size, dim=dim)[tp_rank] for b in blocks], dim=dim)


def unshard_blocks(shards: Sequence[torch.Tensor], dim: int, block_sizes: Sequence[int]) -> torch.Tensor:
    """Inverse of `shard_blocks` over all ranks' shards."""
    tp = len(shards)
    local = [s // tp for s in block_sizes]
    per_rank = [torch.split(s, local, dim=dim) for s in shards]
    return torch.cat([torch.cat([r[i] for r in per_rank], dim=dim) for i in range(len(block_sizes))], dim=dim)


def _mark(param: nn.Parameter, dim: int, blocks: Sequence[int]) -> None:
    """Declare how `param` is split across the tensor-parallel ranks: along `dim`, each of `blocks` (their
    full sizes along dim, summing to the full extent) split separately (shard_blocks). megaclm.model.sharding
    reads this declaration to shard and unshard state dicts offline; DeepSpeed's gradient norm reads the first
    two attributes."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_blocks = tuple(blocks)


def sequence_parallel_grad_hook(param: nn.Parameter, pstate: ParallelState) -> None:
    """Under SP, sum `param`'s gradient over the TP group (it saw only this rank's sequence chunk).

    Marks it `sequence_parallel`; a hook sums each micro-batch's gradient, unless the trainer set
    `sequence_parallel_deferred` on it to sum the accumulated gradients of all such parameters once per
    optimizer step, in one all-reduce (`all_reduce_sequence_parallel_grads`, megaclm.training.engine).
    """
    if not tp_info(pstate)[2]:
        return
    param.sequence_parallel = True

    def all_reduce(grad):
        if getattr(param, "sequence_parallel_deferred", False):
            return grad
        grad = grad.clone()
        dist.all_reduce(grad, group=tp_group(pstate))
        return grad

    param.register_hook(all_reduce)


def all_reduce_sequence_parallel_grads(grads: Sequence[torch.Tensor], group) -> None:
    """Sum `grads` (the accumulated gradients of SP-replicated parameters) over `group` in place: one
    all-reduce of them all, flattened."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(summed.view_as(g))


def _init_shard(shape_full: tuple, dim: int, block_sizes: Sequence[int], init_method: InitMethod, tp: int, rank: int):
    full = torch.empty(shape_full)
    init_method(full)
    return shard_blocks(full, dim, block_sizes, tp, rank)


def lora_a_init(t: torch.Tensor) -> None:
    """PEFT's init of A (kaiming-uniform, a=sqrt(5), as nn.Linear); B starts at zero."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class _LoraMixin:
    """Adapter bookkeeping shared by both linears; `lora_a`/`lora_b` are None without LoRA."""

    def _init_lora(self, lora: LoraConfig | None) -> None:
        self.lora_a = self.lora_b = None
        self.register_buffer("lora_mask", None, persistent=False)  # column-parallel: (out/tp, 1), some blocks only
        self.lora_scale = lora.scale if lora is not None else 0.0
        self.lora_dropout = nn.Dropout(lora.lora_dropout if lora is not None else 0.0)


class ColumnParallelLinear(_LoraMixin, nn.Module):
    """y = x A^T + b with A split along its output rows: (B, T, in) -> (B, T, out/tp).

    `output_blocks` (default [out]) lists blocks of the output that are split separately, e.g.
    [q, k, v] sizes, so each rank holds its own heads of each. `gather_output` returns (B, T, out).
    """

    def __init__(self, in_features: int, out_features: int, pstate: ParallelState, bias: bool = True,
                 init_method: InitMethod = nn.init.xavier_normal_, output_blocks: Sequence[int] | None = None,
                 gather_output: bool = False, lora: LoraConfig | None = None,
                 lora_blocks: Sequence[bool] | None = None):
        super().__init__()
        self.pstate = pstate
        self.tp, rank, self.sp = tp_info(pstate)
        blocks = list(output_blocks or [out_features])
        if sum(blocks) != out_features or any(b % self.tp for b in blocks):
            raise ValueError(f"output blocks {blocks} must sum to {out_features} and divide by tp={self.tp}")
        self.gather_output = gather_output
        self.weight = nn.Parameter(_init_shard((out_features, in_features), 0, blocks, init_method, self.tp, rank))
        _mark(self.weight, 0, blocks)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features // self.tp))
            _mark(self.bias, 0, blocks)
        self.linear = F.linear  # the base matmul; megaclm.model.fp8 swaps in a float8 one
        self._init_lora(lora)
        if lora is not None:
            a = torch.empty(lora.lora_rank, in_features)
            lora_a_init(a)
            self.lora_a = nn.Parameter(a)  # (r, in), replicated
            sequence_parallel_grad_hook(self.lora_a, pstate)  # under SP it sees this rank's tokens only
            self.lora_b = nn.Parameter(torch.zeros(out_features // self.tp, lora.lora_rank))  # (out/tp, r)
            _mark(self.lora_b, 0, blocks)
            if lora_blocks is not None:  # this rank's rows of each block, 1 where the block is adapted
                self.lora_mask = torch.cat([torch.full((b // self.tp, 1), float(on))
                                            for b, on in zip(blocks, lora_blocks)])

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        """`add_bias=False` leaves the bias to the caller (to fuse it into the activation)."""
        group = tp_group(self.pstate)
        y = column_parallel_linear(x, self.weight, self.bias if add_bias else None, group, self.sp, self.linear)
        if self.lora_a is not None:
            # x is replicated (same dropout mask on every rank) or, under SP, this rank's tokens (its own mask).
            with tp_rng_fork(self.sp and self.training and self.lora_dropout.p > 0):
                x = self.lora_dropout(x)
            u = F.linear(x, self.lora_a)  # (B, S, r)
            u = gather_from_sp(u, group) if self.sp else copy_to_tp(u, group)  # (B, T, r)
            b = self.lora_b if self.lora_mask is None else self.lora_b * self.lora_mask.to(self.lora_b.dtype)
            y = y + self.lora_scale * F.linear(u, b)  # (B, T, out/tp)
        return gather_from_tp(y, group) if self.gather_output else y


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group,
                           sequence_parallel: bool, linear: Callable = F.linear) -> torch.Tensor:
    """(B, T, in) replicated, or (B, T/tp, in) under SP -> (B, T, out/tp) with this rank's output rows.

    Also the tied output layer, which multiplies by the vocab-parallel embedding table.
    """
    if sequence_parallel and group is not None and linear is F.linear:
        return _SequenceParallelLinear.apply(x, weight, bias, group)
    # SP gathers the sequence (backward reduce-scatters the partial grads); TP copies (backward all-reduces).
    x = gather_from_sp(x, group) if sequence_parallel else copy_to_tp(x, group)
    return linear(x, weight, bias)


class _SequenceParallelLinear(torch.autograd.Function):
    """all-gather(x) W^T + b that keeps the LOCAL (B, T/tp, in) input for backward, not the gathered one
    (Megatron's LinearWithGradAccumulationAndAsyncCommunication): 1/tp of the bytes F.linear would save.

    backward: all-gather x again, overlapped with the input-gradient matmul dy W; reduce-scatter dx along T
    (each rank holds the part of dx from its output rows); dW = dy^T x with the gathered x.
    A float8 `linear` (megaclm.model.fp8) keeps the plain gather + linear.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(mappings.all_gather(x, 1, group), weight, bias)  # (B, T, out/tp)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        gathered = mappings.all_gather_async(x, 1, ctx.group)
        dx = dy.matmul(weight) if ctx.needs_input_grad[0] else None  # (B, T, in), overlaps the gather
        x = gathered()  # (B, T, in)
        if dx is not None:
            dx = mappings.reduce_scatter(dx, 1, ctx.group)  # (B, T/tp, in)
        dw = dy.flatten(0, -2).t().matmul(x.flatten(0, -2)) if ctx.needs_input_grad[1] else None
        db = dy.sum(dim=tuple(range(dy.dim() - 1))) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


class RowParallelLinear(_LoraMixin, nn.Module):
    """y = x A^T + b with A split along its input columns: (B, T, in/tp) -> (B, T, out), summed over ranks.

    The input is already split (the output of a ColumnParallelLinear). Under SP the sum is a
    reduce-scatter and the result is (B, T/tp, out). The bias is added once, after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, pstate: ParallelState, bias: bool = True,
                 init_method: InitMethod = nn.init.xavier_normal_, lora: LoraConfig | None = None):
        super().__init__()
        self.pstate = pstate
        self.tp, rank, self.sp = tp_info(pstate)
        if in_features % self.tp:
            raise ValueError(f"in_features={in_features} is not divisible by tp={self.tp}")
        self.weight = nn.Parameter(_init_shard((out_features, in_features), 1, [in_features], init_method,
                                               self.tp, rank))
        _mark(self.weight, 1, [in_features])
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
            sequence_parallel_grad_hook(self.bias, pstate)
        self.linear = F.linear  # the base matmul; megaclm.model.fp8 swaps in a float8 one
        self._init_lora(lora)
        if lora is not None:
            self.lora_a = nn.Parameter(_init_shard((lora.lora_rank, in_features), 1, [in_features], lora_a_init,
                                                   self.tp, rank))  # (r, in/tp)
            _mark(self.lora_a, 1, [in_features])
            self.lora_b = nn.Parameter(torch.zeros(out_features, lora.lora_rank))  # (out, r), replicated
            sequence_parallel_grad_hook(self.lora_b, pstate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x, self.weight)  # (B, T, out) partial sum over this rank's inputs
        group = tp_group(self.pstate)
        reduce = reduce_scatter_to_sp if self.sp else reduce_from_tp
        y = reduce(y, group)  # (B, S, out)
        if self.lora_a is not None:
            with tp_rng_fork(self.tp > 1 and self.training and self.lora_dropout.p > 0):  # x differs across ranks
                x = self.lora_dropout(x)
            u = reduce(F.linear(x, self.lora_a), group)  # (B, S, r), summed over the input shards
            y = y + self.lora_scale * F.linear(u, self.lora_b)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows: (B, T) ids -> (B, T, dim), summed over the TP ranks.

    Rank r holds rows [r*V/tp, (r+1)*V/tp); ids outside its range contribute zeros. Under SP the sum is
    left to the caller (`reduce=False`) so it can reduce-scatter instead.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, pstate: ParallelState,
                 init_method: InitMethod = nn.init.xavier_normal_):
        super().__init__()
        self.pstate = pstate
        self.tp, rank, _ = tp_info(pstate)
        if num_embeddings % self.tp:
            raise ValueError(f"vocabulary of {num_embeddings} is not divisible by tp={self.tp}; pad it")
        self.num_embeddings = num_embeddings
        per_rank = num_embeddings // self.tp
        self.vocab_start, self.vocab_end = rank * per_rank, (rank + 1) * per_rank
        self.weight = nn.Parameter(_init_shard((num_embeddings, embedding_dim), 0, [num_embeddings], init_method,
                                               self.tp, rank))
        _mark(self.weight, 0, [num_embeddings])

    def forward(self, ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (B, T, dim) partial
        return reduce_from_tp(out, tp_group(self.pstate)) if reduce else out


def normal_init(std: float, generator: torch.Generator | None = None) -> InitMethod:
    return lambda t: nn.init.normal_(t, mean=0.0, std=std, generator=generator)


def scaled_normal_init(std: float, num_layers: int, generator: torch.Generator | None = None) -> InitMethod:
    """Megatron's init for the output projection of each residual branch: std / sqrt(2 * num_layers)."""
    return normal_init(std / math.sqrt(2.0 * num_layers), generator)
