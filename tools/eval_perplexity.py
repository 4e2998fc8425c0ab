"""Perplexity of a megaclm checkpoint or a Hugging Face model on a text corpus, by one exact rule.

    python tools/eval_perplexity.py --load CKPT --input docs.jsonl --json-keys text --seq-length 1024
    python tools/eval_perplexity.py --hf ./hf-model --input docs.jsonl --json-keys text --seq-length 1024
    deepspeed --num_gpus 2 tools/eval_perplexity.py --load CKPT ...   # tensor-parallel over the 2 ranks

--input reads every format tools/preprocess_data.py reads, with the same readers (JSON lines or arrays,
.txt by --text-mode, .csv, .parquet, .arrow, datasets' save_to_disk folders; files, globs, directories).

The rule (so that two models, or two implementations, are compared on exactly the same tokens):
  1. each document (the --json-keys field or column of each line or row) is tokenized on its own: no BOS,
     and special-token strings inside the text are plain text; the eod id is appended after each document;
  2. all documents are concatenated in input order and cut into consecutive non-overlapping windows of
     seq_length + 1 tokens starting at position 0; the incomplete tail is dropped (--max-windows keeps
     the first N windows);
  3. in each window the inputs are tokens[:-1] at positions 0..S-1, attending only within the window,
     and the targets tokens[1:];
  4. loss = the token-weighted mean cross-entropy over all targets, ppl = exp(loss).
The last line printed is one JSON object: {"loss", "ppl", "windows", "tokens"}; --output-json FILE also
writes it to FILE (atomically), for scripts: under the deepspeed launcher the launcher's own lines follow
it on stdout.

A megaclm checkpoint of any TP/PP layout is evaluated with tensor parallelism over the launched ranks
(--tensor-model-parallel-size, default: all of them; the rest split the windows data-parallel). Padded
vocabulary rows are excluded from the softmax: the loss is over the real vocabulary (--vocab-size, default
the imported HF model's or the tokenizer's size), as the exported HF model computes it.
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megaclm.logging.quiet import entry_point  # noqa: E402

entry_point()  # before DeepSpeed is imported: it would guess the accelerator, and warn that it did

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megaclm.checkpoint.hf import files, pad_vocab, unpad_vocab  # noqa: E402
from megaclm.checkpoint.layout import tag_at_step  # noqa: E402
from megaclm.checkpoint.shards import (FullCheckpoint, load_full_state_dict, load_lora_checkpoint,  # noqa: E402
                                      lora_trained_base)
from megaclm.config import MegaclmConfig  # noqa: E402
from megaclm.config.checkpoint import parse_ckpt_step  # noqa: E402
from megaclm.config.derived import pad_vocab_size  # noqa: E402
from megaclm.config.lora import LoraConfig  # noqa: E402
from megaclm.config.tokenizer import TOKENIZER_TYPES  # noqa: E402
from megaclm.data.readers import TEXT_MODE_HELP, TEXT_MODES, check_text_mode, expand_inputs, read_texts  # noqa: E402
from megaclm.model.gpt import GPTModel  # noqa: E402
from megaclm.model.sharding import shard_state_dict  # noqa: E402
from megaclm.parallel.cross_entropy import vocab_parallel_cross_entropy  # noqa: E402
from megaclm.parallel.layers import tp_group  # noqa: E402
from megaclm.parallel.state import ParallelState  # noqa: E402
from megaclm.utils.errors import UserError, cli_main  # noqa: E402
from megaclm.utils.fileio import atomic_write  # noqa: E402
from megaclm.utils.launch_env import rank_env_from_slurm  # noqa: E402


def make_windows(token_docs, eod: int, seq_length: int, max_windows: int | None = None) -> torch.Tensor:
    """(N, seq_length + 1) int64: documents + eod each, concatenated, cut into whole windows from position 0."""
    stream: list[int] = []
    for ids in token_docs:
        stream.extend(ids)
        stream.append(eod)
    n = len(stream) // (seq_length + 1)
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(f"the input has {len(stream)} tokens (with eod), fewer than one window of --seq-length + 1 "
                        f"= {seq_length + 1}; use more text or a shorter --seq-length")
    return torch.tensor(stream[:n * (seq_length + 1)], dtype=torch.int64).view(n, seq_length + 1)


def _init_distributed() -> tuple[int, int, torch.device]:
    rank_env_from_slurm()  # tasks of a bare `srun -n N` job step
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def load_for_eval(load: str, tag: str | None) -> tuple[FullCheckpoint, LoraConfig | None]:
    """The checkpoint's full state dict and, for a LoRA run's checkpoint (adapters only), its LoRA settings with
    the frozen base it names loaded under the adapters: the model then computes W x + (alpha / r) B A x as
    the run did (convert_hf.py export --lora-merge folds the same product into W)."""
    ckpt = load_full_state_dict(load, tag)
    if "lora_base" not in ckpt.meta:
        return ckpt, None
    adapters, base = load_lora_checkpoint(load, tag)
    trained = lora_trained_base(adapters, base)  # a QLoRA run's base quantized and dequantized as the run saw it
    # The run's config (tokenizer included) and sizes; the base's for what only an import records (hf_vocab_size).
    return (FullCheckpoint(adapters.config, {**base.meta, **adapters.meta}, {**trained, **adapters.state_dict}),
            LoraConfig(**adapters.config["lora"]))


class MegaclmScorer:
    """Per-token losses of a megaclm checkpoint, tensor-parallel over `tp` ranks of the launched world."""

    def __init__(self, load: str, ckpt_step: int | str | None, tp: int | None, vocab_size: int | None,
                 rank: int, world: int, device: torch.device):
        ckpt, lora = load_for_eval(load, tag_at_step(load, ckpt_step))
        self.config_tree, meta = ckpt.config, ckpt.meta
        model_cfg = MegaclmConfig.from_dict({"model": ckpt.config["model"]}).model
        tp = tp or world
        self.pstate = ParallelState(world, rank, tp, 1)
        if world > 1:
            self.pstate.init_process_groups()
        rows = ckpt.state_dict["embedding.word_embeddings.weight"].shape[0]
        self.vocab = vocab_size or max(meta.get("tokenizer_vocab_size", 0), meta.get("hf_vocab_size", 0)) or rows
        if self.vocab > rows:
            raise UserError(f"--vocab-size {self.vocab} is larger than the checkpoint's embedding ({rows} rows)")
        # Re-pad for this TP size (a checkpoint saved with another TP may have a different padding).
        padded = rows if rows % tp == 0 else pad_vocab_size(self.vocab, model_cfg.make_vocab_size_divisible_by, tp)
        full = pad_vocab(unpad_vocab(ckpt.state_dict, self.vocab), padded) if padded != rows else ckpt.state_dict
        self.model = GPTModel(model_cfg, padded, self.pstate, lora=lora)
        self.model.load_state_dict(shard_state_dict(full, model_cfg, tp, self.pstate.tp_rank))
        self.model.to(device).eval()
        self.padded, self.tp, self.device = padded, tp, device

    def token_losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(inputs.to(self.device))  # (B, S, padded/tp)
        per_rank = self.padded // self.tp
        ids = self.pstate.tp_rank * per_rank + torch.arange(per_rank, device=logits.device)
        logits = logits.float().masked_fill(ids >= self.vocab, float("-inf"))  # padding is not vocabulary
        return vocab_parallel_cross_entropy(logits, targets.to(self.device), tp_group(self.pstate))  # (B, S) fp32


class HFScorer:
    def __init__(self, hf_dir: str, device: torch.device):
        from transformers import AutoModelForCausalLM

        files.read_config(hf_dir)  # a clear error for a missing directory or config.json
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
        self.device = device

    def token_losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(inputs.to(self.device)).logits.float()  # (B, S, V)
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.to(self.device), reduction="none")


def _tokenizer_section(args, default: dict | None) -> dict:
    if args.tokenizer_type is not None:
        return {"tokenizer_type": args.tokenizer_type, "vocab_file": args.vocab_file, "merge_file": args.merge_file,
                "tokenizer_model": args.tokenizer_model}
    if not default or not default.get("tokenizer_type"):
        raise UserError("no tokenizer: the model carries none; pass --tokenizer-type and its files")
    return default


def evaluate(args) -> dict:
    inputs = expand_inputs(args.input)
    text_mode = check_text_mode(inputs, args.text_mode)
    rank, world, device = _init_distributed()
    if args.hf:
        if world > 1:
            raise UserError("--hf runs in one process; launch it without the distributed launcher")
        scorer = HFScorer(args.hf, device)
        section = _tokenizer_section(args, files.tokenizer_section(args.hf))
        dp, dp_rank = 1, 0
    else:
        scorer = MegaclmScorer(args.load, args.ckpt_step, args.tensor_model_parallel_size, args.vocab_size,
                               rank, world, device)
        section = _tokenizer_section(args, scorer.config_tree.get("tokenizer"))
        dp, dp_rank = scorer.pstate.dp_size, scorer.pstate.dp_rank
    tokenizer = files.build_from_section(section)
    docs = (tokenizer.tokenize(text) for text in read_texts(inputs, args.json_keys[0], text_mode, args.skip_bad_lines))
    windows = make_windows(docs, tokenizer.eod, args.seq_length, args.max_windows)
    mine = windows[dp_rank::dp]  # data-parallel ranks take every dp-th window
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for batch in mine.split(args.micro_batch_size):
            total += scorer.token_losses(batch[:, :-1], batch[:, 1:]).double().sum().cpu()
    if world > 1:  # each window's loss counted once: by tensor-parallel rank 0 of its data-parallel rank
        total *= float(scorer.pstate.tp_rank == 0)
        dist.all_reduce(total)
    tokens = windows.shape[0] * args.seq_length
    loss = total.item() / tokens
    return {"loss": loss, "ppl": math.exp(loss), "windows": windows.shape[0], "tokens": tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="megaclm checkpoint directory (any TP/PP layout).")
    src.add_argument("--hf", help="Local Hugging Face model directory.")
    p.add_argument("--input", nargs="+", required=True,
                   help="Files, globs or directories, in any format tools/preprocess_data.py reads.")
    p.add_argument("--json-keys", "--json-key", nargs="+", default=["text"],
                   help="The field (column) holding each document's text (--json-key, train_tokenizer.py's "
                        "spelling, is accepted too).")
    p.add_argument("--text-mode", choices=TEXT_MODES, default=None, help=TEXT_MODE_HELP)
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="Skip malformed lines (rows) instead of stopping, as preprocess_data.py does.")
    p.add_argument("--seq-length", type=int, required=True, help="Window length S (inputs; windows hold S + 1 tokens).")
    p.add_argument("--max-windows", type=int, default=None, help="Evaluate only the first N windows.")
    p.add_argument("--micro-batch-size", type=int, default=4, help="Windows per forward pass.")
    p.add_argument("--output-json", default=None, metavar="FILE",
                   help="Also write the result object to FILE (rank 0; written to a temp name, then renamed).")
    p.add_argument("--ckpt-step", type=parse_ckpt_step, default=None,
                   help="--load: evaluate iteration N instead of `latest`; `best`: the lowest validation loss's.")
    p.add_argument("--tensor-model-parallel-size", type=int, default=None,
                   help="--load under a launcher: TP size (default: the world size).")
    p.add_argument("--vocab-size", type=int, default=None, help="--load: size of the real vocabulary (see above).")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="Override the model's own tokenizer (default: the checkpoint's, or the HF directory's).")
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--tokenizer-model", default=None)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment is what is used.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if len(a.json_keys) != 1:
        raise UserError(f"--json-keys takes one key for evaluation, got {a.json_keys}")
    for flag, value in (("--seq-length", a.seq_length), ("--micro-batch-size", a.micro_batch_size),
                        ("--max-windows", 1 if a.max_windows is None else a.max_windows)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if a.output_json is not None and not os.path.isdir(os.path.dirname(os.path.abspath(a.output_json))):
        raise UserError(f"--output-json {a.output_json}: its directory does not exist; create it or pick another path")
    result = evaluate(a)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
        if a.output_json is not None:
            with atomic_write(a.output_json, "w") as f:
                f.write(json.dumps(result) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    cli_main(main)
