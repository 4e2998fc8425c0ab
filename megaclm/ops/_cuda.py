"""Fused CUDA implementations of the megaclm.ops signatures (the `kernels: fused` backend).

Loads the optional extension megaclm._cuda_kernels (csrc/kernels, built by setup.py when CUDA is
present). `megaclm.ops.build_ops("fused")` takes every op below when `is_available()`, and logs one
line and keeps the references when not. Each function has its reference's signature and wraps the
kernels in an autograd.Function; given tensors the kernels cannot take (CPU, float64, shapes they do
not cover) it runs the reference instead and logs that once per op.

Extra over the references: `linear_cross_entropy(..., group=None)` takes a tensor-parallel group for a
vocab-split weight (see megaclm.ops.chunked_ce), and `cross_entropy` / `linear_cross_entropy` give
loss 0 at label -100 (F.cross_entropy's ignore_index).
"""
import torch

from megaclm.logging import warn_once
from megaclm.ops.activations import bias_gelu_reference, gelu_reference, swiglu_reference
from megaclm.ops.chunked_ce import IGNORE_INDEX, Rows, TORCH_ROWS, chunked_linear_cross_entropy, finish_loss
from megaclm.ops.cross_entropy import cross_entropy_reference
from megaclm.ops.norms import (add_layer_norm_reference, add_rms_norm_reference, layer_norm_reference,
                               rms_norm_reference)
from megaclm.ops.rope import rope_reference
from megaclm.ops.softmax import scaled_masked_softmax_reference

try:
    import megaclm._cuda_kernels as _ext
    _LOAD_ERROR = ""
except ModuleNotFoundError as e:  # not built: a CPU install
    if e.name != "megaclm._cuda_kernels":
        raise
    _ext, _LOAD_ERROR = None, "megaclm._cuda_kernels is not built"
except (ImportError, OSError) as e:  # built, but against another torch or CUDA
    _ext, _LOAD_ERROR = None, f"megaclm._cuda_kernels does not load ({e}); rebuild it"

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KERNEL_DEVICE = "cuda"


def is_available() -> bool:
    """True when the extension is built and a CUDA device is visible."""
    return _ext is not None and torch.cuda.is_available()


def unavailable_reason() -> str:
    """Why is_available() is False ("" when it is True)."""
    if _ext is None:
        return f"{_LOAD_ERROR}: on a CUDA machine run MEGACLM_CUDA_EXT=1 pip install --no-build-isolation -e ."
    return "" if torch.cuda.is_available() else "no CUDA device is visible"


def _kernels_take(op: str, *tensors: torch.Tensor | None, why: str = "") -> bool:
    """Whether the kernels can run `op` on these tensors; if not, log once and use the reference."""
    bad = why or next((f"a {t.dtype} tensor on {t.device}" for t in tensors if t is not None and
                       (t.device.type != _KERNEL_DEVICE or t.dtype not in _DTYPES)), "")
    if bad:
        warn_once(f"ops-fused-fallback-{op}", f"kernels=fused: {op} got {bad}; using the PyTorch reference for it")
    return not bad


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., F) -> contiguous (rows, F)."""
    return x.contiguous().view(-1, x.size(-1))


def _cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(like.dtype)


# ---- norms --------------------------------------------------------------------------------------------
class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        x2 = _rows(x)
        y, _, mean, rstd = _ext.norm_fwd(x2, None, weight.contiguous(), None if bias is None else bias.contiguous(),
                                         eps, rms)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.rms, ctx.has_bias, ctx.shape = rms, bias is not None, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _ext.norm_bwd(_rows(dy), None, x2, weight.contiguous(), mean, rstd, ctx.rms, ctx.has_bias)
        return dx.view(ctx.shape), dw, db, None, None


class _AddNorm(torch.autograd.Function):
    """(x, residual) -> (norm(x + residual), x + residual); both inputs get the same gradient."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, rms):
        y, h, mean, rstd = _ext.norm_fwd(_rows(x), _rows(residual), weight.contiguous(),
                                         None if bias is None else bias.contiguous(), eps, rms)
        ctx.save_for_backward(h, weight, mean, rstd)
        ctx.rms, ctx.has_bias, ctx.shape = rms, bias is not None, x.shape
        return y.view(x.shape), h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh_out):
        h, weight, mean, rstd = ctx.saved_tensors
        dh, dw, db = _ext.norm_bwd(_rows(dy), _rows(dh_out), h, weight.contiguous(), mean, rstd, ctx.rms,
                                   ctx.has_bias)
        dh = dh.view(ctx.shape)
        return dh, dh, dw, db, None, None


def _norm_ok(op, x, weight, bias, residual=None):
    shapes_ok = weight.shape == x.shape[-1:] and (bias is None or bias.shape == x.shape[-1:]) and \
        (residual is None or residual.shape == x.shape)
    return _kernels_take(op, x, weight, bias, residual, why="" if shapes_ok else "inputs of mismatched shapes")


def rms_norm(x, weight, eps):
    if not _norm_ok("rms_norm", x, weight, None):
        return rms_norm_reference(x, weight, eps)
    return _Norm.apply(x, _cast(weight, x), None, eps, True)


def layer_norm(x, weight, bias, eps):
    if not _norm_ok("layer_norm", x, weight, bias):
        return layer_norm_reference(x, weight, bias, eps)
    return _Norm.apply(x, _cast(weight, x), _cast(bias, x), eps, False)


def add_rms_norm(x, residual, weight, eps):
    if not _norm_ok("add_rms_norm", x, weight, None, residual):
        return add_rms_norm_reference(x, residual, weight, eps)
    return _AddNorm.apply(x, residual, _cast(weight, x), None, eps, True)


def add_layer_norm(x, residual, weight, bias, eps):
    if not _norm_ok("add_layer_norm", x, weight, bias, residual):
        return add_layer_norm_reference(x, residual, weight, bias, eps)
    return _AddNorm.apply(x, residual, _cast(weight, x), _cast(bias, x), eps, False)


# ---- activations --------------------------------------------------------------------------------------
class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        x2 = _rows(x)
        ctx.save_for_backward(x2, bias)
        ctx.shape = x.shape
        return _ext.bias_gelu_fwd(x2, bias).view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, bias = ctx.saved_tensors
        dx = _ext.bias_gelu_bwd(_rows(dy), x2, bias)
        dbias = dx.sum(dim=0) if bias is not None and ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dbias


def bias_gelu(x, bias):
    shapes_ok = bias is None or bias.shape == x.shape[-1:]
    if not _kernels_take("bias_gelu", x, bias, why="" if shapes_ok else "a bias of another width"):
        return bias_gelu_reference(x, bias)
    return _BiasGelu.apply(x, _cast(bias, x))


def gelu(x):
    if not _kernels_take("gelu", x):
        return gelu_reference(x)
    return _BiasGelu.apply(x, None)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x2 = _rows(x)  # (rows, 2F) = [gate | up]
        ctx.save_for_backward(x2)
        ctx.shape = x.shape
        return _ext.swiglu_fwd(x2).view(*x.shape[:-1], x.size(-1) // 2)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        return _ext.swiglu_bwd(_rows(dy), x2).view(ctx.shape)


def swiglu(x):
    if not _kernels_take("swiglu", x, why="" if x.size(-1) % 2 == 0 else "an odd last dimension"):
        return swiglu_reference(x)
    return _SwiGLU.apply(x)


# ---- rope ---------------------------------------------------------------------------------------------
def _heads(x: torch.Tensor) -> torch.Tensor:
    """(B, T, n, hd) -> (B*T, n, hd) with contiguous heads, a view when x is a slice of a fused qkv row."""
    x3 = x.reshape(-1, x.size(2), x.size(3))
    hd, n = x3.size(2), x3.size(1)
    if x3.stride(2) != 1 or x3.stride(1) != hd or x3.stride(0) < n * hd:
        x3 = x3.contiguous()
    return x3


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, inv_freq, positions):
        q_out, k_out = _ext.rope_fwd(_heads(q), _heads(k), positions, inv_freq, False)
        ctx.save_for_backward(inv_freq, positions)
        ctx.q_shape, ctx.k_shape = q.shape, k.shape
        return q_out.view(q.shape), k_out.view(k.shape)

    @staticmethod
    def backward(ctx, dq, dk):
        inv_freq, positions = ctx.saved_tensors
        dq_in, dk_in = _ext.rope_fwd(_heads(dq), _heads(dk), positions, inv_freq, True)  # inverse rotation
        return dq_in.view(ctx.q_shape), dk_in.view(ctx.k_shape), None, None


def rope(q, k, inv_freq, position_ids):
    shapes_ok = (q.dim() == 4 and k.dim() == 4 and q.shape[:2] == k.shape[:2] and q.size(3) == k.size(3)
                 and q.dtype == k.dtype and 2 * inv_freq.numel() <= q.size(3) and position_ids.dim() <= 2
                 and not position_ids.is_floating_point() and not inv_freq.requires_grad)
    if not _kernels_take("rope", q, k, why="" if shapes_ok else "shapes or dtypes it does not cover") \
            or position_ids.device != q.device or inv_freq.device != q.device:
        return rope_reference(q, k, inv_freq, position_ids)
    B, T = q.shape[:2]
    positions = position_ids.expand(B, T).reshape(-1).to(torch.int64).contiguous()  # (B*T,)
    return _Rope.apply(q, k, inv_freq.float().contiguous(), positions)


# ---- softmax ------------------------------------------------------------------------------------------
class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, mask, bias, scale):
        y = _ext.softmax_fwd(scores.contiguous(), mask, True, bias, False, scale)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return _ext.softmax_bwd(dy.contiguous(), y, ctx.scale), None, None, None


def _expand(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Broadcast view of t with the scores' shape (stride 0 where broadcast); last dim contiguous."""
    e = t.expand(shape)
    return e if e.stride(-1) == 1 else e.contiguous()


def _broadcasts(shape, target) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def scaled_masked_softmax(scores, mask, scale):
    why = "" if scores.dim() == 4 else "scores that are not (B, nh, Tq, Tk)"
    if not why and mask is not None:
        if mask.device != scores.device or mask.dim() > 4 or mask.requires_grad:
            why = "a mask it does not cover (other device, > 4 dims, or requiring grad)"
        elif not _broadcasts(mask.shape, scores.shape):
            why = "a mask that does not broadcast to the scores"
    if not _kernels_take("scaled_masked_softmax", scores, why=why):
        return scaled_masked_softmax_reference(scores, mask, scale)
    keep = bias = None
    if mask is not None and mask.dtype == torch.bool:
        keep = _expand(mask, scores.shape)  # True = attend
    elif mask is not None:
        bias = _expand(mask.float(), scores.shape)  # additive, -inf where masked
    return _Softmax.apply(scores, keep, bias, float(scale))


# ---- cross-entropy ------------------------------------------------------------------------------------
class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels):
        l2, y = _rows(logits), labels.reshape(-1).to(torch.int64).contiguous()
        row_max, sum_exp, target = _ext.ce_stats(l2, y, 0)
        lse = row_max + torch.log(sum_exp)
        ctx.save_for_backward(l2, y, lse)
        ctx.shape = logits.shape
        return finish_loss(lse, target, y, l2.size(1)).view(labels.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        l2, y, lse = ctx.saved_tensors
        grad = torch.empty_like(l2)
        _ext.ce_grad(l2, grad, y, 0, lse, grad_loss.reshape(-1).float().contiguous(), IGNORE_INDEX)
        return grad.view(ctx.shape), None


def cross_entropy(logits, labels):
    shapes_ok = logits.shape[:-1] == labels.shape and logits.size(-1) > 0 and not labels.is_floating_point()
    if not _kernels_take("cross_entropy", logits, why="" if shapes_ok else "labels not matching the logits") \
            or labels.device != logits.device:
        return cross_entropy_reference(logits, labels)
    return _CrossEntropy.apply(logits, labels)


def _cuda_ce_grad_(logits, labels, vocab_start, lse, grad_scale, ignore_index):
    _ext.ce_grad(logits, logits, labels, vocab_start, lse, grad_scale, ignore_index)


CUDA_ROWS = Rows(stats=lambda logits, labels, vocab_start: _ext.ce_stats(logits, labels, vocab_start),
                 grad_=_cuda_ce_grad_)


def linear_cross_entropy(hidden, weight, labels, chunk_size=4096, group=None):
    on_kernels = hidden.dtype == weight.dtype and labels.device == hidden.device and \
        _kernels_take("linear_cross_entropy", hidden, weight)
    return chunked_linear_cross_entropy(hidden, weight, labels, chunk_size, group,
                                        CUDA_ROWS if on_kernels else TORCH_ROWS)
