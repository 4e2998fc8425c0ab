"""The fused-kernel plumbing on CPU: backend fallback, the autograd wiring of megaclm.ops._cuda (run
against a pure-PyTorch model of the extension), the chunked linear cross-entropy, and setup.py's
decision to build the CUDA extension or not.

The kernels themselves run in tests/gpu/test_kernels.py; nvcc compiles them in test_nvcc_compile.py.
"""
import logging
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import megaclm.logging as mlog
from megaclm.config.kernels import KernelsConfig
from megaclm.ops import REFERENCES, OP_NAMES, _cuda, build_ops, is_available
from megaclm.ops.chunked_ce import chunked_linear_cross_entropy
from megaclm.ops.cross_entropy import linear_cross_entropy_reference

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from kernel_model import KernelModel  # noqa: E402


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_seen(monkeypatch):
    """Messages warned on the megaclm logger during the test, with warn_once's memory cleared."""
    monkeypatch.setattr(mlog, "_warned", set())
    handler = _Records()
    logger = mlog.get_logger()
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


# ---- backend selection ---------------------------------------------------------------------------------
def test_fused_without_extension_uses_references_and_warns_once(warnings_seen):
    assert not _cuda.is_available()
    assert "not built" in _cuda.unavailable_reason() and "MEGACLM_CUDA_EXT=1" in _cuda.unavailable_reason()
    for _ in range(3):
        for request in ("fused", KernelsConfig(op_backend="fused")):
            ops = build_ops(request)
            assert ops.backend == "torch"
            assert all(getattr(ops, name) is REFERENCES[name] for name in OP_NAMES)
    assert len(warnings_seen) == 1 and "kernels=fused" in warnings_seen[0] and "not built" in warnings_seen[0]
    assert not any(is_available(name) for name in OP_NAMES)


@pytest.fixture
def model_ext(monkeypatch, warnings_seen):
    """megaclm.ops._cuda driving the pure-PyTorch kernel model on CPU tensors, as if the GPU were here.
    A test using it fails if any op quietly fell back to its reference (unless it empties the list)."""
    monkeypatch.setattr(_cuda, "_ext", KernelModel())
    monkeypatch.setattr(_cuda, "_KERNEL_DEVICE", "cpu")
    monkeypatch.setattr(_cuda, "is_available", lambda: True)
    yield
    assert warnings_seen == [], "an op fell back to its reference"


def test_fused_backend_takes_every_op_from_the_extension_module(model_ext):
    ops = build_ops("fused")
    assert ops.backend == "fused"
    assert all(getattr(ops, name) is getattr(_cuda, name) for name in OP_NAMES)
    assert all(is_available(name) for name in OP_NAMES)


def test_fused_op_falls_back_per_call_with_one_warning(model_ext, warnings_seen):
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(_cuda.rms_norm(x, w, 1e-5), REFERENCES["rms_norm"](x, w, 1e-5))
    assert len(warnings_seen) == 1 and "rms_norm got a torch.float64" in warnings_seen[0]
    warnings_seen.clear()


# ---- autograd wiring against the references ----------------------------------------------------------
def _compare(fused, reference, inputs, atol=1e-5, rtol=1e-5, constants=()):
    """Same outputs and same gradients of every float input not in `constants` (indices), for a random
    linear function of every output."""
    def run(fn):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point() and i not in constants)
                  if isinstance(t, torch.Tensor) else t for i, t in enumerate(inputs)]
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        gen = torch.Generator().manual_seed(1)
        loss = sum((o.float() * torch.randn(o.shape, generator=gen)).nan_to_num().sum() for o in outs)
        loss.backward()
        return outs, [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]

    (f_out, f_grad), (r_out, r_grad) = run(fused), run(reference)
    for a, b in zip(f_out, r_out, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=True)
    for a, b in zip(f_grad, r_grad, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", [(2, 5, 33), (1, 1, 8), (7, 64)])
def test_norms(model_ext, shape):
    torch.manual_seed(0)
    x, r = torch.randn(shape) * 3 + 1, torch.randn(shape)
    w, b = torch.randn(shape[-1:]), torch.randn(shape[-1:])
    _compare(_cuda.rms_norm, REFERENCES["rms_norm"], [x, w, 1e-5])
    _compare(_cuda.layer_norm, REFERENCES["layer_norm"], [x, w, b, 1e-5])
    _compare(_cuda.layer_norm, REFERENCES["layer_norm"], [x, w, None, 1e-5])
    _compare(_cuda.add_rms_norm, REFERENCES["add_rms_norm"], [x, r, w, 1e-5])
    _compare(_cuda.add_layer_norm, REFERENCES["add_layer_norm"], [x, r, w, b, 1e-5])


def test_activations(model_ext):
    torch.manual_seed(0)
    x, bias = torch.randn(3, 4, 10) * 3, torch.randn(10)
    _compare(_cuda.bias_gelu, REFERENCES["bias_gelu"], [x, bias])
    _compare(_cuda.bias_gelu, REFERENCES["bias_gelu"], [x, None])
    _compare(_cuda.gelu, REFERENCES["gelu"], [x])
    _compare(_cuda.swiglu, REFERENCES["swiglu"], [x])


@pytest.mark.parametrize("rot", [8, 4])  # full and partial rotary (head dim 8)
def test_rope_on_a_fused_qkv_view_with_gqa(model_ext, rot):
    torch.manual_seed(0)
    B, T, nh, nkv, hd = 2, 5, 4, 2, 8
    qkv = torch.randn(B, T, (nh + 2 * nkv) * hd)

    def split(fn):
        def run(qkv, inv_freq, pos):
            q, k, _ = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)  # strided views, as in the model
            return fn(q.view(B, T, nh, hd), k.view(B, T, nkv, hd), inv_freq, pos)
        return run

    inv_freq = 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)
    pos = torch.randint(0, 4096, (B, T))
    _compare(split(_cuda.rope), split(REFERENCES["rope"]), [qkv, inv_freq, pos], atol=1e-4, constants={1})
    _compare(split(_cuda.rope), split(REFERENCES["rope"]), [qkv, inv_freq, torch.arange(T).expand(1, T)],
             constants={1})


def test_softmax_masks(model_ext):
    torch.manual_seed(0)
    B, nh, T = 2, 3, 6
    scores = torch.randn(B, nh, T, T) * 4
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    doc = causal.clone().expand(B, 1, T, T).clone()
    doc[0, 0, 3:, :3] = False  # a document boundary in sample 0
    doc[1, 0, 2, :] = False  # a row with nothing to attend to: zeros, not NaN
    alibi = -torch.arange(T).float().flip(0) * torch.tensor([0.5, 0.25, 0.125])[:, None]  # (nh, T)
    bias = alibi[None, :, None, :].expand(1, nh, T, T).masked_fill(~causal, float("-inf"))
    for mask in (None, causal, doc, bias, torch.zeros(1, 1, 1, T)):
        _compare(_cuda.scaled_masked_softmax, REFERENCES["scaled_masked_softmax"], [scores, mask, 0.3],
                 constants={1})


def test_cross_entropy_ignores_minus_100_and_poisons_bad_labels(model_ext):
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 4, 11), torch.randint(0, 11, (3, 4))
    labels[0, 1] = -100
    _compare(_cuda.cross_entropy, REFERENCES["cross_entropy"], [logits, labels])
    labels[1, 1] = 11
    loss = _cuda.cross_entropy(logits, labels)
    assert loss[1, 1].isnan() and loss[0, 1] == 0 and loss.isfinite().sum() == 11


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_linear_cross_entropy_matches_reference(model_ext, chunk):
    torch.manual_seed(0)
    hidden, weight, labels = torch.randn(2, 6, 16), torch.randn(37, 16) * 0.3, torch.randint(0, 37, (2, 6))
    _compare(_cuda.linear_cross_entropy, linear_cross_entropy_reference, [hidden, weight, labels, chunk])


# ---- chunked linear cross-entropy (the CPU row functions) --------------------------------------------
def test_chunked_cross_entropy_equals_full_logits_cross_entropy():
    torch.manual_seed(0)
    hidden, weight, labels = torch.randn(9, 16), torch.randn(50, 16) * 0.3, torch.randint(0, 50, (9,))
    labels[[2, 7]] = -100

    def full(h, w, y, chunk):
        return F.cross_entropy(h @ w.t(), y, reduction="none")

    _compare(chunked_linear_cross_entropy, full, [hidden, weight, labels, 4])
    labels[0] = 50
    assert chunked_linear_cross_entropy(hidden, weight, labels, 4)[0].isnan()
    with pytest.raises(ValueError, match="chunk_size=0"):
        chunked_linear_cross_entropy(hidden, weight, labels, 0)


# ---- setup.py: build the CUDA extension only with nvcc and a CUDA torch ------------------------------
def _setup(mode: str | None):
    env = {k: v for k, v in os.environ.items() if k != "MEGACLM_CUDA_EXT"}
    if mode is not None:
        env["MEGACLM_CUDA_EXT"] = mode
    probe = ("import runpy, sys; sys.argv = ['setup.py', '--name']; g = runpy.run_path('setup.py'); "
             "print('EXT', [e.name for e in g['ext_modules']], 'torch' in sys.modules)")
    return subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_setup_builds_no_cuda_extension_on_a_cpu_install():
    auto, skip, forced, bad = _setup(None), _setup("0"), _setup("1"), _setup("yes")
    assert auto.returncode == 0 and "megaclm._cuda_kernels" not in auto.stdout, auto.stderr
    assert skip.returncode == 0 and skip.stdout.strip().endswith("False"), "MEGACLM_CUDA_EXT=0 must not import torch"
    assert forced.returncode != 0 and "CPU build" in forced.stderr
    assert bad.returncode != 0 and "MEGACLM_CUDA_EXT='yes'" in bad.stderr
