"""`logging:` section: console line, metrics JSON lines, TensorBoard, Weights & Biases, the step profiler."""
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
    profile: bool = field(default=False, metadata={
        "help": "Profile the steps after iteration --profile-step-start up to --profile-step-end on the ranks "
                "--profile-ranks (megaclm.training.callbacks.Profiler): with --use-pytorch-profiler a torch.profiler "
                "trace (<profile-dir>/rank<R>.iter<A>-<B>.pt.trace.json: chrome://tracing, Perfetto, TensorBoard) "
                "and a table of the costliest ops in the log; without it a CUDA profiler range with NVTX marks for "
                "Nsight Systems (nsys profile --capture-range=cudaProfilerApi). Off: no cost."})
    use_pytorch_profiler: bool = field(default=False, metadata={
        "help": "--profile with torch.profiler (CPU and, when present, CUDA activity) instead of an Nsight range."})
    profile_step_start: int = field(default=10, metadata={
        "help": "--profile: profiling starts after this iteration (the first profiled step is the next one)."})
    profile_step_end: int = field(default=12, metadata={"help": "--profile: the last profiled iteration."})
    profile_ranks: list[int] = field(default_factory=lambda: [0], metadata={
        "help": "--profile: the global ranks that profile.", "nargs": "+"})
    profile_dir: str | None = field(default=None, metadata={
        "help": "--use-pytorch-profiler: where the traces go; default <save>/profile, or ./profile without --save."})
    verbose: bool = field(default=False, metadata={
        "help": "Show the library lines hidden by default (megaclm.logging.quiet: torch/torchao warnings known "
                "to be harmless, DeepSpeed's INFO log) and the INFO lines of every rank, not only rank 0's."})

    def __post_init__(self):
        if self.log_interval < 1:
            raise UserError(f"logging.log_interval={self.log_interval} must be >= 1")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise UserError(f"logging.peak_tflops={self.peak_tflops} must be > 0")
        if not 0 <= self.profile_step_start < self.profile_step_end:
            raise UserError(f"logging.profile_step_start={self.profile_step_start} and logging.profile_step_end="
                            f"{self.profile_step_end}: need 0 <= start < end (the steps start+1 .. end are profiled)")
        if not self.profile_ranks or min(self.profile_ranks) < 0:
            raise UserError(f"logging.profile_ranks={self.profile_ranks}: give one or more global ranks (>= 0)")
        if self.use_pytorch_profiler and not self.profile:
            raise UserError("logging.use_pytorch_profiler chooses how --profile profiles; add --profile (or drop "
                            "--use-pytorch-profiler)")
