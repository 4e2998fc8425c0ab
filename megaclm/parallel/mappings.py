"""Collectives across the tensor-parallel group, each an autograd pair (Megatron tensor_parallel/mappings.py).

Activations are batch-first (B, T, ...): the tensor-parallel ("TP") split is on the last dim, the
sequence-parallel ("SP") split on dim 1. Every function is the identity when the group has one rank.

    copy_to_tp          fwd: identity                 bwd: all-reduce
    reduce_from_tp      fwd: all-reduce               bwd: identity
    scatter_to_tp       fwd: keep my last-dim chunk   bwd: all-gather last dim
    gather_from_tp      fwd: all-gather last dim      bwd: keep my last-dim chunk
    scatter_to_sp       fwd: keep my seq chunk        bwd: all-gather seq
    gather_from_sp      fwd: all-gather seq           bwd: reduce-scatter seq (grad_is_partial) or keep my chunk
    reduce_scatter_to_sp fwd: reduce-scatter seq      bwd: all-gather seq
    all_to_all          fwd: rows to their ranks      bwd: the rows back (splits swapped)   (any group: EP)
    all_reduce_sum      fwd: all-reduce               bwd: all-reduce   (any group: a sum every rank's loss uses)

Plain (no autograd) helpers for hand-written backwards: all_gather, all_gather_async, reduce_scatter.
"""
import torch
import torch.distributed as dist


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if x.size(dim) % n:
        raise RuntimeError(f"cannot split dim {dim} of size {x.size(dim)} into {n} tensor-parallel chunks")
    return x.chunk(n, dim=dim)[dist.get_rank(group)].contiguous()


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def all_gather_async(x: torch.Tensor, dim: int, group):
    """Start an all-gather along `dim`; returns wait() -> the gathered tensor (work in between overlaps it)."""
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    handle = dist.all_gather(parts, x.contiguous(), group=group, async_op=True)

    def wait() -> torch.Tensor:
        handle.wait()
        return torch.cat(parts, dim=dim)

    return wait


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if x.size(dim) % n:
        raise RuntimeError(f"cannot reduce-scatter dim {dim} of size {x.size(dim)} over {n} ranks")
    if dist.get_backend(group) == dist.Backend.GLOO:
        # gloo has no reduce_scatter: all-reduce, then keep my chunk (same result, more traffic).
        return _split(_all_reduce(x.clone(), group), dim, group)
    out = torch.empty_like(x.chunk(n, dim=dim)[0])
    dist.reduce_scatter(out, [c.contiguous() for c in x.chunk(n, dim=dim)], group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, -1, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, 1, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, grad_is_partial):
        ctx.group, ctx.grad_is_partial = group, grad_is_partial
        return all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        if ctx.grad_is_partial:  # the consumer was tensor-parallel: each rank holds part of the gradient
            return reduce_scatter(g, 1, ctx.group), None, None
        return _split(g, 1, ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, 1, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _size(group) == 1 else _ScatterToSP.apply(x, group)


def gather_from_sp(x: torch.Tensor, group, grad_is_partial: bool = True) -> torch.Tensor:
    return x if _size(group) == 1 else _GatherFromSP.apply(x, group, grad_is_partial)


def reduce_scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _size(group) == 1 else _ReduceScatterToSP.apply(x, group)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits):
        ctx.group, ctx.splits = group, (output_splits, input_splits)
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        output_splits, input_splits = ctx.splits
        return _AllToAll.apply(g, ctx.group, input_splits, output_splits), None, None, None


def all_to_all(x: torch.Tensor, group, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
    """Rows [sum(input_splits[:r]), +input_splits[r]) of x go to rank r; rank r's rows for me arrive in rank order."""
    return x if _size(group) == 1 else _AllToAll.apply(x, group, output_splits, input_splits)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), ctx.group), None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """The sum over `group` of every rank's x, where each rank's loss uses the sum: the gradient of a rank's x
    is the sum of every rank's gradient of the sum (unlike reduce_from_tp, whose ranks share one loss)."""
    return x if _size(group) == 1 else _AllReduceSum.apply(x, group)
