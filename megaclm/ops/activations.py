"""Activation references.

    gelu(x)            -> 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))   (GPT-2's tanh approximation)
    bias_gelu(x, bias) -> gelu(x + bias), bias (F,) or None
    swiglu(x)          -> silu(gate) * up, where gate, up = x.chunk(2, dim=-1); (..., 2F) -> (..., F)
"""
import torch
import torch.nn.functional as F


def gelu_reference(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return gelu_reference(x if bias is None else x + bias)


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
