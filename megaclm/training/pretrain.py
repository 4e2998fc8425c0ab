"""`pretrain_gpt.py`: config -> checks -> DeepSpeed engine -> data -> training loop.

Everything that can be wrong with the inputs is checked before any process group, model or dataset
exists: the config (megaclm.config.validate), the tokenizer files, the padded vocabulary against the
parallel layout, the checkpoint's vocabulary against the tokenizer's, the DeepSpeed JSON. With
`--validate-only` the resolved config, derived values, parameter count and a per-GPU memory estimate
(megaclm.model.flops, as tools/estimate_memory.py) are printed and nothing runs.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from megaclm.checkpoint.deepspeed_ckpt import resolve_lora_base, verify_checksums
from megaclm.checkpoint.layout import read_config, read_meta
from megaclm.checkpoint.lock import SaveDirLock
from megaclm.checkpoint.manifest import Choice, choose_tag
from megaclm.checkpoint.save_errors import CheckpointSaveError
from megaclm.checkpoint.weights import load_weights
from megaclm.config import MegaclmConfig, arguments, parse_args
from megaclm.config.deepspeed_json import deepspeed_config, load_user_config, overlaps_grad_reduce
from megaclm.config.derived import with_inputs
from megaclm.config.derived import Derived
from megaclm.config.validate import check_vocab, validate
from megaclm.data.curriculum import Curriculum
from megaclm.data.epochs import train_split
from megaclm.data.fingerprint import check_fingerprint, data_fingerprint
from megaclm.data.token_range import check_token_ids
from megaclm.logging import get_logger, quiet
from megaclm.model import quantize
from megaclm.model.flops import (KERNELS_ASSUMED, MemorySetup, count_parameters, estimate_memory, flops_per_token,
                                 lora_layer_parameters, seq_split_summary)
from megaclm.model.fp8 import check_fp8
from megaclm.model.lora import is_lora_key
from megaclm.parallel.device import rank_device
from megaclm.parallel.state import ParallelState
from megaclm.tokenizer import build_tokenizer_from_config, model_vocab_size
from megaclm.training.batch import build_batch_source
from megaclm.training.batch_change import check_batch_change, saved_global_batch
from megaclm.training.callbacks import load_callbacks, stop_agreed
from megaclm.training.checkpointer import load_engine
from megaclm.training.engine import build_engine, build_model, init_distributed
from megaclm.training.loop import Trainer
from megaclm.training.metrics import MetricsLogger, detect_peak_tflops
from megaclm.training.progress import Progress, TrainingDiverged
from megaclm.training.schedules import build_schedule
from megaclm.training.start import Start, hf_padded_vocab, import_pretrained, remove_import, resolve_start
from megaclm.training.summary import end_of_run
from megaclm.utils import exitcodes, shm_buffers
from megaclm.utils.errors import UserError
from megaclm.utils.launch_env import rank_env_from_slurm

log = get_logger("megaclm.train")

DESCRIPTION = ("Pretrain a GPT-family model with DeepSpeed (ZeRO 0-3, tensor/sequence/pipeline parallel). "
               "Launch with `deepspeed --num_gpus N pretrain_gpt.py ...`, torchrun, or srun.")


def _model_vocab(cfg: MegaclmConfig, start: Start, tag: str | None, tokenizer_vocab: int,
                 padded: int) -> tuple[int, str]:
    """The embedding size to build: the loaded checkpoint `tag`'s (an HF --pretrained-checkpoint's, padded for the
    run), else the padded tokenizer's."""
    if start.hf is not None:
        vocab, source = hf_padded_vocab(cfg, start), start.flag()
    elif tag is not None:
        vocab, source = read_meta(start.dir, tag)["padded_vocab_size"], f"{start.flag()}/{tag}"
    else:
        return padded, "the tokenizer, padded"
    check_vocab(tokenizer_vocab, vocab, source, cfg.parallel.tensor_model_parallel_size)
    return vocab, source


def _tokenizer_text(t: Any) -> str:
    """e.g. "--tokenizer-type GPT2BPETokenizer --vocab-file v.json", for messages."""
    files = [f"--{k.replace('_', '-')} {getattr(t, k)}" for k in ("tokenizer_model", "vocab_file")
             if getattr(t, k, None)]
    return " ".join([f"--tokenizer-type {t.tokenizer_type}", *files])


def _checks_on(cfg: MegaclmConfig, derived: Derived, start: Start, tag: str | None, tokenizer: Any,
               fingerprint: dict) -> tuple[int, str, Any]:
    """Everything checked against the checkpoint `tag` of `start.dir` a run loads (None: none): (model vocabulary,
    where it comes from, resolve_lora_base's answer or None without LoRA). Run once in `main` and again if the tag
    changes."""
    model_vocab, vocab_source = _model_vocab(cfg, start, tag, tokenizer.vocab_size, derived.padded_vocab_size)
    lora = (resolve_lora_base(start.dir, tag, start.weights_only, cfg.to_dict()["lora"]) if cfg.lora.enabled
            else None)
    resumed = None if start.weights_only else tag
    _check_data(cfg, resumed, fingerprint)
    _check_batch_change(cfg, derived, resumed)
    return model_vocab, vocab_source, lora


def features(cfg: MegaclmConfig, lora: tuple[dict, bool] | None) -> list[str]:
    """One line per optional training feature and whether it is on (printed by --validate-only)."""
    l, k = cfg.lora, cfg.kernels
    lines = ["lora: off" if lora is None else
             f"lora: rank {l.lora_rank}, alpha {l.lora_alpha:g}, dropout {l.lora_dropout:g} on {l.lora_target}; base "
             f"frozen from {lora[0]['dir']}/{lora[0]['tag']}" + ("; adapters resumed from --load" if lora[1] else "")
             + (f"; base quantized to {l.base_quantization}" if l.quantized else "")]
    lines.append(f"torch_compile: {'on (each transformer block)' if k.torch_compile else 'off'}; "
                 f"kernels: {k.op_backend}")
    p = cfg.precision
    lines.append("fp8: off" if p.fp8_format is None else
                 f"fp8: {p.fp8_format} format, {p.fp8_recipe} scaling (torchao.float8) on the transformer blocks' "
                 "linears")
    lines.append(f"gradient reduction: {grad_reduction(cfg)}")
    return lines


def grad_reduction(cfg: MegaclmConfig) -> str:
    """When the data-parallel gradient reduction runs, and whether it overlaps the backward."""
    z = cfg.zero
    if z.zero_stage == 3:
        return "reduce-scatter during each micro-batch's backward, overlapped (ZeRO-3's overlap_comm)"
    if overlaps_grad_reduce(cfg):
        when = "each micro-batch's backward" if z.zero_stage == 2 else "the last micro-batch's backward"
        return f"bucket by bucket during {when}, overlapped (--overlap-grad-reduce: DeepSpeed overlap_comm)"
    waited = {0: "all-reduce after the last micro-batch's backward", 1: "after the last micro-batch's backward",
              2: "during each micro-batch's backward"}[z.zero_stage] + ", waited for"
    if z.overlap_grad_reduce:
        return (f"{waited}: --overlap-grad-reduce has no effect with pipeline parallelism (DeepSpeed's pipeline "
                "engine turns overlap_comm off)")
    return waited + ("" if z.zero_stage == 0 else " (--overlap-grad-reduce overlaps it)")


def derive(cfg: MegaclmConfig, derived: Derived, vocab_size: int) -> Derived:
    """parse_args's `derived` (the layout, checked there) completed with the tokenizer's vocabulary; with
    --train-tokens the step count follows the sequence-length warmup, with --train-epochs the size of the training
    data (read from the .idx files: every run logs its epoch)."""
    split = train_split(cfg.data)
    tokens_iters = None
    if cfg.training.train_tokens is not None:  # a sequence-length warmup makes early steps shorter
        tokens_iters = Curriculum.from_config(cfg.data, derived.global_batch_size).first_step_after_tokens(
            cfg.training.train_tokens)
    derived = with_inputs(derived, cfg, vocab_size, None if split is None else split.samples_per_epoch, tokens_iters)
    if cfg.training.train_epochs is not None:  # the lr lengths against the run's, now known (parse_args could not)
        validate(cfg, derived)
    return derived


def _check_data(cfg: MegaclmConfig, tag: str | None, fingerprint: dict) -> None:
    """Refuse to resume (from `tag`; None: a fresh start or a weights-only load) on data that differs from the
    checkpoint's (unless --override-data-fingerprint)."""
    if tag is None:
        return
    saved = read_meta(cfg.checkpoint.load, tag).get("data_fingerprint")
    if cfg.checkpoint.override_data_fingerprint:
        log.warning(f"--override-data-fingerprint: not comparing the data with {cfg.checkpoint.load}/{tag}'s")
        return
    check_fingerprint(saved, fingerprint, f"--load {cfg.checkpoint.load}/{tag}")


def _check_batch_change(cfg: MegaclmConfig, derived: Derived, tag: str | None) -> None:
    """Resuming (from `tag`; None: a fresh start or a weights-only load) with another --global-batch-size: say what
    continues, or refuse (megaclm.training.batch_change)."""
    if tag is None:
        return
    meta = read_meta(cfg.checkpoint.load, tag)
    if meta.get("hf_model_type") is not None and "client" not in meta:
        return  # an HF import: weights only, training starts at iteration 0
    saved = saved_global_batch(read_config(cfg.checkpoint.load, tag), meta)
    note = check_batch_change(cfg, derived, saved, meta.get("iteration", 0), f"--load {cfg.checkpoint.load}/{tag}")
    if note and os.environ.get("RANK", "0") == "0":
        log.info(note)


def layout_line(cfg: MegaclmConfig, derived: Derived) -> str:
    """e.g. "world 8 = tp 2 x ulysses 2 x dp 2 x pp 1 (rank order: tp fastest, then ulysses, dp, pp); each rank
    holds 8192 of 32768 tokens per sample (contiguous)"."""
    p = cfg.parallel
    kind = "ulysses" if p.ds_sequence_parallel_size > 1 else "cp" if p.context_parallel_size > 1 else None
    axes = [("tp", derived.tensor_model_parallel_size)] + ([(kind, derived.seq_split_size)] if kind else []) + [
        ("dp", derived.data_parallel_size), ("pp", derived.pipeline_model_parallel_size)]
    line = (f"world {derived.world_size} = {' x '.join(f'{a} {n}' for a, n in axes)} (rank order: tp fastest, then "
            f"{', '.join(a for a, _ in axes[1:])})")
    if kind:
        how = ("contiguous; DeepSpeed-Ulysses all-to-all of heads <-> sequence in attention" if kind == "ulysses"
               else "2 load-balanced chunks i, 2N-1-i; ring attention")
        line += (f"; each rank holds {derived.seq_length // derived.seq_split_size} of {derived.seq_length} tokens "
                 f"per sample ({how})")
    return line


def _summary(cfg: MegaclmConfig, derived: Derived, model_vocab: int, ds_config: dict,
             lora: tuple[dict, bool] | None = None, reference_ops: bool = False) -> str:
    params = count_parameters(cfg.model, model_vocab)
    setup = MemorySetup(seq_length=cfg.data.seq_length, micro_batch_size=derived.micro_batch_size,
                        tensor_parallel=derived.tensor_model_parallel_size,
                        pipeline_parallel=derived.pipeline_model_parallel_size,
                        data_parallel=derived.data_parallel_size, zero_stage=cfg.zero.zero_stage,
                        precision=cfg.precision.name, sequence_parallel=cfg.parallel.sequence_parallel,
                        grad_accum_steps=derived.grad_accum_steps, offload_optimizer=cfg.zero.offload_optimizer,
                        offload_param=cfg.zero.offload_param, overlap_grad_reduce=cfg.zero.overlap_grad_reduce,
                        flash_attention=cfg.kernels.attention_backend in ("sdpa", "flash"), reference_ops=reference_ops,
                        lora_rank=cfg.lora.lora_rank, lora_targets=cfg.lora.target_names,
                        base_quantization=cfg.lora.base_quantization,
                        seq_split=derived.seq_split_size, ring=cfg.parallel.context_parallel_size > 1,
                        expert_parallel=cfg.parallel.expert_model_parallel_size)
    memory = estimate_memory(cfg.model, model_vocab, setup)
    lines = ["# resolved config", arguments.dump_yaml(cfg.to_dict()).rstrip(), "", "# derived"]
    lines += [f"{k}: {v}" for k, v in derived.to_dict().items()]
    lines += [f"model_vocab_size: {model_vocab}", f"parameters: {params.total:,}"]
    m = cfg.model
    if m.num_experts is not None:
        lines += [f"moe: {m.num_moe_layers} of {m.num_layers} layers, {m.num_experts} experts of {m.moe_ffn_size}, "
                  f"top-{m.moe_router_topk} ({'softmax then top-k' if m.moe_router_pre_softmax else 'top-k then softmax'}"
                  f"), capacity {m.moe_expert_capacity_factor or 'dropless'}, shared expert "
                  f"{m.moe_shared_expert_intermediate_size or 'none'}, aux loss {m.moe_aux_loss_coeff}, z-loss "
                  f"{m.moe_z_loss_coeff}, expert parallel {cfg.parallel.expert_model_parallel_size}",
                  f"expert_parameters: {params.experts:,}", f"active_parameters_per_token: {params.active:,}"]
    if cfg.lora.enabled:
        adapters = cfg.model.num_layers * lora_layer_parameters(cfg.model, cfg.lora.lora_rank, cfg.lora.target_names)
        lines.append(f"trainable parameters: {adapters:,} LoRA adapters ({100 * adapters / params.total:.2f}%)")
    lines += [f"flops_per_token: {flops_per_token(cfg.model, model_vocab, cfg.data.seq_length):.4g}",
              "", "# layout", layout_line(cfg, derived)]
    if derived.seq_split_size > 1:
        lines.append(seq_split_summary(cfg.model, setup))
    lines += ["", "# features", *features(cfg, lora),
              "", f"# memory per GPU (megaclm.model.flops.estimate_memory; tools/estimate_memory.py), "
              f"{KERNELS_ASSUMED[reference_ops]}",
              memory.table(), "", "# deepspeed config", json.dumps(ds_config, indent=1)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    adopted = rank_env_from_slurm()  # srun without a launcher (MODE=deepspeed): before anything reads RANK
    if adopted and os.environ["RANK"] == "0":
        log.info(adopted)
    choices: dict[tuple[str, int | None], Choice] = {}

    def choose(load: str, ckpt_step: int | None) -> Choice:
        """The one resolution of which checkpoint this run loads, shared by every caller."""
        if (load, ckpt_step) not in choices:
            choices[load, ckpt_step] = choose_tag(load, ckpt_step)
        return choices[load, ckpt_step]

    cfg, derived, args = parse_args(argv, prog="pretrain_gpt.py", description=DESCRIPTION,
                              stored_config=lambda load, step: read_config(load, choose(load, step).tag))
    _quiet(cfg.logging.verbose)
    c = cfg.checkpoint
    choice = choose(c.load, c.ckpt_step) if c.load is not None else Choice(None)
    if choice.tag is None and c.exit_on_missing_checkpoint:
        raise UserError(f"--load {c.load}: no checkpoint there and --exit-on-missing-checkpoint is set; pass the "
                        "directory a run saved into, or drop the flag to start from scratch")
    start = resolve_start(cfg, choice, choose)
    tokenizer = build_tokenizer_from_config(cfg.tokenizer, cfg.parallel.tensor_model_parallel_size)
    derived = derive(cfg, derived, model_vocab_size(cfg.tokenizer, tokenizer))
    fingerprint = data_fingerprint(cfg.data, cfg.training.seed)
    model_vocab, vocab_source, lora = _checks_on(cfg, derived, start, start.choice.tag, tokenizer, fingerprint)
    check_token_ids(cfg.data, tokenizer.vocab_size, model_vocab, _tokenizer_text(cfg.tokenizer), vocab_source)
    ds_config = deepspeed_config(cfg, derived, cuda=torch.cuda.is_available())
    if cfg.zero.overlap_grad_reduce and not overlaps_grad_reduce(cfg) and os.environ.get("RANK", "0") == "0":
        log.info(f"gradient reduction: {grad_reduction(cfg)}")
    if cfg.training.deepspeed_config:
        ds_config = load_user_config(cfg.training.deepspeed_config, ds_config)
    callbacks = load_callbacks(cfg.training.callbacks)  # a bad --callbacks fails here, before any process group
    if args.validate_only:
        print(_summary(cfg, derived, model_vocab, ds_config, lora, reference_ops=args.estimate_for == "cpu"),
              flush=True)
        return 0
    try:
        return _run(cfg, derived, ds_config, tokenizer, model_vocab, vocab_source, lora, fingerprint, start, callbacks)
    finally:
        # The run is over (finished, stopped or failed): a stop request has nothing left to stop. Once the
        # first rank has exited, srun --kill-on-bad-exit sends SIGTERM to the others, which must not turn
        # their exit status (76, 75, 1) into 143; Python's handlers are gone during interpreter shutdown.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        if dist.is_initialized():
            dist.destroy_process_group()
        shm_buffers.remove_mapped()  # DeepSpeed's 66 MiB /dev/shm files of this run (megaclm.utils.shm_buffers)


def _quiet(verbose: bool) -> None:
    """Library lines that alarm without cause hidden, megaclm's INFO from rank 0 (megaclm.logging.quiet)."""
    if verbose:
        quiet.show_all()
    else:
        quiet.hide_known_noise()
        quiet.info_from_rank_zero(int(os.environ.get("RANK", "0")))


def set_thread_count() -> None:
    """Honour OMP_NUM_THREADS: a fixed thread count keeps LayerNorm grads (and so exact resume) stable."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            raise UserError(f"OMP_NUM_THREADS={threads!r} must be a positive integer; set it or unset it")
        torch.set_num_threads(int(threads))


def _run(cfg: MegaclmConfig, derived: Derived, ds_config: dict, tokenizer: Any, model_vocab: int, vocab_source: str,
         lora: tuple[dict, bool] | None, fingerprint: dict, start: Start, callbacks: list) -> int:
    """`lora`: resolve_lora_base's (base checkpoint, --load holds adapters), None without LoRA; `start`: what the
    run loads (an HF --pretrained-checkpoint is imported here; the checksums are verified here, by all ranks)."""
    if cfg.precision.fp16 and not torch.cuda.is_available():
        raise UserError("precision.fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); use --bf16 on CPU")
    check_fp8(cfg.precision.fp8_format)
    if cfg.logging.profile and not cfg.logging.use_pytorch_profiler and not torch.cuda.is_available():
        raise UserError("logging.profile without --use-pytorch-profiler marks the steps for Nsight Systems, which "
                        "needs a GPU; add --use-pytorch-profiler for a torch.profiler trace")
    set_thread_count()
    pstate = init_distributed(cfg)
    # Rank 0 takes the --save lock before anything writes there; every rank follows its decision.
    lock = refusal = None
    if pstate.rank == 0 and cfg.checkpoint.save is not None:
        try:
            lock = SaveDirLock.acquire(cfg.checkpoint.save)
        except UserError as e:
            refusal = e
    try:
        if refusal is None:
            refusal = import_pretrained(cfg, start, pstate.rank)
        if _any_rank(refusal is not None):
            if refusal is not None:
                raise refusal
            return exitcodes.BAD_INPUT  # rank 0 names the holder, in one line
        if _stopped_at_start_up(pstate):
            return exitcodes.STOPPED
        c = cfg.checkpoint
        if start.dir is not None:
            step = c.ckpt_step if start.dir == c.load else None
            verified = verify_checksums(start.dir, start.choice, step, c.verify_checkpoint_checksums)
            if verified.tag != start.choice.tag:  # fell back: the older tag must fit what was built from the newer one
                vocab, vocab_source, lora = _checks_on(cfg, derived, start, verified.tag, tokenizer, fingerprint)
                if vocab != model_vocab:
                    raise UserError(f"{start.flag()}: the fallback checkpoint {verified.tag} has a vocabulary of "
                                    f"{vocab}, not {model_vocab} as {start.choice.tag}; pass --ckpt-step to choose "
                                    "the checkpoint")
            start = start._replace(choice=verified)
        return _train(cfg, derived, ds_config, tokenizer, model_vocab, vocab_source, lora, fingerprint, pstate,
                      start, callbacks)
    finally:
        if lock is not None:
            lock.release()


def _any_rank(flag: bool) -> bool:
    value = torch.tensor([float(flag)], device=rank_device())
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _stopped_at_start_up(pstate: ParallelState) -> bool:
    """A stop request (megaclm.utils.signals) before the first step: nothing trained since the loaded checkpoint,
    so nothing to save; agreed by all ranks."""
    reason = stop_agreed(rank_device())
    if reason is not None and pstate.rank == 0:
        log.info(f"stopping during start-up ({reason}), before the first step: nothing new to save; exit status "
                 f"{exitcodes.STOPPED}")
    return reason is not None


def _train(cfg: MegaclmConfig, derived: Derived, ds_config: dict, tokenizer: Any, model_vocab: int, vocab_source: str,
           lora: tuple[dict, bool] | None, fingerprint: dict, pstate: ParallelState, start: Start,
           callbacks: list) -> int:
    """Build the parts, load --load's checkpoint (the engine here; the client state and RNG states through the
    trainer's Checkpointer.restore, the path a rollback takes too), train."""
    c = cfg.checkpoint
    if pstate.rank == 0:
        log.info(f"{layout_line(cfg, derived)}; "
                 f"global batch {derived.global_batch_size} = micro {derived.micro_batch_size} x dp x "
                 f"{derived.grad_accum_steps} accumulation steps; vocab {tokenizer.vocab_size} -> {model_vocab} "
                 f"({vocab_source}); {count_parameters(cfg.model, model_vocab).total:,} parameters"
                 + (f", ep {pstate.ep_size}" if cfg.model.num_experts is not None else ""))
    model = build_model(cfg, model_vocab, pstate, ds_config)
    engine = build_engine(cfg, model, pstate, ds_config)
    state = None
    lora_base, adapters = lora if lora is not None else (None, False)
    if lora_base is not None:  # the frozen base first; then the adapters, if --load is a LoRA checkpoint
        load_weights(engine, lora_base["dir"], lora_base["tag"], select=lambda key: not is_lora_key(key))
        if pstate.rank == 0:
            log.info(f"LoRA: frozen base from {lora_base['dir']}/{lora_base['tag']}")
        if cfg.lora.quantized:  # QLoRA: each rank's shard of the loaded base, before any adapter is loaded
            quantize.apply_to(engine.module, cfg.lora.base_quantization, log.info if pstate.rank == 0 else None)
    if start.dir is not None and (lora_base is None or adapters):
        state = load_engine(engine, pstate, cfg.zero.zero_stage, start.dir, start.choice.tag,
                            finetune=start.weights_only, load_optim=not c.no_load_optim, load_rng=not c.no_load_rng,
                            adapters=adapters)
        remove_import(cfg, start, pstate.rank)
    progress = Progress()
    data = build_batch_source(cfg, derived, tokenizer.eod, pstate, resumed=state)
    passes = data.passes_line(derived.train_iters * derived.global_batch_size)
    if passes is not None and pstate.rank == 0:
        log.info(passes)
    schedule = build_schedule(cfg.optimizer, cfg.scheduler, derived.train_iters, derived.tokens_per_step,
                              cfg.training.train_tokens, derived.global_batch_size)
    writer = pstate.is_last_stage and pstate.tp_rank == 0 and pstate.dp_rank == 0 and pstate.cp_rank == 0
    metrics_file = cfg.logging.metrics_file or (os.path.join(c.save, "metrics.jsonl") if c.save else None)
    metrics = MetricsLogger(cfg.logging, writer=writer, metrics_file=metrics_file, total_iters=derived.train_iters,
                            start_iter=0 if state is None else state["progress"]["iteration"], run_config=cfg.to_dict(),
                            default_wandb_dir=os.path.join(c.save, "wandb") if c.save else None)
    meta = {"tensor_model_parallel_size": pstate.tp_size, "pipeline_model_parallel_size": pstate.pp_size,
            "data_parallel_size": pstate.dp_size, "expert_model_parallel_size": pstate.ep_size,
            "world_size": pstate.world_size,
            "padded_vocab_size": model_vocab, "tokenizer_vocab_size": tokenizer.vocab_size,
            "zero_stage": cfg.zero.zero_stage, "precision": cfg.precision.name,
            "data_fingerprint": fingerprint}
    if lora_base is not None:
        meta["lora_base"] = lora_base
    peak = cfg.logging.peak_tflops or detect_peak_tflops(cfg.precision.name)
    trainer = Trainer(cfg, derived, engine, pstate, data, schedule, metrics, progress,
                      flops_per_token=lambda seq: flops_per_token(cfg.model, model_vocab, seq),
                      peak_tflops=peak, checkpoint_meta=meta, callbacks=callbacks)
    trainer.checkpointer.restore(state)  # last: dataset building above may draw random numbers
    if state is not None and c.save is not None and os.path.realpath(c.save) == os.path.realpath(start.dir):
        # Resumed from --save itself: this iteration's checkpoint is there, complete. Saving it again (a run
        # stopped during its final evaluation, requeued) would first unmark the very checkpoint `latest` names.
        trainer.checkpointer.last_saved = progress.iteration
    if _stopped_at_start_up(pstate):
        metrics.close()
        return exitcodes.STOPPED
    started, status = (progress.iteration, progress.consumed_tokens), "failed"
    try:
        reason = trainer.train()
        status = (f"stopped ({reason})" if reason != "finished" else
                  "failed (its last steps, a streak of bad steps, were not saved)" if trainer.checkpointer.end_unsaved else reason)
    except TrainingDiverged as e:
        log.error(str(e))
        return exitcodes.FAILED
    except CheckpointSaveError as e:  # every rank raises it; one line is enough
        if pstate.rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return exitcodes.FAILED
    finally:
        metrics.close()
        end_of_run(status, metrics, progress, started, time.time() - trainer.start_time, c.save)
    if trainer.checkpointer.end_unsaved and reason == "finished":
        log.error(f"training ended at iteration {progress.iteration} in a streak of bad steps, which were not saved; "
                  f"the last healthy checkpoint is {trainer.checkpointer.last_healthy()}")
        return exitcodes.FAILED
    if reason != "finished":  # saved and stopped early: a batch script requeues on this status
        if pstate.rank == 0:
            log.info(f"stopped at iteration {progress.iteration} ({reason}), not finished; exit status "
                     f"{exitcodes.STOPPED}")
        return exitcodes.STOPPED
    if pstate.rank == 0:
        log.info(f"done at iteration {progress.iteration} ({reason})")
    return exitcodes.FINISHED
