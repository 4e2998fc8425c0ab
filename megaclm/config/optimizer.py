"""`optimizer:` section: AdamW hyper-parameters and gradient clipping (Megatron flag names)."""
from __future__ import annotations

from dataclasses import dataclass, field

from megaclm.utils.errors import UserError


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with decoupled weight decay; no decay on norms and biases."""

    optimizer: str = field(default="adam", metadata={
        "help": "Optimizer: 'adam' is AdamW (DeepSpeed FusedAdam on GPU, torch AdamW on CPU).",
        "choices": ["adam"]})
    lr: float = field(default=3e-4, metadata={"help": "Peak learning rate (after warmup)."})
    min_lr: float = field(default=0.0, metadata={"help": "Learning rate floor reached at the end of decay."})
    weight_decay: float = field(default=0.01, metadata={
        "help": "AdamW weight decay, applied to weight matrices and embeddings only (not norms or biases)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    clip_grad: float = field(default=1.0, metadata={
        "help": "Clip the global gradient L2 norm to this value; 0 disables clipping."})

    def __post_init__(self):
        if self.lr <= 0:
            raise UserError(f"optimizer.lr={self.lr} must be > 0; pass a positive --lr")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"optimizer.min_lr={self.min_lr} must be in [0, optimizer.lr={self.lr}]; lower --min-lr")
        if self.weight_decay < 0:
            raise UserError(f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise UserError(f"optimizer.{name}={v} must be in [0, 1)")
        if self.adam_eps <= 0:
            raise UserError(f"optimizer.adam_eps={self.adam_eps} must be > 0")
        if self.clip_grad < 0:
            raise UserError(f"optimizer.clip_grad={self.clip_grad} must be >= 0 (0 disables clipping)")
