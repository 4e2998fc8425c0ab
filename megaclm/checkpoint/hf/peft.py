"""megaclm LoRA adapters -> a PEFT adapter directory for the exported HF base model.

    adapter_config.json          {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
    adapter_model.safetensors    base_model.model.<HF module>.lora_A.weight (r, in) / .lora_B.weight (out, r)

megaclm fuses q/k/v (and SwiGLU's gate/up) into one linear with one A; the HF families keep separate
projections. The delta of the fused linear is [B_q; B_k; B_v] A, so each HF projection gets the shared A
and its block of B's rows: the same function, written in PEFT's per-module form. GPT-2's fused c_attn is
kept as one module (a Conv1D, hence `fan_in_fan_out`).

A target naming part of a fused linear (--lora-target q_proj,v_proj) exports only those projections; on GPT-2's
c_attn, which HF fuses too, the whole module with B's unadapted rows at zero (as they stayed in training).
"""
from __future__ import annotations

from typing import Mapping

import torch

from megaclm.config.lora import parse_targets
from megaclm.config.model import ModelConfig


def _modules(mc: ModelConfig, family: str, layer: int) -> dict[str, list[tuple[str, int, str | None]]]:
    """megaclm linear -> [(HF module path, rows of B it takes, its row block or None: all)], in B's row order."""
    H, F, hd = mc.hidden_size, mc.ffn_size, mc.head_dim
    q, kv = mc.num_attention_heads * hd, mc.num_kv_heads * hd
    if family == "gpt2":
        h = f"transformer.h.{layer}."
        return {"qkv": [(h + "attn.c_attn", q + 2 * kv, None)], "proj": [(h + "attn.c_proj", H, None)],
                "fc1": [(h + "mlp.c_fc", F, None)], "fc2": [(h + "mlp.c_proj", H, None)]}
    a, m = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
    return {"qkv": [(a + "q_proj", q, "q"), (a + "k_proj", kv, "k"), (a + "v_proj", kv, "v")],
            "proj": [(a + "o_proj", H, None)], "fc1": [(m + "gate_proj", F, "gate"), (m + "up_proj", F, "up")],
            "fc2": [(m + "down_proj", H, None)]}


def to_peft(mc: ModelConfig, adapters: Mapping[str, torch.Tensor], family: str, lora: dict,
            base_model: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json dict, adapter tensors) from the full adapter state dict of a LoRA checkpoint.

    `lora` is the checkpoint's lora config section; `base_model` goes into base_model_name_or_path."""
    targets = parse_targets(lora["lora_target"])  # megaclm linear -> its adapted row blocks (None: all)
    parent = {"qkv": "attention", "proj": "attention", "fc1": "mlp", "fc2": "mlp"}
    tensors, names = {}, []
    for i in range(mc.num_layers):
        for target, hf in _modules(mc, family, i).items():
            if target not in targets:
                continue
            key = f"layers.{i}.{parent[target]}.{target}"
            a, blocks = adapters[key + ".lora_a"], adapters[key + ".lora_b"].split([rows for _, rows, _ in hf])
            for (path, _, block), b in zip(hf, blocks):
                if targets[target] is not None and block is not None and block not in targets[target]:
                    continue  # e.g. k_proj under --lora-target q_proj,v_proj: B's rows there are zero
                tensors[f"base_model.model.{path}.lora_A.weight"] = a.clone()  # one copy per module (safetensors)
                tensors[f"base_model.model.{path}.lora_B.weight"] = b.contiguous()
                names.append(".".join(path.split(".")[-2:]))  # e.g. self_attn.q_proj: unique per kind
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["lora_rank"],
              "lora_alpha": lora["lora_alpha"], "lora_dropout": lora["lora_dropout"],
              "target_modules": sorted(set(names)), "bias": "none", "fan_in_fan_out": family == "gpt2",
              "use_rslora": False, "init_lora_weights": True, "base_model_name_or_path": base_model,
              "inference_mode": True}
    return config, tensors
