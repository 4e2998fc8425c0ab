"""Every numeric op the model uses, behind one signature with three implementations.

Signatures (shapes batch-first; "ref" = the pure-PyTorch reference in the named module):

    rms_norm(x, weight, eps) -> y                                        norms.py
    layer_norm(x, weight, bias, eps) -> y                                norms.py
    add_rms_norm(x, residual, weight, eps) -> (y, x + residual)          norms.py
    add_layer_norm(x, residual, weight, bias, eps) -> (y, x + residual)  norms.py
    gelu(x) -> y  (tanh approximation)                                   activations.py
    bias_gelu(x, bias | None) -> gelu(x + bias)                          activations.py
    swiglu(x (..., 2F)) -> silu(x[..., :F]) * x[..., F:]                 activations.py
    rope(q (B,T,nh,hd), k (B,T,nkv,hd), inv_freq (rot/2,), position_ids (B,T)) -> (q, k)   rope.py
    scaled_masked_softmax(scores (B,nh,Tq,Tk), mask | None, scale) -> probs               softmax.py
    cross_entropy(logits (...,V), labels (...)) -> per-token fp32 loss (...)               cross_entropy.py
    linear_cross_entropy(hidden (...,H), weight (V,H), labels (...), chunk_size) -> (...)  cross_entropy.py

Backends (`KernelsConfig.op_backend`, flag --kernels), chosen once with `build_ops(...)`, which returns an `Ops` whose
attributes are the functions above:
- "torch": the references.
- "compile": torch.compile of each reference (small graphs, one per op). Whole transformer blocks are
  compiled by `kernels.torch_compile` instead (megaclm.model.compiled); both need `compile_unavailable()`
  to be None, else one line is logged and the eager code runs.
- "fused": the CUDA kernels of `megaclm.ops._cuda` for the ops it provides, the reference for the rest.
  That module (built by the kernels issue) must define `is_available() -> bool` and functions with the
  names and signatures above. When it is missing or not available, one line is logged and every op
  falls back to its reference.
`is_available(name)` says whether a fused kernel for `name` can run in this process.
"""
import os
import shutil
from dataclasses import dataclass, fields
from typing import Callable

import torch

from megaclm.config.kernels import KERNEL_BACKENDS, KernelsConfig
from megaclm.logging import warn_once
from megaclm.ops.activations import bias_gelu_reference, gelu_reference, swiglu_reference
from megaclm.ops.cross_entropy import cross_entropy_reference, linear_cross_entropy_reference
from megaclm.ops.norms import (add_layer_norm_reference, add_rms_norm_reference, layer_norm_reference,
                               rms_norm_reference)
from megaclm.ops.rope import rope_reference
from megaclm.ops.softmax import scaled_masked_softmax_reference
from megaclm.utils.errors import UserError


@dataclass(frozen=True)
class Ops:
    rms_norm: Callable = rms_norm_reference
    layer_norm: Callable = layer_norm_reference
    add_rms_norm: Callable = add_rms_norm_reference
    add_layer_norm: Callable = add_layer_norm_reference
    gelu: Callable = gelu_reference
    bias_gelu: Callable = bias_gelu_reference
    swiglu: Callable = swiglu_reference
    rope: Callable = rope_reference
    scaled_masked_softmax: Callable = scaled_masked_softmax_reference
    cross_entropy: Callable = cross_entropy_reference
    linear_cross_entropy: Callable = linear_cross_entropy_reference
    backend: str = "torch"


OP_NAMES = tuple(f.name for f in fields(Ops) if f.name != "backend")
REFERENCES = {name: getattr(Ops, name) for name in OP_NAMES}


def _fused_module():
    """megaclm.ops._cuda if it is built and usable here, else None."""
    try:
        from megaclm.ops import _cuda
    except ModuleNotFoundError as e:
        if e.name != "megaclm.ops._cuda":
            raise
        return None
    return _cuda if _cuda.is_available() else None


def is_available(name: str) -> bool:
    """True if a fused kernel for op `name` can run in this process."""
    if name not in OP_NAMES:
        raise ValueError(f"unknown op {name!r}; ops are {', '.join(OP_NAMES)}")
    module = _fused_module()
    return module is not None and hasattr(module, name)


def compile_unavailable() -> str | None:
    """Why torch.compile's default (inductor) backend cannot run in this process, or None if it can."""
    if not torch._dynamo.is_dynamo_supported():
        return "TorchDynamo does not support this Python/platform"
    if torch.cuda.is_available():
        from torch.utils._triton import has_triton

        return None if has_triton() else "inductor needs triton for CUDA kernels and it is not installed"
    compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        return "inductor needs a C++ compiler for CPU kernels and none was found (set CXX or install g++)"
    return None


def build_ops(kernels: KernelsConfig | str = "torch") -> Ops:
    """The op table for a backend ("torch", "compile" or "fused", or a KernelsConfig)."""
    backend = kernels.op_backend if isinstance(kernels, KernelsConfig) else kernels
    if backend not in KERNEL_BACKENDS:
        raise UserError(f"kernels.op_backend (--kernels)={backend!r} is not one of {', '.join(KERNEL_BACKENDS)}")
    if backend == "torch":
        return Ops()
    if backend == "compile":
        reason = compile_unavailable()
        if reason is not None:
            warn_once("ops-compile-missing", f"kernels=compile: {reason}; using the eager PyTorch reference ops")
            return Ops(backend="torch")
        return Ops(backend="compile", **{name: torch.compile(REFERENCES[name]) for name in OP_NAMES})
    module = _fused_module()
    if module is None:
        from megaclm.ops import _cuda
        warn_once("ops-fused-missing", "kernels=fused: the megaclm CUDA extension is not available here "
                  f"({_cuda.unavailable_reason()}); using the PyTorch reference ops")
        return Ops(backend="torch")
    return Ops(backend="fused", **{name: getattr(module, name) for name in OP_NAMES if hasattr(module, name)})
