"""`kernels:` section - which implementation of the model's ops runs (see megaclm.ops).

"torch" runs the pure-PyTorch references; "compile" runs them through torch.compile; "fused" runs the
CUDA kernels of megaclm.ops._cuda and falls back to the references (one logged line) when the
extension is not built. `torch_compile` is the coarser, usually faster choice: torch.compile of each
whole transformer block (linears, attention and all ops fused together, one graph per block), applied
by megaclm.model.compiled; the two may be combined (the compiled ops are inlined into the block graph).
Attention goes through torch's scaled_dot_product_attention ("sdpa", which picks
flash/cuDNN/memory-efficient kernels on GPU; "flash" holds it to the flash kernel) or the explicit
matmul + softmax path ("unfused"); see megaclm.model.attention.
"""
from dataclasses import dataclass, field

from megaclm.utils.errors import UserError

KERNEL_BACKENDS = ("torch", "fused", "compile")
ATTENTION_BACKENDS = ("sdpa", "flash", "unfused")


@dataclass(frozen=True)
class KernelsConfig:
    # Flag and YAML key keep their first name, `kernels` (run scripts and stored configs use it).
    op_backend: str = field(default="torch", metadata={
        "help": "Implementation of norms, activations, RoPE, softmax and cross-entropy.",
        "choices": list(KERNEL_BACKENDS), "flag": "--kernels", "yaml_aliases": ["kernels"], "metavar": "KERNELS"})
    attention_backend: str = field(default="sdpa", metadata={
        "help": "Attention: torch scaled_dot_product_attention ('sdpa', torch picks the kernel; flash varlen for "
                "document masks on CUDA), 'flash' (SDPA held to its flash kernel wherever the inputs allow), or "
                "'unfused' (explicit QK^T + masked softmax + V).",
        "choices": list(ATTENTION_BACKENDS)})
    torch_compile: bool = field(default=False, metadata={
        "help": "torch.compile each transformer block (not the whole model: pipeline stages and activation "
                "recomputation keep working); falls back to eager with one logged line where the inductor "
                "backend cannot run. --kernels compile, by contrast, compiles each small op on its own."})
    cross_entropy_chunk_size: int = field(default=4096, metadata={
        "help": "Tokens per chunk of the fused output-layer + cross-entropy (bounds the logits kept in memory)."})

    def __post_init__(self):
        if self.op_backend not in KERNEL_BACKENDS:
            raise UserError(f"kernels.op_backend (--kernels)={self.op_backend!r} is not one of "
                            f"{', '.join(KERNEL_BACKENDS)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise UserError(f"kernels.attention_backend={self.attention_backend!r} is not one of "
                            f"{', '.join(ATTENTION_BACKENDS)}")
        if self.cross_entropy_chunk_size < 1:
            raise UserError(f"kernels.cross_entropy_chunk_size={self.cross_entropy_chunk_size} must be >= 1")
