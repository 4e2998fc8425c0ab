"""HF <-> megaclm end to end: import, eval_perplexity (TP=1, TP=2 under torchrun), export, reshard, and a
continual-pretraining run of pretrain_gpt.py from an imported model (4 ranks, TP=2 x PP=2, deepspeed launcher).

References are independent of the code under test: transformers computes each tiny model's loss on the
same text by the eval rule written out again here (its own tokenizer with split_special_tokens, eos
after each document, windows of S+1), and exported directories are loaded by AutoModelForCausalLM.
Tiny random models (tools/checkpoint/tiny_hf_model.py) with the GPT-2 vocabulary; fp32 throughout.
"""
import glob
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from megaclm.checkpoint.from_deepspeed import ensure_shards  # noqa: E402
from megaclm.checkpoint.hf import FAMILIES  # noqa: E402
from megaclm.checkpoint.hf.llama import MOE_FAMILIES  # noqa: E402
from megaclm.utils.errors import UserError  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
SEQ, WINDOWS = 64, 24
TOL = 1e-5
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))}


def _tool(rel: str):
    spec = importlib.util.spec_from_file_location(pathlib.Path(rel).stem, ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny = _tool("tools/checkpoint/tiny_hf_model.py")
convert = _tool("tools/checkpoint/convert_hf.py")
resharder = _tool("tools/checkpoint/reshard.py")
eval_ppl = _tool("tools/eval_perplexity.py")


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def launch(nprocs: int, args: list[str]) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N ARGS` on a free port; removes the shm buffers its ranks leave behind."""
    port = _free_port()
    try:
        return run([os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(nprocs),
                    "--master_port", str(port), *args])
    finally:
        for name in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
            os.remove(name)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def hf_tokenizer(model_dir: str):
    # The directory's tokenizer.json as is: AutoTokenizer would swap in the class of config.json's
    # model_type (Qwen2Tokenizer splits digits), which the GPT-2 files of these tiny models are not.
    return transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"),
                                                eos_token="<|endoftext|>")


def hf_loss(model_dir: str, jsonl: str, seq: int = SEQ, windows: int = WINDOWS) -> float:
    """The eval rule, independently: transformers' tokenizer and model."""
    tok = hf_tokenizer(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = []
    with open(jsonl) as f:
        for line in f:
            ids += tok(json.loads(line)["text"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            ids.append(tok.eos_token_id)
    n = min(len(ids) // (seq + 1), windows)
    w = torch.tensor(ids[:n * (seq + 1)]).view(n, seq + 1)
    with torch.no_grad():
        logits = model(w[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten()).item()


def eval_in_process(load: str, jsonl: str, **kw) -> dict:
    args = eval_ppl_args(load=load, input=jsonl, **kw)
    return eval_ppl.evaluate(args)


def eval_ppl_args(**kw):
    import argparse

    base = dict(load=None, hf=None, input=None, json_keys=["text"], seq_length=SEQ, max_windows=WINDOWS,
                micro_batch_size=8, ckpt_step=None, tensor_model_parallel_size=None, vocab_size=None,
                tokenizer_type=None, vocab_file=None, merge_file=None, tokenizer_model=None, output_json=None,
                text_mode=None, skip_bad_lines=False)
    return argparse.Namespace(**{**base, **kw, "input": [kw["input"]]})


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Per family: a tiny HF model, its reference loss, and imports at TP=1, TP=2 and TP=2 x PP=2."""
    root = tmp_path_factory.mktemp("hf")
    docs = [json.loads(line) for line in open(ROOT / "tests" / "data" / "wiki_summaries_500.jsonl")][:30]
    # A literal special-token string inside a document must be scored as plain text.
    docs.insert(3, {"text": "A line that mentions <|endoftext|> inside the text, which is data, not a boundary."})
    jsonl = root / "eval.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in docs))
    out = {"root": root, "jsonl": str(jsonl), "families": {}}
    for i, family in enumerate(FAMILIES):
        hf_dir = str(root / f"{family}-hf")
        tiny.make_tiny_model(family, hf_dir, seed=i, init_std=0.1)
        f = {"hf": hf_dir, "ref": hf_loss(hf_dir, str(jsonl))}
        for name, tp, pp in (("tp1", 1, 1), ("tp2", 2, 1), ("tp2pp2", 2, 2)):
            if pp > 1 and family in MOE_FAMILIES:  # MoE checkpoints are written at PP=1 (offline.write_checkpoint)
                continue
            f[name] = str(root / f"{family}-{name}")
            convert.import_hf(hf_dir, f[name], tp, pp)
        out["families"][family] = f
    print("\nloss HF vs megaclm (eval_perplexity):")
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_perplexity_equals_hf_loss_tp1(work, family):
    f = work["families"][family]
    ours = eval_in_process(f["tp1"], work["jsonl"])
    assert ours["windows"] == WINDOWS and ours["tokens"] == WINDOWS * SEQ
    hf_side = eval_ppl.evaluate(eval_ppl_args(hf=f["hf"], input=work["jsonl"]))  # the tool's --hf path
    print(f"  {family:9s} tp1: HF {f['ref']:.7f}  megaclm {ours['loss']:.7f}  eval --hf {hf_side['loss']:.7f}")
    assert abs(ours["loss"] - f["ref"]) < TOL
    assert abs(hf_side["loss"] - f["ref"]) < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_perplexity_equals_hf_loss_tp2_under_torchrun(work, family):
    f = work["families"][family]
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "tools/eval_perplexity.py", "--load", f["tp2"], "--input", work["jsonl"],
                "--seq-length", str(SEQ), "--max-windows", str(WINDOWS), "--tensor-model-parallel-size", "2"])
    ours = last_json(proc)
    print(f"  {family:9s} tp2: HF {f['ref']:.7f}  megaclm {ours['loss']:.7f}")
    assert abs(ours["loss"] - f["ref"]) < TOL
    assert ours["ppl"] == pytest.approx(float(torch.tensor(ours["loss"]).exp()), rel=1e-6)


def test_eval_perplexity_output_json_under_the_deepspeed_launcher(work, tmp_path):
    """The launcher prints its own lines after the tool's JSON; --output-json is the reliable copy."""
    f = work["families"]["llama"]
    out = tmp_path / "ppl.json"
    proc = launch(2, ["tools/eval_perplexity.py", "--load", f["tp2"], "--input", work["jsonl"], "--seq-length",
                      str(SEQ), "--max-windows", str(WINDOWS), "--output-json", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = json.loads(out.read_text())
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"loss"')]
    assert printed == [written] and abs(written["loss"] - f["ref"]) < TOL
    assert not [p for p in os.listdir(tmp_path) if p != "ppl.json"]  # no temp file left behind
    bad = run([sys.executable, "tools/eval_perplexity.py", "--load", f["tp1"], "--input", work["jsonl"],
               "--seq-length", str(SEQ), "--output-json", str(tmp_path / "missing" / "x.json")])
    assert bad.returncode == 2 and "--output-json" in bad.stderr and "directory does not exist" in bad.stderr


@pytest.mark.parametrize("family", FAMILIES)
def test_export_of_import_loads_in_transformers_with_equal_logits(work, family):
    f = work["families"][family]
    out = str(work["root"] / f"{family}-export")
    shard_gb = 0.004 if family == "llama" else 5.0  # llama: several safetensors files + their index
    convert.export_hf(f.get("tp2pp2", f["tp2"]), out, max_shard_gb=shard_gb)  # from a TP=2 (x PP=2) layout
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json")) == (family == "llama")
    original = transformers.AutoModelForCausalLM.from_pretrained(f["hf"], dtype=torch.float32).eval()
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(exported) is type(original)
    ids = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, original(ids).logits, atol=1e-6, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]


@pytest.mark.parametrize("family", FAMILIES)
def test_reshard_keeps_the_loss(work, family):
    f = work["families"][family]
    down = str(work["root"] / f"{family}-2to1")
    resharder.reshard(f["tp2"], down, tp=1, pp=1)
    assert abs(eval_in_process(down, work["jsonl"])["loss"] - f["ref"]) < TOL
    up = str(work["root"] / f"{family}-1to2")
    resharder.reshard(f["tp1"], up, tp=2, pp=1)
    # 1 -> 2 gives exactly the files a direct TP=2 import gives (evaluated under torchrun above).
    for rank in range(2):
        name = f"iter_0000000/megaclm/model/tp{rank:02d}_pp000.pt"
        a = torch.load(os.path.join(up, name), weights_only=False)["tensors"]
        b = torch.load(os.path.join(f["tp2"], name), weights_only=False)["tensors"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ds = f"iter_0000000/mp_rank_{rank:02d}_model_states.pt"
        a, b = (torch.load(os.path.join(d, ds), weights_only=False)["module"] for d in (up, f["tp2"]))
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert abs(eval_in_process(up, work["jsonl"])["loss"] - f["ref"]) < TOL


def preprocess(hf_dir: str, jsonl: str, prefix: str) -> str:
    """tools/preprocess_data.py with the HF model's tokenizer; returns the --data-path prefix."""
    prep = run([sys.executable, "tools/preprocess_data.py", "--input", jsonl, "--tokenizer-type",
                "HuggingFaceTokenizer", "--tokenizer-model", hf_dir, "--append-eod", "--workers", "1",
                "--output-prefix", prefix])
    assert prep.returncode == 0, prep.stderr[-3000:]
    return prefix + "_text_document"


def _pretrain_hf(hf_dir: str, out: str, jsonl: str, steps: int = 40) -> None:
    """A few HF training steps, so the starting model is recognisably not a fresh init (loss well below ln V)."""
    import shutil

    tok = hf_tokenizer(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = []
    for line in open(jsonl):
        ids += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    w = torch.tensor(ids[:len(ids) // (SEQ + 1) * (SEQ + 1)]).view(-1, SEQ + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(steps):
        batch = w[torch.randint(0, len(w), (8,))]
        loss = model(batch[:, :-1], labels=batch[:, :-1].clone()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    for name in os.listdir(hf_dir):
        if name.startswith("tokenizer"):
            shutil.copy(os.path.join(hf_dir, name), out)


def test_continual_pretraining_from_hf(work):
    """import (TP=2 x PP=2) -> pretrain_gpt.py --finetune 10 iterations -> export -> transformers: loss fell."""
    root, f = work["root"], work["families"]["qwen2"]  # tied embeddings across pipeline stages, qkv bias, GQA
    train = str(work["jsonl"])
    start = str(root / "cpt-start-hf")
    _pretrain_hf(f["hf"], start, train)
    before = hf_loss(start, train)
    preprocess(start, train, str(root / "cpt"))
    imported, trained, exported = str(root / "cpt-import"), str(root / "cpt-run"), str(root / "cpt-export")
    convert.import_hf(start, imported, tp=2, pp=2)
    common = ["--data-path", str(root / "cpt_text_document"), "--split", "100,0,0", "--seq-length", str(SEQ),
              "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "2e-3", "--lr-decay-style", "constant",
              "--eval-iters", "0", "--log-interval", "1", "--seed", "7",
              "--config", os.path.join(imported, "model_config.yaml")]
    proc = launch(4, ["pretrain_gpt.py", *common, "--load", imported, "--finetune", "--save", trained,
                      "--train-iters", "10", "--save-interval", "10"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    losses = [json.loads(line)["loss"] for line in open(os.path.join(trained, "metrics.jsonl"))
              if "loss" in json.loads(line)]
    # The first step sees the imported weights: its loss is the HF model's level, far below a fresh
    # init's ln(50304) = 10.8.
    assert abs(losses[0] - before) < 0.5 < 10.8 - before, (losses[0], before)
    convert.export_hf(trained, exported)
    after = hf_loss(exported, train)
    ours = eval_in_process(trained, train)
    print(f"  continual pretraining (qwen2, tp2 x pp2): HF loss {before:.4f} -> {after:.4f} after 10 iterations; "
          f"megaclm eval of the trained checkpoint {ours['loss']:.7f}")
    assert after < before - 0.05
    assert abs(ours["loss"] - after) < TOL
    # The trainer's own pipeline checkpoint reshards too (stage-named keys, the tied table on two stages) ...
    tp2 = str(root / "cpt-run-tp2")
    resharder.reshard(trained, tp2, tp=2, pp=1)
    assert abs(eval_in_process(tp2, train)["loss"] - after) < TOL
    # ... and DeepSpeed resumes from it (its model files for the new layout, megaclm's progress and data
    # state): iterations 11-12, without the Adam moments.
    resumed = str(root / "cpt-resumed")
    proc = launch(2, ["pretrain_gpt.py", *common, "--pipeline-model-parallel-size", "1", "--load", tp2,
                      "--no-load-optim", "--save", resumed, "--train-iters", "12"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in open(os.path.join(resumed, "metrics.jsonl"))]
    steps = [(r["iteration"], r["loss"]) for r in rows if "loss" in r]
    assert [i for i, _ in steps] == [11, 12]
    assert abs(steps[0][1] - losses[-1]) < 0.5  # continues from the trained weights, not a fresh init


# ---- LoRA: adapters on an imported model, TP=2, adapter-only checkpoints, merged and PEFT exports ----------
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-target", "qkv,proj,fc1,fc2"]


def adapted_logits(base_dir: str, lora_dir: str, ids: torch.Tensor) -> torch.Tensor:
    """megaclm's own adapted model (base weights + adapters, not merged), real vocabulary rows only."""
    from megaclm.checkpoint.shards import load_full_state_dict
    from megaclm.config import MegaclmConfig
    from megaclm.config.lora import LoraConfig
    from megaclm.model.gpt import GPTModel

    base, adapters = load_full_state_dict(base_dir), load_full_state_dict(lora_dir)
    cfg = MegaclmConfig.from_dict({"model": base.config["model"], "lora": adapters.config["lora"]})
    model = GPTModel(cfg.model, base.meta["padded_vocab_size"], lora=LoraConfig(**adapters.config["lora"])).eval()
    model.load_state_dict({**base.state_dict, **adapters.state_dict})
    with torch.no_grad():
        return model(ids)[..., :base.meta["hf_vocab_size"]]


@pytest.fixture(scope="module")
def lora_run(work):
    """LoRA on the imported TP=2 llama, 2 ranks under the deepspeed launcher: 6 iterations saved at 3 and 6,
    then a second run resumed from iteration 3."""
    root, f = work["root"], work["families"]["llama"]
    data = preprocess(f["hf"], work["jsonl"], str(root / "lora"))
    common = ["--data-path", data, "--split", "100,0,0", "--seq-length", str(SEQ), "--micro-batch-size", "4",
              "--global-batch-size", "8", "--lr", "1e-2", "--lr-decay-style", "constant", "--eval-iters", "0",
              "--log-interval", "1", "--seed", "5", "--hidden-dropout", "0.1", "--lora-dropout", "0.1",
              "--config", os.path.join(f["tp2"], "model_config.yaml"), "--train-iters", "6", *LORA]
    first, resumed = str(root / "lora-run"), str(root / "lora-resumed")
    proc = launch(2, ["pretrain_gpt.py", *common, "--load", f["tp2"], "--finetune", "--save", first,
                      "--save-interval", "3"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    proc = launch(2, ["pretrain_gpt.py", *common, "--load", first, "--ckpt-step", "3", "--save", resumed,
                      "--save-interval", "3"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    def losses(d):
        return {r["iteration"]: r["loss"] for r in map(json.loads, open(os.path.join(d, "metrics.jsonl"))) if "loss" in r}

    return {"base": f["tp2"], "hf": f["hf"], "first": first, "resumed": resumed, "losses": losses(first),
            "resumed_losses": losses(resumed)}


def test_lora_checkpoint_holds_only_adapters_and_resumes_exactly(lora_run):
    first = lora_run["first"]
    meta = json.load(open(os.path.join(first, "iter_0000006", "megaclm", "meta.json")))
    assert meta["lora_base"] == {"dir": os.path.abspath(lora_run["base"]), "tag": "iter_0000000"}
    # A save writes DeepSpeed's files; megaclm's layout-independent ones are made from them (adapters only).
    assert not os.path.isdir(os.path.join(first, "iter_0000006", "megaclm", "model"))
    ensure_shards(first, "iter_0000006")
    for rank in range(2):
        shard = torch.load(os.path.join(first, "iter_0000006", "megaclm", "model", f"tp{rank:02d}_pp000.pt"),
                           weights_only=False)["tensors"]
        module = torch.load(os.path.join(first, "iter_0000006", f"mp_rank_{rank:02d}_model_states.pt"),
                            weights_only=False)["module"]
        assert shard and all(k.endswith((".lora_a", ".lora_b")) for k in shard), sorted(shard)
        assert set(module) == set(shard), sorted(set(module) ^ set(shard))  # DeepSpeed's file: no frozen base
    # Iterations 4-6 of the resumed run (adapters, Adam moments, RNG and data position from iteration 3,
    # the base from the base checkpoint, dropout on) are the uninterrupted run's, bit for bit.
    assert [lora_run["resumed_losses"][i] for i in (4, 5, 6)] == [lora_run["losses"][i] for i in (4, 5, 6)]


def test_lora_merged_export_equals_adapted_model_and_the_loss_fell(work, lora_run):
    out = str(work["root"] / "lora-merged")
    convert.export_hf(lora_run["first"], out, lora="merge")
    ids = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(1))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted_logits(lora_run["base"], lora_run["first"], ids),
                                   atol=2e-5, rtol=0)
    before, after = hf_loss(lora_run["hf"], work["jsonl"]), hf_loss(out, work["jsonl"])
    print(f"  LoRA (llama, tp2, rank 4): HF loss {before:.4f} -> {after:.4f} after 6 iterations")
    assert after < before - 0.05, (before, after)


def test_eval_perplexity_of_a_lora_checkpoint_equals_the_merged_export_in_transformers(work, lora_run, tmp_path):
    """`eval_perplexity.py --load <LoRA run>`: the base the run names plus its adapters, not a KeyError (and
    train_tokenizer.py's spelling --json-key is accepted)."""
    merged = str(tmp_path / "merged")
    convert.export_hf(lora_run["first"], merged, lora="merge")
    proc = run([sys.executable, "tools/eval_perplexity.py", "--load", lora_run["first"], "--input", work["jsonl"],
                "--json-key", "text", "--seq-length", str(SEQ), "--max-windows", str(WINDOWS)])
    ours, reference = last_json(proc)["loss"], hf_loss(merged, work["jsonl"])
    print(f"  LoRA eval_perplexity {ours:.7f}  merged export in transformers {reference:.7f}")
    assert abs(ours - reference) < TOL
    assert ours < work["families"]["llama"]["ref"] - 0.05  # the adapters are applied: the base alone scores worse


def test_lora_peft_adapter_loads_onto_exported_base_with_equal_logits(work, lora_run):
    peft = pytest.importorskip("peft")
    base_hf, adapter = str(work["root"] / "lora-base-hf"), str(work["root"] / "lora-adapter")
    convert.export_hf(lora_run["base"], base_hf)
    convert.export_hf(lora_run["first"], adapter, lora="adapter")
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.load(open(os.path.join(adapter, "adapter_config.json")))["target_modules"] == [
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
        "self_attn.v_proj"]
    model = transformers.AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter).eval()
    ids = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted_logits(lora_run["base"], lora_run["first"], ids),
                                   atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_layout_of_every_family(work, family, tmp_path):
    """to_peft on random adapters of each family: PEFT on the HF model gives the adapted megaclm logits."""
    peft = pytest.importorskip("peft")
    from megaclm.checkpoint.hf import from_hf
    from megaclm.checkpoint.hf import files
    from megaclm.checkpoint.hf.peft import to_peft
    from megaclm.config.lora import LoraConfig
    from megaclm.model.gpt import GPTModel

    f = work["families"][family]
    hf_config = files.read_config(f["hf"])
    mc, sd = from_hf(files.read_weights(f["hf"]), hf_config)
    # gpt2: fused c_attn and its MLP; llama-like: separate q/k/v/o and gate/up; MoE: attention only (experts
    # take no adapters)
    target = {"gpt2": "qkv,fc1,fc2", "mixtral": "qkv,proj", "qwen2_moe": "qkv,proj"}.get(family, "qkv,proj,fc1")
    lora = LoraConfig(lora_rank=3, lora_alpha=6.0, lora_target=target)
    model = GPTModel(mc, sd["embedding.word_embeddings.weight"].shape[0], lora=lora).eval()
    g = torch.Generator().manual_seed(4)
    adapters = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in model.state_dict().items() if "lora_" in k}
    model.load_state_dict({**sd, **adapters})
    config, tensors = to_peft(mc, adapters, family, convert.MegaclmConfig(lora=lora).to_dict()["lora"], f["hf"])
    files.write_peft_dir(str(tmp_path / "adapter"), config, tensors)
    hf = transformers.AutoModelForCausalLM.from_pretrained(f["hf"], dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, 50257, (2, 40), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=2e-5, rtol=0)


def test_lora_errors(work, lora_run, tmp_path):
    base = lora_run["base"]
    with pytest.raises(UserError, match="holds LoRA adapters only; pass --lora-merge"):
        convert.export_hf(lora_run["first"], str(tmp_path / "a"))
    with pytest.raises(UserError, match="without LoRA adapters; drop --lora-merge"):
        convert.export_hf(base, str(tmp_path / "b"), lora="merge")
    assert not os.listdir(tmp_path)
    cfg = ["--config", os.path.join(base, "model_config.yaml"), "--mock-data", "--seq-length", "32",
           "--train-iters", "2", "--validate-only", "--world-size", "2", *LORA]
    cases = [([], "needs a base model: pass --load BASE --finetune"),
             (["--load", base], "is a full checkpoint; add --finetune"),
             (["--load", lora_run["first"], "--lora-rank", "8"], "adapters of other LoRA settings: --lora-rank 8"),
             (["--lora-target", "qkv,mlp"], "lora.lora_target='qkv,mlp'")]
    for extra, message in cases:
        proc = run([sys.executable, "pretrain_gpt.py", *cfg, *extra])
        assert proc.returncode == 2 and message in proc.stderr, (extra, proc.stderr[-2000:])
    # mock data here, the corpus there: a deliberate data change for this summary-only check
    proc = run([sys.executable, "pretrain_gpt.py", *cfg, "--load", lora_run["first"], "--override-data-fingerprint"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"lora: rank 4, alpha 8, dropout 0 on qkv,proj,fc1,fc2; base frozen from {os.path.abspath(base)}" \
        in proc.stdout and "adapters resumed from --load" in proc.stdout
    assert "trainable parameters:" in proc.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- bad inputs: one clear error, exit 2, nothing written ---------------------------------------------------
def test_cli_errors(work, tmp_path):
    f = work["families"]["llama"]
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(open(os.path.join(f["hf"], "config.json")).read())
    cases = [
        (["import", "--hf", str(bert), "--out", str(tmp_path / "o1")], "unsupported architecture: config.json has "
         "model_type='bert'"),
        (["import", "--hf", str(no_weights), "--out", str(tmp_path / "o2")], "missing file model.safetensors"),
        (["import", "--hf", f["hf"], "--out", str(tmp_path / "o3"), "--tensor-model-parallel-size", "3"],
         "model.num_attention_heads=4 is not divisible by parallel.tensor_model_parallel_size=3"),
    ]
    for args, message in cases:
        proc = run([sys.executable, "tools/checkpoint/convert_hf.py", *args])
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert not os.path.exists(args[args.index("--out") + 1])


def test_api_errors(work, tmp_path):
    f = work["families"]["gpt2"]
    with pytest.raises(UserError, match="no such directory"):
        convert.import_hf(str(tmp_path / "nowhere"), str(tmp_path / "o"))
    with pytest.raises(UserError, match="already exists and is not empty"):
        convert.import_hf(f["hf"], f["tp1"])
    with pytest.raises(UserError, match="no `latest`"):
        convert.export_hf(str(tmp_path), str(tmp_path / "o"))
    with pytest.raises(UserError, match="num_query_groups|num_attention_heads"):
        resharder.reshard(work["families"]["qwen2"]["tp1"], str(tmp_path / "r"), tp=4, pp=1)
    with pytest.raises(UserError, match="cannot be split across"):
        resharder.reshard(f["tp1"], str(tmp_path / "r"), tp=1, pp=3)
    assert not os.path.exists(tmp_path / "r") and not os.path.exists(tmp_path / "o")
