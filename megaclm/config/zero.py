"""`zero:` section: DeepSpeed ZeRO (the `zero_optimization` block of the DeepSpeed JSON)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from megaclm.utils.errors import UserError


@dataclass(frozen=True)
class ZeroConfig:
    """How DeepSpeed shards the optimizer states, gradients and parameters over the data-parallel ranks."""

    former_section: ClassVar[str] = "training"  # a YAML file or stored config may still hold these keys there

    zero_stage: int = field(default=1, metadata={
        "help": "DeepSpeed ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + parameters.",
        "choices": [0, 1, 2, 3]})
    offload_optimizer: bool = field(default=False, metadata={
        "help": "ZeRO 1-3: keep optimizer states on the CPU (DeepSpeed offload_optimizer)."})
    offload_param: bool = field(default=False, metadata={"help": "ZeRO-3: keep parameters on the CPU (offload_param)."})
    zero_param_persistence_threshold: int = field(default=100000, metadata={
        "help": "ZeRO-3: parameters with fewer elements stay unpartitioned (stage3_param_persistence_threshold)."})
    overlap_grad_reduce: bool = field(default=False, metadata={
        "help": "ZeRO-1/2: reduce the gradients bucket by bucket during backward (ZeRO-1: the last micro-batch's, "
                "ZeRO-2: every one's), overlapped with the rest of it (DeepSpeed overlap_comm), at the cost of a "
                "second reduce bucket (953 MiB in bf16). Not with pipeline parallelism (DeepSpeed's pipeline engine "
                "reduces after the last micro-batch); ZeRO-3 always overlaps."})

    def __post_init__(self):
        if self.offload_param and self.zero_stage != 3:
            raise UserError(f"zero.offload_param needs zero.zero_stage=3, got {self.zero_stage}; "
                            "pass --zero-stage 3 or drop --offload-param")
        if self.offload_optimizer and self.zero_stage == 0:
            raise UserError("zero.offload_optimizer needs ZeRO stage 1, 2 or 3; pass --zero-stage 1 or higher")
        if self.overlap_grad_reduce and self.zero_stage == 0:
            raise UserError("zero.overlap_grad_reduce needs ZeRO stage 1 or 2 (DeepSpeed overlaps only ZeRO's "
                            "bucketed reduction; ZeRO-0 all-reduces after the last backward): pass --zero-stage 1 "
                            "(Megatron's --use-distributed-optimizer) or drop --overlap-grad-reduce")
        if self.zero_param_persistence_threshold < 0:
            raise UserError("zero.zero_param_persistence_threshold must be >= 0")
