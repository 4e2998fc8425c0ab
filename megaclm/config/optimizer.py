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
    decoupled_lr: float | None = field(default=None, metadata={
        "help": "Peak learning rate of the input embedding and output layer (Megatron-LM's --decoupled-lr); the "
                "other parameters use --lr, both on the same schedule."})
    decoupled_min_lr: float | None = field(default=None, metadata={
        "help": "Learning-rate floor of the embedding and output layer with --decoupled-lr (default: --min-lr)."})
    clip_grad: float = field(default=1.0, metadata={
        "help": "Clip the global gradient L2 norm to this value; 0 disables clipping."})

    def __post_init__(self):
        if self.lr <= 0:
            raise UserError(f"optimizer.lr={self.lr} must be > 0; pass a positive --lr")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"optimizer.min_lr={self.min_lr} must be in [0, optimizer.lr={self.lr}]; lower --min-lr")
        if self.decoupled_min_lr is not None and self.decoupled_lr is None:
            raise UserError("optimizer.decoupled_min_lr needs optimizer.decoupled_lr; pass --decoupled-lr too")
        if self.decoupled_lr is not None and not 0 <= (self.decoupled_min_lr or 0.0) <= self.decoupled_lr:
            raise UserError(f"optimizer.decoupled_min_lr={self.decoupled_min_lr} must be in "
                            f"[0, optimizer.decoupled_lr={self.decoupled_lr}]")
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
