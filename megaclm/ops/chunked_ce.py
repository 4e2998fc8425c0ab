"""Output layer + cross-entropy that never materialises the (tokens, vocab) logits, vocab-parallel aware.

    chunked_linear_cross_entropy(hidden (..., H), weight (V_local, H), labels (...), chunk_size, group, rows)
        -> per-token fp32 loss (...)

Rank r of `group` (tensor parallel) holds vocabulary rows [r * V_local, (r+1) * V_local) of the output
weight; `hidden` is the full, replicated input (its gradient is all-reduced over the group, as
Megatron's copy-to-tensor-parallel-region would). labels are global ids; ignore_index (-100) gives
loss 0 and no gradient; any other label outside [0, V_local * tp) gives NaN.

Forward, per chunk of `chunk_size` tokens: logits = hidden_c @ W^T (cuBLAS), then `rows.stats` reads
the chunk once for its per-row (max, sum exp(l - max), target logit). After the loop the shards are
combined with two collectives for all tokens at once (max, then the rescaled sums and targets):
lse = M + log(sum_r s_r exp(m_r - M)), loss = lse - target. Only lse (4 bytes per token) is saved.
Backward recomputes each chunk's logits, turns them in place into (softmax - onehot) * grad_loss
(`rows.grad_`), and feeds that to the two GEMMs: grad_hidden_c = G @ W, grad_W += G^T @ hidden_c.
Peak extra memory is one (chunk_size, V_local) logits buffer; the price is one recomputed GEMM.
grad_W accumulates across chunks in the weight's dtype (in-place addmm, fp32 inside each GEMM).

`rows` supplies the two row kernels: `TORCH_ROWS` here (CPU, tests) or the CUDA ones of
megaclm.ops._cuda. Both follow the contracts of csrc/kernels/kernels.h (ce_stats, ce_grad).
"""
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

IGNORE_INDEX = -100


class Rows(NamedTuple):
    # stats(logits (c, V), labels (c,), vocab_start) -> (row_max, sum_exp, target), fp32 (c,) each
    stats: Callable
    # grad_(logits (c, V), labels, vocab_start, lse (c,), grad_scale (c,), ignore_index): in place
    grad_: Callable


def torch_ce_stats(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int):
    lf = logits.float()
    row_max = lf.max(dim=-1).values
    sum_exp = torch.exp(lf - row_max[:, None]).sum(dim=-1)
    local = labels - vocab_start
    inside = (local >= 0) & (local < lf.size(-1))
    target = lf.gather(-1, local.clamp(0, lf.size(-1) - 1)[:, None]).squeeze(-1)
    return row_max, sum_exp, torch.where(inside, target, torch.zeros_like(target))


def torch_ce_grad_(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, lse: torch.Tensor,
                   grad_scale: torch.Tensor, ignore_index: int) -> None:
    grad = torch.exp(logits.float() - lse[:, None])  # softmax over the whole vocabulary, this shard's part
    local = labels - vocab_start
    inside = (local >= 0) & (local < logits.size(-1))
    grad.scatter_add_(-1, local.clamp(0, logits.size(-1) - 1)[:, None], -inside.float()[:, None])
    grad.mul_(torch.where(labels == ignore_index, torch.zeros_like(grad_scale), grad_scale)[:, None])
    logits.copy_(grad)


TORCH_ROWS = Rows(torch_ce_stats, torch_ce_grad_)


def finish_loss(lse: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """lse - target logit; 0 at ignore_index, NaN at any other label outside [0, vocab) (no silent garbage)."""
    loss = torch.where((labels < 0) | (labels >= vocab), torch.full_like(lse, float("nan")), lse - target)
    return torch.where(labels == IGNORE_INDEX, torch.zeros_like(loss), loss)


def _group_info(group) -> tuple[int, int]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, group, rows):
        h = hidden.reshape(-1, hidden.size(-1)).contiguous()  # (N, H)
        y = labels.reshape(-1).contiguous()  # (N,)
        rank, world = _group_info(group)
        vocab = weight.size(0)  # this rank's shard
        start = rank * vocab
        n = h.size(0)
        stats = torch.empty(3, n, dtype=torch.float32, device=h.device)  # row max, sum exp, target
        for s in range(0, n, chunk_size):
            logits = h[s:s + chunk_size] @ weight.t()  # (c, V_local) in the activation dtype
            for dst, src in zip(stats[:, s:s + chunk_size], rows.stats(logits, y[s:s + chunk_size], start)):
                dst.copy_(src)
            del logits
        row_max, sum_exp, target = stats
        if world > 1:  # combine the vocab shards: global max, then the sums rescaled to it
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            sums = torch.stack((sum_exp * torch.exp(row_max - global_max), target))
            dist.all_reduce(sums, group=group)
            row_max, (sum_exp, target) = global_max, sums
        lse = row_max + torch.log(sum_exp)
        loss = finish_loss(lse, target, y, vocab * world)
        ctx.save_for_backward(h, weight, y, lse)
        ctx.chunk_size, ctx.group, ctx.rows, ctx.start, ctx.world = chunk_size, group, rows, start, world
        ctx.hidden_shape = hidden.shape
        return loss.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        h, weight, y, lse = ctx.saved_tensors
        g = grad_loss.reshape(-1).float().contiguous()
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        c = ctx.chunk_size
        for s in range(0, h.size(0), c):
            hc = h[s:s + c]
            logits = hc @ weight.t()  # recomputed (c, V_local)
            ctx.rows.grad_(logits, y[s:s + c], ctx.start, lse[s:s + c], g[s:s + c], IGNORE_INDEX)
            if want_h:
                torch.mm(logits, weight, out=grad_h[s:s + c])
            if want_w:
                grad_w.addmm_(logits.t(), hc)
            del logits
        if want_h and ctx.world > 1:  # each shard contributed its part of d loss / d hidden
            dist.all_reduce(grad_h, group=ctx.group)
        grad_hidden = grad_h.view(ctx.hidden_shape) if want_h else None
        return grad_hidden, grad_w, None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 chunk_size: int = 4096, group=None, rows: Rows = TORCH_ROWS) -> torch.Tensor:
    """Per-token fp32 loss of softmax(hidden @ weight^T) at `labels`, `chunk_size` tokens at a time."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_size, group, rows)
