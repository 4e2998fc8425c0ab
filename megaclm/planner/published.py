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

BigScience's layout sweep before BLOOM (github.com/bigscience-workshop/bigscience,
train/tr11-176B-ml/chronicles-prequel.md, "GBS Variations", 2022-02-25): one 181B GPT (72 layers, hidden 14,336,
64 heads, vocabulary 250,680, sequence 2,048) on 48 nodes of 8 A100 80GB, with Megatron-DeepSpeed (DeepSpeed's
pipeline engine and ZeRO-1, as megaclm), fp16, full recomputation, no flash attention; seconds per iteration as
measured (the 2nd iteration of each run), and three layouts that ran out of memory. Jean Zay's nodes have
4 Omni-Path links per node (tr11-176B-ml/README.md; Omni-Path 100 runs 100 Gb/s per link), a quarter of a DGX
A100's 8 x 200 Gb/s InfiniBand.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megaclm.config.derived import pad_vocab_size
from megaclm.config.kernels import KernelsConfig
from megaclm.config.model import ModelConfig
from megaclm.config.presets import model_preset
from megaclm.planner.cost import Layout, Prediction, Workload, predict
from megaclm.planner.hardware import HardwareProfile, Link, load_profile
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


BIGSCIENCE_MODEL = dict(layers=72, hidden=14336, heads=64, vocab=250680, seq=2048)


@dataclass(frozen=True)
class SweepRun:
    """One measured layout of a sweep: ZeRO-1, full recomputation, as the sweep ran."""

    tp: int
    pp: int
    dp: int
    micro_batch: int
    global_batch: int
    seconds: float | None  # per iteration as measured; None: out of memory

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tokens_per_s_per_gpu(self) -> float | None:
        """As measured (None: out of memory)."""
        return self.global_batch * BIGSCIENCE_MODEL["seq"] / self.seconds / self.world if self.seconds else None

    def layout(self) -> Layout:
        return Layout(tp=self.tp, pp=self.pp, dp=self.dp, zero=1, recompute="full", micro_batch=self.micro_batch)


# tp, pp, dp, micro batch, global batch, s/iteration. Left out: the three rows at global batch 1,568, layouts also
# timed at 2,048 (tp8 pp6 dp8 mb4 took 113.01 s for 1,568 samples and 114.11 s for 2,048); tp4 pp12 dp8 mb2 was timed
# twice (110.48 and 113.54 s), the first is kept.
BIGSCIENCE_SWEEP = (
    SweepRun(8, 6, 8, 4, 2048, 114.11), SweepRun(8, 6, 8, 6, 2016, 123.57), SweepRun(8, 12, 4, 4, 2048, 117.07),
    SweepRun(8, 12, 4, 2, 2048, 128.82), SweepRun(8, 8, 6, 4, 2016, 113.16), SweepRun(8, 4, 12, 2, 2016, 125.52),
    SweepRun(8, 4, 12, 4, 2016, 114.81), SweepRun(8, 2, 24, 1, 2016, 145.45), SweepRun(8, 2, 24, 2, 2016, 136.13),
    SweepRun(4, 12, 8, 4, 2048, 111.89), SweepRun(4, 12, 8, 2, 2048, 110.48), SweepRun(4, 6, 16, 4, 2048, 117.11),
    SweepRun(4, 6, 16, 2, 2048, 111.71), SweepRun(2, 12, 16, 2, 2048, 112.50), SweepRun(2, 24, 8, 1, 2048, 119.53),
    SweepRun(2, 24, 8, 2, 2048, 122.75), SweepRun(4, 24, 4, 1, 2048, 130.60),
    SweepRun(8, 1, 48, 1, 2016, None), SweepRun(2, 6, 32, 2, 2048, None), SweepRun(2, 6, 32, 1, 2048, None),
)


def jean_zay_a100() -> HardwareProfile:
    """a100-80gb with Jean Zay's inter-node fabric: 4 x 100 Gb/s Omni-Path per 8 GPUs = 6.25 GB/s per GPU, of
    which NCCL's bus bandwidth is taken as the same ~80% as on InfiniBand (the a100 profile's 22 of 25)."""
    return dataclasses.replace(load_profile("a100-80gb"), name="a100-80gb, Jean Zay", inter_node=Link(5.0, 25.0))


def plan_sweep_run(run: SweepRun, hw: HardwareProfile) -> Prediction:
    """The planner's prediction for one layout of BigScience's sweep (memory: megaclm's estimate)."""
    m = BIGSCIENCE_MODEL
    model = model_preset("gpt2-1.3b", num_layers=m["layers"], hidden_size=m["hidden"], num_attention_heads=m["heads"],
                         max_position_embeddings=m["seq"])
    work = Workload(model=model, padded_vocab=pad_vocab_size(m["vocab"], 128, run.tp), seq_length=m["seq"],
                    global_batch=run.global_batch, gpus_per_node=8, precision="fp16", flash_attention=False)
    return predict(run.layout(), work, hw)


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (no ties expected: measured and predicted times)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1))


def sweep_spearman(hw: HardwareProfile) -> float:
    """Rank agreement of the predicted and measured tokens/s per GPU over the sweep's layouts that ran."""
    ran = [r for r in BIGSCIENCE_SWEEP if r.seconds]
    return spearman([r.tokens_per_s_per_gpu for r in ran], [plan_sweep_run(r, hw).tokens_per_s_per_gpu for r in ran])


def fit_op_overhead(hw: HardwareProfile) -> float:
    """The op_overhead_us (0-1000 us, 5 us steps) whose predicted step times fit the sweep's best (least squares
    of log(predicted / measured)). The sweep almost certainly ran with CUDA_LAUNCH_BLOCKING=1 (the same page
    found 320 GPUs always hung without it; BLOOM's training script kept it): every launch waits for its kernel, so
    the host's whole time per operation is on the critical path, not the ~5 us the shipped profiles count. One
    constant fitted on the data it is checked on."""
    ran = [r for r in BIGSCIENCE_SWEEP if r.seconds]

    def misfit(us: float) -> float:
        fitted = dataclasses.replace(hw, op_overhead_us=us)
        return sum(math.log(plan_sweep_run(r, fitted).step_s / r.seconds) ** 2 for r in ran)

    return float(min(range(0, 1001, 5), key=misfit))
