"""Cross-entropy over logits split by vocabulary across the tensor-parallel ranks (Megatron's algorithm).

Rank r holds logits[..., r*V/tp:(r+1)*V/tp]. Three all-reduces over the group give the exact loss
without ever gathering (B, T, V): the max (for stability), the target's logit (only its owner has it),
and the sum of exponentials. The gradient, softmax - onehot, is then local to each shard.
"""
import torch
import torch.distributed as dist

from megaclm.ops.cross_entropy import cross_entropy_reference


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group):
        # logits: (..., V/tp) any float dtype; labels: (...) int64 global ids. Math in fp32.
        logits = logits.float()
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)

        per_rank = logits.size(-1)
        start = dist.get_rank(group) * per_rank
        outside = (labels < start) | (labels >= start + per_rank)
        local = (labels - start).masked_fill(outside, 0)
        target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(target, group=group)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target  # (...) fp32

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, outside = ctx.saved_tensors
        grad = softmax  # reused in place: the forward's buffer is not needed again
        onehot = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local.unsqueeze(-1), -onehot)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group=None) -> torch.Tensor:
    """Per-token fp32 loss (...) from vocab-split logits (..., V/tp). `group=None` or size 1: plain CE.

    The returned gradient has the logits' dtype.
    """
    if group is None or dist.get_world_size(group) == 1:
        return cross_entropy_reference(logits, labels)
    return _VocabParallelCrossEntropy.apply(logits, labels, group).to(torch.float32)
