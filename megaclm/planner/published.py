"""Published layouts to check the planner against on paper (README "Choosing a layout", validation 2).

Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM"
(arXiv:2104.04473), on DGX A100 80GB nodes (8 GPUs, 8 x 200 Gb/s InfiniBand): GPT models with a 51,200-token
vocabulary and 2,048-token sequences, 4h FFN, mixed precision, full activation recomputation, Megatron's
optimizer (no distributed optimizer: megaclm's ZeRO-0), no sequence parallelism (it came in 2022).
Every row of Table 1 (1.7B to 1T) and Table 2's PTD-P row for GPT-3 175B (174.6B on 384 GPUs).

The paper's teraFLOP/s count the recompute forward (its eq. 3 has 4 passes, not 3), so the model FLOPs
utilization they imply is 3/4 of that over the A100's 312 TFLOP/s: `published_mfu`.
"""
from __future__ import annotations

from dataclasses import dataclass

from megaclm.config.model import ModelConfig
from megaclm.config.presets import model_preset

A100_PEAK_TFLOPS = 312.0
VOCAB = 51200
SEQ = 2048


@dataclass(frozen=True)
class PublishedRun:
    name: str
    source: str
    layers: int
    hidden: int
    heads: int
    tp: int
    pp: int
    gpus: int
    global_batch: int
    tflops_per_gpu: float  # as published (eq. 3, recompute included)

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def published_mfu(self) -> float:
        return 0.75 * self.tflops_per_gpu / A100_PEAK_TFLOPS

    def model(self) -> ModelConfig:
        """GPT as the paper trains it (the gpt2-* presets' architecture at this size)."""
        return model_preset("gpt2-1.3b", num_layers=self.layers, hidden_size=self.hidden,
                            num_attention_heads=self.heads, max_position_embeddings=SEQ)


NARAYANAN_2021 = (  # name, source, layers, hidden, heads, tp, pp, GPUs, batch, teraFLOP/s per GPU
    PublishedRun("GPT 1.7B", "Narayanan et al. 2021, Table 1", 24, 2304, 24, 1, 1, 32, 512, 137.0),
    PublishedRun("GPT 3.6B", "Narayanan et al. 2021, Table 1", 30, 3072, 32, 2, 1, 64, 512, 138.0),
    PublishedRun("GPT 7.5B", "Narayanan et al. 2021, Table 1", 36, 4096, 32, 4, 1, 128, 512, 142.0),
    PublishedRun("GPT 18.4B", "Narayanan et al. 2021, Table 1", 40, 6144, 48, 8, 1, 256, 1024, 135.0),
    PublishedRun("GPT 39.1B", "Narayanan et al. 2021, Table 1", 48, 8192, 64, 8, 2, 512, 1536, 138.0),
    PublishedRun("GPT 76.1B", "Narayanan et al. 2021, Table 1", 60, 10240, 80, 8, 4, 1024, 1792, 140.0),
    PublishedRun("GPT 145.6B", "Narayanan et al. 2021, Table 1", 80, 12288, 96, 8, 8, 1536, 2304, 148.0),
    PublishedRun("GPT-3 174.6B", "Narayanan et al. 2021, Table 2 (PTD-P, 384 GPUs)", 96, 12288, 96, 8, 12, 384,
                 1536, 153.0),
    PublishedRun("GPT 310.1B", "Narayanan et al. 2021, Table 1", 96, 16384, 128, 8, 16, 1920, 2160, 155.0),
    PublishedRun("GPT 529.6B", "Narayanan et al. 2021, Table 1", 105, 20480, 128, 8, 35, 2520, 2520, 163.0),
    PublishedRun("GPT 1008B", "Narayanan et al. 2021, Table 1", 128, 25600, 160, 8, 64, 3072, 3072, 163.0),
)
