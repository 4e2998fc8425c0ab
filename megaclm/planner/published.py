"""Published layouts to check the planner against on paper (README "Choosing a layout", validation 2).

Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM"
(arXiv:2104.04473), on DGX A100 80GB nodes (8 GPUs, 8 x 200 Gb/s InfiniBand): GPT models with a 51,200-token
vocabulary and 2,048-token sequences, 4h FFN, mixed precision, full activation recomputation, Megatron's
optimizer (no distributed optimizer: megaclm's ZeRO-0), no sequence parallelism (it came in 2022).
Every row of Table 1 (1.7B to 1T) and Table 2's PTD-P row for GPT-3 175B (174.6B on 384 GPUs).
The paper's teraFLOP/s count the recompute forward (its eq. 3 has 4 passes, not 3), so the model FLOPs
utilization they imply is 3/4 of that over the A100's 312 TFLOP/s: `published_mfu`.

The Megatron-LM README's weak-scaling table (github.com/NVIDIA/Megatron-LM, "Performance Benchmarking",
images/model_table.png, read off the image): GPT models from 1.7B to 462B on H100s, vocabulary 131,072,
sequence 4,096, with the distributed optimizer (megaclm's ZeRO-1) and Megatron's communication overlap
(--overlap-grad-reduce, --overlap-param-gather, --tp-comm-overlap, which needs sequence parallelism); the
teraFLOP/s per GPU are model FLOPs (MFU = them over 989.4). Recomputation is not stated: the planner chooses.
megaclm runs --overlap-grad-reduce too (DeepSpeed's overlap_comm), where DeepSpeed can: without a pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass

from megaclm.config.derived import pad_vocab_size
from megaclm.config.kernels import KernelsConfig
from megaclm.config.model import ModelConfig
from megaclm.config.presets import model_preset
from megaclm.planner.cost import Prediction, Workload
from megaclm.planner.hardware import load_profile
from megaclm.planner.search import SearchResult, SearchSpace, search, shape_rank


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
    tflops_per_gpu: float  # as published
    peak_tflops: float = 312.0  # the GPU's dense 16-bit peak
    counted_passes: int = 4  # passes over the model the published FLOPs count (4: the recompute forward too)
    seq: int = 2048
    vocab: int = 51200

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def published_mfu(self) -> float:
        return 3 / self.counted_passes * self.tflops_per_gpu / self.peak_tflops

    def model(self) -> ModelConfig:
        """GPT as the publication trains it (the gpt2-* presets' architecture at this size)."""
        return model_preset("gpt2-1.3b", num_layers=self.layers, hidden_size=self.hidden,
                            num_attention_heads=self.heads, max_position_embeddings=self.seq)


@dataclass(frozen=True)
class PublishedSet:
    """One publication's runs, the GPU profile to plan them on and the recipe it fixes (the rest is searched)."""

    title: str
    profile: str
    space: SearchSpace
    flash_attention: bool
    runs: tuple[PublishedRun, ...]
    overlaps_comm: bool = False  # the publication hides TP and DP traffic under compute (megaclm: DP, no pipeline)


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


def _h100(name, heads, hidden, layers, tp, pp, gpus, batch, tflops):
    return PublishedRun(name, "Megatron-LM README, model table (H100)", layers, hidden, heads, tp, pp, gpus, batch,
                        tflops, peak_tflops=989.4, counted_passes=3, seq=4096, vocab=131072)


MEGATRON_LM_H100 = (  # name, heads, hidden, layers, tp, pp, GPUs, batch, teraFLOP/s per GPU (data-parallel 48 in all)
    _h100("GPT 1.7B", 16, 2048, 24, 1, 1, 48, 192, 408.8),
    _h100("GPT 7.1B", 32, 4096, 30, 2, 1, 96, 192, 465.9),
    _h100("GPT 16B", 48, 6144, 32, 4, 1, 192, 192, 489.1),
    _h100("GPT 32B", 56, 7168, 48, 8, 1, 384, 192, 459.6),
    _h100("GPT 70B", 64, 8192, 84, 8, 2, 768, 384, 419.7),
    _h100("GPT 119B", 80, 10240, 92, 8, 4, 1536, 768, 420.5),
    _h100("GPT 177B", 96, 12288, 96, 8, 6, 2304, 1152, 432.8),
    _h100("GPT 314B", 128, 16384, 96, 8, 8, 3072, 1536, 474.4),
    _h100("GPT 462B", 144, 18432, 112, 8, 16, 6144, 3072, 459.9),
)

PUBLISHED = (
    PublishedSet("Narayanan et al. 2021, DGX A100", "a100-80gb",
                 SearchSpace(zero=(0,), recompute=("full",), seq=(1,), sp=(False,)), False, NARAYANAN_2021),
    PublishedSet("Megatron-LM README, H100", "h100-80gb",
                 SearchSpace(zero=(1,), seq=(1,), sp=(True,), overlap_grad=(True,)), True, MEGATRON_LM_H100,
                 overlaps_comm=True),
)


def hidden_comm_mfu(prediction: Prediction) -> float:
    """The MFU with all the tensor-parallel and data-parallel traffic hidden under compute (Megatron's
    --tp-comm-overlap, --overlap-grad-reduce, --overlap-param-gather at their best; megaclm hides only the
    gradients' reduce-scatter, outside pipelines): an upper bound."""
    comm = prediction.breakdown.get("tensor comm", 0.0) + prediction.breakdown.get("data comm", 0.0)
    return prediction.mfu * prediction.step_s / (prediction.step_s - comm)


def plan_published(published_set: PublishedSet, run: PublishedRun) -> tuple[SearchResult, Prediction, int]:
    """(the planner's search for a published run under its publication's recipe, the published layout's
    prediction, its rank among the distinct tp x pp x dp shapes)."""
    work = Workload(model=run.model(), padded_vocab=run.vocab, seq_length=run.seq, global_batch=run.global_batch,
                    gpus_per_node=8, flash_attention=published_set.flash_attention)
    result = search(run.gpus, work, load_profile(published_set.profile), published_set.space, KernelsConfig(),
                    padded_vocab_for=lambda tp: pad_vocab_size(run.vocab, 128, tp))
    mine = next(p for p in result.ranked if (p.layout.tp, p.layout.pp, p.layout.dp) == (run.tp, run.pp, run.dp))
    return result, mine, shape_rank(result.ranked, run.tp, run.pp, run.dp)
