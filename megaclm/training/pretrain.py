"""`pretrain_gpt.py`: config -> checks -> DeepSpeed engine -> data -> training loop.

Everything that can be wrong with the inputs is checked before any process group, model or dataset
exists: the config (megaclm.config.validate), the tokenizer files, the padded vocabulary against the
parallel layout, the checkpoint's vocabulary against the tokenizer's, the DeepSpeed JSON. With
`--validate-only` the resolved config, derived values, parameter count and a per-GPU memory estimate
(megaclm.model.flops, as tools/estimate_memory.py) are printed and nothing runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
import torch.distributed as dist

from megaclm.checkpoint.deepspeed_ckpt import load_checkpoint, restore_rng
from megaclm.checkpoint.layout import read_latest, read_meta, tag_for
from megaclm.config import arguments, compute_derived, parse_args, world_size_from_env
from megaclm.config.deepspeed_json import deepspeed_config, load_user_config
from megaclm.config.model import check_parallel_shapes
from megaclm.config.validate import check_vocab
from megaclm.data.curriculum import Curriculum
from megaclm.data.fingerprint import check_fingerprint, data_fingerprint
from megaclm.logging import get_logger
from megaclm.model.flops import MemorySetup, count_parameters, estimate_memory, flops_per_token
from megaclm.tokenizer import build_tokenizer_from_config
from megaclm.training.batch import build_batch_source
from megaclm.training.engine import build_engine, build_model, init_distributed
from megaclm.training.loop import Progress, Trainer, TrainingDiverged
from megaclm.training.metrics import MetricsLogger, detect_peak_tflops
from megaclm.training.schedules import build_schedule
from megaclm.utils.errors import UserError

log = get_logger("megaclm.train")

DESCRIPTION = ("Pretrain a GPT-family model with DeepSpeed (ZeRO 0-3, tensor/sequence/pipeline parallel). "
               "Launch with `deepspeed --num_gpus N pretrain_gpt.py ...`, torchrun, or srun.")


def _model_vocab(cfg: Any, tokenizer_vocab: int, padded: int) -> tuple[int, str]:
    """The embedding size to build: the checkpoint's when resuming/fine-tuning, else the padded tokenizer's."""
    c = cfg.checkpoint
    if c.load is not None:
        tag = tag_for(c.ckpt_step) if c.ckpt_step is not None else read_latest(c.load)
        if tag is not None:
            meta = read_meta(c.load, tag)
            vocab = meta["padded_vocab_size"]
            check_vocab(tokenizer_vocab, vocab, f"--load {c.load}/{tag}")
            return vocab, f"--load {c.load}/{tag}"
    return padded, "the tokenizer, padded"


def derive(cfg: Any, world_size: int, vocab_size: int) -> Any:
    """The run's derived values; with --train-tokens the step count follows the sequence-length warmup."""
    derived = compute_derived(cfg, world_size, vocab_size=vocab_size)
    if cfg.training.train_tokens is not None:  # a sequence-length warmup makes early steps shorter
        iters = Curriculum.from_config(cfg.data, derived.global_batch_size).first_step_after_tokens(
            cfg.training.train_tokens)
        derived = dataclasses.replace(derived, train_iters=iters, train_samples=iters * derived.global_batch_size)
    return derived


def _resume_tag(cfg: Any) -> str | None:
    """The tag a full resume (not --finetune) would load, or None for a fresh start or weights-only load."""
    c = cfg.checkpoint
    if c.load is None or c.finetune:
        return None
    return tag_for(c.ckpt_step) if c.ckpt_step is not None else read_latest(c.load)


def _check_data(cfg: Any, fingerprint: dict) -> None:
    """Refuse to resume on data that differs from the checkpoint's (unless --override-data-fingerprint)."""
    tag = _resume_tag(cfg)
    if tag is None:
        return
    saved = read_meta(cfg.checkpoint.load, tag).get("data_fingerprint")
    if cfg.checkpoint.override_data_fingerprint:
        log.warning(f"--override-data-fingerprint: not comparing the data with {cfg.checkpoint.load}/{tag}'s")
        return
    check_fingerprint(saved, fingerprint, f"--load {cfg.checkpoint.load}/{tag}")


def _summary(cfg: Any, derived: Any, model_vocab: int, ds_config: dict) -> str:
    params = count_parameters(cfg.model, model_vocab)
    setup = MemorySetup(seq_length=cfg.data.seq_length, micro_batch_size=derived.micro_batch_size,
                        tensor_parallel=derived.tensor_model_parallel_size,
                        pipeline_parallel=derived.pipeline_model_parallel_size,
                        data_parallel=derived.data_parallel_size, zero_stage=cfg.training.zero_stage,
                        precision=cfg.training.precision, sequence_parallel=cfg.parallel.sequence_parallel,
                        grad_accum_steps=derived.grad_accum_steps, offload_optimizer=cfg.training.offload_optimizer,
                        offload_param=cfg.training.offload_param,
                        flash_attention=torch.cuda.is_available() and cfg.kernels.attention_backend == "sdpa")
    memory = estimate_memory(cfg.model, model_vocab, setup)
    lines = ["# resolved config", arguments.dump_yaml(cfg.to_dict()).rstrip(), "", "# derived"]
    lines += [f"{k}: {v}" for k, v in derived.to_dict().items()]
    lines += [f"model_vocab_size: {model_vocab}", f"parameters: {params.total:,}",
              f"flops_per_token: {flops_per_token(cfg.model, model_vocab, cfg.data.seq_length):.4g}",
              "", "# memory per GPU (megaclm.model.flops.estimate_memory; tools/estimate_memory.py)",
              memory.table(), "", "# deepspeed config", json.dumps(ds_config, indent=1)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg, _, args = parse_args(argv, prog="pretrain_gpt.py", description=DESCRIPTION)
    world = world_size_from_env(args.world_size)
    tokenizer = build_tokenizer_from_config(cfg.tokenizer, cfg.parallel.tensor_model_parallel_size)
    derived = derive(cfg, world, tokenizer.vocab_size)
    model_vocab, vocab_source = _model_vocab(cfg, tokenizer.vocab_size, derived.padded_vocab_size)
    check_parallel_shapes(cfg.model, cfg.parallel, model_vocab)
    ds_config = deepspeed_config(cfg, derived, cuda=torch.cuda.is_available())
    if cfg.training.deepspeed_config:
        ds_config = load_user_config(cfg.training.deepspeed_config, ds_config)
    fingerprint = data_fingerprint(cfg.data, cfg.training.seed)
    _check_data(cfg, fingerprint)
    if args.validate_only:
        print(_summary(cfg, derived, model_vocab, ds_config), flush=True)
        return 0
    try:
        return _run(cfg, derived, ds_config, tokenizer, model_vocab, vocab_source, fingerprint)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def set_thread_count() -> None:
    """Honour OMP_NUM_THREADS: a fixed thread count keeps LayerNorm grads (and so exact resume) stable."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            raise UserError(f"OMP_NUM_THREADS={threads!r} must be a positive integer; set it or unset it")
        torch.set_num_threads(int(threads))


def _run(cfg: Any, derived: Any, ds_config: dict, tokenizer: Any, model_vocab: int, vocab_source: str,
         fingerprint: dict) -> int:
    if cfg.training.fp16 and not torch.cuda.is_available():
        raise UserError("training.fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); use --bf16 on CPU")
    set_thread_count()
    pstate = init_distributed(cfg)
    if pstate.rank == 0:
        log.info(f"world {pstate.world_size} = tp {pstate.tp_size} x pp {pstate.pp_size} x dp {pstate.dp_size}; "
                 f"global batch {derived.global_batch_size} = micro {derived.micro_batch_size} x dp x "
                 f"{derived.grad_accum_steps} accumulation steps; vocab {tokenizer.vocab_size} -> {model_vocab} "
                 f"({vocab_source}); {count_parameters(cfg.model, model_vocab).total:,} parameters")
    model = build_model(cfg, model_vocab, pstate, ds_config)
    engine = build_engine(cfg, model, pstate, ds_config)
    progress, state = Progress(), None
    c = cfg.checkpoint
    if c.load is not None:
        state = load_checkpoint(engine, c.load, ckpt_step=c.ckpt_step, finetune=c.finetune,
                                load_optim=not c.no_load_optim, load_rng=not c.no_load_rng,
                                layout=(pstate.tp_size, pstate.pp_size, pstate.dp_size, cfg.training.zero_stage))
        if state is not None:
            progress = Progress(**state["progress"])
    data = build_batch_source(cfg, derived, tokenizer.eod, pstate)
    if state is not None:
        data.load_state_dict(state["data"])
    schedule = build_schedule(cfg.optimizer, cfg.scheduler, derived.train_iters, derived.tokens_per_step,
                              cfg.training.train_tokens)
    writer = pstate.is_last_stage and pstate.tp_rank == 0 and pstate.dp_rank == 0
    metrics_file = cfg.logging.metrics_file or (os.path.join(c.save, "metrics.jsonl") if c.save else None)
    metrics = MetricsLogger(cfg.logging, writer=writer, metrics_file=metrics_file, total_iters=derived.train_iters,
                            start_iter=progress.iteration, run_config=cfg.to_dict(),
                            default_wandb_dir=os.path.join(c.save, "wandb") if c.save else None)
    meta = {"tensor_model_parallel_size": pstate.tp_size, "pipeline_model_parallel_size": pstate.pp_size,
            "data_parallel_size": pstate.dp_size, "world_size": pstate.world_size,
            "padded_vocab_size": model_vocab, "tokenizer_vocab_size": tokenizer.vocab_size,
            "zero_stage": cfg.training.zero_stage, "precision": cfg.training.precision,
            "data_fingerprint": fingerprint}
    peak = cfg.logging.peak_tflops or detect_peak_tflops(cfg.training.precision)
    trainer = Trainer(cfg, derived, engine, pstate, data, schedule, metrics, progress,
                      flops_per_token=lambda seq: flops_per_token(cfg.model, model_vocab, seq),
                      peak_tflops=peak, checkpoint_meta=meta)
    if state is not None and trainer.guard is not None and state.get("spike"):
        trainer.guard.load_state_dict(state["spike"])
    restore_rng(state)  # last: dataset building above may draw random numbers
    try:
        reason = trainer.train()
    except TrainingDiverged as e:
        log.error(str(e))
        return 1
    finally:
        metrics.close()
    if pstate.rank == 0:
        log.info(f"done at iteration {progress.iteration} ({reason})")
    return 0
