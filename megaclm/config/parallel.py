"""`parallel:` section - how the model is split: tensor (TP), sequence (SP), pipeline (PP), expert (EP) parallel,
and the long-context split of the sequence itself: DeepSpeed-Ulysses or ring context parallelism (one of them).

The data-parallel size is derived (world_size // (tp * pp * ulysses * cp)) by megaclm.parallel.ParallelState
and never stored here. Rank layout (megaclm.parallel.state): tp fastest, then the sequence axis, then dp, then pp.
"""
from dataclasses import dataclass, field

from megaclm.utils.errors import UserError

PARTITION_METHODS = ("parameters", "uniform")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = field(default=1, metadata={
        "help": "Ranks that split each layer's weights (Megatron tensor parallelism)."})
    pipeline_model_parallel_size: int = field(default=1, metadata={
        "help": "Pipeline stages the layers are split into (DeepSpeed PipelineModule)."})
    sequence_parallel: bool = field(default=False, metadata={
        "help": "Megatron sequence parallelism: split norms/dropout activations along the sequence across "
                "the tensor-parallel ranks (no effect when tensor_model_parallel_size=1)."})
    expert_model_parallel_size: int = field(default=1, metadata={
        "help": "Data-parallel ranks that split the routed experts of each MoE layer between them: each holds and "
                "trains 1/size of them, and tokens travel to their experts by all-to-all. Must divide the "
                "data-parallel size and model.num_experts."})
    ds_sequence_parallel_size: int = field(default=1, metadata={
        "help": "DeepSpeed-Ulysses: ranks that split each sample's sequence; attention exchanges heads for "
                "sequence with two all-to-alls (query and key/value heads per TP rank must divide by it)."})
    context_parallel_size: int = field(default=1, metadata={
        "help": "Ring attention (Megatron-LM's context parallelism): ranks that split each sample's sequence "
                "into 2N load-balanced chunks (rank i holds chunks i and 2N-1-i); keys/values travel between them."})
    pipeline_partition_method: str = field(default="parameters", metadata={
        "help": "How layers are assigned to pipeline stages: 'parameters' balances parameter counts, "
                "'uniform' gives every stage the same number of transformer layers.",
        "choices": list(PARTITION_METHODS)})

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                     "ds_sequence_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise UserError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.pipeline_partition_method not in PARTITION_METHODS:
            raise UserError(f"parallel.pipeline_partition_method={self.pipeline_partition_method!r} is not one of "
                            f"{', '.join(PARTITION_METHODS)}")
        if self.ds_sequence_parallel_size > 1 and self.context_parallel_size > 1:
            raise UserError(f"parallel.ds_sequence_parallel_size={self.ds_sequence_parallel_size} and "
                            f"parallel.context_parallel_size={self.context_parallel_size}: use one way of splitting "
                            "the sequence (--ds-sequence-parallel-size or --context-parallel-size), not both")

    @property
    def seq_split_size(self) -> int:
        """Ranks that share one sample, each holding a slice of its sequence (Ulysses or ring; 1 = none)."""
        return self.ds_sequence_parallel_size * self.context_parallel_size
