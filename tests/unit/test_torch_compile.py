"""--torch-compile on CPU (inductor): compiled blocks train like eager ones, with and without recomputation."""
import dataclasses

import pytest
import torch

from megaclm.config.kernels import KernelsConfig
from megaclm.config.model import ModelConfig
from megaclm.model import compiled
from megaclm.model.gpt import GPTModel
from megaclm.ops import compile_unavailable

CFG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=16,
                  position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                  hidden_dropout=0.0, attention_dropout=0.0)
VOCAB = 64


def losses(config: ModelConfig, torch_compile: bool, steps: int = 3) -> tuple[list[float], GPTModel]:
    torch.manual_seed(0)
    model = GPTModel(config, VOCAB, kernels=KernelsConfig(torch_compile=torch_compile))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        ids, labels = torch.randint(0, VOCAB, (2, 16), generator=g), torch.randint(0, VOCAB, (2, 16), generator=g)
        loss = model(ids, labels=labels).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out, model


@pytest.mark.skipif(compile_unavailable() is not None, reason="inductor cannot run here")
@pytest.mark.parametrize("recompute", [None, "full"])
def test_compiled_blocks_train_like_eager(recompute):
    config = dataclasses.replace(CFG, recompute_granularity=recompute)
    eager, _ = losses(config, False)
    fast, model = losses(config, True)
    assert all(layer._compiled_call_impl is not None for layer in model.layers)  # each block, not the model
    assert model._compiled_call_impl is None and model.embedding._compiled_call_impl is None
    assert eager[-1] < eager[0]
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(eager), atol=1e-5, rtol=1e-5)
    # Same state-dict keys as the eager model: checkpoints do not depend on the flag.
    assert set(model.state_dict()) == set(GPTModel(config, VOCAB).state_dict())


def test_fallback_logs_one_line_and_runs_eagerly(monkeypatch, caplog):
    monkeypatch.setattr(compiled, "compile_unavailable", lambda: "no C++ compiler (test)")
    monkeypatch.setattr("megaclm.logging._warned", set())
    torch.manual_seed(0)
    with caplog.at_level("WARNING"):
        model = GPTModel(CFG, VOCAB, kernels=KernelsConfig(torch_compile=True))
    assert all(layer._compiled_call_impl is None for layer in model.layers)
    lines = [r.getMessage() for r in caplog.records if "--torch-compile" in r.getMessage()]
    assert lines == ["--torch-compile: no C++ compiler (test); running the transformer blocks eagerly"]
