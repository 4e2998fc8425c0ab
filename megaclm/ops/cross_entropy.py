"""Cross-entropy references: per-token fp32 losses, no reduction (the trainer applies its loss mask).

    cross_entropy(logits, labels)                                  -> (...)  fp32
    linear_cross_entropy(hidden, weight, labels, chunk_size)       -> (...)  fp32
        == cross_entropy(hidden @ weight.T, labels), computed chunk_size tokens at a time

logits: (..., V); labels: (...) int64 in [0, V); hidden: (..., H); weight: (V, H).
linear_cross_entropy never holds more than (chunk_size, V) logits: the forward keeps only the per-token
log-sum-exp, the backward recomputes each chunk's logits to form softmax - onehot.
"""
import torch
import torch.nn.functional as F


def cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    flat = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="none")
    return flat.view(labels.shape)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        h = hidden.reshape(-1, hidden.size(-1))  # (N, H)
        y = labels.reshape(-1)  # (N,)
        loss = torch.empty(y.shape, dtype=torch.float32, device=h.device)
        lse = torch.empty_like(loss)
        for s in range(0, h.size(0), chunk_size):
            logits = F.linear(h[s:s + chunk_size], weight).float()  # (c, V)
            lse[s:s + chunk_size] = torch.logsumexp(logits, dim=-1)
            loss[s:s + chunk_size] = lse[s:s + chunk_size] - logits.gather(-1, y[s:s + chunk_size, None]).squeeze(-1)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size = chunk_size
        return loss.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse = ctx.saved_tensors
        h = hidden.reshape(-1, hidden.size(-1))
        y, g = labels.reshape(-1), grad_loss.reshape(-1).float()
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        c = ctx.chunk_size
        for s in range(0, h.size(0), c):
            logits = F.linear(h[s:s + c], weight).float()
            d = torch.exp(logits - lse[s:s + c, None])  # softmax (c, V)
            d.scatter_add_(-1, y[s:s + c, None], -torch.ones_like(d[:, :1]))
            d.mul_(g[s:s + c, None])
            if grad_h is not None:
                grad_h[s:s + c] = (d @ weight.float()).to(h.dtype)
            if grad_w is not None:
                grad_w.addmm_(d.t(), h[s:s + c].float())
        grad_hidden = None if grad_h is None else grad_h.view(hidden.shape)
        return grad_hidden, None if grad_w is None else grad_w.to(weight.dtype), None, None


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   chunk_size: int = 4096) -> torch.Tensor:
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_size)
