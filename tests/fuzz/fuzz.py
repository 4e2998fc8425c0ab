"""The layout fuzzer: random layouts (tests/fuzz/cases.py), each checked as tools/check_layout.py checks it.

    python tests/fuzz/fuzz.py --n 300 --seed 1            (make fuzz N=300 SEED=1)
    python tests/fuzz/fuzz.py --regressions               the pinned cases of tests/fuzz/regressions.txt

A case passes when the checker says PASS, or when the configuration is refused with its one-line reason (the
validator's job is to accept a combination and then match, or refuse it); a pinned regression case must PASS
(a refusal of it would hide the bug it pins). A mismatch, a crash or a hang (timeout) fails: the case is
printed as a one-line reproducer (`python tools/check_layout.py ...`), then shrunk (flags dropped one group at
a time while it still fails) and printed again.
At the end: counts of pass / refused / fail per axis value.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import shlex
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]
from cases import MAX_RANKS, sample  # noqa: E402
from megaclm.training.layout_check import check  # noqa: E402
from megaclm.utils.errors import UserError  # noqa: E402

REGRESSIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "regressions.txt")


def run_case(argv: list[str], timeout: float) -> tuple[str, str]:
    """("pass" | "refused" | "fail", detail): tools/check_layout.py's check, run in this process (its ranks
    are processes; importing megaclm and starting the rank server once for all cases saves ~6 s of CPU per
    case). A refusal is the UserError pretrain_gpt.py would print as its one `error:` line."""
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="megaclm-fuzz-") as workdir:
        try:
            passed = check(argv, max_ranks=MAX_RANKS, steps=3, workdir=workdir, timeout=timeout, echo=lines.append)
        except UserError as e:
            return "refused", f"error: {e}"
        except Exception:
            return "fail", "\n".join(lines + traceback.format_exc().splitlines()[-20:])
    return ("pass", lines[-1]) if passed else ("fail", "\n".join(lines[-30:]))


def reproducer(argv: list[str]) -> str:
    return "python tools/check_layout.py " + shlex.join(argv)


def groups(argv: list[str]) -> list[list[str]]:
    """The flags as [flag, values...] groups, in order."""
    out: list[list[str]] = []
    for token in argv:
        if token.startswith("--") or not out:
            out.append([token])
        else:
            out[-1].append(token)
    return out


def shrink(argv: list[str], timeout: float) -> list[str]:
    """Drop flag groups (never the base model or --world-size) while the case still fails."""
    essential = {"--num-layers", "--hidden-size", "--seq-length", "--max-position-embeddings", "--train-iters",
                 "--lr", "--mock-data", "--tokenizer-type", "--vocab-size", "--world-size", "--micro-batch-size",
                 "--global-batch-size", "--num-attention-heads"}
    current = groups(argv)
    i = 0
    while i < len(current):
        if current[i][0] in essential:
            i += 1
            continue
        trial = current[:i] + current[i + 1:]
        if run_case([t for g in trial for t in g], timeout)[0] == "fail":
            current = trial
        else:
            i += 1
    return [t for g in current for t in g]


def pinned() -> list[list[str]]:
    with open(REGRESSIONS) as f:
        return [shlex.split(line.split("#")[0]) for line in f if line.split("#")[0].strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10, help="random cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--regressions", action="store_true", help="also run the pinned regression cases")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a case counts as a hang")
    parser.add_argument("--no-shrink", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    cases = [sample(rng) for _ in range(args.n)]
    cases += [({"pinned": True}, argv) for argv in (pinned() if args.regressions else [])]
    counts: dict = collections.defaultdict(collections.Counter)
    failures = []
    started = time.monotonic()
    for i, (axes, argv) in enumerate(cases):
        t = time.monotonic()
        outcome, detail = run_case(argv, args.timeout)
        if axes.get("pinned") and outcome == "refused":  # a pinned case was accepted once: it must still run
            outcome, detail = "fail", f"pinned case refused: {detail}"
        print(f"[{i + 1}/{len(cases)}] {outcome:7} {time.monotonic() - t:5.0f} s  {reproducer(argv)}\n"
              f"        {detail.splitlines()[0] if outcome != 'fail' else detail}", flush=True)
        for axis, value in axes.items():
            counts[(axis, value)][outcome] += 1
        if outcome == "fail":
            small = argv if args.no_shrink else shrink(argv, args.timeout)
            failures.append(small)
            print(f"        shrunk: {reproducer(small)}", flush=True)
    print(f"\n{len(cases)} cases in {time.monotonic() - started:.0f} s; per axis value (pass/refused/fail):")
    for (axis, value), c in sorted(counts.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        print(f"  {axis}={value}: {c['pass']}/{c['refused']}/{c['fail']}")
    for argv in failures:
        print(f"FAILED: {reproducer(argv)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
