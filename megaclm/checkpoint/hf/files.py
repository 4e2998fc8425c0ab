"""Hugging Face model directories on disk: read config + weights, write safetensors + config + tokenizer.

A directory as `save_pretrained` writes it: config.json; weights as model.safetensors, sharded
model-0000i-of-0000n.safetensors + model.safetensors.index.json, or the older pytorch_model.bin
(+ .index.json); tokenizer files beside them. Nothing here touches the hub.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Mapping

import torch

from megaclm.tokenizer import BaseTokenizer, build_tokenizer
from megaclm.utils.errors import UserError
from megaclm.utils.fileio import temp_path_for

# Files that make up an HF tokenizer (any subset), plus generation_config.json (the model's bos/eos/pad
# ids for generation): copied into the checkpoint on import, and out again on export.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_config(hf_dir: str) -> dict:
    if not os.path.isdir(hf_dir):
        raise UserError(f"--hf {hf_dir}: no such directory; pass a local Hugging Face model directory "
                        "(as written by save_pretrained)")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"--hf {hf_dir}: missing file config.json; is it a Hugging Face model directory?")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e


def _weight_files(hf_dir: str) -> list[str]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(hf_dir, single)):
            return [os.path.join(hf_dir, single)]
        if os.path.isfile(os.path.join(hf_dir, index)):
            with open(os.path.join(hf_dir, index), encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(hf_dir, n) for n in names]
            missing = [n for n, p in zip(names, files) if not os.path.isfile(p)]
            if missing:
                raise UserError(f"--hf {hf_dir}: missing file {missing[0]} listed in {index}")
            return files
    raise UserError(f"--hf {hf_dir}: missing file model.safetensors (or model.safetensors.index.json, "
                    "pytorch_model.bin); the directory has no weights")


def read_weights(hf_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for path in _weight_files(hf_dir):
        try:
            part = load_file(path) if path.endswith(".safetensors") else \
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # safetensors/torch raise assorted types on a damaged file
            raise UserError(f"{path}: cannot read the weights ({e})") from e
        sd.update(part)
    return sd


def tokenizer_section(tok_dir: str, root: str | None = None) -> dict | None:
    """The `tokenizer:` config section for the tokenizer files in `tok_dir`, or None if it has none.

    Paths are absolute, under `root` (where the same files will be copied) or else `tok_dir`.
    """
    has = lambda name: os.path.isfile(os.path.join(tok_dir, name))  # noqa: E731
    dest = os.path.abspath(root or tok_dir)
    if has("tokenizer.json"):
        return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": dest}
    if has("vocab.json") and has("merges.txt"):
        return {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": os.path.join(dest, "vocab.json"),
                "merge_file": os.path.join(dest, "merges.txt")}
    if has("tokenizer.model"):
        return {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": os.path.join(dest, "tokenizer.model")}
    return None


def build_from_section(section: Mapping) -> BaseTokenizer:
    return build_tokenizer(section["tokenizer_type"], vocab_file=section.get("vocab_file"),
                           merge_file=section.get("merge_file"), tokenizer_model=section.get("tokenizer_model"),
                           vocab_size=section.get("vocab_size"))


def tokenizer_sources(section: Mapping) -> dict[str, str]:
    """{file name in an HF directory: source path} for the tokenizer a config section names.

    HuggingFaceTokenizer: its directory's tokenizer files; GPT2BPETokenizer: vocab.json + merges.txt
    (AutoTokenizer reads them as a GPT-2 tokenizer through tokenizer_config.json, see write_hf_dir).
    """
    kind = section.get("tokenizer_type")
    if kind == "HuggingFaceTokenizer":
        path = section["tokenizer_model"]
        tok_dir = path if os.path.isdir(path) else os.path.dirname(path)
        files = {n: os.path.join(tok_dir, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tok_dir, n))}
        if os.path.isfile(path):
            files["tokenizer.json"] = path
        return files
    if kind == "GPT2BPETokenizer":
        return {"vocab.json": section["vocab_file"], "merges.txt": section["merge_file"]}
    raise UserError(f"the checkpoint's tokenizer ({kind}) cannot be exported automatically; pass --tokenizer-dir "
                    "with the Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json)")


def token_ids(tokenizer_files: Mapping[str, str], eod: int) -> dict:
    """bos/eos ids for config.json: generation_config.json's when exported with it, else the eod id."""
    ids = {"bos_token_id": eod, "eos_token_id": eod}
    if "generation_config.json" in tokenizer_files:
        with open(tokenizer_files["generation_config.json"], encoding="utf-8") as f:
            gen = json.load(f)
        ids.update({k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if gen.get(k) is not None})
    return ids


def _gpt2_tokenizer_config(eod_token: str) -> dict:
    return {"tokenizer_class": "GPT2Tokenizer", "bos_token": eod_token, "eos_token": eod_token,
            "unk_token": eod_token, "add_prefix_space": False, "model_max_length": 1024}


@contextlib.contextmanager
def staged_dir(out_dir: str):
    """Yield a temporary sibling directory to fill; it becomes `out_dir` (empty or absent) only on success."""
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    tmp = temp_path_for(out_dir)
    os.remove(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # the caller checked it is empty
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_peft_dir(out_dir: str, adapter_config: dict, tensors: Mapping[str, torch.Tensor], dtype: str = "fp32") -> None:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors), written atomically."""
    from safetensors.torch import save_file

    with staged_dir(out_dir) as tmp:
        save_file({k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in tensors.items()},
                  os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(adapter_config, f, indent=1)


def write_hf_dir(out_dir: str, config: dict, state_dict: Mapping[str, torch.Tensor],
                 tokenizer_files: Mapping[str, str], dtype: str = "fp32", max_shard_gb: float = 5.0) -> None:
    """Write an HF model directory atomically: safetensors (sharded above `max_shard_gb`), config.json, tokenizer."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(DTYPES[dtype]).clone().contiguous() for k, v in state_dict.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_gb * 2 ** 30:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    with staged_dir(out_dir) as tmp:
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in tensors.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            name = str(DTYPES[dtype]).replace("torch.", "")
            json.dump({**config, "dtype": name, "torch_dtype": name}, f, indent=1)  # transformers 5 / 4.x
        for name, src in tokenizer_files.items():
            shutil.copyfile(src, os.path.join(tmp, name))
        if "vocab.json" in tokenizer_files and "tokenizer.json" not in tokenizer_files \
                and "tokenizer_config.json" not in tokenizer_files:
            eod = "<|endoftext|>"
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
                json.dump(_gpt2_tokenizer_config(eod), f, indent=1)
