"""`lora:` section - low-rank adapters on the transformer blocks' linears (Hu et al. 2021, PEFT's layout).

With `lora_rank > 0` every targeted linear W (out, in) gets y = W x + (alpha / r) B A dropout(x), with
A (r, in) random and B (out, r) zero, so training starts from the base model exactly; every other
weight is frozen (no gradient, no optimizer state). Targets are megaclm's module names: `qkv` (the
fused q/k/v projection), `proj` (attention output), `fc1` (MLP in, [gate; up] under SwiGLU), `fc2`
(MLP out). A checkpoint of a LoRA run holds the adapters only, plus the base checkpoint it started from.
"""
from dataclasses import dataclass, field

from megaclm.utils.errors import UserError

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclass(frozen=True)
class LoraConfig:
    lora_rank: int = field(default=0, metadata={
        "help": "Rank r of the LoRA adapters; 0 trains the full model. Needs --load BASE (the frozen base model)."})
    lora_alpha: float = field(default=16.0, metadata={
        "help": "LoRA scaling: the adapter output is multiplied by lora_alpha / lora_rank (PEFT's rule)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapters' input."})
    lora_target: str = field(default=",".join(LORA_TARGETS), metadata={
        "help": "Linears that get adapters, comma-separated subset of qkv,proj,fc1,fc2."})

    def __post_init__(self):
        if self.lora_rank < 0:
            raise UserError(f"lora.lora_rank={self.lora_rank} must be >= 0 (0 disables LoRA)")
        if self.lora_alpha <= 0:
            raise UserError(f"lora.lora_alpha={self.lora_alpha} must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"lora.lora_dropout={self.lora_dropout} must be in [0, 1)")
        unknown = [t for t in self.target_names if t not in LORA_TARGETS]
        if unknown or not self.target_names:
            raise UserError(f"lora.lora_target={self.lora_target!r}: choose a non-empty comma-separated "
                            f"subset of {','.join(LORA_TARGETS)}")

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_target.split(",") if t.strip())

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def targets(self, name: str) -> bool:
        """Whether the linear `name` (qkv, proj, fc1, fc2) gets an adapter."""
        return self.enabled and name in self.target_names
