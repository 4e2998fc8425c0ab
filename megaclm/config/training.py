"""`training:` section: batch sizes, run length, evaluation cadence, seed and run control.

The precision, ZeRO and the guards of a long run have their own sections (precision.py, zero.py,
resilience.py); a YAML file or stored config that still has them under `training:` loads with a
deprecation line (megaclm.config.arguments.yaml_values)."""
from __future__ import annotations

from dataclasses import dataclass, field

from megaclm.utils.errors import UserError


@dataclass(frozen=True)
class TrainingConfig:
    """How long to train, on what batches, how often to evaluate, when to stop early."""

    micro_batch_size: int = field(default=1, metadata={"help": "Samples per forward/backward on one data-parallel rank."})
    global_batch_size: int | None = field(default=None, metadata={
        "help": "Samples per optimizer step over all data-parallel ranks; gradient accumulation = "
                "global / (micro x data-parallel size). Default: micro x data-parallel size."})
    train_iters: int | None = field(default=None, metadata={"help": "Training length in optimizer steps."})
    train_samples: int | None = field(default=None, metadata={"help": "Training length in samples."})
    train_tokens: int | None = field(default=None, metadata={
        "help": "Training length in tokens: the run stops once this many tokens were consumed."})
    train_epochs: float | None = field(default=None, metadata={
        "help": "Training length in passes over the training data (fractions allowed): iterations = "
                "ceil(N x samples per epoch / global batch), samples per epoch = the --seq-length samples of one "
                "pass over every training dataset's train split, summed over a blend (megaclm.data.epochs). "
                "Instead of --train-iters/--train-samples/--train-tokens."})
    eval_interval: int = field(default=1000, metadata={"help": "Evaluate on the validation split every this many iterations."})
    eval_iters: int = field(default=100, metadata={
        "help": "Global batches per evaluation (validation, and the test split at the end); 0 disables evaluation."})
    exit_interval: int | None = field(default=None, metadata={
        "help": "Save and exit once the iteration is a multiple of this."})
    exit_duration_in_mins: float | None = field(default=None, metadata={
        "help": "Save and exit once the run has lasted this many minutes."})
    seed: int = field(default=1234, metadata={"help": "Seed for model init, dropout and data order."})
    callbacks: list[str] = field(default_factory=list, metadata={
        "help": "Training-loop callbacks of your own, run after the built-in ones: each 'pkg.module:factory' or "
                "'pkg.module:factory=ARG' (factory() or factory('ARG') returns an object with any of the hooks "
                "of megaclm/training/callbacks.py: pre_step, post_step, post_eval, post_checkpoint_saved, ...); "
                "the module must be importable (PYTHONPATH).", "nargs": "*"})
    distributed_backend: str | None = field(default=None, metadata={
        "help": "torch.distributed backend; default nccl with CUDA, gloo without (nccl without CUDA falls back to "
                "gloo with a warning).", "choices": ["nccl", "gloo"]})
    distributed_timeout_minutes: int = field(default=10, metadata={"help": "Timeout of collective operations."})
    deepspeed_config: str | None = field(default=None, metadata={
        "help": "A DeepSpeed JSON to use instead of the one generated from this config; it is checked "
                "for consistency with the flags (batch sizes, precision, clipping).",
        "flag": ["--deepspeed_config", "--deepspeed-config"]})

    def __post_init__(self):
        if self.micro_batch_size < 1:
            raise UserError(f"training.micro_batch_size={self.micro_batch_size} must be >= 1")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise UserError(f"training.global_batch_size={self.global_batch_size} must be >= 1")
        given = [n for n in ("train_iters", "train_samples", "train_tokens") if getattr(self, n) is not None]
        if self.train_epochs is not None and given:
            raise UserError(f"training.train_epochs and training.{given[0]} are exclusive; give the run length once "
                            f"(--train-epochs, or --train-iters/--train-samples/--train-tokens)")
        if self.train_epochs is not None and not self.train_epochs > 0:
            raise UserError(f"training.train_epochs={self.train_epochs} must be > 0")
        if self.train_iters is not None and self.train_samples is not None:
            raise UserError("training.train_iters and training.train_samples are exclusive; give the run length "
                            "once (--train-iters or --train-samples; --train-tokens may cap either)")
        for n in given:
            if getattr(self, n) < 1:
                raise UserError(f"training.{n}={getattr(self, n)} must be >= 1")
        if self.eval_interval < 1:
            raise UserError(f"training.eval_interval={self.eval_interval} must be >= 1")
        if self.eval_iters < 0:
            raise UserError(f"training.eval_iters={self.eval_iters} must be >= 0")
        if self.exit_interval is not None and self.exit_interval < 1:
            raise UserError(f"training.exit_interval={self.exit_interval} must be >= 1")
