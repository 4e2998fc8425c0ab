"""Save and load training checkpoints on DeepSpeed, by explicit tag, with megaclm's own `latest`.

Collective: every rank calls `save_checkpoint` / `load_checkpoint` (layout: megaclm.checkpoint).
Order of a save, so that a crash at any point leaves the previous checkpoint loadable:
    1. rank 0 removes the directories of saves that never finished (no meta.json), a stale
       `megaclm/meta.json` + manifest of the same tag (a save of this tag that died), and the work folders
       that killed conversions left in complete tags (megaclm.checkpoint.from_deepspeed)
    2. DeepSpeed writes model/optimizer files under <save>/<tag> (save_latest=False: no `latest`), through
       megaclm's checkpoint engine: atomically, each file checksummed as it is written
    3. each rank writes its RNG file; with `layout_independent` (every --save-layout-independent-interval
       saves) dp-rank 0 of each (tp, pp) also its fp32 model shard and its full Adam moments
       (megaclm.checkpoint.universal), gathered over the data-parallel ranks; atomically, checksummed
    4. the ranks agree that every write succeeded (else the save fails on all of them in one line and its
       partial directory is removed: megaclm.checkpoint.save_errors); rank 0 gathers every rank's (file,
       size, checksum) and writes config.json, the manifest, meta.json, then `latest` (atomic renames)
    5. rank 0 prunes old tags (--save-total-limit), never `latest`'s nor `best`'s
Without `layout_independent` a save writes DeepSpeed's files and megaclm's small ones only (about half the
bytes, no gather); the layout-independent files are made from DeepSpeed's when something needs them
(megaclm.checkpoint.from_deepspeed: a load into another layout, reshard.py, the offline readers).
With `--async-save` steps 2-3 write CPU copies in a background thread and step 4's barrier is the
ranks' agreement that every thread finished (megaclm.checkpoint.async_save).
`latest` therefore only ever names a tag whose meta.json exists, and a tag without meta.json is
incomplete. Loading verifies the tag against its manifest first (`verify_checksums`: sizes always,
checksums spread over the ranks unless --no-verify-checkpoint-checksums) and falls back to the
previous intact tag (megaclm.checkpoint.manifest.choose_tag).

LoRA (meta.json has "lora_base": {"dir", "tag"}): DeepSpeed's files and megaclm's shards hold the
trainable adapters only (`exclude_frozen_parameters`); the frozen base is read from the named base
checkpoint on every load (`resolve_lora_base`, then `load_weights(..., select=not is_lora_key)`). Loading always passes the tag to DeepSpeed (an untagged load silently takes an older
`latest` of DeepSpeed's own).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

import torch
import torch.distributed as dist

from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from megaclm.checkpoint.async_save import AsyncCheckpointWriter, capture_deepspeed_files, cpu_copy, write_files
from megaclm.checkpoint.from_deepspeed import PARAM_NAMES_KEY, optimizer_param_names, remove_stale_conversions
from megaclm.checkpoint.layout import (BEST, CLIENT_KEY, CONFIG, LATEST, MANIFEST, META, OWN, is_complete,
                                      iteration_of, read_best, read_config, read_latest, read_meta, rng_file, tag_for,
                                      tags_on_disk)
from megaclm.checkpoint.manifest import (Choice, check_checksums, choose_tag, read_file, read_manifest,
                                         share_of, write_manifest)
from megaclm.checkpoint.rng import get_rng_state, set_rng_state
from megaclm.checkpoint.save_errors import agree_saved, describe, recorded_write_errors
from megaclm.checkpoint.shards import model_shard_file
from megaclm.checkpoint.universal import load_resharded, optimizer_shard_file
from megaclm.checkpoint.weights import load_weights
from megaclm.logging import get_logger
from megaclm.model.lora import is_lora_key
from megaclm.parallel.state import ParallelState
from megaclm.utils.errors import UserError
from megaclm.utils.fileio import atomic_write, remove_quietly

log = get_logger("megaclm.checkpoint")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_text(path: str, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def save_checkpoint(engine: Any, save_dir: str, iteration: int, client_state: dict, *, pstate: ParallelState,
                    config_tree: dict, meta: dict, total_limit: int | None = None,
                    writer: AsyncCheckpointWriter | None = None, on_complete: Callable[[], None] | None = None,
                    files_written: Callable[[], None] | None = None, layout_independent: bool = False) -> str:
    """Save everything for `iteration` under `<save_dir>/iter_XXXXXXX`; returns the tag.

    `layout_independent`: also gather and write megaclm's fp32 model shards and full Adam moments (step 3).

    With `writer` the files are written in the background (megaclm.checkpoint.async_save) and
    steps 3-5 happen when the writer finishes; `on_complete` runs on rank 0 after `latest` moved;
    `files_written` runs on every rank once its files are written, before the checkpoint is complete (with
    `writer`: in its thread)."""
    tag = tag_for(iteration)
    ckpt = os.path.join(save_dir, tag)
    if _rank() == 0:
        remove_partial_tags(save_dir)
        os.makedirs(os.path.join(ckpt, OWN), exist_ok=True)
        remove_quietly(os.path.join(ckpt, META), os.path.join(ckpt, MANIFEST))
    _barrier()
    # Each model-parallel rank's file of DeepSpeed's holds its own copy of the client state: its tp/pp ranks and
    # (ZeRO-0, whose optimizer files do not name them) the parameters its optimizer steps, group by group, are
    # what megaclm.checkpoint.from_deepspeed needs to read DeepSpeed's files.
    client_state = {CLIENT_KEY: client_state, PARAM_NAMES_KEY: optimizer_param_names(engine)}
    adapters_only = "lora_base" in meta  # LoRA: the adapters, not the frozen base the checkpoint refers to
    rng = (os.path.join(ckpt, rng_file(_rank())), get_rng_state())
    own = os.path.join(ckpt, OWN)

    def finalize(entries: dict[str, dict]) -> None:  # collective
        gathered = [None] * dist.get_world_size() if dist.is_initialized() and _rank() == 0 else None
        if dist.is_initialized():
            dist.gather_object(entries, gathered, dst=0)
        if _rank() == 0:
            every = {os.path.relpath(path, ckpt): entry for part in gathered or [entries] for path, entry in part.items()}
            _complete(save_dir, tag, config_tree, {**meta, "tag": tag, "iteration": iteration}, every, total_limit)
            if on_complete is not None:
                on_complete()

    if writer is not None:
        files = capture_deepspeed_files(engine, save_dir, tag, client_state, writer.staging,
                                        exclude_frozen_parameters=adapters_only) + [rng]
        shards = ((model_shard_file(engine.module, own, pstate, trainable_only=adapters_only),
                   optimizer_shard_file(engine, own, pstate)) if layout_independent else ())
        for shard, key in zip(shards, ("model_shard", "optimizer_shard")):
            if shard is not None:  # its tensors may be the live parameters / optimizer states
                files.append((shard[0], cpu_copy(shard[1], writer.staging, key)))
        writer.submit(tag, files, finalize, after_write=files_written, save_dir=save_dir)
        return tag
    # A failed write (a full disk) is recorded, not raised, so that every rank reaches DeepSpeed's barriers and
    # agree_saved, which fails the save on all ranks in one line (megaclm.checkpoint.save_errors).
    with recorded_write_errors(engine) as atomic:
        engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=adapters_only)
    error, entries = atomic.error, dict(atomic.entries)
    shards = ((model_shard_file(engine.module, own, pstate, trainable_only=adapters_only),
               optimizer_shard_file(engine, own, pstate)) if layout_independent else ())
    if error is None:
        try:
            entries.update(write_files([rng] + [f for f in shards if f is not None]))
        except OSError as e:
            error = describe(e)
    if files_written is not None:
        files_written()
    agree_saved(error, save_dir, tag)
    try:
        finalize(entries)  # gathers every rank's entries, then rank 0 writes config.json, the manifest, meta.json
    except OSError as e:  # rank 0's config.json, manifest, meta.json, `latest`
        error = describe(e)
    agree_saved(error, save_dir, tag)
    return tag


def _complete(save_dir: str, tag: str, config_tree: dict, meta: dict, entries: dict[str, dict],
              total_limit: int | None) -> None:
    """Rank 0, once every rank's files are written: config.json, the manifest, meta.json, then `latest`; prune."""
    ckpt = os.path.join(save_dir, tag)
    _write_text(os.path.join(ckpt, CONFIG), json.dumps(config_tree, indent=1))
    meta_text = json.dumps(meta, indent=1)
    write_manifest(ckpt, entries, {META: meta_text.encode()})
    _write_text(os.path.join(ckpt, META), meta_text)
    _write_text(os.path.join(save_dir, LATEST), tag)
    if total_limit is not None:
        prune(save_dir, total_limit)
    log.info(f"saved checkpoint {ckpt}")


def mark_best(save_dir: str, tag: str, val_loss: float) -> None:
    """Record `tag` as the best checkpoint so far (rank 0; atomic)."""
    if _rank() == 0:
        _write_text(os.path.join(save_dir, BEST), json.dumps({"tag": tag, "val_loss": val_loss}))


def remove_partial_tags(save_dir: str) -> list[str]:
    """Rank 0, at the start of a save: delete the tags whose save never finished (no meta.json), except the
    one `latest` names (never expected; left for a person to look at), and the work folders of conversions that
    were killed (megaclm.checkpoint.from_deepspeed.remove_stale_conversions). Only a save calls it: the run holds
    --save by then, and an asynchronous save in flight has been waited for."""
    latest = read_latest(save_dir)
    doomed = [t for t in tags_on_disk(save_dir) if not is_complete(save_dir, t) and t != latest]
    for t in doomed:
        shutil.rmtree(os.path.join(save_dir, t), ignore_errors=True)
    if doomed:
        log.info(f"removed {', '.join(doomed)} from {save_dir}: saves that did not finish (no {META})")
    for t in tags_on_disk(save_dir):  # and what killed conversions of the complete ones left behind
        if stale := remove_stale_conversions(os.path.join(save_dir, t, OWN)):
            log.info(f"removed {', '.join(stale)} from {os.path.join(save_dir, t, OWN)}: conversions that did not "
                     "finish")
    return doomed


def prune(save_dir: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete tags; the `latest` and `best` ones always stay."""
    tags = sorted((t for t in tags_on_disk(save_dir) if is_complete(save_dir, t)), key=iteration_of)
    kept = set(tags[-keep:]) | {read_latest(save_dir), (read_best(save_dir) or {}).get("tag")}
    doomed = [t for t in tags if t not in kept]
    for t in doomed:
        shutil.rmtree(os.path.join(save_dir, t), ignore_errors=True)
    if doomed:
        log.info(f"--save-total-limit {keep}: removed {', '.join(doomed)}")
    return doomed


def resolve_lora_base(load_dir: str | None, tag: str | None, finetune: bool, lora: dict) -> tuple[dict, bool]:
    """LoRA run: ({"dir", "tag"} of the checkpoint with the frozen base, whether --load is a LoRA checkpoint).

    --load is either a full checkpoint (the base itself; --finetune: the adapters start fresh) or a LoRA
    run's checkpoint (`tag`: the one this run loads, choose_tag's), whose base it names and whose adapter
    settings (`lora`: the lora config section) must be this run's."""
    if tag is None:
        raise UserError(f"--lora-rank {lora['lora_rank']} needs --load BASE: a megaclm checkpoint (pretrain_gpt.py "
                        f"--save, or tools/checkpoint/convert_hf.py import) whose frozen weights the adapters train "
                        f"on; --load {load_dir} holds none")
    base = read_meta(load_dir, tag).get("lora_base")
    if base is None:
        if not finetune:
            raise UserError(f"--load {load_dir}/{tag} is a full checkpoint; add --finetune to train LoRA adapters on "
                            "it as the frozen base (a LoRA run's own checkpoints resume without --finetune)")
        return {"dir": os.path.abspath(load_dir), "tag": tag}, False
    saved = (read_config(load_dir, tag) or {}).get("lora", {})
    differ = [f"--{k.replace('_', '-')} {lora[k]!r} (checkpoint: {saved.get(k)!r})"
              for k in ("lora_rank", "lora_alpha", "lora_target") if saved.get(k) != lora[k]]
    if differ:
        raise UserError(f"--load {load_dir}/{tag} holds adapters of other LoRA settings: {', '.join(differ)}; "
                        "pass the checkpoint's")
    if not is_complete(base["dir"], base["tag"]):
        raise UserError(f"--load {load_dir}/{tag} is a LoRA checkpoint whose base {base['dir']}/{base['tag']} is "
                        "missing or incomplete; restore the base checkpoint at that path")
    return base, True


LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size", "zero_stage",
               "expert_model_parallel_size")


def run_layout(pstate: ParallelState, zero_stage: int) -> tuple[int, ...]:
    """The layout a run saves and loads DeepSpeed's own files in, as `LAYOUT_KEYS` of meta.json."""
    return pstate.tp_size, pstate.pp_size, pstate.dp_size, zero_stage, pstate.ep_size


def saved_layout(load_dir: str, tag: str, meta: dict) -> tuple[int | None, ...]:
    """The layout (`LAYOUT_KEYS`) checkpoint `tag` was saved in. Without an EP size it was written before experts
    were sharded: a dense one is EP 1 (DeepSpeed's files load as ever); an MoE one has no per-expert DeepSpeed
    files, so its EP is None, which no run's layout equals: it loads from megaclm's files (converted on reading)."""
    legacy_moe = ("expert_model_parallel_size" not in meta and os.path.isfile(os.path.join(load_dir, tag, CONFIG))
                  and read_config(load_dir, tag).get("model", {}).get("num_experts") is not None)
    return tuple(meta.get(k, None if legacy_moe else 1) if k == "expert_model_parallel_size" else meta.get(k)
                 for k in LAYOUT_KEYS)


def _layout_text(layout: tuple[int, ...], other: tuple[int, ...]) -> str:
    """e.g. "TP x PP x DP = 2 x 1 x 1, ZeRO-1", with ", EP 2" when either layout splits experts (None: an
    older MoE checkpoint, whose experts were whole on every rank)."""
    text = f"TP x PP x DP = {layout[0]} x {layout[1]} x {layout[2]}, ZeRO-{layout[3]}"
    return text + (f", EP {layout[4] or 1}" if max(layout[4] or 1, other[4] or 1) > 1 else "")


def resolve_load(load_dir: str, ckpt_step: int | None, exit_on_missing: bool = False) -> Choice:
    """The checkpoint a run loads from --load (megaclm.checkpoint.manifest.choose_tag: names and sizes, no
    process group needed); tag None: a fresh start."""
    choice = choose_tag(load_dir, ckpt_step)
    if choice.tag is None and exit_on_missing:
        raise UserError(f"--load {load_dir}: no checkpoint there (no `latest`) and --exit-on-missing-checkpoint "
                        "is set; pass the directory a run saved into, or drop the flag to start from scratch")
    return choice


def verify_checksums(load_dir: str, choice: Choice, ckpt_step: int | None, checksums: bool = True) -> Choice:
    """Collective: compare the chosen tag's files with its manifest's checksums, each rank a share of the
    files; a mismatch rejects the tag and asks `choose_tag` for the next intact one (a pinned --ckpt-step is
    refused). Logs the outcome on rank 0 (loudly when it fell back); returns the final choice."""
    while checksums and choice.tag is not None:
        ckpt = os.path.join(load_dir, choice.tag)
        entries = read_manifest(ckpt)
        if entries is None:
            break
        world = dist.get_world_size() if dist.is_initialized() else 1
        mine = check_checksums(ckpt, share_of(entries, _rank(), world), entries)
        problems = [mine]
        if dist.is_initialized():
            problems = [None] * world
            dist.all_gather_object(problems, mine)
        problem = next((p for p in problems if p is not None), None)
        if problem is None:
            break
        choice = choose_tag(load_dir, ckpt_step, {**choice.rejected, choice.tag: problem})
    if _rank() == 0:
        for level, line in choice.report(load_dir):
            getattr(log, level)(line)
    return choice


class _NamingCheckpointEngine(CheckpointEngine):
    """DeepSpeed's reads through its own engine, with the file named when one fails (torch's errors, such as
    "failed finding central directory", do not name it)."""

    def __init__(self, inner: CheckpointEngine):
        super().__init__()
        self.inner = inner

    def create(self, info):
        self.inner.create(info)

    def save(self, state_dict, path: str):
        self.inner.save(state_dict, path)

    def load(self, path: str, map_location=None):
        return read_file(path, lambda: self.inner.load(path, map_location))

    def commit(self, info):
        return self.inner.commit(info)


def load_checkpoint(engine: Any, load_dir: str, tag: str | None, *, finetune: bool = False,
                    load_optim: bool = True, load_rng: bool = True,
                    layout: tuple[int, ...] | None = None, adapters: bool = False) -> dict | None:
    """Load checkpoint `tag` (resolve_load + verify_checksums's) into `engine`; returns megaclm's client state
    (plus this rank's RNG states under "rng", to apply with `restore_rng`), or None if there is nothing to
    load (tag None: a fresh start) or when `finetune` (weights only: progress restarts).

    `layout` is the run's `run_layout` (tp, pp, dp, zero stage, ep). The same layout loads DeepSpeed's own files
    (bit-exact resume); another one, or a checkpoint written offline (tools/checkpoint/reshard.py),
    loads megaclm's layout-independent files (megaclm.checkpoint.universal: weights, Adam moments
    and step, progress, data position; no RNG states).
    `adapters`: --load is a LoRA checkpoint (resolve_lora_base) and the base weights are loaded already."""
    if tag is None:
        # The first launch of `--save X --load X` (the restart idiom): nothing is wrong, so no warning.
        log.info(f"--load {load_dir}: no checkpoint there; starting from scratch")
        return None
    if not is_complete(load_dir, tag):
        raise UserError(f"--load {load_dir}: checkpoint {tag} is incomplete (no {META}); it was interrupted "
                        "while saving - pass an older --ckpt-step or remove it")
    if not adapters and "lora_base" in read_meta(load_dir, tag):
        raise UserError(f"--load {load_dir}/{tag} holds LoRA adapters only; pass its --lora-* flags to continue it, "
                        "or merge it first (tools/checkpoint/convert_hf.py export --lora-merge)")
    meta = read_meta(load_dir, tag)
    # An HF import (tools/checkpoint/convert_hf.py) holds weights only: like Megatron's converted checkpoints
    # it starts a run at iteration 0, with or without --finetune.
    hf_import = meta.get("hf_model_type") is not None and "client" not in meta
    if finetune or hf_import:  # megaclm's fp32 shards: any saved TP/PP layout, any ZeRO stage
        load_weights(engine, load_dir, tag, select=is_lora_key if adapters else None)
        if _rank() == 0:
            log.info(f"loaded checkpoint {os.path.join(load_dir, tag)} (weights only"
                     + ("; an HF import: training starts at iteration 0)" if hf_import else ")"))
        return None
    saved = saved_layout(load_dir, tag, meta)
    if (layout is not None and saved != tuple(layout)) or meta.get("written_by") == "offline":
        state = load_resharded(engine, load_dir, tag, load_optim=load_optim)
        if _rank() == 0:
            log.info(f"loaded checkpoint {os.path.join(load_dir, tag)} saved as {_layout_text(saved, layout)} into "
                     f"{_layout_text(layout, saved)} ({'weights, Adam state' if load_optim else 'weights'}, progress, "
                     "data position; RNG states start fresh)")
        return state
    original = engine.checkpoint_engine
    engine.checkpoint_engine = _NamingCheckpointEngine(original)
    try:
        path, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optim,
                                              load_lr_scheduler_states=False, load_module_strict=not adapters)
    finally:
        engine.checkpoint_engine = original
    if path is None:
        raise UserError(f"--load {load_dir}: DeepSpeed could not load {tag}")
    if not load_optim and not engine.zero_optimization():
        # Non-ZeRO mixed-precision optimizers keep fp32 master copies that a module-only load leaves stale.
        refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()
    if _rank() == 0:
        log.info(f"loaded checkpoint {os.path.join(load_dir, tag)}")
    state = (client or {}).get(CLIENT_KEY)
    if state is None:
        raise UserError(f"--load {load_dir}/{tag} has no megaclm state; use --finetune to load its weights only")
    state = dict(state, rng=None)
    if load_rng:
        path = os.path.join(load_dir, tag, rng_file(_rank()))
        world = dist.get_world_size() if dist.is_initialized() else 1
        if state.get("world_size") == world and os.path.isfile(path):
            state["rng"] = read_file(path, lambda: torch.load(path, weights_only=False))
        else:
            log.warning(f"RNG states not restored (saved with world size {state.get('world_size')}, now {world}); "
                        "the run continues but is not bit-identical to an uninterrupted one")
    return state


def restore_rng(state: dict | None) -> None:
    """Apply the RNG states `load_checkpoint` read; call it last, right before training resumes, so
    that nothing run after loading (dataset building, ...) draws from the restored streams."""
    if state is not None and state.get("rng") is not None:
        set_rng_state(state["rng"])
