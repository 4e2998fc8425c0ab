"""Hardware profiles: what one GPU and its links can do, as JSON.

    {"name": "h100-80gb", "hbm_gib": 80,
     "peak_tflops": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},    dense peak per dtype (fp32: no TF32)
     "achievable": {"matmul": 0.7, "attention": 0.4, "memory": 0.8},  fraction of the peak reached per op class
                                                                      (memory: of hbm_gbps, by memory-bound kernels)
     "hbm_gbps": 3350, "pcie_gbps": 50,                               GB/s (optimizer step; offload transfers)
     "cpu_adam_gparams_per_s": 0.25,                                  offloaded Adam: 1e9 parameters/s per GPU
     "op_overhead_us": 5,                                             fixed cost of one operation on the critical
                                                                      path: a kernel launch on a GPU, an eager op's
                                                                      Python/dispatcher/autograd time on a CPU
     "overlap": 1.0,                                                  optional: the fraction of a collective that
                                                                      can run under compute (1: NCCL on its own
                                                                      stream; gloo on a 2-core host, whose cores
                                                                      do both, measured 0.3-0.4)
     "zero3_layer_us": 0,                                             optional: ZeRO-3's per-layer bookkeeping
                                                                      (DeepSpeed's module hooks), forward+backward
     "links": {"intra_node": {"gbps": 360, "latency_us": 8},          NCCL bus bandwidth per GPU and per-call
               "inter_node": {"gbps": 45, "latency_us": 20}}}         latency, inside a node / across nodes
                                                                      (+ optional "gather_gbps": all-gather,
                                                                      reduce-scatter, all-to-all, if slower;
                                                                      + optional "sizes": {"all_reduce" | "gather":
                                                                      [[wire bytes, seconds] per call, ...]}, a
                                                                      measured curve used instead of the two)

`achievable.attention` is counted against the model FLOPs of attention at the full (not causally halved) s^2,
as the MFU numerator counts them. Shipped profiles (profiles/*.json, each listing its published sources):
a100-80gb, h100-80gb, h200-141gb; bench/profile_hardware.py measures one on the machine at hand.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from megaclm.utils.errors import UserError

PROFILE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")
OP_CLASSES = ("matmul", "attention", "memory")
LINKS = ("intra_node", "inter_node")


def shipped_profiles() -> list[str]:
    return sorted(f[:-len(".json")] for f in os.listdir(PROFILE_DIR) if f.endswith(".json"))


SIZE_KINDS = ("all_reduce", "gather")


def _interpolate(curve: tuple, x: float) -> float:
    """Seconds of one call moving x wire bytes on a measured (bytes, seconds) curve of >= 2 points: piecewise
    linear between them, the smallest message's time below, the last segment extended (its bandwidth) above."""
    if x <= curve[0][0]:
        return curve[0][1]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x <= x1:
            break
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class Link:
    gbps: float  # bus bandwidth per GPU, GB/s (NCCL's busbw: what a ring all-reduce sustains)
    latency_us: float  # fixed cost of one collective call
    gather_gbps: float | None = None  # all-gather / reduce-scatter / all-to-all, when not `gbps` (gloo: slower)
    # Measured seconds per call by wire bytes ({"all_reduce" | "gather": ((bytes, s), ...)}): gloo's mid-size
    # messages are slower than the large-message bandwidth and the empty call's latency add up to.
    sizes: dict | None = None

    def seconds(self, wire_bytes: float, calls: int, gather: bool = False) -> float:
        curve = (self.sizes or {}).get("gather" if gather else "all_reduce")
        if curve and calls:
            return calls * _interpolate(curve, wire_bytes / calls)
        bw = self.gather_gbps if gather and self.gather_gbps else self.gbps
        return wire_bytes / (bw * 1e9) + calls * self.latency_us * 1e-6


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    hbm_gib: float
    peak_tflops: dict
    achievable: dict
    hbm_gbps: float
    pcie_gbps: float
    cpu_adam_gparams_per_s: float
    intra_node: Link
    inter_node: Link
    op_overhead_us: float = 0.0  # per operation (kernel launch; eager op on a CPU), see cost.OPS_PER_LAYER
    overlap: float = 1.0  # fraction of a collective that can hide under compute
    zero3_layer_us: float = 0.0  # ZeRO-3's hooks and bookkeeping per layer, forward + backward

    def peak_flops(self, precision: str) -> float:
        if precision not in self.peak_tflops:
            raise UserError(f"hardware profile {self.name!r} has no peak_tflops for {precision!r}; "
                            f"it lists {', '.join(self.peak_tflops)}")
        return self.peak_tflops[precision] * 1e12

    def to_dict(self) -> dict:
        return {"name": self.name, "hbm_gib": self.hbm_gib, "peak_tflops": self.peak_tflops,
                "achievable": self.achievable, "hbm_gbps": self.hbm_gbps, "pcie_gbps": self.pcie_gbps,
                "cpu_adam_gparams_per_s": self.cpu_adam_gparams_per_s, "op_overhead_us": self.op_overhead_us,
                "overlap": self.overlap, "zero3_layer_us": self.zero3_layer_us,
                "links": {k: _link_dict(getattr(self, k)) for k in LINKS}}


def _link_dict(link: Link) -> dict:
    tree = {"gbps": link.gbps, "latency_us": link.latency_us}
    if link.gather_gbps:
        tree["gather_gbps"] = link.gather_gbps
    if link.sizes:
        tree["sizes"] = {kind: [list(point) for point in curve] for kind, curve in link.sizes.items()}
    return tree


def _positive(tree: dict, key: str, where: str) -> float:
    value = tree.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"{where}: {key} must be a number > 0, got {value!r}")
    return float(value)


def _non_negative(tree: dict, key: str, where: str) -> float:
    """An optional field, 0 when absent (a profile written before it existed models no such cost)."""
    value = tree.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise UserError(f"{where}: {key} must be a number >= 0, got {value!r}")
    return float(value)


def _sizes(link: dict, where: str) -> dict | None:
    """A link's optional measured curves, each >= 2 points of (wire bytes, seconds per call), bytes increasing."""
    sizes = link.get("sizes")
    if sizes is None:
        return None
    if not isinstance(sizes, dict) or set(sizes) - set(SIZE_KINDS):
        raise UserError(f"{where}: sizes must map {' / '.join(SIZE_KINDS)} to [[bytes, seconds], ...]")
    curves = {}
    for kind, curve in sizes.items():
        ok = isinstance(curve, list) and len(curve) >= 2 and all(
            isinstance(pt, list) and len(pt) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                          and v > 0 for v in pt) for pt in curve)
        if not ok or any(a[0] >= b[0] or a[1] > b[1] for a, b in zip(curve, curve[1:])):
            raise UserError(f"{where}: sizes.{kind} must be >= 2 [bytes, seconds] pairs, all > 0, bytes increasing "
                            "and seconds non-decreasing (a larger message is never cheaper)")
        curves[kind] = tuple((float(b), float(t)) for b, t in curve)
    return curves


def profile_from_dict(tree: dict, where: str) -> HardwareProfile:
    """Validate a profile's JSON tree; every bad field is one UserError naming `where` and the field."""
    if not isinstance(tree, dict):
        raise UserError(f"{where}: a hardware profile is a JSON object (see megaclm/planner/hardware.py)")
    missing = [k for k in ("hbm_gib", "peak_tflops", "achievable", "hbm_gbps", "links") if k not in tree]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)} (see megaclm/planner/hardware.py for the fields)")
    peaks = tree["peak_tflops"]
    if not isinstance(peaks, dict) or not peaks:
        raise UserError(f"{where}: peak_tflops must map a dtype (bf16, fp16, fp32) to TFLOP/s")
    peaks = {k: _positive(peaks, k, f"{where} peak_tflops") for k in peaks}
    ach = tree["achievable"]
    if not isinstance(ach, dict):
        raise UserError(f"{where}: achievable must map {', '.join(OP_CLASSES)} to a fraction of the peak")
    for op in OP_CLASSES:
        if not 0 < _positive(ach, op, f"{where} achievable") <= 1:
            raise UserError(f"{where}: achievable.{op}={ach[op]} must be a fraction in (0, 1]")
    links = tree["links"]
    if not isinstance(links, dict) or any(k not in links or not isinstance(links[k], dict) for k in LINKS):
        raise UserError(f"{where}: links needs intra_node and inter_node, each {{\"gbps\": ..., \"latency_us\": ...}}")
    made = {k: Link(_positive(links[k], "gbps", f"{where} links.{k}"),
                    _positive(links[k], "latency_us", f"{where} links.{k}"),
                    _positive(links[k], "gather_gbps", f"{where} links.{k}") if "gather_gbps" in links[k] else None,
                    _sizes(links[k], f"{where} links.{k}"))
            for k in LINKS}
    overlap = _non_negative({"overlap": tree.get("overlap", 1.0)}, "overlap", where)
    if overlap > 1:
        raise UserError(f"{where}: overlap={overlap} must be a fraction in [0, 1]")
    return HardwareProfile(
        name=str(tree.get("name", where)), hbm_gib=_positive(tree, "hbm_gib", where), peak_tflops=peaks,
        achievable={op: float(ach[op]) for op in OP_CLASSES}, hbm_gbps=_positive(tree, "hbm_gbps", where),
        pcie_gbps=_positive({"pcie_gbps": tree.get("pcie_gbps", 25)}, "pcie_gbps", where),
        cpu_adam_gparams_per_s=_positive({"c": tree.get("cpu_adam_gparams_per_s", 0.25)}, "c", where),
        op_overhead_us=_non_negative(tree, "op_overhead_us", where), overlap=overlap,
        zero3_layer_us=_non_negative(tree, "zero3_layer_us", where), **made)


def load_profile(name_or_path: str) -> HardwareProfile:
    """A shipped profile by name (h100-80gb, ...) or a JSON file (e.g. written by bench/profile_hardware.py)."""
    path = name_or_path if name_or_path.endswith(".json") else os.path.join(PROFILE_DIR, name_or_path + ".json")
    if not os.path.isfile(path):
        if name_or_path.endswith(".json"):
            raise UserError(f"--gpu {name_or_path}: no such file; pass a profile JSON (bench/profile_hardware.py "
                            "writes one) or a shipped name")
        raise UserError(f"--gpu {name_or_path}: unknown GPU; choose one of {', '.join(shipped_profiles())} or "
                        "pass a profile .json")
    try:
        with open(path) as f:
            tree = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--gpu {name_or_path}: cannot read it as JSON ({e})") from e
    return profile_from_dict(tree, f"--gpu {name_or_path}")
