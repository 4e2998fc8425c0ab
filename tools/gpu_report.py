#!/usr/bin/env python
"""The two Python steps of tools/gpu_check.sh.

    python tools/gpu_report.py env OUT/env.json      # import check of the GPU run, with the versions
    python tools/gpu_report.py report OUT --budget 480 --elapsed 431.2 [--dry-run]

`report` gathers what the stages left in OUT (stages.tsv, env.json, tests_gpu.xml, kernel_bench.json,
throughput_<case>.json) into OUT/gpu_check.json and OUT/gpu_check.md and prints the Markdown. A stage
that failed or ran out of time still contributes what it wrote (the benches rewrite their JSON after
every measurement). It also checks the issue's targets: GPT-2 124M megaclm >= 1.3x HF + torch.compile,
GPT 1.3B >= 50% MFU, Llama 1.2B >= 55% MFU (the better of megaclm's two modes).
"""
import argparse
import importlib
import importlib.metadata as metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaclm.utils.errors import UserError, cli_main  # noqa: E402
from megaclm.utils.fileio import atomic_write  # noqa: E402

# What the GPU run imports: the image's (torch, transformers, pytest) and the carried wheels' (the rest).
IMPORTS = ("torch", "transformers", "deepspeed", "pydantic", "hjson", "pytest", "pytest_timeout", "megaclm")
TARGETS = (  # (case, what, threshold): megaclm's better mode against it
    ("gpt2-124m", "speedup_vs_hf-compile", 1.3),
    ("gpt-1.3b", "mfu", 0.50),
    ("llama-1.2b", "mfu", 0.55),
)
STAGE_FIELDS = ("name", "status", "rc", "seconds", "budget_s", "note")


def environment(path: str) -> int:
    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "versions": {}}
    modules = {}
    for name in IMPORTS:
        try:
            modules[name] = importlib.import_module(name)
        except ImportError as e:
            print(f"error: cannot import {name} ({e}): add its wheel to tools/gpu_wheels.sh", file=sys.stderr)
            return 1
        env["versions"][name] = getattr(modules[name], "__version__", None) or metadata.version(name.replace("_", "-"))
        print(f"{name} {env['versions'][name]} from {os.path.dirname(modules[name].__file__)}")
    torch = modules["torch"]
    env["cuda"] = torch.version.cuda
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc:
        env["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(f"device {env['device']}, torch CUDA {env['cuda']}, nvcc {env.get('nvcc', 'not found')}")
    _write(path, json.dumps(env, indent=1))
    return 0


def _write(path: str, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def _load_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError:
            return None


def read_stages(path: str) -> list[dict]:
    stages = []
    with open(path) as fh:
        for line in fh:
            row = dict(zip(STAGE_FIELDS, line.rstrip("\n").split("\t"), strict=True))
            row["rc"] = int(row["rc"]) if row["rc"] else None
            row["seconds"], row["budget_s"] = float(row["seconds"]), int(row["budget_s"])
            stages.append(row)
    return stages


def read_junit(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    return counts


def check_targets(throughput: dict) -> list[dict]:
    """Each target: the value megaclm's better mode reached (None when the case was not measured)."""
    out = []
    for case, what, threshold in TARGETS:
        rows = {r["mode"]: r for r in throughput.get(case, {}).get("results", [])}
        ours = [r for m, r in rows.items() if m.startswith("megaclm")]
        value, mode = None, None
        if ours and what == "mfu" and all(r["mfu"] is not None for r in ours):
            best = max(ours, key=lambda r: r["mfu"])
            value, mode = best["mfu"], best["mode"]
        elif ours and what.startswith("speedup_vs_") and what[len("speedup_vs_"):] in rows:
            best = max(ours, key=lambda r: r["tokens_per_sec"])
            value, mode = best["tokens_per_sec"] / rows[what[len("speedup_vs_"):]]["tokens_per_sec"], best["mode"]
        out.append({"case": case, "metric": what, "threshold": threshold, "value": value, "mode": mode,
                    "met": None if value is None else value >= threshold})
    return out


def _f(x, fmt):
    return "n/a" if x is None else format(x, fmt)


def markdown(summary: dict) -> str:
    lines = [f"# GPU check{' (dry run on the CPU)' if summary['dry_run'] else ''}", ""]
    env = summary.get("environment") or {}
    if env:
        v = env["versions"]
        lines += [f"{env['device']}; torch {v.get('torch')} (CUDA {env.get('cuda')}), deepspeed {v.get('deepspeed')}, "
                  f"transformers {v.get('transformers')}; {summary['elapsed_s']:.0f} s of a {summary['budget_s']} s "
                  "budget", ""]
    lines += ["| stage | status | seconds | budget s | note |", "|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['budget_s']} | {s['note']} |"
              for s in summary["stages"]]
    tests = summary.get("tests")
    if tests:
        lines += ["", f"tests/gpu: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                  f"{tests['skipped']} skipped" + "".join(f"\n- failed: {t}" for t in tests["failed_tests"])]
    kb = summary.get("kernels")
    if kb and kb["rows"]:
        ratios = {(r["kernel"], r["vs"]): r for r in kb["ratios"]}
        lines += ["", f"Kernels ({kb['dtype']}, HBM peak {kb['peak_tbs']} TB/s; x = {kb['impls'][0]} speed-up, fwd+bwd)",
                  "", "| kernel | impl | fwd ms | fwd GB/s | % peak | fwd+bwd ms | bwd GB/s | % peak | TFLOP/s | x |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in kb["rows"]:
            ratio = ratios.get((r["kernel"], r["impl"]))
            lines.append(f"| {r['kernel']} | {r['impl']} | {r['fwd_ms']:.3f} | {_f(r.get('fwd_gbs'), '.0f')} | "
                         f"{_f(r.get('fwd_peak'), '.0%')} | {r['total_ms']:.3f} | {_f(r.get('bwd_gbs'), '.0f')} | "
                         f"{_f(r.get('bwd_peak'), '.0%')} | {_f(r.get('tflops'), '.1f')} | "
                         f"{_f(ratio and ratio['fwd_bwd_speedup'], '.2f')} |")
    hw = summary.get("hardware_profile")
    if hw:
        m, link = hw["measured"], hw["links"]["intra_node"]
        lines += ["", f"Hardware profile {hw['name']} (bench/profile_hardware.py, for tools/plan_layout.py --gpu): "
                  f"matmul {m['matmul_tflops']:.2f} TFLOP/s, attention {m['attention_tflops']:.2f} TFLOP/s, copy "
                  f"{m['copy_gbps']:.0f} GB/s, {hw.get('op_overhead_us', 0)} us per operation, ZeRO-3 "
                  f"{hw.get('zero3_layer_us', 0)} us per layer; link {link['gbps']} GB/s, {link['latency_us']} us per "
                  f"call, overlap {hw.get('overlap', 1.0)}"]
    rows = [r for t in summary["throughput"].values() for r in t.get("results", [])]
    if rows:
        lines += ["", "Throughput (bf16; megaclm/x and fused/x: megaclm's tokens/s over the row's)", "",
                  "| case | mode | micro batch | tokens/s | TFLOP/s | MFU | peak GB | megaclm/x | fused/x |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['mode']} | {r['micro_batch']} | {r['tokens_per_sec']:,.0f} | {r['tflops']:.2f} | "
                  f"{_f(r['mfu'], '.1%')} | {_f(r['peak_memory_gb'], '.1f')} | {_f(r['megaclm_ratio'], '.2f')} | "
                  f"{_f(r['megaclm_fused_ratio'], '.2f')} |" for r in rows]
    for case, t in summary["throughput"].items():
        for mode, found in t.get("largest_micro_batch", {}).get(case, {}).items():
            lines.append(f"\n{case}: largest micro batch {mode} {found['micro_batch']}"
                         f"{' (the cap)' if found['hit_cap'] else ''}")
        if not t.get("fused_kernels", {}).get("available", True):
            lines.append(f"\n{case}: megaclm-fused ran the PyTorch ops ({t['fused_kernels']['reason']})")
    lines += ["", "| target | value | met |", "|---|---|---|"]
    for t in summary["targets"]:
        value = _f(t["value"], ".1%" if t["metric"] == "mfu" else ".2f")
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "no")
        mode = f" ({t['mode']})" if t["mode"] else ""
        lines.append(f"| {t['case']} {t['metric']} >= {t['threshold']} | {value}{mode} | {met} |")
    return "\n".join(lines) + "\n"


def report(args) -> int:
    out = args.out
    stages = read_stages(os.path.join(out, "stages.tsv"))
    throughput = {s["name"][len("throughput-"):]: _load_json(os.path.join(out, f"{s['name'].replace('-', '_', 1)}.json"))
                  for s in stages if s["name"].startswith("throughput-")}
    throughput = {case: t for case, t in throughput.items() if t is not None}
    summary = {"dry_run": args.dry_run, "budget_s": args.budget, "elapsed_s": args.elapsed, "stages": stages,
               "environment": _load_json(os.path.join(out, "env.json")),
               "tests": read_junit(os.path.join(out, "tests_gpu.xml")),
               "kernels": _load_json(os.path.join(out, "kernel_bench.json")),
               "hardware_profile": _load_json(os.path.join(out, "hardware_profile.json")),
               "throughput": throughput, "targets": check_targets(throughput)}
    text = markdown(summary)
    _write(os.path.join(out, "gpu_check.json"), json.dumps(summary, indent=1))
    _write(os.path.join(out, "gpu_check.md"), text)
    print(text, end="")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="Import everything the GPU run needs; write the versions as JSON.")
    e.add_argument("path")
    r = sub.add_parser("report", help="Gather the stages' outputs into gpu_check.json and gpu_check.md.")
    r.add_argument("out")
    r.add_argument("--budget", type=int, required=True)
    r.add_argument("--elapsed", type=float, required=True)
    r.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    if args.command == "env":
        return environment(args.path)
    if not os.path.exists(os.path.join(args.out, "stages.tsv")):
        raise UserError(f"{args.out}: no stages.tsv; run tools/gpu_check.sh, which writes it")
    return report(args)


if __name__ == "__main__":
    cli_main(main)
