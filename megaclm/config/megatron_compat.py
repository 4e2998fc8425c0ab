"""Megatron-LM and Megatron-DeepSpeed flags that are not megaclm's own: one table, one fate each.

A Megatron user's launch script must run unchanged or be told exactly why not. `translate(argv)` runs
before argparse and rewrites every flag of `TABLE`:

    alias    the flag means something megaclm has under another name: it becomes the native flags
             (`--use-rotary-position-embeddings` -> `--position-embedding-type rope`); an alias that
             contradicts a native flag the user also gave is an error naming both
    ignored  it has no meaning here (megaclm always does it, or it tunes something megaclm does not
             have): dropped, with one line saying why
    refused  megaclm cannot do what it asks: one `error:` line naming the flag and what to use instead

A flag may also be conditional: `only` lists the values under which it is ignored (others refuse it:
`--data-impl mmap` is what megaclm reads, `--data-impl lazy` is not). `VALUE_ALIASES` maps Megatron's
spellings of a native flag's values (`--normalization rmsnorm`). The README's compatibility section is
generated from this table (`markdown_table`), and tests run the real example scripts' argument lists
(tests/data/megatron_scripts) through it. Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megaclm.utils.errors import UserError

ALIAS, IGNORED, REFUSED = "alias", "ignored", "refused"
MLM, MDS = "MLM", "MDS"  # Megatron-LM, Megatron-DeepSpeed: where the flag comes from


@dataclass(frozen=True)
class CompatFlag:
    flag: str
    fate: str  # ALIAS | IGNORED | REFUSED
    why: str  # the logged line (ignored), the error (refused), the README's explanation (alias)
    nargs: int = 0  # values the flag takes
    to: tuple[str, ...] = ()  # alias: native argv, "{0}" = the flag's first value
    weak: tuple[str, ...] = ()  # alias: native argv applied only where the user set that flag nowhere else
    only: tuple[str, ...] = ()  # values for which the fate holds; any other value is refused with `why`
    requires: str | None = None  # alias: a native flag that must also be given
    source: tuple[str, ...] = (MLM, MDS)


def _ignored(flag, why, nargs=0, only=(), source=(MLM, MDS)):
    return CompatFlag(flag, IGNORED, why, nargs=nargs, only=only, source=source)


def _alias(flag, to=(), why="", nargs=0, weak=(), requires=None, source=(MLM, MDS)):
    return CompatFlag(flag, ALIAS, why, nargs=nargs, to=tuple(to), weak=tuple(weak), requires=requires, source=source)


def _refused(flag, why, nargs=0, source=(MLM, MDS)):
    return CompatFlag(flag, REFUSED, why, nargs=nargs, source=source)


_TELEMETRY = ("megaclm logs a fixed set (loss, lr, grad norm, loss scale, tokens/s, TFLOP/s, MFU, batch size, "
              "validation loss and perplexity) to stdout, metrics.jsonl, TensorBoard and W&B")
_FUSION = "megaclm picks its kernels with --attention-backend and --kernels (fused where available, torch ops otherwise)"

TABLE: tuple[CompatFlag, ...] = (
    # --- model shape ------------------------------------------------------------------------------------
    _alias("--use-rotary-position-embeddings", ["--position-embedding-type", "rope"], "rotary position embeddings",
           source=(MLM, MDS)),
    _alias("--no-position-embedding", weak=["--position-embedding-type", "none"],
           why="no learned absolute position embedding (with RoPE: rope)"),
    _alias("--group-query-attention", requires="--num-query-groups",
           why="grouped-query attention; megaclm applies --num-query-groups whenever it is given"),
    _alias("--num-key-value-heads", ["--num-query-groups", "{0}"], "grouped-query attention's key/value heads",
           nargs=1, source=(MDS,)),
    _alias("--layernorm-epsilon", ["--norm-epsilon", "{0}"], "the norm's epsilon", nargs=1),
    _alias("--rope-theta", ["--rotary-base", "{0}"], "RoPE base period", nargs=1),
    _alias("--use-rope-scaling-llama3", ["--use-rope-scaling"], "Llama-3.1 RoPE scaling", source=(MLM,)),
    _ignored("--no-query-key-layer-scaling",
             "megaclm never scales QK^T by the layer number (that fp16 workaround is what this flag turns off)"),
    _ignored("--attention-softmax-in-fp32", "megaclm's attention softmax always accumulates in fp32"),
    _ignored("--use-mcore-models", "megaclm has one model implementation (megaclm.model.gpt)", source=(MLM,)),
    _ignored("--transformer-impl", "megaclm has one layer implementation; Transformer Engine is not used",
             nargs=1, source=(MLM,)),
    # --- Mixture of Experts (Megatron-DeepSpeed spellings) -------------------------------------------------
    _alias("--moe-expert-parallel-size", ["--expert-model-parallel-size", "{0}"], "expert-parallel ranks", nargs=1,
           source=(MDS,)),
    _alias("--topk", ["--moe-router-topk", "{0}"], "experts per token", nargs=1, source=(MDS,)),
    _alias("--moe-loss-coeff", ["--moe-aux-loss-coeff", "{0}"], "load-balancing loss coefficient", nargs=1,
           source=(MDS,)),
    _alias("--moe-train-capacity-factor", ["--moe-expert-capacity-factor", "{0}"], "expert capacity factor",
           nargs=1, source=(MDS,)),
    _ignored("--mlp-type", "megaclm has DeepSpeed's standard MoE MLP; its residual PR-MoE (a dense MLP mixed in by a "
             "softmax coefficient) is not available: --moe-shared-expert-intermediate-size F adds a dense expert "
             "every token passes through (Qwen2-MoE/DeepSeek shared expert)", nargs=1, only=("standard",),
             source=(MDS,)),
    # --- attention and kernels ----------------------------------------------------------------------------
    _alias("--use-flash-attn", ["--attention-backend", "flash"], "SDPA's FlashAttention kernel"),
    _alias("--use-flash-attn-v2", ["--attention-backend", "flash"], "SDPA's FlashAttention kernel", source=(MDS,)),
    _alias("--use-flash-attn-triton", ["--attention-backend", "flash"], "SDPA's FlashAttention kernel (no Triton "
           "kernel is needed)", source=(MDS,)),
    _ignored("--no-masked-softmax-fusion", _FUSION),
    _ignored("--no-bias-gelu-fusion", _FUSION),
    _ignored("--no-bias-swiglu-fusion", _FUSION, source=(MLM,)),
    _ignored("--no-bias-dropout-fusion", _FUSION),
    _ignored("--no-rope-fusion", _FUSION, source=(MLM,)),
    _ignored("--no-gradient-accumulation-fusion", "megaclm has no apex gradient-accumulation fusion to turn off"),
    _ignored("--cross-entropy-loss-fusion", "megaclm always fuses the output layer with the cross-entropy "
             "(chunked, the (B, T, V) logits are never materialised)", source=(MLM,)),
    _ignored("--no-create-attention-mask-in-dataloader",
             "megaclm's loader never builds an attention mask (documents travel as ids)", source=(MLM,)),
    # --- recomputation ------------------------------------------------------------------------------------
    _alias("--recompute-activations", ["--recompute-granularity", "selective"],
           "selective recomputation (the core attention)"),
    _alias("--checkpoint-activations", ["--recompute-granularity", "full"], weak=["--recompute-method", "uniform"],
           why="full recomputation of every layer (chunks of --recompute-num-layers)"),
    _alias("--checkpoint-num-layers", ["--recompute-num-layers", "{0}"], "layers per recomputed chunk", nargs=1),
    _ignored("--deepspeed-activation-checkpointing",
             "megaclm's recomputation always runs on DeepSpeed's activation checkpointing", source=(MDS,)),
    _ignored("--distribute-checkpointed-activations",
             "megaclm keeps checkpointed activations whole on each tensor-parallel rank"),
    # --- parallelism and optimizer --------------------------------------------------------------------------
    _alias("--use-distributed-optimizer", weak=["--zero-stage", "1"],
           why="optimizer states sharded over data parallelism: DeepSpeed ZeRO-1 (a higher --zero-stage also shards "
               "them)", source=(MLM,)),
    _alias("--no-pipeline-parallel", ["--pipeline-model-parallel-size", "1"],
           "no DeepSpeed PipelineModule (megaclm uses one only when --pipeline-model-parallel-size > 1)",
           source=(MDS,)),
    _alias("--cpu-optimizer", ["--offload-optimizer"], "optimizer step on the CPU (DeepSpeed ZeRO offload)",
           source=(MDS,)),
    _ignored("--no-async-tensor-model-parallel-allreduce",
             "megaclm's tensor-parallel all-reduces are issued in order by autograd; there is nothing to turn off"),
    _ignored("--overlap-param-gather", "DeepSpeed ZeRO-3 prefetches the parameters itself; at ZeRO-1/2 the updated "
             "parameters are all-gathered after the optimizer step, waited for (megaclm's --overlap-grad-reduce, "
             "also Megatron's flag, overlaps the gradients' reduction)", source=(MLM,)),
    _ignored("--grad-reduce-in-bf16",
             "gradients are reduced in DeepSpeed's communication dtype (the training precision)", source=(MLM,)),
    _ignored("--cp-comm-type", "megaclm's ring attention (--context-parallel-size) all-gathers the keys/values once "
             "per layer whichever exchange is named (the same arithmetic)", nargs=1, source=(MLM,)),
    _refused("--num-layers-per-virtual-pipeline-stage",
             "interleaved (virtual) pipeline stages are not available on DeepSpeed's pipeline engine; drop the flag "
             "(each rank then holds one contiguous stage)", nargs=1, source=(MLM,)),
    _refused("--rampup-batch-size", "batch-size ramp-up is not supported: use a constant --global-batch-size, "
             "and a sequence-length warmup (--curriculum-seqlen-*) for the same early-training effect", nargs=3),
    # --- schedule, loss, run length -----------------------------------------------------------------------
    _ignored("--override-opt_param-scheduler",
             "megaclm always builds the lr schedule from the flags; a checkpoint only holds the step", source=(MDS,)),
    _ignored("--override-opt-param-scheduler",
             "megaclm always builds the lr schedule from the flags; a checkpoint only holds the step", source=(MLM,)),
    _ignored("--use-checkpoint-opt_param-scheduler",
             "megaclm always builds the lr schedule from the flags; a checkpoint only holds the step", source=(MDS,)),
    _alias("--exit-signal-handler", why="on SIGTERM/SIGUSR1 save at the next step (or evaluation batch) and exit 76: "
           "megaclm always does, with handlers installed at process start"),
    _ignored("--calculate-per-token-loss",
             "megaclm always averages the loss over every loss token of the global batch", source=(MLM,)),
    # --- precision ----------------------------------------------------------------------------------------
    # --fp8-format / --fp8-recipe are native (training section); Transformer Engine's delayed-scaling knobs are
    # not: torchao's float8 scales dynamically from the current tensor.
    _ignored("--fp8-amax-history-len", "a delayed-scaling FP8 knob; megaclm's FP8 (torchao) scales dynamically",
             nargs=1, source=(MLM,)),
    _ignored("--fp8-amax-compute-algo", "a delayed-scaling FP8 knob; megaclm's FP8 (torchao) scales dynamically",
             nargs=1, source=(MLM,)),
    _ignored("--fp8-param-gather", "an FP8 option megaclm does not have (weights stay in high precision)",
             source=(MLM,)),
    # --- data ---------------------------------------------------------------------------------------------
    _ignored("--data-impl", "megaclm reads Megatron's memory-mapped indexed datasets (MMIDIDX) only; other formats "
             "must be rebuilt with tools/preprocess_data.py", nargs=1, only=("mmap", "infer"), source=(MDS,)),
    _ignored("--no-mmap-bin-files", "megaclm always memory-maps the .bin files (the page cache shares them)",
             source=(MLM,)),
    _ignored("--dataloader-type", "megaclm's sampler is always the exact-resume single pass (Megatron's "
             "'single'); shuffling happens in the dataset indices", nargs=1, only=("single", "cyclic"), source=(MLM,)),
    # --- checkpoints --------------------------------------------------------------------------------------
    _ignored("--ckpt-format", "megaclm writes DeepSpeed checkpoints (tools/checkpoint converts them to and from HF)",
             nargs=1, source=(MLM,)),
    _ignored("--use-dist-ckpt", "megaclm writes DeepSpeed checkpoints; reshard them with tools/checkpoint/reshard.py",
             source=(MLM,)),
    _ignored("--no-save-optim", "megaclm checkpoints always hold the optimizer (exact resume needs it)"),
    # --- logging and housekeeping -------------------------------------------------------------------------
    _ignored("--log-throughput", "megaclm always logs tokens/s, TFLOP/s and MFU", source=(MLM,)),
    _ignored("--log-timers-to-tensorboard", _TELEMETRY),
    _ignored("--log-batch-size-to-tensorboard", _TELEMETRY),
    _ignored("--log-validation-ppl-to-tensorboard", _TELEMETRY),
    _ignored("--log-optimizer-states-to-tensorboard", _TELEMETRY, source=(MDS,)),
    _ignored("--log-memory-to-tensorboard", _TELEMETRY),
    _ignored("--log-params-norm", _TELEMETRY),
    _ignored("--log-num-zeros-in-grad", _TELEMETRY),
    _ignored("--tensorboard-queue-size", "megaclm flushes TensorBoard at every log interval", nargs=1),
    _ignored("--tensorboard-log-interval", "megaclm writes TensorBoard at --log-interval", nargs=1),
    _ignored("--timing-log-level", "megaclm times whole steps only", nargs=1, source=(MLM,)),
    _ignored("--manual-gc", "Python's automatic garbage collection stays on; megaclm's step creates few objects",
             source=(MLM,)),
    _ignored("--manual-gc-interval", "Python's automatic garbage collection stays on", nargs=1, source=(MLM,)),
    _ignored("--empty-unused-memory-level",
             "megaclm never empties the CUDA cache inside the step (it costs a device sync)", nargs=1, source=(MLM,)),
)

# Megatron's spellings of the values of native flags.
VALUE_ALIASES: dict[str, dict[str, str]] = {
    "--normalization": {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"},
    # Megatron-LM's AttnBackend: flash, fused (cuDNN), unfused, local (its own unfused path), auto.
    "--attention-backend": {"fused": "sdpa", "auto": "sdpa", "local": "unfused"},
    "--tokenizer-type": {"GPTSentencePieceTokenizer": "SentencePieceTokenizer"},
}

_BY_FLAG = {c.flag: c for c in TABLE}


def native_value(flag: str, value: str) -> str:
    """Megatron's spelling of a native flag's value -> megaclm's (`--normalization rmsnorm` -> RMSNorm)."""
    return VALUE_ALIASES.get(flag, {}).get(value, value)


def _split(argv: list[str]) -> list[tuple[str, list[str]]]:
    """argv -> [(flag, values)], a `--flag=value` split in two; tokens before the first flag keep flag ''."""
    out: list[tuple[str, list[str]]] = []
    for tok in argv:
        if tok.startswith("--"):
            name, eq, value = tok.partition("=")
            out.append((name, [value] if eq else []))
        elif out:
            out[-1][1].append(tok)
        else:
            out.append(("", [tok]))
    return out


def translate(argv: list[str]) -> tuple[list[str], list[str]]:
    """Megatron argv -> (native argv, one line per ignored flag). Raises UserError for refused flags
    (all of them, on one line) and for aliases that contradict a native flag."""
    native: list[tuple[str, list[str]]] = []
    aliased: list[tuple[str, list[str], str]] = []  # (native flag, values, the Megatron flag it came from)
    weak: list[tuple[str, list[str], str]] = []
    required: list[CompatFlag] = []  # aliases that need a native flag beside them
    notes: list[str] = []
    refused: list[str] = []
    given = set()
    for flag, values in _split(argv):
        c = _BY_FLAG.get(flag)
        if c is None:
            if values:
                values = [native_value(flag, values[0])] + values[1:]
            native.append((flag, values))
            given.add(flag)
            continue
        # A compat flag takes exactly `nargs` values; anything after them is positional noise argparse reports.
        mine, rest = values[:c.nargs], values[c.nargs:]
        if len(mine) < c.nargs:
            raise UserError(f"{flag} expects {c.nargs} value(s), got {len(mine)}")
        if rest:
            native.append(("", rest))
        shown = " ".join([flag, *mine])
        if c.fate == REFUSED or (c.only and mine and mine[0] not in c.only):
            refused.append(f"{shown} is not supported: {c.why}")
        elif c.fate == IGNORED:
            notes.append(f"ignoring {shown}: {c.why}")
        else:
            aliased += _expand(c.to, mine, flag)
            weak += _expand(c.weak, mine, flag)
            if c.requires:
                required.append(c)
    if refused:
        raise UserError("; ".join(refused))
    out = list(native)
    for flag, values, origin in aliased:
        clash = [v for f, v in native if f == flag and v != values]
        if clash:
            raise UserError(f"{origin} means {' '.join([flag, *values])}, but {' '.join([flag, *clash[0]])} was "
                            f"also given; drop one of them")
        earlier = [(o, v) for f, v, o in aliased if f == flag and v != values]
        if earlier:
            raise UserError(f"{origin} and {earlier[0][0]} contradict each other ({flag}); drop one of them")
        out.append((flag, values))
    set_flags = given | {f for f, _, _ in aliased}
    out += [(flag, values) for flag, values, _ in weak if flag not in set_flags]
    for c in required:
        if c.requires not in set_flags:
            raise UserError(f"{c.flag} needs {c.requires} N (the number of key/value heads)")
    return [tok for flag, values in out for tok in ([flag] if flag else []) + values], notes


def _expand(template: tuple[str, ...], values: list[str], origin: str) -> list[tuple[str, list[str], str]]:
    toks = [t.format(*values) for t in template]
    return [(flag, vals, origin) for flag, vals in _split(toks)]


def markdown_table() -> str:
    """The README's section body: every flag of TABLE with its fate and meaning."""
    rows = ["| flag | from | fate | megaclm |", "| --- | --- | --- | --- |"]
    for c in sorted(TABLE, key=lambda c: (c.fate, c.flag)):
        fate = c.fate if not c.only else f"{c.fate} for {' / '.join(c.only)}, else refused"
        if c.fate == ALIAS:
            native = [f"`{' '.join(c.to).replace('{0}', 'N')}`"] if c.to else []
            native += [f"`{' '.join(c.weak)}` unless given" if c.weak else ""]
            what = ", ".join(n for n in native if n)
            what = f"{what}: {c.why}" if what else c.why
        else:
            what = c.why
        values = " N" if c.nargs == 1 else (" " + " ".join(["N"] * c.nargs) if c.nargs else "")
        rows.append(f"| `{c.flag}{values}` | {', '.join(c.source)} | {fate} | "
                    f"{what.replace('|', '/')} |")
    rows.append("")
    rows.append("Values: " + "; ".join(f"`{flag} {m}` = `{n}`" for flag, m_n in VALUE_ALIASES.items()
                                       for m, n in m_n.items() if m != n) + ".")
    return "\n".join(rows)


if __name__ == "__main__":  # regenerate the README section: python -m megaclm.config.megatron_compat
    print(markdown_table())
