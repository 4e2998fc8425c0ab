"""The layout fuzzer in make test: its sampler covers every axis value within 4 ranks (no processes), and a
fixed-seed sample passes or is refused with one line, and every pinned regression case
(tests/fuzz/regressions.txt) passes, through tools/check_layout.py's check (fuzz.py as a subprocess, as `make
fuzz` runs it)."""
import collections
import random
import subprocess
import sys
from pathlib import Path

from cases import MAX_RANKS, sample
from fuzz import groups, pinned

REPO = Path(__file__).resolve().parents[2]
SAMPLE_SEED, SAMPLE_N = 7, 6


def test_sampler_covers_every_axis_value_within_the_rank_limit():
    seen = collections.defaultdict(set)
    moe_pipelines = collections.Counter()
    rng = random.Random(0)
    for _ in range(300):
        axes, argv = sample(rng)
        flags = dict((g[0], g[1:]) for g in groups(argv))
        assert int(flags["--world-size"][0]) <= MAX_RANKS, argv
        for axis, value in axes.items():
            seen[axis].add(value)
        if axes["moe"] and axes["split"] != "none":  # MoE with a sequence split, also with EP and capacity
            seen["moe_split"].add((axes["split"], axes["ep"], axes["capacity"] is not None))
        if axes["moe"] and axes["pp"] == 2:
            moe_pipelines[axes["ep"]] += 1
    # MoE pipelines are drawn as accepted cases, not only by the 10% that ignore refusals
    assert moe_pipelines[1] >= 10 and moe_pipelines[2] >= 1, moe_pipelines
    assert seen["tp"] == {1, 2} and seen["pp"] == {1, 2} and seen["dp"] == {1, 2, 4}
    assert seen["split"] == {"none", "ulysses", "ring"} and seen["ep"] == {1, 2} and seen["zero"] == {0, 1, 2, 3}
    assert seen["recompute"] == {"none", "selective", "full-uniform", "full-block"}
    assert seen["accum"] == {1, 2, 3, 4} and seen["groups"] == {1, 2, 4}
    assert seen["positions"] == {"rope", "alibi", "learned_absolute"}
    assert seen["moe_split"] == {(split, ep, capacity) for split in ("ulysses", "ring") for ep in (1, 2)
                                 for capacity in (False, True)}
    for axis in ("sp", "offload", "overlap", "lora", "untied", "window", "documents", "eod_mask_loss", "bf16", "moe",
                 "compile", "seqlen_warmup", "shared_expert", "router_losses"):
        assert seen[axis] == {False, True}, axis


def test_pinned_regressions_parse():
    for argv in pinned():
        assert "--world-size" in argv, argv


def test_fixed_seed_sample_and_pinned_regressions():
    r = subprocess.run([sys.executable, "tests/fuzz/fuzz.py", "--n", str(SAMPLE_N), "--seed", str(SAMPLE_SEED),
                        "--regressions", "--no-shrink", "--timeout", "600"], cwd=REPO, capture_output=True, text=True,
                       timeout=3000)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert f"{SAMPLE_N + len(pinned())} cases in" in r.stdout and "FAILED" not in r.stdout
