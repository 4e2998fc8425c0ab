"""`precision:` section: the training dtype (DeepSpeed's bf16/fp16 blocks), fp16 loss scaling, FP8 matmuls."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from megaclm.utils.errors import UserError

FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("tensorwise", "rowwise")


@dataclass(frozen=True)
class PrecisionConfig:
    """The dtype the model trains in (fp32 master weights under bf16/fp16), fp16's loss scaling, FP8."""

    former_section: ClassVar[str] = "training"  # a YAML file or stored config may still hold these keys there

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

    def __post_init__(self):
        if self.bf16 and self.fp16:
            raise UserError("precision.bf16 and precision.fp16 are exclusive; pass only one of --bf16, --fp16")
        if self.fp8_format not in (None, *FP8_FORMATS):
            raise UserError(f"precision.fp8_format={self.fp8_format!r} is not one of {', '.join(FP8_FORMATS)} (or unset)")
        if self.fp8_recipe not in FP8_RECIPES:
            raise UserError(f"precision.fp8_recipe={self.fp8_recipe!r} is not one of {', '.join(FP8_RECIPES)}")
        if self.fp8_format is not None and not self.bf16:
            raise UserError(f"precision.fp8_format={self.fp8_format!r} needs --bf16: FP8 replaces the bf16 matmuls "
                            "of the blocks (the other ops and the master weights stay bf16/fp32)")
        if self.loss_scale is not None and self.loss_scale <= 0:
            raise UserError(f"precision.loss_scale={self.loss_scale} must be > 0 (omit it for dynamic scaling)")

    @property
    def name(self) -> str:
        """"bf16", "fp16" or "fp32" (checkpoint metadata, the memory estimate, the peak-FLOPs table)."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"
