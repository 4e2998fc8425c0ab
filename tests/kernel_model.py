"""A pure-PyTorch model of the megaclm._cuda_kernels functions: same arguments, same returns, the
same formulas as the CUDA kernels (csrc/kernels), computed in fp32.

tests/unit/test_kernels_cpu.py puts it in place of the extension to test megaclm.ops._cuda's autograd
wiring on CPU against the references; the backward formulas written here (and in the kernels) are
thereby checked against autograd. tests/gpu/test_kernels.py compares the real kernels' side outputs
(mean, rstd, row statistics) with it.
"""
import math

import torch

from megaclm.ops.chunked_ce import torch_ce_grad_, torch_ce_stats

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _check_heads(t):
    assert t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.size(2), "kernel contract: contiguous heads"


class KernelModel:
    # ---- norms: h = x (+ residual) rounded to the dtype; stats fp32 --------------------------------
    @staticmethod
    def norm_fwd(x, residual, weight, bias, eps, rms):
        h = x if residual is None else x + residual
        hf = h.float()
        if rms:
            mean = None
            rstd = torch.rsqrt(hf.pow(2).mean(-1) + eps)
            y = hf * rstd[:, None] * weight.float()
        else:
            mean = hf.mean(-1)
            rstd = torch.rsqrt((hf - mean[:, None]).pow(2).mean(-1) + eps)
            y = (hf - mean[:, None]) * rstd[:, None] * weight.float() + (0 if bias is None else bias.float())
        return [y.to(x.dtype), None if residual is None else h, mean, rstd]

    @staticmethod
    def norm_bwd(dy, dresidual, h, weight, mean, rstd, rms, with_bias):
        hidden = h.size(1)
        g, w = dy.float(), weight.float()
        xhat = (h.float() - (0 if rms else mean[:, None])) * rstd[:, None]
        s_gx = (g * w * xhat).sum(-1, keepdim=True) / hidden
        s_g = 0 if rms else (g * w).sum(-1, keepdim=True) / hidden
        dh = rstd[:, None] * (g * w - s_g - xhat * s_gx)
        if dresidual is not None:
            dh = dh + dresidual.float()
        dw = (g * xhat).sum(0).to(weight.dtype)
        db = g.sum(0).to(weight.dtype) if with_bias else None
        return [dh.to(h.dtype), dw, db]

    # ---- activations ------------------------------------------------------------------------------
    @staticmethod
    def _z(x, bias):
        return (x if bias is None else x + bias).float()  # x + bias rounded to the dtype first

    @staticmethod
    def bias_gelu_fwd(x, bias):
        z = KernelModel._z(x, bias)
        return (0.5 * z * (1 + torch.tanh(SQRT_2_OVER_PI * (z + 0.044715 * z ** 3)))).to(x.dtype)

    @staticmethod
    def bias_gelu_bwd(dy, x, bias):
        z = KernelModel._z(x, bias)
        t = torch.tanh(SQRT_2_OVER_PI * (z + 0.044715 * z ** 3))
        grad = 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * 0.044715 * z * z)
        return (dy.float() * grad).to(x.dtype)

    @staticmethod
    def swiglu_fwd(x):
        gate, up = x.float().chunk(2, dim=-1)
        return (gate * torch.sigmoid(gate) * up).to(x.dtype)

    @staticmethod
    def swiglu_bwd(dy, x):
        gate, up = x.float().chunk(2, dim=-1)
        s, d = torch.sigmoid(gate), dy.float()
        return torch.cat((d * up * s * (1 + gate * (1 - s)), d * gate * s), dim=-1).to(x.dtype)

    # ---- rope -------------------------------------------------------------------------------------
    @staticmethod
    def rope_fwd(q, k, positions, inv_freq, inverse):
        _check_heads(q)
        _check_heads(k)
        angles = positions.float()[:, None] * inv_freq  # (tokens, rot/2)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None] * (-1 if inverse else 1)
        half = inv_freq.numel()

        def turn(x):
            out = x.float().clone()
            a, b = out[..., :half].clone(), out[..., half:2 * half].clone()
            out[..., :half], out[..., half:2 * half] = a * cos - b * sin, b * cos + a * sin
            return out.to(x.dtype).contiguous()

        return [turn(q), turn(k)]

    # ---- softmax ----------------------------------------------------------------------------------
    @staticmethod
    def softmax_fwd(x, mask, mask_keeps, bias, causal, scale):
        for t in (mask, bias):
            assert t is None or (t.shape == x.shape and t.stride(-1) == 1), "kernel contract: expanded, last dim 1"
        assert bias is None or bias.dtype == torch.float32
        v = x.float() * scale + (0 if bias is None else bias)
        if mask is not None:
            v = v.masked_fill(mask.bool() != mask_keeps, float("-inf"))
        if causal:
            tq, tk = x.shape[-2:]
            v = v.masked_fill(torch.ones(tq, tk, dtype=torch.bool).triu(tk - tq + 1), float("-inf"))
        return torch.softmax(v, -1).nan_to_num(0.0).to(x.dtype)

    @staticmethod
    def softmax_bwd(dy, y, scale):
        g, p = dy.float(), y.float()
        return (scale * p * (g - (g * p).sum(-1, keepdim=True))).to(y.dtype)

    # ---- cross-entropy rows -----------------------------------------------------------------------
    @staticmethod
    def ce_stats(logits, labels, vocab_start):
        return list(torch_ce_stats(logits, labels, vocab_start))

    @staticmethod
    def ce_grad(logits, out, labels, vocab_start, lse, grad_scale, ignore_index):
        work = logits.clone()
        torch_ce_grad_(work, labels, vocab_start, lse, grad_scale, ignore_index)
        out.copy_(work)
