"""`logging:` section: console line, metrics JSON lines, TensorBoard, Weights & Biases."""
from __future__ import annotations

from dataclasses import dataclass, field

from megaclm.utils.errors import UserError


@dataclass(frozen=True)
class LoggingConfig:
    """What is logged where; the console line comes from the last pipeline stage's first rank."""

    log_interval: int = field(default=100, metadata={"help": "Log one line (and one metrics record) every this many iterations."})
    metrics_file: str | None = field(default=None, metadata={
        "help": "JSON-lines metrics file; default <save>/metrics.jsonl when --save is given."})
    tensorboard_dir: str | None = field(default=None, metadata={"help": "Write TensorBoard scalars here."})
    wandb_project: str | None = field(default=None, metadata={
        "help": "Log to this Weights & Biases project (WANDB_MODE=offline works without network)."})
    wandb_exp_name: str | None = field(default=None, metadata={"help": "W&B run name."})
    wandb_save_dir: str | None = field(default=None, metadata={"help": "W&B local directory (default: <save>/wandb)."})
    peak_tflops: float | None = field(default=None, metadata={
        "help": "Peak TFLOP/s per device for MFU; default by detected GPU (989 for H100 bf16)."})
    progress_bar: bool = field(default=True, metadata={"help": "Show a tqdm bar when stderr is a terminal."})
    verbose: bool = field(default=False, metadata={
        "help": "Show the library lines hidden by default (megaclm.logging.quiet: torch/torchao warnings known "
                "to be harmless, DeepSpeed's INFO log) and the INFO lines of every rank, not only rank 0's."})

    def __post_init__(self):
        if self.log_interval < 1:
            raise UserError(f"logging.log_interval={self.log_interval} must be >= 1")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise UserError(f"logging.peak_tflops={self.peak_tflops} must be > 0")
