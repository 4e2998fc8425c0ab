"""GPTModel on CUDA: bf16 forward/backward against the fp32 CPU model, and SDPA (flash/cuDNN/efficient
kernels on GPU) against the explicit softmax path. Skipped without CUDA."""
import sys
from pathlib import Path

import pytest
import torch

from megaclm.config.kernels import KernelsConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from parallel_checks import FAMILIES, VOCAB, batch, family_config, reference  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_cuda_matches_fp32_cpu(family):
    config = family_config(family)
    ids, labels, weights, pos, doc = batch(seed=1, documents=True)
    cpu = reference(config)
    want = cpu(ids, pos, doc, labels=labels)
    gpu = reference(config).cuda().to(torch.bfloat16)
    gpu.load_state_dict(cpu.state_dict())
    dev = [t.cuda() if t is not None else None for t in (ids, labels, weights, pos, doc)]
    got = gpu(dev[0], dev[3], dev[4], labels=dev[1])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want.detach(), rtol=5e-2, atol=5e-2)
    (got * dev[2]).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sdpa_matches_unfused_on_cuda(family):
    config = family_config(family)
    ids, _, _, pos, doc = (t.cuda() if t is not None else None for t in batch(seed=2, documents=True))
    sdpa = reference(config).cuda().to(torch.bfloat16)
    unfused = reference(config, kernels=KernelsConfig(attention_backend="unfused")).cuda().to(torch.bfloat16)
    unfused.load_state_dict(sdpa.state_dict())
    for m in (None, doc):
        torch.testing.assert_close(unfused(ids, pos, m).float(), sdpa(ids, pos, m).float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_varlen_document_attention_equals_the_dense_mask(family):
    """On CUDA document ids run FlashAttention's varlen kernel (no mask); it must equal the dense-mask path."""
    from megaclm.model.attention import varlen_available

    if not varlen_available(torch.device("cuda")):
        pytest.skip("this torch has no torch.nn.attention.varlen")
    config = family_config(family)
    ids, labels, _, pos, doc = (t.cuda() for t in batch(seed=3, documents=True))
    varlen = reference(config).cuda().to(torch.bfloat16).eval()
    dense = reference(config, kernels=KernelsConfig(attention_backend="unfused")).cuda().to(torch.bfloat16).eval()
    dense.load_state_dict(varlen.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(varlen(ids, pos, doc).float(), dense(ids, pos, doc).float(), rtol=3e-2, atol=3e-2)
