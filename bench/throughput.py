#!/usr/bin/env python
"""Training throughput on one GPU: megaclm against HF eager, HF + torch.compile and HF + DeepSpeed ZeRO-2.

    python bench/throughput.py                    # the three cases of issue 9, on the GPU
    python bench/throughput.py --quick            # tiny shapes on the CPU: checks the script in seconds
    python bench/throughput.py --cases llama-1.2b --modes megaclm-fused,hf-compile --megaclm-args="--zero-stage 2"

Per case, one process measures, warm-up excluded:
    hf-eager      transformers' GPT2LMHeadModel / LlamaForCausalLM, fp32 weights under bf16 autocast,
                  torch AdamW (fused on GPU) - what HF Trainer's --bf16 runs
    hf-compile    the same with torch.compile(model)
    hf-deepspeed  the same model in a DeepSpeed ZeRO-2 bf16 engine (HF Trainer + DeepSpeed)
    megaclm       megaclm.training.pretrain.main (pretrain_gpt.py) itself on a synthetic MMIDIDX dataset:
                  its DeepSpeed engine (ZeRO-1 by default, bf16, AdamW), data loader, loss mask, lr
                  schedule, with the PyTorch ops (--kernels torch); its tokens/s and peak memory are
                  read back from its metrics file.
    megaclm-fused the same with the CUDA kernels of megaclm.ops._cuda (--kernels fused; without the
                  built extension megaclm logs one line and runs the PyTorch ops: the JSON says which)
and prints tokens/s, TFLOP/s, MFU, peak memory and each megaclm mode / each mode, then the largest
micro batch that fits for the Llama case (megaclm, fused when measured, vs HF eager). TFLOP/s and MFU use megaclm.model.flops
(6N + 12*L*d*T per token, N from the unpadded model, the same for every mode, so MFU ratios equal
tokens/s ratios) and the GPU's dense bf16 peak (989.4 TFLOP/s on H100/H200; --peak-tflops otherwise).
HF modes train on one fixed random batch already on the device; megaclm reads its dataset.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaclm.config.model import ModelConfig  # noqa: E402
from megaclm.config.presets import model_preset  # noqa: E402
from megaclm.data.indexed_dataset import IndexedDatasetBuilder, optimal_dtype  # noqa: E402
from megaclm.model.flops import H100_BF16_PEAK_FLOPS, count_parameters, flops_per_token  # noqa: E402
from megaclm.ops import _cuda  # noqa: E402
from megaclm.utils.errors import UserError, cli_main  # noqa: E402
from megaclm.utils.fileio import atomic_write  # noqa: E402

MODES = ("hf-eager", "hf-compile", "hf-deepspeed", "megaclm", "megaclm-fused")
MEGACLM_MODES = ("megaclm", "megaclm-fused")


@dataclass(frozen=True)
class Case:
    preset: str
    vocab_size: int  # the tokenizer's (HF models use it unpadded; megaclm pads it)
    seq_length: int
    micro_batch_size: int
    overrides: dict = field(default_factory=dict)

    def model(self) -> ModelConfig:
        return model_preset(self.preset, **self.overrides)


CASES = {
    "gpt2-124m": Case("gpt2-125m", 50257, 1024, 16, dict(max_position_embeddings=1024)),
    "gpt-1.3b": Case("gpt2-1.3b", 50257, 2048, 4),
    "llama-1.2b": Case("llama-1b", 128256, 2048, 4),  # 16 layers, 2048 hidden, 32/8 heads, tied
}
_TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, max_position_embeddings=64)
QUICK_CASES = {
    "gpt2-tiny": Case("gpt2-125m", 512, 64, 2, _TINY),
    "llama-tiny": Case("llama-1b", 512, 64, 2, dict(_TINY, num_query_groups=2, ffn_hidden_size=128)),
}
BATCH_SEARCH_CASE = {"llama-1.2b", "llama-tiny"}


# ---------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Result:
    mode: str
    tokens_per_sec: float
    peak_memory_gb: float | None  # device peak; None on the CPU
    seconds: float


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def time_steps(step: Callable[[], None], warmup: int, iters: int, tokens_per_step: int, mode: str) -> Result:
    """Run `warmup` untimed steps, then time `iters` steps (device synchronised at both ends)."""
    for _ in range(warmup):
        step()
    _sync()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync()
    seconds = time.perf_counter() - start
    return Result(mode, iters * tokens_per_step / seconds, peak_memory_gb(), seconds)


def largest_micro_batch(fits: Callable[[int], bool], start: int, cap: int) -> tuple[int, bool]:
    """Largest micro batch in [1, cap] for which `fits` holds (assumed monotone): double from `start`
    until one fails, then bisect. Returns (size, whether the cap was reached); size 0 if 1 does not fit."""
    lo = hi = max(1, min(start, cap))
    if not fits(hi):
        lo = 0
    else:
        while True:
            if lo == cap:
                return lo, True
            hi = min(2 * lo, cap)
            if not fits(hi):
                break
            lo = hi
    while hi - lo > 1:  # lo fits (or is 0), hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, False


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ---------------------------------------------------------------------------------------------
# HF baselines


def hf_model(cfg: ModelConfig, vocab_size: int) -> torch.nn.Module:
    """The transformers model with `cfg`'s shape (GPT-2 for learned positions, else Llama)."""
    if cfg.position_embedding_type == "learned_absolute":
        from transformers import GPT2Config, GPT2LMHeadModel
        hf = GPT2Config(vocab_size=vocab_size, n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
                        n_layer=cfg.num_layers, n_head=cfg.num_attention_heads, n_inner=cfg.ffn_size,
                        resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout,
                        attn_pdrop=cfg.attention_dropout, layer_norm_epsilon=cfg.norm_epsilon,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
        return GPT2LMHeadModel(hf)
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                     num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                     rms_norm_eps=cfg.norm_epsilon, tie_word_embeddings=not cfg.untie_embeddings_and_output_weights,
                     attention_bias=cfg.qkv_bias, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    return LlamaForCausalLM(hf)


def _batch(case: Case, micro_batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, case.vocab_size, (micro_batch, case.seq_length), generator=g).to(device())


def hf_step(case: Case, micro_batch: int, compile_backend: str | None) -> Callable[[], None]:
    """One HF Trainer-style step: bf16 autocast over fp32 weights, AdamW."""
    torch.manual_seed(0)
    model = hf_model(case.model(), case.vocab_size).to(device()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.cuda.is_available() or None)
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model
    ids = _batch(case, micro_batch)

    def step():
        with torch.autocast(device().type, dtype=torch.bfloat16):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf_deepspeed_step(case: Case, micro_batch: int) -> tuple[Callable[[], None], object]:
    import deepspeed
    torch.manual_seed(0)
    model = hf_model(case.model(), case.vocab_size)
    params = {"lr": 1e-4, "weight_decay": 0.0}
    if not torch.cuda.is_available():
        params["torch_adam"] = True  # inside "params", or DeepSpeed JIT-builds FusedAdam
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": params},
              "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
              "steps_per_print": 2 ** 31 - 1}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    ids = _batch(case, micro_batch)

    def step():
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()

    return step, engine


def run_hf(mode: str, case: Case, args, micro_batch: int | None = None) -> Result:
    mb = micro_batch or case.micro_batch_size
    engine = None
    try:
        if mode == "hf-deepspeed":
            step, engine = hf_deepspeed_step(case, mb)
        else:
            step = hf_step(case, mb, args.compile_backend if mode == "hf-compile" else None)
        return time_steps(step, args.warmup, args.iters, mb * case.seq_length, mode)
    finally:
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
        del engine
        torch._dynamo.reset()
        free_memory()


# ---------------------------------------------------------------------------------------------
# megaclm: pretrain_gpt.py's main on a synthetic MMIDIDX dataset


def synthetic_dataset(workdir: str, vocab_size: int, tokens: int) -> str:
    """An MMIDIDX dataset of random documents (ids below vocab_size - 1; eod = vocab_size - 1)."""
    prefix = os.path.join(workdir, f"synthetic_{vocab_size}_{tokens}")
    if os.path.exists(prefix + ".idx"):
        return prefix
    rng = np.random.default_rng(0)
    lengths = rng.integers(64, 4096, size=max(1, tokens // 1000 + 1))
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), tokens) + 1]
    ids = rng.integers(0, vocab_size - 1, size=int(lengths.sum()))
    ids[np.cumsum(lengths) - 1] = vocab_size - 1
    builder = IndexedDatasetBuilder(prefix, dtype=optimal_dtype(vocab_size))
    builder.add_documents(ids, lengths)
    builder.finalize()
    return prefix


def _new_master_port() -> None:
    """A free MASTER_PORT for the next process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def megaclm_argv(case: Case, micro_batch: int, steps: int, data_prefix: str, workdir: str, args,
                 kernels: str = "torch") -> list[str]:
    model_flags = []
    for name, value in case.overrides.items():
        model_flags += ["--" + name.replace("_", "-"), str(value)]
    return ["--model-preset", case.preset, *model_flags,
            "--seq-length", str(case.seq_length), "--micro-batch-size", str(micro_batch),
            "--global-batch-size", str(micro_batch), "--train-iters", str(steps),
            "--lr", "1e-4", "--zero-stage", str(args.zero_stage), "--bf16",
            "--data-path", data_prefix, "--split", "100,0,0", "--data-cache-path", os.path.join(workdir, "cache"),
            "--num-workers", str(args.num_workers),
            # NullTokenizer: ids below --vocab-size plus eod, i.e. case.vocab_size tokens in all.
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(case.vocab_size - 1),
            "--eval-iters", "0", "--log-interval", str(args.warmup), "--no-progress-bar",
            "--metrics-file", os.path.join(workdir, "metrics.jsonl"), *shlex.split(args.megaclm_args),
            "--kernels", kernels]


def run_megaclm(case: Case, args, workdir: str, micro_batch: int | None = None, mode: str = "megaclm") -> Result:
    """pretrain_gpt.py for warmup + iters steps, logging every `warmup`: the records after the first
    window are the timed ones (the loop times each step and syncs on the loss every step)."""
    from megaclm.training import pretrain
    mb = micro_batch or case.micro_batch_size
    if args.iters % args.warmup:
        raise UserError(f"--iters {args.iters} must be a multiple of --warmup {args.warmup} "
                        "(megaclm logs every --warmup steps)")
    steps = args.warmup + args.iters
    # One dataset per case, large enough for every micro batch the search may try.
    tokens = int(1.2 * max(steps, 25) * max(mb, case.micro_batch_size, args.batch_cap) * case.seq_length) + 10_000
    prefix = synthetic_dataset(workdir, case.vocab_size, tokens)
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    _new_master_port()  # pretrain ends by destroying its process group
    free_memory()
    try:
        kernels = "fused" if mode == "megaclm-fused" else "torch"
        code = pretrain.main(megaclm_argv(case, mb, steps, prefix, workdir, args, kernels))
    finally:
        free_memory()
    if code:
        raise RuntimeError(f"megaclm exited with status {code}")
    with open(metrics) as fh:
        records = [r for r in map(json.loads, fh) if "tokens_per_sec" in r][1:]  # drop the warm-up window
    if not records:
        raise RuntimeError(f"megaclm wrote no timed metrics records to {metrics}")
    tokens = len(records) * args.warmup * mb * case.seq_length
    seconds = sum(args.warmup * mb * case.seq_length / r["tokens_per_sec"] for r in records)
    memory = records[-1]["memory_gb"] if torch.cuda.is_available() else None
    return Result(mode, tokens / seconds, memory, seconds)


# ---------------------------------------------------------------------------------------------
# Reporting


def peak_flops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if torch.cuda.is_available() and any(k in torch.cuda.get_device_name() for k in ("H100", "H200")):
        return H100_BF16_PEAK_FLOPS
    return None


def report(name: str, case: Case, results: list[Result], args) -> list[dict]:
    """Print the case's table; rows with each megaclm mode's speed-up over the row's mode
    ("megaclm_ratio" for the PyTorch ops, "megaclm_fused_ratio" for the fused kernels)."""
    cfg = case.model()
    fpt = flops_per_token(cfg, case.vocab_size, case.seq_length)
    peak = peak_flops(args)
    ours = {r.mode: r for r in results if r.mode in MEGACLM_MODES}
    n = count_parameters(cfg, case.vocab_size).total
    print(f"\n{name}: {n / 1e6:,.1f}M parameters, seq {case.seq_length}, micro batch {case.micro_batch_size}, "
          f"{fpt / 1e9:.3f} GFLOP/token")
    print(f"  {'mode':14s}{'tokens/s':>12s}{'TFLOP/s':>10s}{'MFU':>8s}{'peak GB':>10s}"
          + "".join(f"{m + '/x':>16s}" for m in ours))
    rows = []
    for r in results:
        tflops = r.tokens_per_sec * fpt / 1e12
        mfu = r.tokens_per_sec * fpt / peak if peak else None
        ratios = {m: o.tokens_per_sec / r.tokens_per_sec for m, o in ours.items()}
        print(f"  {r.mode:14s}{r.tokens_per_sec:12,.0f}{tflops:10.2f}"
              f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%':>8s}"
              f"{'n/a' if r.peak_memory_gb is None else f'{r.peak_memory_gb:.1f}':>10s}"
              + "".join(f"{f'{x:.2f}x':>16s}" for x in ratios.values()))
        rows.append({"case": name, "mode": r.mode, "micro_batch": case.micro_batch_size,
                     "seq_length": case.seq_length, "tokens_per_sec": r.tokens_per_sec, "tflops": tflops,
                     "mfu": mfu, "peak_memory_gb": r.peak_memory_gb, "seconds": r.seconds,
                     "megaclm_ratio": ratios.get("megaclm"), "megaclm_fused_ratio": ratios.get("megaclm-fused")})
    return rows


def search_batches(name: str, case: Case, args, workdir: str, modes: list[str]) -> dict:
    """Largest micro batch that trains one step without running out of memory: megaclm (its fused
    mode when that is measured) vs HF eager."""
    quick = argparse.Namespace(**{**vars(args), "warmup": 1, "iters": 1})
    ours = "megaclm-fused" if "megaclm-fused" in modes else "megaclm"
    out = {}
    for mode in (ours, "hf-eager"):
        def fits(mb: int, mode=mode) -> bool:
            try:
                if mode in MEGACLM_MODES:
                    run_megaclm(case, quick, workdir, micro_batch=mb, mode=mode)
                else:
                    run_hf(mode, case, quick, micro_batch=mb)
                return True
            except Exception as exc:  # noqa: BLE001 - only out-of-memory means "does not fit"
                if not is_oom(exc):
                    raise
                return False
            finally:
                free_memory()

        size, capped = largest_micro_batch(fits, case.micro_batch_size, args.batch_cap)
        out[mode] = {"micro_batch": size, "hit_cap": capped}
        print(f"  largest micro batch, {mode:13s}: {size}{' (the --batch-cap)' if capped else ''}")
    return out


def _write_json(path: str | None, out: dict) -> None:
    if path:
        with atomic_write(path, "w") as fh:
            json.dump(out, fh, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Tiny shapes on the CPU (checks the script).")
    p.add_argument("--cases", default=None, help=f"Comma list of {', '.join(CASES)} (or the --quick ones).")
    p.add_argument("--modes", default=",".join(MODES), help=f"Comma list of {', '.join(MODES)}.")
    p.add_argument("--warmup", type=int, default=None, help="Untimed steps (default 5; 1 with --quick).")
    p.add_argument("--iters", type=int, default=None, help="Timed steps, a multiple of --warmup (default 20; 2 quick).")
    p.add_argument("--zero-stage", type=int, default=1, choices=[1, 2], help="megaclm's ZeRO stage.")
    p.add_argument("--megaclm-args", default="", help="Extra pretrain_gpt.py flags, e.g. '--attention-backend unfused' (--kernels is the mode's).")
    p.add_argument("--num-workers", type=int, default=None, help="megaclm DataLoader workers (default 2; 0 quick).")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend for hf-compile (default inductor; 'eager' with --quick).")
    p.add_argument("--peak-tflops", type=float, default=None, help="Device peak for MFU (default: H100/H200 bf16).")
    p.add_argument("--batch-cap", type=int, default=None, help="Largest micro batch tried (default 64; 4 quick).")
    p.add_argument("--no-batch-search", action="store_true", help="Skip the largest-micro-batch search.")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="Measure every case at this micro batch (default: the case's; e.g. the one the search found).")
    p.add_argument("--json", default=None, help="Also write the results here as JSON.")
    args = p.parse_args(argv)
    table = QUICK_CASES if args.quick else CASES
    defaults = dict(warmup=1, iters=2, num_workers=0, compile_backend="eager", batch_cap=4) if args.quick else \
        dict(warmup=5, iters=20, num_workers=2, compile_backend="inductor", batch_cap=64)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.micro_batch_size is not None:
        if args.micro_batch_size < 1:
            raise UserError(f"--micro-batch-size {args.micro_batch_size} must be >= 1")
        table = {name: replace(case, micro_batch_size=args.micro_batch_size) for name, case in table.items()}
    names = args.cases.split(",") if args.cases else list(table)
    modes = args.modes.split(",")
    for n in names:
        if n not in table:
            raise UserError(f"--cases: unknown case {n!r}; choose from {', '.join(table)}")
    for m in modes:
        if m not in MODES:
            raise UserError(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
    if args.warmup < 1 or args.iters < 1:
        raise UserError("--warmup and --iters must be >= 1")
    if not args.quick and not torch.cuda.is_available():
        raise UserError("no CUDA device: the full benchmark needs a GPU; pass --quick for the CPU check")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; torch {torch.__version__}; "
          f"warm-up {args.warmup}, timed {args.iters} steps")
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "fused_kernels": {"available": _cuda.is_available(), "reason": _cuda.unavailable_reason()},
           "measured": [], "results": [], "largest_micro_batch": {}}
    results: dict[str, list[Result]] = {name: [] for name in names}

    def measured(name: str, result: Result) -> None:
        """Keep one result; the JSON is rewritten after each, so a run stopped by a time budget keeps
        what it measured ("measured": raw results; "results": the finished cases with their ratios)."""
        results[name].append(result)
        out["measured"].append({"case": name, **asdict(result)})
        _write_json(args.json, out)

    with tempfile.TemporaryDirectory(prefix="megaclm_bench_") as workdir:
        # Every HF mode first: pretrain_gpt.py ends by destroying its process group, and DeepSpeed
        # keeps its groups cached, so a later hf-deepspeed engine in this process would fail.
        for name in names:
            for mode in (m for m in modes if m not in MEGACLM_MODES):
                _new_master_port()
                measured(name, run_hf(mode, table[name], args))
        for name in names:
            for mode in (m for m in modes if m in MEGACLM_MODES):
                measured(name, run_megaclm(table[name], args, workdir, mode=mode))
            out["results"] += report(name, table[name], results[name], args)
            _write_json(args.json, out)
            if name in BATCH_SEARCH_CASE and not args.no_batch_search:
                out["largest_micro_batch"][name] = search_batches(name, table[name], args, workdir, modes)
                _write_json(args.json, out)
    return 0


if __name__ == "__main__":
    cli_main(main)
