"""`training:` section: batch sizes, run length, evaluation, precision, ZeRO and run control."""
from __future__ import annotations

from dataclasses import dataclass, field

from megaclm.utils.errors import UserError

FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("tensorwise", "rowwise")


@dataclass(frozen=True)
class TrainingConfig:
    """How long to train, on what batches, at what precision, under which ZeRO stage."""

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
    zero_stage: int = field(default=1, metadata={
        "help": "DeepSpeed ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + parameters.",
        "choices": [0, 1, 2, 3]})
    offload_optimizer: bool = field(default=False, metadata={
        "help": "ZeRO 1-3: keep optimizer states on the CPU (DeepSpeed offload_optimizer)."})
    offload_param: bool = field(default=False, metadata={"help": "ZeRO-3: keep parameters on the CPU (offload_param)."})
    zero_param_persistence_threshold: int = field(default=100000, metadata={
        "help": "ZeRO-3: parameters with fewer elements stay unpartitioned (stage3_param_persistence_threshold)."})
    bf16: bool = field(default=False, metadata={"help": "Train in bfloat16 with fp32 master weights."})
    fp16: bool = field(default=False, metadata={"help": "Train in float16 with fp32 master weights and loss scaling."})
    fp8_format: str | None = field(default=None, metadata={
        "help": "FP8 matmuls in the transformer blocks' linears (torchao.float8; NVIDIA sm_89+ only): 'e4m3' "
                "everywhere, or 'hybrid' (e4m3 forward, e5m2 gradients, as Megatron). Needs --bf16. Default: off.",
        "choices": list(FP8_FORMATS)})
    fp8_recipe: str = field(default="tensorwise", metadata={
        "help": "FP8 scaling: one dynamic scale per tensor ('tensorwise', fastest) or per row ('rowwise', more "
                "accurate).", "choices": list(FP8_RECIPES)})
    loss_scale: float | None = field(default=None, metadata={
        "help": "fp16: static loss scale; unset means dynamic loss scaling."})
    initial_loss_scale: float = field(default=2.0 ** 16, metadata={"help": "fp16 dynamic loss scaling: initial scale (a power of 2)."})
    min_loss_scale: float = field(default=1.0, metadata={"help": "fp16 dynamic loss scaling: lowest scale."})
    loss_scale_window: int = field(default=1000, metadata={"help": "fp16: overflow-free steps before the scale doubles."})
    hysteresis: int = field(default=2, metadata={"help": "fp16: overflows tolerated before the scale halves."})
    max_consecutive_nan_steps: int = field(default=10, metadata={
        "help": "A step whose loss is NaN/inf is skipped and counted; this many in a row stop the run."})
    spike_zscore: float | None = field(default=None, metadata={
        "help": "Loss-spike guard: a step whose loss is more than this many standard deviations above the mean "
                "of the last --spike-window accepted losses is not applied (megaclm.training.spike). Unset: off."})
    spike_window: int = field(default=50, metadata={"help": "Spike guard: accepted losses in the running window."})
    spike_action: str = field(default="skip", metadata={
        "help": "Spike guard: skip (the step's update is not applied), or rollback (also: after "
                "--spike-rollback-after spikes in a row, reload the last checkpoint and skip those batches).",
        "choices": ["skip", "rollback"]})
    spike_rollback_after: int = field(default=3, metadata={
        "help": "Spike guard, rollback: this many consecutive spikes trigger a rollback."})
    spike_max_rollbacks: int = field(default=3, metadata={
        "help": "Spike guard, rollback: stop the run (exit 1) instead of rolling back more often than this; the "
                "training dataset holds rollback_after x max_rollbacks extra global batches for the skipped ones."})
    hang_timeout_s: float | None = field(default=1800.0, metadata={
        "help": "Hang watchdog: a rank on which no training step, evaluation batch or save finished for this many "
                "seconds writes every thread's stack to <save>/hang/rank<R>.txt and exits with status 75 (to be "
                "requeued). Choose more than the slowest of these (the first step may compile; a synchronous save "
                "of a large model to a shared file system takes minutes). 0 (or null): off."})
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
        if self.bf16 and self.fp16:
            raise UserError("training.bf16 and training.fp16 are exclusive; pass only one of --bf16, --fp16")
        if self.offload_param and self.zero_stage != 3:
            raise UserError(f"training.offload_param needs training.zero_stage=3, got {self.zero_stage}; "
                            "pass --zero-stage 3 or drop --offload-param")
        if self.offload_optimizer and self.zero_stage == 0:
            raise UserError("training.offload_optimizer needs ZeRO stage 1, 2 or 3; pass --zero-stage 1 or higher")
        if self.fp8_format not in (None, *FP8_FORMATS):
            raise UserError(f"training.fp8_format={self.fp8_format!r} is not one of {', '.join(FP8_FORMATS)} (or unset)")
        if self.fp8_recipe not in FP8_RECIPES:
            raise UserError(f"training.fp8_recipe={self.fp8_recipe!r} is not one of {', '.join(FP8_RECIPES)}")
        if self.fp8_format is not None and not self.bf16:
            raise UserError(f"training.fp8_format={self.fp8_format!r} needs --bf16: FP8 replaces the bf16 matmuls "
                            "of the blocks (the other ops and the master weights stay bf16/fp32)")
        if self.loss_scale is not None and self.loss_scale <= 0:
            raise UserError(f"training.loss_scale={self.loss_scale} must be > 0 (omit it for dynamic scaling)")
        if self.max_consecutive_nan_steps < 1:
            raise UserError(f"training.max_consecutive_nan_steps={self.max_consecutive_nan_steps} must be >= 1")
        if self.spike_zscore is not None and self.spike_zscore <= 0:
            raise UserError(f"training.spike_zscore={self.spike_zscore} must be > 0 (omit it to disable the guard)")
        if self.spike_window < 2:
            raise UserError(f"training.spike_window={self.spike_window} must be >= 2 (a standard deviation needs two)")
        if self.spike_rollback_after < 1 or self.spike_max_rollbacks < 1:
            raise UserError("training.spike_rollback_after and training.spike_max_rollbacks must be >= 1")
        if self.hang_timeout_s is not None and not self.hang_timeout_s >= 0:  # NaN too
            raise UserError(f"training.hang_timeout_s={self.hang_timeout_s} must be >= 0 (0 turns the watchdog off)")
        if self.zero_param_persistence_threshold < 0:
            raise UserError("training.zero_param_persistence_threshold must be >= 0")

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"
