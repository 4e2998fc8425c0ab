"""Normalisation references. Statistics in fp32 whatever the input dtype; the output has the input's dtype.

    rms_norm(x, weight, eps)                      -> y = x / sqrt(mean(x^2) + eps) * weight
    layer_norm(x, weight, bias, eps)              -> y = (x - mean) / sqrt(var + eps) * weight + bias
    add_rms_norm(x, residual, weight, eps)        -> (rms_norm(x + residual), x + residual)
    add_layer_norm(x, residual, weight, bias, eps) -> (layer_norm(x + residual), x + residual)

x, residual: (..., H); weight, bias: (H,). The add variants are the residual add fused with the norm
that follows it in a pre-norm block.
"""
import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = F.layer_norm(x.float(), x.shape[-1:], weight.float(), None if bias is None else bias.float(), eps)
    return y.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return rms_norm_reference(h, weight, eps), h


def add_layer_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return layer_norm_reference(h, weight, bias, eps), h
