"""L1 parallel: ParallelState (rank math + groups + DeepSpeed mpu), tensor/sequence-parallel mappings,
layers, vocab-parallel cross-entropy and the tensor-parallel RNG streams."""
from megaclm.parallel.state import ParallelState

__all__ = ["ParallelState"]
