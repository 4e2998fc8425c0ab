"""Cross-section checks, run once at start-up before any process group, model or dataset exists.

Each check raises one UserError naming the fields involved and what to change. Checks whose
sections a tool did not load (parse_args(sections=...)) are skipped. The per-section checks live
in each section's __post_init__; the model-vs-parallel shape checks in config.model.
"""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from megaclm.config.data import parse_blend
from megaclm.config.derived import Derived
from megaclm.config.lora import parse_targets
from megaclm.config.model import ModelConfig, check_parallel_shapes
from megaclm.config.parallel import ParallelConfig
from megaclm.utils.errors import UserError

if TYPE_CHECKING:  # megaclm.config imports this module (in parse_args)
    from megaclm.config import MegaclmConfig


def _model_parallel(cfg: MegaclmConfig) -> None:
    check_parallel_shapes(cfg.model, cfg.parallel)


def _pipeline_zero(cfg: MegaclmConfig) -> None:
    pp, stage = cfg.parallel.pipeline_model_parallel_size, cfg.zero.zero_stage
    if pp > 1 and stage >= 2:
        raise UserError(f"parallel.pipeline_model_parallel_size={pp} needs zero.zero_stage 0 or 1, got {stage}: "
                        "DeepSpeed's pipeline engine cannot partition gradients or parameters; "
                        "pass --zero-stage 1 (or --pipeline-model-parallel-size 1 to use ZeRO-2/3)")


def _moe_zero(cfg: MegaclmConfig) -> None:
    if cfg.model.num_experts is not None and cfg.zero.zero_stage == 3:
        raise UserError(f"model.num_experts={cfg.model.num_experts} with zero.zero_stage=3: DeepSpeed's engine "
                        "does not partition MoE layers' parameters under ZeRO-3; use --zero-stage 1 or 2 (expert "
                        "parallelism, --expert-model-parallel-size, already splits the experts' weights)")


def _compile_zero3(cfg: MegaclmConfig) -> None:
    if cfg.kernels.torch_compile and cfg.zero.zero_stage == 3:
        raise UserError("kernels.torch_compile with zero.zero_stage=3: torch.compile of the transformer blocks "
                        "traces ZeRO-3's partitioned parameters as they are between its gather hooks (empty "
                        "shards: a shape error at the first step); use --zero-stage 1 or 2 with --torch-compile, or "
                        "drop --torch-compile")


def _seq_length(cfg: MegaclmConfig) -> None:
    seq, maxpos = cfg.data.seq_length, cfg.model.max_position_embeddings
    if seq > maxpos:
        raise UserError(f"data.seq_length={seq} is larger than model.max_position_embeddings={maxpos}; "
                        f"pass --max-position-embeddings {seq} (or more) or a shorter --seq-length")


def _shared_fields(cfg: MegaclmConfig) -> None:
    a, b = cfg.model.make_vocab_size_divisible_by, cfg.tokenizer.make_vocab_size_divisible_by
    if a != b:
        raise UserError(f"model.make_vocab_size_divisible_by={a} differs from tokenizer.make_vocab_size_divisible_by={b}; "
                        "set both to one value (the flag --make-vocab-size-divisible-by sets both)")


def _data_paths(cfg: MegaclmConfig) -> None:
    d = cfg.data
    if d.mock_data:
        return
    if not (d.data_path or d.data_path_file or d.train_data_path):
        raise UserError("data.data_path is empty: pass --data-path PREFIX (the output prefix of "
                        "tools/preprocess_data.py, e.g. data/corpus_text_document), or --train-data-path")
    if d.data_path_file is not None and not os.path.isfile(d.data_path_file):
        raise UserError(f"data.data_path_file={d.data_path_file!r} does not exist")
    for name in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        if not getattr(d, name):
            continue
        for prefix in parse_blend(getattr(d, name), f"data.{name}")[1]:
            missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
            if missing:
                raise UserError(f"data.{name}: {' and '.join(missing)} not found; pass the prefix written by "
                                "tools/preprocess_data.py (without .bin/.idx)")


def _tokenizer(cfg: MegaclmConfig) -> None:
    if cfg.tokenizer.tokenizer_type is None:
        raise UserError("tokenizer.tokenizer_type is not set; pass --tokenizer-type (e.g. GPT2BPETokenizer "
                        "with --vocab-file and --merge-file)")
    for name in ("vocab_file", "merge_file", "tokenizer_model"):
        path = getattr(cfg.tokenizer, name)
        if path is not None and not os.path.exists(path):
            raise UserError(f"tokenizer.{name}={path!r} does not exist; pass the right --{name.replace('_', '-')}")


def _run_length(cfg: MegaclmConfig) -> None:
    t = cfg.training
    if t.train_iters is None and t.train_samples is None and t.train_tokens is None and t.train_epochs is None:
        raise UserError("the training length is not set: pass --train-iters, --train-samples, --train-tokens or "
                        "--train-epochs")


def _epochs(cfg: MegaclmConfig) -> None:
    if cfg.training.train_epochs is not None and cfg.data.mock_data:
        raise UserError("training.train_epochs needs a training dataset to count passes over; --mock-data has no "
                        "size: give --train-iters or --train-samples instead")


def _schedule(cfg: MegaclmConfig, derived: Derived | None) -> None:
    s = cfg.scheduler
    if s.by_tokens and (s.lr_warmup_iters or s.lr_decay_iters is not None or s.lr_wsd_decay_iters is not None
                      or s.lr_warmup_samples is not None or s.lr_decay_samples is not None):
        raise UserError("scheduler: warmup/decay lengths mix iterations and tokens (or samples and tokens); give them all in tokens "
                        "(--lr-warmup-tokens, --lr-decay-tokens, --lr-wsd-decay-tokens) or all in iterations")
    if derived is None or derived.train_iters is None:
        return
    unit, warmup, decay, wsd = s.lengths(derived.train_iters, derived.tokens_per_step, cfg.training.train_tokens,
                                         derived.global_batch_size)
    if s.lr_decay_style in ("linear", "cosine", "WSD") and warmup > decay:
        raise UserError(f"scheduler.lr_warmup_{unit}={warmup} is longer than the decay length {decay} {unit}; "
                        f"shorten the warmup or lengthen --lr-decay-{unit}")
    if s.lr_decay_style == "WSD" and wsd is not None and wsd > decay - warmup:
        raise UserError(f"scheduler.lr_wsd_decay_{unit}={wsd} does not fit after the warmup ({warmup}) within "
                        f"the decay length {decay} {unit}")


def _profile_ranks(cfg: MegaclmConfig, derived: Derived | None) -> None:
    lg = cfg.logging
    if lg.profile and derived is not None and max(lg.profile_ranks) >= derived.world_size:
        raise UserError(f"logging.profile_ranks={lg.profile_ranks}: rank {max(lg.profile_ranks)} is not in a world "
                        f"of {derived.world_size}; give ranks 0-{derived.world_size - 1} to --profile-ranks")


def _checkpointing(cfg: MegaclmConfig) -> None:
    c = cfg.checkpoint
    if c.save_best and cfg.training.eval_iters == 0:
        raise UserError("checkpoint.save_best needs validation: set training.eval_iters > 0 (--eval-iters)")


def check_vocab(tokenizer_vocab_size: int, model_vocab_size: int, source: str, tensor_size: int = 1) -> None:
    """The model's (padded) embedding must hold every token id the tokenizer produces, in equal shards."""
    if tokenizer_vocab_size > model_vocab_size:
        raise UserError(f"the tokenizer's vocabulary ({tokenizer_vocab_size} tokens) is larger than the model's "
                        f"({model_vocab_size}, from {source}); use the tokenizer the model was trained with")
    _vocab_split(model_vocab_size, tensor_size, source)


def _vocab_split(padded_vocab_size: int, tensor_size: int, source: str) -> None:
    if padded_vocab_size % tensor_size:
        raise UserError(f"padded vocabulary size {padded_vocab_size} (from {source}) is not divisible by "
                        f"parallel.tensor_model_parallel_size={tensor_size}; pad it to a multiple of "
                        "make_vocab_size_divisible_by x the tensor-parallel size")


def validate_layout(model: ModelConfig, parallel: ParallelConfig, padded_vocab_size: int | None = None,
                    source: str = "") -> None:
    """`validate`'s model-vs-parallel checks for a tool that lays a stored model out anew (HF import, reshard,
    the offline writer); `padded_vocab_size` (the embedding's rows, from `source`) must split into equal shards."""
    from megaclm.config import MegaclmConfig  # the package's own module: imported when called, not at import

    validate(MegaclmConfig(model=model, parallel=parallel), None, sections={"model", "parallel"})
    if padded_vocab_size is not None:
        _vocab_split(padded_vocab_size, parallel.tensor_model_parallel_size, source)


def _lora(cfg: MegaclmConfig) -> None:
    if cfg.lora.enabled and cfg.checkpoint.load is None:
        raise UserError(f"lora.lora_rank={cfg.lora.lora_rank} needs a base model: pass --load BASE --finetune (a "
                        "megaclm checkpoint, e.g. from tools/checkpoint/convert_hf.py import); adapters on a random "
                        "init train nothing useful")
    mlp = {"fc1", "fc2"} & set(cfg.lora.target_names)
    if cfg.lora.enabled and cfg.model.num_experts is not None and mlp:
        raise UserError(f"lora.lora_target={cfg.lora.lora_target!r}: an MoE model's MLPs are experts, which take no "
                        f"LoRA adapters ({', '.join(sorted(mlp))}); use --lora-target qkv,proj")
    if cfg.lora.enabled and not cfg.model.swiglu and "gate" in (parse_targets(cfg.lora.lora_target).get("fc1") or ()):
        raise UserError(f"lora.lora_target={cfg.lora.lora_target!r}: gate_proj names SwiGLU's gate, and this model's "
                        "MLP has none (model.swiglu is off); use up_proj (or fc1) for its MLP input")


def _base_quantization(cfg: MegaclmConfig) -> None:
    """QLoRA's quantized base: refuse what cannot work with it, one reason each."""
    method = cfg.lora.base_quantization
    if not cfg.lora.quantized:
        return
    if cfg.zero.zero_stage == 3:
        raise UserError(f"lora.base_quantization={method} with zero.zero_stage=3: ZeRO-3 partitions every "
                        "parameter, and a quantized weight cannot be split and gathered as one; the base is frozen, "
                        "so ZeRO-3 saves nothing on it: use --zero-stage 1 or 2")
    if cfg.precision.fp8_format is not None:
        raise UserError(f"lora.base_quantization={method} with precision.fp8_format={cfg.precision.fp8_format}: both "
                        "replace the block linears' matmul; drop --fp8-format (the frozen base is already quantized)")
    if cfg.kernels.torch_compile:
        raise UserError(f"lora.base_quantization={method} with kernels.torch_compile: compiling the blocks would "
                        "trace torchao's quantized weights through megaclm's dequantizing matmul, an untested "
                        "path; drop --torch-compile")


def _spike_guard(cfg: MegaclmConfig) -> None:
    r = cfg.resilience
    if r.spike_zscore is None:
        return
    if cfg.parallel.pipeline_model_parallel_size > 1:
        raise UserError("resilience.spike_zscore (the loss-spike guard) needs "
                        "parallel.pipeline_model_parallel_size=1: DeepSpeed's pipeline engine runs the whole step at "
                        "once, with no point between the loss and the update; drop --spike-zscore or use "
                        "tensor/data parallelism")
    if r.spike_action == "rollback" and cfg.checkpoint.save is None:
        raise UserError("resilience.spike_action=rollback needs checkpoint.save (it rolls back to the last "
                        "checkpoint); pass --save DIR --save-interval N")


# (check, sections it reads); a tool that parsed fewer sections skips the ones it lacks.
CHECKS = [
    (_model_parallel, {"model", "parallel"}),
    (_pipeline_zero, {"parallel", "zero"}),
    (_moe_zero, {"model", "zero"}),
    (_compile_zero3, {"kernels", "zero"}),
    (_seq_length, {"data", "model"}),
    (_shared_fields, {"model", "tokenizer"}),
    (_tokenizer, {"tokenizer"}),
    (_data_paths, {"data"}),
    (_run_length, {"training"}),
    (_epochs, {"training", "data"}),
    (_checkpointing, {"checkpoint", "training"}),
    (_lora, {"lora", "checkpoint", "model"}),
    (_base_quantization, {"lora", "zero", "precision", "kernels"}),
    (_spike_guard, {"parallel", "resilience", "checkpoint"}),
]


def validate(cfg: MegaclmConfig, derived: Derived | None, sections: set[str] | None = None) -> None:
    """Run every cross-section check whose sections are present; raise the first UserError."""
    have = set(sections) if sections is not None else {f.name for f in dataclasses.fields(cfg)}
    for check, needs in CHECKS:
        if needs <= have:
            check(cfg)
    if {"scheduler", "training"} <= have:
        _schedule(cfg, derived)
    if "logging" in have:
        _profile_ranks(cfg, derived)
