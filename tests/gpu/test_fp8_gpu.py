"""FP8 training with real float8 matmuls (torch._scaled_mm) on an sm_89+ GPU; skipped elsewhere."""
import pytest
import torch

from megaclm.config.model import ModelConfig
from megaclm.model.fp8 import convert_to_fp8, fp8_unavailable
from megaclm.model.gpt import GPTModel

pytestmark = pytest.mark.skipif(fp8_unavailable() is not None, reason=f"no FP8 here: {fp8_unavailable()}")

CFG = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=4, max_position_embeddings=128,
                  position_embedding_type="rope", normalization="RMSNorm", swiglu=True, ffn_hidden_size=512,
                  add_bias_linear=False, untie_embeddings_and_output_weights=True, hidden_dropout=0.0,
                  attention_dropout=0.0)


@pytest.mark.parametrize("fmt, recipe", [("hybrid", "tensorwise"), ("e4m3", "rowwise")])
def test_fp8_training_tracks_bf16(fmt, recipe):
    torch.manual_seed(0)
    ids = torch.randint(0, 1024, (8, 129), device="cuda")
    losses = {}
    for name in ("bf16", "fp8"):
        torch.manual_seed(1)
        model = GPTModel(CFG, 1024).cuda().to(torch.bfloat16)
        if name == "fp8":
            assert len(convert_to_fp8(model, fmt, recipe)) == 8
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        out = []
        for _ in range(20):
            loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        losses[name] = out
    assert losses["fp8"][-1] < losses["fp8"][0] - 0.5  # it learns the fixed batch
    assert abs(losses["fp8"][-1] - losses["bf16"][-1]) < 0.1 * losses["bf16"][0], losses
