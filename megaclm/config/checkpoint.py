"""`checkpoint:` section: where and when to save, what to load (layout: megaclm.checkpoint)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

from megaclm.utils.errors import UserError

BEST_STEP = "best"  # --ckpt-step best: the checkpoint <dir>/best records (--save-best)


def parse_ckpt_step(text: str) -> int | str:
    """argparse `type=` of the tools' --ckpt-step: an iteration N >= 0, or `best`."""
    if text == BEST_STEP:
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"expects an iteration (an integer >= 0) or {BEST_STEP!r}, got {text!r}")


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoint saving (by tag `iter_0000100`, own atomic `latest`) and loading."""

    save: str | None = field(default=None, metadata={"help": "Directory to save checkpoints (and metrics.jsonl) in."})
    load: str | None = field(default=None, metadata={
        "help": "Checkpoint directory to resume from (its `latest`, or --ckpt-step); nothing there = fresh start."})
    pretrained_checkpoint: str | None = field(default=None, metadata={
        "help": "Initialise the weights from this megaclm checkpoint or HF model directory (config.json + "
                "*.safetensors, imported for the run's layout) and start at iteration 0 (as --finetune), unless "
                "--load holds a checkpoint: then the run resumes from that and ignores this. `--save X --load X "
                "--pretrained-checkpoint HF_DIR` serves the first launch and every restart."})
    overwrite_save: bool = field(default=False, metadata={
        "help": "Let a run that starts afresh (not resuming from --save) write into a --save directory that holds "
                "another run's checkpoints (they are overwritten or mixed with this run's)."})
    save_interval: int | None = field(default=None, metadata={"help": "Save every this many iterations (and at the end)."})
    save_total_limit: int | None = field(default=None, metadata={
        "help": "Keep only the newest N checkpoints (plus the best one with --save-best)."})
    save_best: bool = field(default=False, metadata={
        "help": "Also keep the checkpoint with the lowest validation loss (recorded in <save>/best)."})
    save_layout_independent_interval: int | None = field(default=None, metadata={
        "help": "Every Nth save also gathers and writes megaclm's layout-independent files (fp32 weights and full "
                "Adam moments per TP/PP rank, <tag>/megaclm/model/ and optim/: about twice the bytes and a gather "
                "over the data-parallel ranks). Without it a save writes DeepSpeed's files only, and those files "
                "are made from them when needed (a --load into another layout, reshard.py, HF export)."})
    async_save: bool = field(default=False, metadata={
        "help": "Write checkpoints in a background thread from a CPU copy while training goes on; `latest` "
                "moves once every rank's files are written and fsynced (costs one host-memory copy)."})
    ckpt_step: int | Literal["best"] | None = field(default=None, metadata={
        "help": "Load iteration N (iter_{N:07d}) instead of `latest`; `best`: the checkpoint with the lowest "
                "validation loss, recorded in <load>/best by a run with --save-best."})
    finetune: bool = field(default=False, metadata={
        "help": "Load weights only: iteration, consumed samples, optimizer, scheduler and RNG start fresh."})
    no_load_optim: bool = field(default=False, metadata={
        "help": "Load weights and progress but not the optimizer state (continual pretraining)."})
    no_load_rng: bool = field(default=False, metadata={"help": "Do not restore RNG states when loading."})
    exit_on_missing_checkpoint: bool = field(default=False, metadata={
        "help": "With --load: exit with an error when there is no checkpoint there (instead of a fresh start)."})
    use_checkpoint_args: bool = field(default=False, metadata={
        "help": "Take the model shape (the model section) from the --load checkpoint's stored config; model flags "
                "that are also given must agree with it."})
    verify_checkpoint_checksums: bool = field(default=True, metadata={
        "help": "Compare every file of the checkpoint to load with its manifest's checksum (xxh3, spread over the "
                "ranks); a damaged one makes the run fall back to the previous intact checkpoint. Sizes are always "
                "checked; --no-verify-checkpoint-checksums skips the checksums (reading every file once)."})
    override_data_fingerprint: bool = field(default=False, metadata={
        "help": "Resume even though the data files or their order settings differ from the checkpoint's "
                "fingerprint (a deliberate data change; megaclm.data.fingerprint)."})

    def __post_init__(self):
        if self.save_interval is not None and self.save_interval < 1:
            raise UserError(f"checkpoint.save_interval={self.save_interval} must be >= 1")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise UserError(f"checkpoint.save_total_limit={self.save_total_limit} must be >= 1")
        if self.save_layout_independent_interval is not None and self.save_layout_independent_interval < 1:
            raise UserError(f"checkpoint.save_layout_independent_interval={self.save_layout_independent_interval} "
                            "must be >= 1 (1: every save)")
        if isinstance(self.ckpt_step, int) and self.ckpt_step < 0:
            raise UserError(f"checkpoint.ckpt_step={self.ckpt_step} must be >= 0")
        if (self.finetune or self.no_load_optim or self.ckpt_step is not None or self.exit_on_missing_checkpoint
                or self.use_checkpoint_args) and self.load is None:
            raise UserError("checkpoint.finetune/no_load_optim/ckpt_step/exit_on_missing_checkpoint/"
                            "use_checkpoint_args need checkpoint.load; pass --load DIR")
        if (self.save_interval or self.save_total_limit or self.save_best or self.async_save
                or self.save_layout_independent_interval) and self.save is None:
            raise UserError("checkpoint.save_interval/save_total_limit/save_best/save_layout_independent_interval/"
                            "async_save need checkpoint.save; pass --save DIR")
