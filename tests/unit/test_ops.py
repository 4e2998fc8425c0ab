"""megaclm.ops references against plain formulas (float64 where the formula is written out), and the
backend dispatch: torch / compile / fused with a missing or a stand-in extension."""
import functools
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import megaclm.logging
from megaclm import ops
from megaclm.config.kernels import KernelsConfig
from megaclm.ops.activations import bias_gelu_reference, gelu_reference, swiglu_reference
from megaclm.ops.cross_entropy import cross_entropy_reference, linear_cross_entropy_reference
from megaclm.ops.norms import (add_layer_norm_reference, add_rms_norm_reference, layer_norm_reference,
                               rms_norm_reference)
from megaclm.ops.rope import rope_reference
from megaclm.ops.softmax import scaled_masked_softmax_reference
from megaclm.utils.errors import UserError


@pytest.fixture
def g():
    return torch.Generator().manual_seed(0)


def test_rms_norm_matches_formula(g):
    x, w = torch.randn(3, 5, 16, generator=g), torch.randn(16, generator=g)
    xd = x.double()
    expect = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(rms_norm_reference(x, w, 1e-6).double(), expect, rtol=1e-5, atol=1e-6)


def test_layer_norm_matches_formula(g):
    x, w, b = torch.randn(4, 16, generator=g) * 3 + 1, torch.randn(16, generator=g), torch.randn(16, generator=g)
    xd = x.double()
    mean, var = xd.mean(-1, keepdim=True), xd.var(-1, unbiased=False, keepdim=True)
    expect = (xd - mean) / torch.sqrt(var + 1e-5) * w.double() + b.double()
    torch.testing.assert_close(layer_norm_reference(x, w, b, 1e-5).double(), expect, rtol=1e-5, atol=1e-5)


def test_norms_keep_dtype_and_compute_in_fp32(g):
    x, w = (torch.randn(4, 64, generator=g) * 100).bfloat16(), torch.ones(64).bfloat16()
    y = rms_norm_reference(x, w, 1e-6)
    assert y.dtype == torch.bfloat16
    xf = x.float()
    torch.testing.assert_close(y.float(), xf / xf.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt(), rtol=1e-2, atol=1e-2)


def test_add_norms_return_the_sum_and_its_norm(g):
    x, r = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    y, h = add_rms_norm_reference(x, r, w, 1e-5)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, rms_norm_reference(x + r, w, 1e-5))
    y, h = add_layer_norm_reference(x, r, w, b, 1e-5)
    torch.testing.assert_close(y, F.layer_norm(x + r, (8,), w, b, 1e-5))


def test_gelu_is_the_tanh_formula(g):
    x = torch.randn(100, generator=g).double() * 3
    expect = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    torch.testing.assert_close(gelu_reference(x), expect)
    b = torch.randn(100, generator=g).double()
    torch.testing.assert_close(bias_gelu_reference(x, b), gelu_reference(x + b))
    torch.testing.assert_close(bias_gelu_reference(x, None), gelu_reference(x))


def test_swiglu_is_silu_gate_times_up(g):
    x = torch.randn(2, 3, 10, generator=g).double()
    gate, up = x[..., :5], x[..., 5:]
    torch.testing.assert_close(swiglu_reference(x), gate / (1 + torch.exp(-gate)) * up)


def _rope_complex(x, pos, inv_freq):
    """Independent RoPE: dims (i, i + rot/2) as the complex number x_i + j x_{i+rot/2}, times e^{j pos f_i}."""
    rot = 2 * inv_freq.numel()
    xr = x[..., :rot].double()
    z = torch.complex(xr[..., : rot // 2], xr[..., rot // 2:])
    angle = pos.double()[:, :, None, None] * inv_freq.double()
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag, x[..., rot:].double()], dim=-1)


@pytest.mark.parametrize("rot", [8, 4])
def test_rope_matches_complex_rotation(g, rot):
    q, k = torch.randn(2, 5, 4, 8, generator=g), torch.randn(2, 5, 2, 8, generator=g)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 3, 0, 1, 100]])
    qr, kr = rope_reference(q, k, inv_freq, pos)
    torch.testing.assert_close(qr.double(), _rope_complex(q, pos, inv_freq), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kr.double(), _rope_complex(k, pos, inv_freq), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position(g):
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)

    def score(pq, pk):
        qr, _ = rope_reference(q, k, inv_freq, torch.tensor([[pq]]))
        _, kr = rope_reference(q, k, inv_freq, torch.tensor([[pk]]))
        return (qr * kr).sum().item()

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_scaled_masked_softmax_bool_and_additive_masks(g):
    s = torch.randn(2, 3, 4, 4, generator=g)
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    expect = torch.softmax((s * 0.5).masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(scaled_masked_softmax_reference(s, mask, 0.5), expect)
    bias = torch.randn(2, 3, 4, 4, generator=g)
    torch.testing.assert_close(scaled_masked_softmax_reference(s, bias, 0.5), torch.softmax(s * 0.5 + bias, -1))
    torch.testing.assert_close(scaled_masked_softmax_reference(s, None, 1.0), torch.softmax(s, -1))


def test_fully_masked_rows_give_zeros_not_nan(g):
    s = torch.randn(1, 1, 2, 3, generator=g)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    p = scaled_masked_softmax_reference(s, mask, 1.0)
    assert torch.equal(p[0, 0, 1], torch.zeros(3)) and p[0, 0, 0, 0] == 1.0


def test_cross_entropy_is_per_token_fp32(g):
    logits = torch.randn(2, 3, 11, generator=g).bfloat16()
    labels = torch.randint(0, 11, (2, 3), generator=g)
    loss = cross_entropy_reference(logits, labels)
    assert loss.shape == (2, 3) and loss.dtype == torch.float32
    lf = logits.double()
    expect = torch.logsumexp(lf, -1) - lf.gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_linear_cross_entropy_equals_matmul_then_cross_entropy(g, chunk):
    h = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7), generator=g)
    weights = torch.rand(2, 7, generator=g)
    ref = F.cross_entropy((h @ w.t()).view(-1, 50), labels.view(-1), reduction="none").view(2, 7)
    gh, gw = torch.autograd.grad((ref * weights).sum(), (h, w))
    loss = linear_cross_entropy_reference(h, w, labels, chunk)
    assert loss.shape == (2, 7) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    h2, w2 = torch.autograd.grad((loss * weights).sum(), (h, w))
    torch.testing.assert_close(h2, gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w2, gw, rtol=1e-5, atol=1e-5)


def test_linear_cross_entropy_bf16_grads_keep_dtypes(g):
    h = torch.randn(6, 16, generator=g).bfloat16().requires_grad_()
    w = torch.randn(32, 16, generator=g).bfloat16().requires_grad_()
    labels = torch.randint(0, 32, (6,), generator=g)
    linear_cross_entropy_reference(h, w, labels, 4).sum().backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    ref = cross_entropy_reference(h.detach().float() @ w.detach().float().t(), labels)
    torch.testing.assert_close(linear_cross_entropy_reference(h, w, labels, 4), ref, rtol=2e-2, atol=2e-2)


def test_torch_backend_is_the_references():
    table = ops.build_ops("torch")
    assert all(getattr(table, name) is ops.REFERENCES[name] for name in ops.OP_NAMES)
    assert ops.build_ops(KernelsConfig()).backend == "torch"


def test_fused_uses_the_extension_ops_it_provides(monkeypatch):
    fake = types.ModuleType("megaclm.ops._cuda")
    fake.is_available = lambda: True
    fake.rms_norm = lambda x, w, eps: "fused"
    monkeypatch.setitem(sys.modules, "megaclm.ops._cuda", fake)
    monkeypatch.setattr(ops, "_cuda", fake, raising=False)
    table = ops.build_ops("fused")
    assert table.backend == "fused" and table.rms_norm is fake.rms_norm
    assert table.layer_norm is ops.REFERENCES["layer_norm"]
    assert ops.is_available("rms_norm") and not ops.is_available("layer_norm")
    with pytest.raises(ValueError, match="unknown op"):
        ops.is_available("flash")


def test_compile_backend_traces_the_references(g, monkeypatch):
    # Dynamo tracing without inductor's C++ code generation (tens of seconds on a busy CPU).
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    table = ops.build_ops("compile")
    assert table.backend == "compile" and table.bias_gelu is not ops.REFERENCES["bias_gelu"]
    x, b = torch.randn(4, 8, generator=g), torch.randn(8, generator=g)
    torch.testing.assert_close(table.bias_gelu(x, b), bias_gelu_reference(x, b))
    q, k = torch.randn(1, 3, 2, 4, generator=g), torch.randn(1, 3, 1, 4, generator=g)
    inv, pos = torch.tensor([1.0, 0.1]), torch.arange(3)[None]
    for got, want in zip(table.rope(q, k, inv, pos), rope_reference(q, k, inv, pos)):
        torch.testing.assert_close(got, want)


def test_unknown_backend_is_a_user_error():
    with pytest.raises(UserError, match=r"kernels.op_backend \(--kernels\)=\'cuda\'"):
        ops.build_ops("cuda")
    with pytest.raises(UserError, match="kernels.attention_backend"):
        KernelsConfig(attention_backend="triton")
