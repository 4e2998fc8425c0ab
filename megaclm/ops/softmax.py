"""Scaled, masked softmax reference (the non-flash attention path).

    scaled_masked_softmax(scores, mask, scale) -> softmax(scores * scale + mask) over the last dim

scores: (B, nh, Tq, Tk); mask: None, bool broadcastable to scores (True = attend), or a float additive
bias (ALiBi, -inf where masked). Computed in fp32, returned in the scores' dtype. A row with nothing to
attend to gives zeros rather than NaN.
"""
import torch


def scaled_masked_softmax_reference(scores: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    x = scores.float() * scale
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else x + mask.float()
    probs = torch.softmax(x, dim=-1)
    return probs.nan_to_num(0.0).to(scores.dtype)
