"""QLoRA end to end: an imported tiny llama, pretrain_gpt.py under the deepspeed launcher at TP=2 with sequence
parallelism, LoRA rank 8 on HF-named targets (q_proj,v_proj without k_proj: a part of the fused qkv) over an
NF4 base; then convert_hf.py export, loaded by transformers (merged) and by PEFT (adapter).

The references are megaclm's own adapted GPTModel (adapters not merged): on the base as the run saw it
(quantize.fake_quantize: each TP=2 shard quantized and dequantized, as tests/unit/test_qlora.py checks it is)
for the merged export, and on the unquantized base for the PEFT adapter, which PEFT applies to the HF base.
"""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchao")

from megaclm.checkpoint.from_deepspeed import ensure_shards  # noqa: E402
from test_hf_conversion import ENV, ROOT, SEQ, TOL, WINDOWS, convert, hf_loss, launch, last_json, preprocess, tiny  # noqa: E402,E501

TARGET = "q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    jsonl = root / "train.jsonl"
    jsonl.write_text("".join(open(ROOT / "tests" / "data" / "wiki_summaries_500.jsonl").readlines()[:60]))
    hf, base, save = str(root / "hf"), str(root / "base"), str(root / "run")
    tiny.make_tiny_model("llama", hf, seed=0, init_std=0.1)
    convert.import_hf(hf, base, 1, 1)
    data = preprocess(hf, str(jsonl), str(root / "data"))
    proc = launch(2, ["pretrain_gpt.py", "--config", os.path.join(base, "model_config.yaml"), "--load", base,
                      "--finetune", "--save", save, "--data-path", data, "--split", "100,0,0", "--seq-length", "64",
                      "--micro-batch-size", "4", "--global-batch-size", "4", "--lr", "1e-2", "--lr-decay-style",
                      "constant", "--eval-iters", "0", "--log-interval", "1", "--seed", "5", "--train-iters", "10",
                      "--save-interval", "10", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                      "--lora-rank", "8", "--lora-alpha", "16", "--lora-target", TARGET, "--base-quantization", "nf4"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"root": root, "hf": hf, "base": base, "save": save, "output": proc.stdout + proc.stderr}


def _adapted_logits(base_dir: str, lora_dir: str, ids: torch.Tensor, quantized: bool) -> torch.Tensor:
    from megaclm.checkpoint.shards import load_full_state_dict
    from megaclm.config import MegaclmConfig
    from megaclm.config.lora import LoraConfig
    from megaclm.model.gpt import GPTModel
    from megaclm.model.quantize import fake_quantize

    base, adapters = load_full_state_dict(base_dir), load_full_state_dict(lora_dir)
    cfg = MegaclmConfig.from_dict({"model": base.config["model"]}).model
    weights = fake_quantize(base.state_dict, cfg, "nf4", 2, torch.float32) if quantized else base.state_dict
    model = GPTModel(cfg, base.meta["padded_vocab_size"], lora=LoraConfig(**adapters.config["lora"])).eval()
    model.load_state_dict({**weights, **adapters.state_dict})
    with torch.no_grad():
        return model(ids)[..., :base.meta["hf_vocab_size"]]


def test_qlora_trains_adapters_on_an_nf4_base_at_tp2(qlora):
    rows = [json.loads(line) for line in open(os.path.join(qlora["save"], "metrics.jsonl"))]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    line = next(line for line in qlora["output"].splitlines() if "QLoRA: frozen block linears stored in nf4" in line)
    before, after = (float(x.split()[0]) for x in line.split(": ")[-1].split(" -> "))
    assert after < before / 7  # fp32 -> ~0.52 byte per element
    q, kv = 64 // 2, 32 // 2  # this rank's rows of q and of k in qkv.lora_b: 4 heads x 16, 2 kv heads x 16, TP=2
    ensure_shards(qlora["save"], "iter_0000010")  # megaclm's fp32 files, made from DeepSpeed's (adapters only)
    for rank in range(2):
        shard = torch.load(os.path.join(qlora["save"], "iter_0000010", "megaclm", "model", f"tp{rank:02d}_pp000.pt"),
                           weights_only=False)["tensors"]
        assert shard and all(k.endswith((".lora_a", ".lora_b")) for k in shard)  # adapters only, no base
        b = shard["layers.0.attention.qkv.lora_b"]
        assert torch.count_nonzero(b[q:q + kv]) == 0 < torch.count_nonzero(b[:q])  # no k_proj: k rows stay zero


def test_qlora_merged_export_loads_in_transformers_with_the_trained_logits(qlora):
    out = str(qlora["root"] / "merged")
    proc = run([sys.executable, "tools/checkpoint/convert_hf.py", "export", "--load", qlora["save"], "--out", out,
                "--lora-merge"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "QLoRA: merging into the base as the run saw it (nf4, tp 2, fp32), dequantized" in proc.stderr
    ids = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(1))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = merged(ids).logits
    torch.testing.assert_close(logits, _adapted_logits(qlora["base"], qlora["save"], ids, quantized=True),
                               atol=2e-5, rtol=0)
    # Merging into the unquantized weights instead would give another model.
    assert (logits - _adapted_logits(qlora["base"], qlora["save"], ids, quantized=False)).abs().max() > 1e-3


def test_eval_perplexity_of_a_qlora_checkpoint_equals_the_merged_export_in_transformers(qlora, tmp_path):
    """The base as the run saw it (nf4 at TP=2, dequantized) under the adapters, as the merged export holds it."""
    merged, jsonl = str(tmp_path / "merged"), str(qlora["root"] / "train.jsonl")
    convert.export_hf(qlora["save"], merged, lora="merge")
    proc = run([sys.executable, "tools/eval_perplexity.py", "--load", qlora["save"], "--input", jsonl,
                "--seq-length", str(SEQ), "--max-windows", str(WINDOWS)])
    assert abs(last_json(proc)["loss"] - hf_loss(merged, jsonl)) < TOL


def test_qlora_peft_adapter_has_the_named_projections_only(qlora):
    peft = pytest.importorskip("peft")
    base_hf, adapter = str(qlora["root"] / "base-hf"), str(qlora["root"] / "adapter")
    convert.export_hf(qlora["base"], base_hf)
    convert.export_hf(qlora["save"], adapter, lora="adapter")
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert config["target_modules"] == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.o_proj",
                                        "self_attn.q_proj", "self_attn.v_proj"]
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32), adapter).eval()
    ids = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _adapted_logits(qlora["base"], qlora["save"], ids, False),
                                   atol=2e-5, rtol=0)


def test_qlora_without_lora_is_one_error_line(qlora, tmp_path):
    proc = run([sys.executable, "pretrain_gpt.py", "--config", os.path.join(qlora["base"], "model_config.yaml"),
                "--mock-data", "--seq-length", "32", "--train-iters", "2", "--base-quantization", "nf4"])
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: lora.base_quantization=nf4: a quantized base cannot be trained, only adapters on it; "
                      "pass --lora-rank R (e.g. 8), or drop --base-quantization"], proc.stderr[-2000:]
    assert not glob.glob(str(tmp_path / "*"))
