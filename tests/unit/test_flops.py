"""megaclm.model.flops and tools/estimate_memory.py against independent references.

Parameters: sum(p.numel()) of built GPTModels (three families), their tensor-parallel shards, and
published totals of the real checkpoints. FLOPs: torch's FlopCounterMode on a real forward+backward,
and issue 9's published MFU figures. Memory: DeepSpeed's own ZeRO-2/3 estimators (their printed
`_all_cold` tables and the functions behind them), Korthikanti et al. 2022's closed forms, and the
bytes a real layer saves for backward.
"""
import re

import pytest
import torch
import torch.nn.functional as F
from deepspeed.runtime.zero import stage3, stage_1_and_2
from torch.utils.flop_counter import FlopCounterMode

from megaclm.config.kernels import KernelsConfig
from megaclm.config.model import ModelConfig
from megaclm.config.presets import PRESET_VOCAB_SIZE, model_preset
from megaclm.model import GPTModel
from megaclm.model import flops
from megaclm.model.flops import GiB, MemorySetup, count_parameters, estimate_memory, flops_per_token
from megaclm.model.sharding import shard_state_dict
from megaclm.utils.errors import UserError, cli_main

V = 256  # tiny padded vocabulary
FAMILIES = {
    # GPT-2: learned positions, LayerNorm, GeLU, biases everywhere, tied head, dropout.
    "gpt2": dict(num_layers=2, hidden_size=64, num_attention_heads=4, max_position_embeddings=64),
    # Llama: RoPE, RMSNorm, SwiGLU, GQA 4/2, no biases, untied head.
    "llama": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                  position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                  untie_embeddings_and_output_weights=True, hidden_dropout=0.0, attention_dropout=0.0),
    # Qwen2: Llama with a qkv bias (tied here, as qwen2-0.5b).
    "qwen2": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                  position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                  add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0),
    # GPT with ALiBi (no position table) and an untied head.
    "alibi": dict(num_layers=3, hidden_size=64, num_attention_heads=4, position_embedding_type="alibi",
                  untie_embeddings_and_output_weights=True),
}


def build(name: str, **kernels) -> tuple[ModelConfig, GPTModel]:
    torch.manual_seed(0)
    cfg = ModelConfig(**FAMILIES[name])
    return cfg, GPTModel(cfg, V, kernels=KernelsConfig(**kernels))


# ---------------------------------------------------------------------------------------------
# Parameters


@pytest.mark.parametrize("name", FAMILIES)
def test_parameter_count_equals_built_model(name):
    cfg, model = build(name)
    count = count_parameters(cfg, V)
    assert count.total == sum(p.numel() for p in model.parameters())
    # DeepSpeed's own counter (shared parameters once) and its largest module (what ZeRO-3 gathers).
    ds_total, ds_largest = stage3.model_to_params(model)
    est = estimate_memory(cfg, V, MemorySetup(seq_length=16))
    assert (est.params, est.largest_module) == (ds_total, ds_largest)
    embeddings = sum(p.numel() for n, p in model.named_parameters() if "embedding" in n)
    assert count.non_embedding == count.total - embeddings - count.output_layer


@pytest.mark.parametrize("name,tp", [("gpt2", 2), ("gpt2", 4), ("llama", 2), ("qwen2", 2)])
def test_tensor_parallel_shard_count(name, tp):
    cfg, model = build(name)
    est = estimate_memory(cfg, V, MemorySetup(seq_length=16, tensor_parallel=tp))
    full = model.state_dict()
    for rank in range(tp):
        shard = shard_state_dict(full, cfg, tp, rank)
        assert sum(t.numel() for t in shard.values()) == est.params


def test_pipeline_stages_hold_every_parameter_once_plus_the_tied_copy():
    for name, tied in (("gpt2", True), ("llama", False)):
        cfg = ModelConfig(**{**FAMILIES[name], "num_layers": 8})
        count = count_parameters(cfg, V)
        for pp in (1, 2, 4):
            stages = flops.stage_parameters(cfg, V, pipeline_parallel=pp)
            assert [st.layers for st in stages] == [8 // pp] * pp
            copy = count.word_embeddings if tied and pp > 1 else 0
            assert sum(st.params for st in stages) == count.total + copy
            head = count.final_norm + count.output_layer if pp == 1 else 0
            embeddings = count.word_embeddings + count.position_embeddings
            assert stages[0].params == (8 // pp) * count.layer + embeddings + head


@pytest.mark.parametrize("preset,total", [
    # Published totals of the released checkpoints (HF num_parameters()).
    ("llama-1b", 1_235_814_400), ("llama-7b", 6_738_415_616), ("mistral-7b", 7_241_732_096),
    ("qwen2-0.5b", 494_032_768), ("qwen2-7b", 7_615_616_512),
])
def test_preset_counts_match_published_checkpoints(preset, total):
    assert count_parameters(model_preset(preset), PRESET_VOCAB_SIZE[preset]).total == total


def test_gpt2_small_matches_openai_checkpoint():
    cfg = model_preset("gpt2-125m", max_position_embeddings=1024)
    assert count_parameters(cfg, 50257).total == 124_439_808


# ---------------------------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize("name", FAMILIES)
def test_flops_per_token_against_flop_counter(name):
    # Explicit attention matmuls so FlopCounterMode sees QK^T and AV (it has no rule for CPU flash SDPA).
    cfg, model = build(name, attention_backend="unfused")
    B, T = 2, 32
    ids = torch.randint(0, V, (B, T))
    with FlopCounterMode(display=False) as counter:
        logits = model(ids)
        F.cross_entropy(logits.float().reshape(-1, V), ids.reshape(-1)).backward()
    # 6N counts every parameter of N as a matmul weight; biases and norm gains are not matmuls.
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert counter.get_total_flops() == (flops_per_token(cfg, V, T) - 6 * vectors) * B * T


@pytest.mark.parametrize("case,vocab,seq,figures", [
    # Issue 9's H100 reference figures: (tokens/s, MFU %) for HF eager, HF compile, HF + ZeRO-2.
    (("gpt2-125m", dict(max_position_embeddings=1024)), 50257, 1024, [(162.8e3, 14), (340.4e3, 29), (188.7e3, 16)]),
    (("gpt2-1.3b", {}), 50257, 2048, [(28.2e3, 26), (40.0e3, 37), (30.3e3, 28)]),
    (("llama-1b", {}), 128256, 2048, [(38.8e3, 32), (50.0e3, 42), (36.1e3, 30)]),
])
def test_mfu_convention_reproduces_issue_figures(case, vocab, seq, figures):
    fpt = flops_per_token(model_preset(case[0], **case[1]), vocab, seq)
    assert [round(100 * flops.mfu(tps, fpt)) for tps, _ in figures] == [pct for _, pct in figures]


# ---------------------------------------------------------------------------------------------
# Memory: model states against DeepSpeed's estimators


def _parse_ds_table(text: str) -> dict[tuple, float]:
    """DeepSpeed's printed rows ' 1.23GB |  4.56GB | offload_x=..., ...' -> {options: GPU GiB}.

    Options become a sorted tuple of (name, "cpu" | "none") pairs; the enum's spelling varies by Python."""
    out = {}
    for _, gpu, opts in re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$", text, flags=re.M):
        pairs = (o.strip().split("=") for o in opts.split(","))
        out[tuple(sorted((k, "none" if v.strip() == "none" else "cpu" if "cpu" in v else v.strip())
                         for k, v in pairs))] = float(gpu)
    return out


def _mine(preset: str, n: int, stage: int, **kw) -> flops.MemoryEstimate:
    cfg = model_preset(preset)
    vocab = -(-PRESET_VOCAB_SIZE[preset] // 128) * 128
    return estimate_memory(cfg, vocab, MemorySetup(seq_length=2048, data_parallel=n, zero_stage=stage, **kw))


PRESETS = ["gpt2-125m", "gpt2-1.3b", "llama-1b", "llama-7b", "qwen2-7b"]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_zero2_matches_deepspeed_estimator(preset, gpus, capsys):
    est = _mine(preset, gpus, 2)
    stage_1_and_2.estimate_zero2_model_states_mem_needs_all_cold(est.params, num_gpus_per_node=gpus)
    rows = _parse_ds_table(capsys.readouterr().out)
    for offload in ("none", "cpu"):
        e = _mine(preset, gpus, 2, offload_optimizer=offload == "cpu")
        ds_gib = rows[(("offload_optimizer", offload),)]
        assert abs(e.gpu_model_states / GiB - ds_gib) <= 0.01 + 0.1 * ds_gib, offload
        # The unrounded function agrees exactly: 2P + 18P/N (bf16 weights + sharded states).
        _, ds_bytes = stage_1_and_2.estimate_zero2_model_states_mem_needs(
            est.params, num_gpus_per_node=gpus, cpu_offload=offload == "cpu")
        assert e.gpu_model_states == pytest.approx(ds_bytes, rel=1e-9, abs=2)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_zero3_matches_deepspeed_estimator(preset, gpus, capsys):
    base = _mine(preset, gpus, 3)
    p, largest = base.params, base.largest_module
    stage3.estimate_zero3_model_states_mem_needs_all_cold(p, largest, num_gpus_per_node=gpus)
    rows = _parse_ds_table(capsys.readouterr().out)
    cases = {  # (offload_param, offload_optimizer) -> my estimate; zero_init only changes DeepSpeed's CPU figure
        ("cpu", "cpu"): _mine(preset, gpus, 3, offload_optimizer=True, offload_param=True),
        ("none", "cpu"): _mine(preset, gpus, 3, offload_optimizer=True),
        ("none", "none"): base,
    }
    for option, e in cases.items():
        ds_gib = rows[(("offload_optimizer", option[1]), ("offload_param", option[0]), ("zero_init", "1"))]
        # DeepSpeed's no-offload ZeRO-3 figure (4*largest + 18P/N) leaves out the 16-bit parameter
        # partition (2P/N) that its offload_optimizer branch counts; add it back to compare.
        missing = 2 * p / gpus if option == ("none", "none") else 0
        # (test_model_states_match_a_real_deepspeed_engine measures the 20P/N of a real engine.)
        assert abs(e.gpu_model_states / GiB - (ds_gib + missing / GiB)) <= 0.01 + 0.01 * ds_gib, option


def _deepspeed_engine_bytes_per_param(port: int, stages: list[int]) -> dict[int, float]:
    """Run in a fresh process: peak bytes per parameter a 1-rank bf16 DeepSpeed engine holds at the
    optimizer step (every live tensor storage, counted once), minus what was live before the model.

    Measured where it peaks: inside the inner optimizer step, and for ZeRO-1/2 just before the 16-bit
    gradients are freed (DeepSpeed converts them to fp32 first). Buckets are kept tiny."""
    import gc
    import os

    import deepspeed
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)

    def live_bytes() -> int:
        gc.collect()
        storages = {}
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.untyped_storage().nbytes():
                storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        return sum(storages.values())

    out = {}
    for stage in stages:
        base = live_bytes()
        cfg, model = build("gpt2")
        params = sum(p.numel() for p in model.parameters())
        ds_config = {
            "train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 1000, "allgather_bucket_size": 1000,
                                  "stage3_prefetch_bucket_size": 1000, "stage3_param_persistence_threshold": 0,
                                  "stage3_max_live_parameters": 1000, "stage3_max_reuse_distance": 0},
            "steps_per_print": 2 ** 31 - 1}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        del model
        peaks = []

        def measured(fn):
            def wrapped(*args, **kwargs):
                peaks.append(live_bytes())
                return fn(*args, **kwargs)
            return wrapped

        engine.optimizer.optimizer.step = measured(engine.optimizer.optimizer.step)
        if hasattr(engine.optimizer, "free_grad_in_param_list"):
            engine.optimizer.free_grad_in_param_list = measured(engine.optimizer.free_grad_in_param_list)
        ids = torch.randint(0, V, (1, 32))
        for _ in range(2):  # the second step has Adam's moments allocated
            engine.backward(engine(ids, labels=ids).mean())
            engine.step()
        out[stage] = (max(peaks) - base) / params
        del engine
    return out


@pytest.fixture(scope="module")
def engine_bytes_per_param():
    import json
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, __file__, str(port)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_model_states_match_a_real_deepspeed_engine(stage, engine_bytes_per_param):
    cfg = ModelConfig(**FAMILIES["gpt2"])
    est = estimate_memory(cfg, V, MemorySetup(seq_length=32, zero_stage=stage))
    mine = (est.gpu_model_states - est.gpu["gathered layer"]) / est.params  # nothing is gathered at the step
    assert mine == 20  # bf16 weights and gradients, fp32 gradients, master weights and two Adam moments
    assert engine_bytes_per_param[stage] == pytest.approx(mine, rel=0.05)
    if stage == 3:  # DeepSpeed's own ZeRO-3 estimator says 18 bytes per parameter here
        _, ds_bytes, _ = stage3.estimate_zero3_model_states_mem_needs(est.params, 0, cpu_offload=False)
        assert ds_bytes / est.params == 18 and engine_bytes_per_param[3] > 19


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_moves_optimizer_states_to_cpu(stage):
    on, off = _mine("llama-1b", 8, stage), _mine("llama-1b", 8, stage, offload_optimizer=True)
    moved = ("fp32 gradients", "fp32 master weights", "Adam moments")
    assert all(off.gpu[r] == 0 and off.cpu[r] == on.gpu[r] > 0 for r in moved)
    assert off.gpu["weights"] == on.gpu["weights"]


def test_zero_stages_partition_what_they_promise():
    p = _mine("gpt2-1.3b", 8, 0).params
    by_stage = [_mine("gpt2-1.3b", 8, z).gpu_model_states for z in range(4)]
    largest = _mine("gpt2-1.3b", 8, 3).largest_module
    # 16 bytes/param of mixed-precision Adam (+4 fp32 gradients, as DeepSpeed makes them), sharded stage by stage.
    assert by_stage == pytest.approx([20 * p, 4 * p + 16 * p / 8, 2 * p + 18 * p / 8, 20 * p / 8 + 4 * largest])
    fp32 = _mine("gpt2-1.3b", 8, 0, precision="fp32").gpu_model_states
    assert fp32 == 16 * p  # weights, gradients, two Adam moments; no master copy


# ---------------------------------------------------------------------------------------------
# Memory: activations


def _gpt(**kw) -> ModelConfig:
    return model_preset("gpt2-1.3b", **kw)


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (4, False), (4, True)])
def test_activations_reproduce_korthikanti(tp, sp):
    """Korthikanti et al. 2022, eq. 1-4: GPT with dropout, materialised attention, 16-bit activations."""
    cfg = _gpt()
    s, b, h, a = 2048, 4, cfg.hidden_size, cfg.num_attention_heads
    setup = MemorySetup(seq_length=s, micro_batch_size=b, tensor_parallel=tp, sequence_parallel=sp,
                        flash_attention=False)
    if sp:
        paper = s * b * h / tp * (34 + 5 * a * s / h)
    else:
        paper = s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))
    assert flops.layer_activation_bytes(cfg, setup) == pytest.approx(paper)


def test_full_recompute_keeps_layer_inputs_and_one_layer():
    cfg_ckpt = _gpt(recompute_granularity="full", hidden_dropout=0.0)
    cfg_full = _gpt(hidden_dropout=0.0)
    s, b, h, v = 2048, 4, cfg_full.hidden_size, 50304
    setup = MemorySetup(seq_length=s, micro_batch_size=b)
    per_layer = flops.layer_activation_bytes(cfg_full, setup)
    head = 2 * s * b * h * 2 + 4 * s * b  # final norm in/out, fused cross-entropy's log-sum-exp
    assert estimate_memory(cfg_full, v, setup).gpu["activations"] == pytest.approx(24 * per_layer + head)
    # The paper's 2*s*b*h*L for the checkpoints, plus the one layer being recomputed.
    assert estimate_memory(cfg_ckpt, v, setup).gpu["activations"] == pytest.approx(
        2 * s * b * h * 24 + per_layer + head)
    chunked = estimate_memory(model_preset("gpt2-1.3b", recompute_granularity="full", recompute_num_layers=4,
                                           hidden_dropout=0.0), v, setup).gpu["activations"]
    assert chunked == pytest.approx(2 * s * b * h * 6 + 4 * per_layer + head)


def test_pipeline_first_stage_holds_min_pp_gas_micro_batches():
    cfg = _gpt(hidden_dropout=0.0)
    s, b = 1024, 1
    per_layer = flops.layer_activation_bytes(cfg, MemorySetup(seq_length=s, micro_batch_size=b))
    for gas, in_flight in ((2, 2), (16, 4)):
        est = estimate_memory(cfg, 50304, MemorySetup(seq_length=s, micro_batch_size=b, pipeline_parallel=4,
                                                      grad_accum_steps=gas))
        assert est.stage == 0
        assert est.gpu["activations"] == pytest.approx(in_flight * 6 * per_layer)


def test_pipeline_last_stage_keeps_the_logits():
    """With one micro-batch in flight everywhere the last stage is the fullest: the pipeline's loss (GPTPipelineModule.loss)
    materialises the logits even at tp=1 and keeps their fp32 log-softmax, and DeepSpeed's engine keeps the
    logits of its 2 pipe buffers after their backward (measured: bench/plan_validation.py's pp2-recompute)."""
    cfg = _gpt(hidden_dropout=0.0)
    s, b, h, v = 1024, 1, cfg.hidden_size, 50304
    per_layer = flops.layer_activation_bytes(cfg, MemorySetup(seq_length=s, micro_batch_size=b))
    est = estimate_memory(cfg, v, MemorySetup(seq_length=s, micro_batch_size=b, pipeline_parallel=4))
    assert est.stage == 3
    head = 2 * s * b * h * 2 + 4 * s * b * v  # final norm in/out (fp16), the loss's fp32 log-softmax
    assert est.gpu["activations"] == pytest.approx(6 * per_layer + head + 2 * s * b * v * 2)  # + 2 buffers' logits


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_layer_activations_bound_what_a_real_layer_saves(name):
    """The formula assumes fused kernels; the pure-PyTorch CPU path keeps a few extra copies
    (norm statistics, reshaped linear inputs, the whole QKV output behind V), so what a real layer
    saves for backward lies between 1x and 2x the estimate."""
    cfg, model = build(name, attention_backend="unfused")
    B, T = 2, 64
    x = torch.randn(B, T, cfg.hidden_size, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train().layers[0](x, torch.arange(T).expand(B, T))
    est = flops.layer_activation_bytes(cfg, MemorySetup(seq_length=T, micro_batch_size=B, precision="fp32",
                                                        flash_attention=False))
    assert est <= sum(saved.values()) <= 2 * est


# ---------------------------------------------------------------------------------------------
# Errors and the tool


@pytest.mark.parametrize("kw,msg", [
    (dict(seq_length=0), "seq_length=0"),
    (dict(seq_length=8, zero_stage=4), "zero_stage=4"),
    (dict(seq_length=8, precision="fp8"), "precision='fp8'"),
    (dict(seq_length=8, pipeline_parallel=2, zero_stage=2), "pipeline engine supports ZeRO 0 and 1"),
    (dict(seq_length=8, zero_stage=0, offload_optimizer=True), "offload_optimizer needs ZeRO"),
    (dict(seq_length=8, zero_stage=2, offload_param=True), "offload_param needs zero_stage=3"),
])
def test_setup_errors(kw, msg):
    with pytest.raises(UserError, match=re.escape(msg)):
        MemorySetup(**kw)


def test_shape_errors():
    cfg = ModelConfig(**FAMILIES["llama"])
    with pytest.raises(UserError, match="num_query_groups=2 is not divisible by tensor_parallel=4"):
        estimate_memory(cfg, V, MemorySetup(seq_length=8, tensor_parallel=4))
    with pytest.raises(UserError, match="vocab_size=255 is not divisible by tensor_parallel=2"):
        estimate_memory(cfg, 255, MemorySetup(seq_length=8, tensor_parallel=2))
    with pytest.raises(UserError, match="num_layers=2 cannot be split across pipeline_parallel=4"):
        estimate_memory(cfg, V, MemorySetup(seq_length=8, pipeline_parallel=4))
    with pytest.raises(UserError, match="vocab_size=0"):
        count_parameters(cfg, 0)


@pytest.fixture(scope="module")
def tool():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[2] / "tools" / "estimate_memory.py"
    spec = importlib.util.spec_from_file_location("estimate_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(text: str) -> dict[str, float]:
    return {m[0].strip(): float(m[1]) for m in re.findall(r"^([a-zA-Z0-9 ]+?)\s+([\d.]+)\s+[\d.]+$", text, re.M)}


def test_tool_prints_the_estimate(tool, capsys):
    argv = ["--model", "llama-7b", "--tp", "2", "--num-gpus", "16", "--zero-stage", "1",
            "--micro-batch-size", "1", "--seq-length", "4096", "--bf16", "--checkpoint-activations"]
    assert tool.main(argv) == 0
    out = capsys.readouterr().out
    est = estimate_memory(model_preset("llama-7b", recompute_granularity="full"), 32000,
                          MemorySetup(seq_length=4096, tensor_parallel=2, data_parallel=8, zero_stage=1))
    rows = _table(out)
    assert rows["total"] == pytest.approx(est.gpu_total / GiB, abs=0.006)
    assert rows["Adam moments"] == pytest.approx(est.gpu["Adam moments"] / GiB, abs=0.006)
    assert "tp 2 x pp 1 x dp 8" in out and "6,738.4M total" in out
    # --dp and the long Megatron flag name give the same setup.
    assert tool.main(["--model-preset", "llama-7b", "--tensor-model-parallel-size", "2", "--dp", "8",
                      "--zero-stage", "1", "--micro-batch-size", "1", "--seq-length", "4096", "--bf16",
                      "--checkpoint-activations"]) == 0
    assert _table(capsys.readouterr().out) == rows


def test_tool_counts_zero_reduce_buckets(tool, capsys):
    """DeepSpeed's 5e8-element reduce bucket (bf16: 953 MiB): one at ZeRO-1/2 and 3, two with
    --overlap-grad-reduce (double-buffered), which a pipeline turns off; none at ZeRO-0 or on a CPU."""
    base = ["--model", "gpt2-125m", "--num-gpus", "8", "--seq-length", "1024", "--bf16"]
    buckets = {}
    for extra in ([], ["--overlap-grad-reduce"], ["--overlap-grad-reduce", "--pp", "2"], ["--zero-stage", "0"],
                  ["--zero-stage", "2", "--overlap-grad-reduce"], ["--zero-stage", "3"],
                  ["--overlap-grad-reduce", "--estimate-for", "cpu"]):
        assert tool.main(base + extra) == 0
        buckets[" ".join(extra)] = _table(capsys.readouterr().out)["reduce bucket"] * GiB / (500_000_000 * 2)
    assert buckets == pytest.approx({"": 1, "--overlap-grad-reduce": 2, "--overlap-grad-reduce --pp 2": 1,
                                     "--zero-stage 0": 0, "--zero-stage 2 --overlap-grad-reduce": 2,
                                     "--zero-stage 3": 1, "--overlap-grad-reduce --estimate-for cpu": 0}, abs=0.01)


@pytest.mark.parametrize("argv,msg", [
    (["--model-preset", "gpt2-125m", "--tp", "5"], "num_attention_heads=12 is not divisible"),
    (["--model-preset", "gpt2-125m", "--pp", "2", "--zero-stage", "2"], "ZeRO 0 and 1 only"),
    (["--model-preset", "gpt2-125m", "--num-gpus", "3", "--tp", "2"], "--num-gpus 3 is not a multiple"),
    (["--model-preset", "gpt2-125m", "--num-gpus", "4", "--dp", "2"], "contradicts --dp 2"),
    (["--model-preset", "gpt2-125m", "--bf16", "--fp16"], "exclusive"),
    (["--model-preset", "nope"], "invalid choice"),
])
def test_tool_errors_are_one_line(tool, capsys, argv, msg):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(lambda: tool.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0]


if __name__ == "__main__":  # the engine_bytes_per_param fixture's worker process
    import json
    import sys
    print(json.dumps(_deepspeed_engine_bytes_per_param(int(sys.argv[1]), [0, 1, 2, 3])))


def _activations(out: str) -> float:
    return _table(out)["activations"]


def test_validate_only_and_the_tool_estimate_the_same_on_any_host(tool, capsys, monkeypatch):
    """Issue 24: --validate-only once assumed unfused attention on a host without CUDA (3.3x the tool's
    activations for the same 1.3B flags). Both now assume the fused kernels and flash attention, with or
    without CUDA, and say so; --estimate-for cpu counts the reference ops' extra fp32 saves."""
    import megaclm.training.pretrain as pretrain

    shape = ["--model-preset", "gpt2-1.3b", "--tensor-model-parallel-size", "2", "--zero-stage", "1",
             "--micro-batch-size", "4", "--seq-length", "2048", "--bf16"]
    train = ["--world-size", "8", "--global-batch-size", "16", "--train-iters", "10", "--mock-data",
             "--tokenizer-type", "NullTokenizer", "--vocab-size", "50256", "--validate-only"]
    tool_argv = shape + ["--num-gpus", "8", "--vocab-size", "50257"]
    assert tool.main(tool_argv) == 0
    tool_out = capsys.readouterr().out
    assert "kernels      activations for the fused CUDA ops and flash attention" in tool_out
    seen = []
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        assert pretrain.main(shape + train) == 0
        out = capsys.readouterr().out
        assert "activations for the fused CUDA ops and flash attention (--estimate-for gpu)" in out
        seen.append(_activations(out))
    assert seen[0] == seen[1] == _activations(tool_out)
    assert tool.main(tool_argv + ["--estimate-for", "cpu"]) == 0
    cpu_out = capsys.readouterr().out
    assert "reference ops of a CPU run (--estimate-for cpu)" in cpu_out
    assert 1.05 < _activations(cpu_out) / _activations(tool_out) < 2.0
