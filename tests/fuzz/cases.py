"""The layout fuzzer's case sampler: a seeded draw over every axis megaclm accepts, at most 4 ranks.

`sample(rng)` returns (axes, argv): the axis values drawn (for the per-value counts) and the pretrain_gpt.py
flags of a small run at that layout, --world-size included; tools/check_layout.py compares it with one rank.
"""
from __future__ import annotations

import random

MAX_RANKS = 4
BASE = ["--num-layers", "4", "--hidden-size", "64", "--seq-length", "64", "--max-position-embeddings", "64",
        "--train-iters", "10", "--lr", "1e-3", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size",
        "200", "--hidden-dropout", "0", "--attention-dropout", "0"]


def sample(rng: random.Random) -> tuple[dict, list[str]]:
    """Mostly combinations the validator accepts (so that they run and are compared); one draw in ten ignores
    the known refusals (PP with ZeRO-2/3, query groups per TP rank) to test them too."""
    a: dict = {}
    free = rng.random() < 0.1
    a["moe"] = rng.random() < 0.25
    a["tp"] = rng.choice([1, 2])
    a["sp"] = a["tp"] == 2 and rng.random() < 0.5
    a["pp"] = rng.choice([1, 2])
    a["split"] = rng.choice(["none", "none", "ulysses", "ring"])
    if a["tp"] * a["pp"] * (1 if a["split"] == "none" else 2) > MAX_RANKS:
        a["split"] = "none"
    seq = 1 if a["split"] == "none" else 2
    a["dp"] = rng.choice([d for d in (1, 2, 4) if a["tp"] * a["pp"] * seq * d <= MAX_RANKS])
    a["ep"] = 2 if a["moe"] and a["dp"] * seq >= 2 and rng.random() < 0.6 else 1  # EP ranks: dp or sequence ranks
    a["zero"] = rng.choice([0, 1, 2, 3] if free or a["pp"] == 1 else [0, 1])
    a["offload"] = a["zero"] >= 1 and rng.random() < 0.2
    a["overlap"] = (free or a["zero"] in (1, 2)) and rng.random() < 0.3  # --overlap-grad-reduce (PP: no effect)
    a["recompute"] = rng.choice(["none", "selective", "full-uniform", "full-block"])
    a["lora"] = rng.random() < 0.2
    if a["lora"]:  # an MoE model's MLPs are experts, which take no adapters
        a["lora_target"] = rng.choice(["qkv,proj"] if a["moe"] and not free else ["qkv,fc2", "qkv,proj", "qkv,proj,fc1,fc2"])
    split = a["tp"] * (2 if a["split"] == "ulysses" else 1)  # whole key/value heads per rank
    a["groups"] = rng.choice([g for g in (4, 2, 1) if free or g % split == 0])
    a["untied"] = rng.random() < 0.5
    a["positions"] = rng.choice(["rope", "rope", "alibi", "learned_absolute"])
    a["window"] = rng.random() < 0.2
    a["documents"] = rng.random() < 0.3
    a["eod_mask_loss"] = rng.random() < 0.4
    a["bf16"] = rng.random() < 0.4
    a["accum"] = rng.choice([1, 2, 3, 4])
    a["mbs"] = rng.choice([1, 2])
    a["compile"] = rng.random() < 0.08
    a["seqlen_warmup"] = rng.random() < 0.15
    if a["moe"]:
        a["topk"] = rng.choice([1, 2])
        a["capacity"] = rng.choice([None, 1.0])
        a["shared_expert"] = rng.random() < 0.4
        a["router_losses"] = rng.random() < 0.7  # their gradient crosses stages, their statistics the split
    return a, argv(a)


def argv(a: dict) -> list[str]:
    seq = 1 if a["split"] == "none" else 2
    world = a["tp"] * a["pp"] * seq * a["dp"]
    out = BASE + ["--world-size", str(world), "--num-attention-heads", "4", "--num-query-groups", str(a["groups"]),
                  "--tensor-model-parallel-size", str(a["tp"]), "--pipeline-model-parallel-size", str(a["pp"]),
                  "--micro-batch-size", str(a["mbs"]), "--global-batch-size", str(a["mbs"] * a["dp"] * a["accum"]),
                  "--zero-stage", str(a["zero"]), "--position-embedding-type", a["positions"]]
    out += ["--sequence-parallel"] if a["sp"] else []
    out += {"none": [], "ulysses": ["--ds-sequence-parallel-size", "2"],
            "ring": ["--context-parallel-size", "2"]}[a["split"]]
    if a["offload"]:
        out += ["--offload-optimizer"] + (["--offload-param"] if a["zero"] == 3 else [])
    out += ["--overlap-grad-reduce"] if a["overlap"] else []
    if a["recompute"] != "none":
        granularity, _, method = a["recompute"].partition("-")
        out += ["--recompute-granularity", granularity] + (["--recompute-method", method] if method else [])
    if a["lora"]:
        out += ["--lora-rank", "4", "--lora-target", a["lora_target"]]
    out += ["--untie-embeddings-and-output-weights"] if a["untied"] else []
    out += ["--window-size", "16"] if a["window"] else []
    out += ["--reset-attention-mask", "--reset-position-ids"] if a["documents"] else []
    out += ["--eod-mask-loss"] if a["eod_mask_loss"] else []
    out += ["--bf16"] if a["bf16"] else []
    out += ["--torch-compile"] if a["compile"] else []
    out += ["--curriculum-seqlen-start", "32", "--curriculum-seqlen-steps", "2"] if a["seqlen_warmup"] else []
    if a["moe"]:
        out += ["--num-experts", "4", "--moe-router-topk", str(a["topk"]), "--expert-model-parallel-size", str(a["ep"])]
        out += ["--moe-expert-capacity-factor", str(a["capacity"])] if a["capacity"] else []
        out += ["--moe-shared-expert-intermediate-size", "64"] if a["shared_expert"] else []
        out += ["--moe-aux-loss-coeff", "0.1", "--moe-z-loss-coeff", "0.01"] if a["router_losses"] else []
    return out
