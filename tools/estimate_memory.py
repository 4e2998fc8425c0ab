#!/usr/bin/env python
"""Per-GPU memory, parameter count and FLOPs per token of a megaclm training setup, without a GPU.

    python tools/estimate_memory.py --model-preset llama-7b --tp 2 --num-gpus 16 --zero-stage 1 \\
        --micro-batch-size 1 --seq-length 4096 --bf16 --recompute-granularity full

The model comes from --model-preset (--model) and/or the model shape flags (or `--config` YAML with model,
parallel and kernels sections); --tp/--pp are short for --tensor-model-parallel-size and
--pipeline-model-parallel-size. The data-parallel size is --dp, or --num-gpus / (tp * pp * sequence split),
where the sequence split is --ds-sequence-parallel-size (Ulysses) or --context-parallel-size (ring attention).
Formulas and their sources: megaclm/model/flops.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaclm.logging.quiet import entry_point  # noqa: E402

entry_point()  # before DeepSpeed is imported: it would guess the accelerator, and warn that it did

from megaclm.config import parse_args  # noqa: E402
from megaclm.config.derived import pad_vocab_size  # noqa: E402
from megaclm.config.presets import MODEL_PRESETS, PRESET_VOCAB_SIZE  # noqa: E402
from megaclm.model.flops import (KERNELS_ASSUMED, MemorySetup, count_parameters, estimate_memory,  # noqa: E402
                                 flops_per_token, seq_split_summary)
from megaclm.utils.errors import UserError, cli_main  # noqa: E402

GPT2_VOCAB_SIZE = 50257


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tp, pp = "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size"
    parser.add_argument("--tp", dest=tp, type=int, default=argparse.SUPPRESS,
                        help="Short for --tensor-model-parallel-size.")
    parser.add_argument("--pp", dest=pp, type=int, default=argparse.SUPPRESS,
                        help="Short for --pipeline-model-parallel-size.")
    parser.add_argument("--model", dest="model_preset", choices=sorted(MODEL_PRESETS), default=argparse.SUPPRESS,
                        help="Short for --model-preset.")
    g = parser.add_argument_group("estimate")
    g.add_argument("--num-gpus", type=int, default=None, help="GPUs in the job (data parallel = num_gpus / (tp * pp)).")
    g.add_argument("--dp", type=int, default=None, help="Data-parallel size (instead of --num-gpus). Default 1.")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="Tokenizer vocabulary before padding. Default: the preset's, else GPT-2's 50257.")
    g.add_argument("--seq-length", type=int, default=2048, help="Tokens per sample.")
    g.add_argument("--micro-batch-size", type=int, default=1, help="Samples per forward/backward on one GPU.")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="Samples per optimizer step (sets the accumulation steps that fill the pipeline).")
    g.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage.")
    g.add_argument("--bf16", action="store_true", help="bfloat16 training with fp32 master weights.")
    g.add_argument("--fp16", action="store_true", help="float16 training with fp32 master weights.")
    g.add_argument("--offload-optimizer", action="store_true", help="ZeRO 1-3: optimizer states on the CPU.")
    g.add_argument("--offload-param", action="store_true", help="ZeRO-3: parameters on the CPU.")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="A second reduce bucket (DeepSpeed overlap_comm double-buffers it); takes effect at "
                        "ZeRO-1/2 without a pipeline.")


def data_parallel_size(args, tp: int, pp: int, split: int = 1) -> int:
    if args.num_gpus is not None and args.dp is not None and args.num_gpus != args.dp * tp * pp * split:
        raise UserError(f"--num-gpus {args.num_gpus} contradicts --dp {args.dp} x tp {tp} x pp {pp} x sequence split "
                        f"{split}; pass one of them")
    if args.num_gpus is None:
        return 1 if args.dp is None else args.dp
    if args.num_gpus < 1 or args.num_gpus % (tp * pp * split):
        raise UserError(f"--num-gpus {args.num_gpus} is not a multiple of tp {tp} x pp {pp} x sequence split {split}")
    return args.num_gpus // (tp * pp * split)


def grad_accum_steps(args, dp: int) -> int:
    if args.global_batch_size is None:
        return 1
    per_step = args.micro_batch_size * dp
    if args.global_batch_size < 1 or args.global_batch_size % per_step:
        raise UserError(f"--global-batch-size {args.global_batch_size} is not a multiple of "
                        f"--micro-batch-size {args.micro_batch_size} x data parallel {dp}")
    return args.global_batch_size // per_step


def main(argv=None) -> int:
    cfg, _, args = parse_args(argv, sections=("model", "parallel", "kernels", "lora"), add_arguments=add_arguments,
                              prog="estimate_memory.py", description=__doc__.split("\n\n")[0])
    if args.bf16 and args.fp16:
        raise UserError("--bf16 and --fp16 are exclusive; pass one")
    model, par = cfg.model, cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    split = par.seq_split_size
    dp = data_parallel_size(args, tp, pp, split)
    vocab = args.vocab_size or PRESET_VOCAB_SIZE.get(args.model_preset, GPT2_VOCAB_SIZE)
    if vocab < 1:
        raise UserError(f"--vocab-size {vocab} must be >= 1")
    padded = pad_vocab_size(vocab, model.make_vocab_size_divisible_by, tp)
    setup = MemorySetup(
        seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, tensor_parallel=tp,
        pipeline_parallel=pp, data_parallel=dp, zero_stage=args.zero_stage,
        precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        sequence_parallel=par.sequence_parallel and tp > 1, grad_accum_steps=grad_accum_steps(args, dp),
        offload_optimizer=args.offload_optimizer, offload_param=args.offload_param,
        overlap_grad_reduce=args.overlap_grad_reduce,
        flash_attention=cfg.kernels.attention_backend in ("sdpa", "flash"), seq_split=split,
        reference_ops=args.estimate_for == "cpu",
        ring=par.context_parallel_size > 1, expert_parallel=par.expert_model_parallel_size,
        lora_rank=cfg.lora.lora_rank, lora_targets=cfg.lora.target_names, base_quantization=cfg.lora.base_quantization)
    est = estimate_memory(model, padded, setup)
    count = count_parameters(model, padded)
    fpt = flops_per_token(model, padded, args.seq_length)
    recompute = {None: "off", "selective": "selective (core attention)",
                 "full": f"full, {model.recompute_method}, {model.recompute_num_layers} layer(s)"}[model.recompute_granularity]
    print(f"model        {args.model_preset or 'custom'}: {model.num_layers} layers, hidden {model.hidden_size}, "
          f"heads {model.num_attention_heads}/{model.num_kv_heads}, ffn {model.ffn_size}, vocab {vocab} -> {padded}")
    print(f"parameters   {count.total / 1e6:,.1f}M total, {count.non_embedding / 1e6:,.1f}M non-embedding, "
          f"N = {count.flops_params / 1e6:,.1f}M for 6N")
    if model.num_experts is not None:
        print(f"experts      {model.num_experts} x {model.num_moe_layers} layers, top-{model.moe_router_topk}: "
              f"{count.experts / 1e6:,.1f}M expert parameters, {count.active / 1e6:,.1f}M active per token "
              f"(each GPU holds 1/{setup.expert_parallel} of them: --expert-model-parallel-size)")
    print(f"FLOPs/token  {fpt / 1e9:,.3f} GFLOP (6N + 12*L*d*T at T={args.seq_length})")
    kind = "ulysses" if par.ds_sequence_parallel_size > 1 else "cp (ring)" if par.context_parallel_size > 1 else None
    layout = f"tp {tp} x {kind} {split} x pp {pp} x dp {dp}" if kind else f"tp {tp} x pp {pp} x dp {dp}"
    print(f"setup        {tp * pp * dp * split} GPUs = {layout}; ZeRO-{args.zero_stage}, {setup.precision}, "
          f"micro batch {args.micro_batch_size}, accumulation {setup.grad_accum_steps}, recompute {recompute}"
          f"{', sequence parallel' if setup.sequence_parallel else ''}")
    if kind:
        print(f"sequence     {seq_split_summary(model, setup)}")
    print(f"per GPU      stage {est.stage} of {pp}: {est.params / 1e6:,.1f}M parameters on one GPU before ZeRO")
    print(f"kernels      {KERNELS_ASSUMED[setup.reference_ops]}")
    print(est.table())
    return 0


if __name__ == "__main__":
    cli_main(main)
