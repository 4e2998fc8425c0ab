"""Change the tensor/pipeline-parallel layout of a megaclm checkpoint.

    python tools/checkpoint/reshard.py --load runs/gpt-tp2 --out runs/gpt-tp1pp2 \\
        --tensor-model-parallel-size 1 --pipeline-model-parallel-size 2
    deepspeed --num_gpus 2 pretrain_gpt.py ... --pipeline-model-parallel-size 2 --load runs/gpt-tp1pp2

What is carried over:
  - model weights: exactly, as fp32 (the optimizer's master copy, <tag>/megaclm/model/; made from
    DeepSpeed's files first when the save did not write them: in place, or in a temporary copy when
    --load is read-only), merged across the old shards and split for the new layout. The vocabulary
    padding is redone for the new TP size (padding rows hold no real token; real rows are unchanged);
  - the Adam moments (exp_avg, exp_avg_sq; <tag>/megaclm/optim/, megaclm.checkpoint.universal) and
    Adam's step count, merged and split the same way (padding rows: zero moments);
  - progress (iteration, consumed samples/tokens, skipped steps), the data position (sampler, skipped
    batches, curriculum) and the loss-spike guard's window.
`--load NEW` (any data-parallel size and ZeRO stage) then continues where the old run stopped; with
`--no-load-optim` Adam's moments restart from zero; `--finetune` starts over from the weights.
RNG states are not carried over. A plain `--load OLD` into another layout does the same without
this tool (pretrain_gpt.py reads megaclm's layout-independent files); the tool writes a checkpoint
that is already split for the new layout (and DeepSpeed's module files for it).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megaclm.logging.quiet import entry_point  # noqa: E402

entry_point()  # before DeepSpeed is imported: it would guess the accelerator, and warn that it did

import torch  # noqa: E402

from megaclm.checkpoint.layout import (CLIENT_KEY, CONFIG, ds_model_states, read_latest, read_meta,  # noqa: E402
                                      tag_at_step)
from megaclm.checkpoint.from_deepspeed import ensure_shards  # noqa: E402
from megaclm.checkpoint.hf import pad_vocab, unpad_vocab, vocab_rows  # noqa: E402
from megaclm.checkpoint.offline import check_fresh_output, write_checkpoint  # noqa: E402
from megaclm.checkpoint.shards import load_full_state_dict  # noqa: E402
from megaclm.checkpoint.universal import MOMENTS, has_optimizer_shards, saved_adam_step  # noqa: E402
from megaclm.config.checkpoint import parse_ckpt_step  # noqa: E402
from megaclm.config.derived import pad_vocab_size  # noqa: E402
from megaclm.config.model import ModelConfig  # noqa: E402
from megaclm.config.parallel import ParallelConfig  # noqa: E402
from megaclm.config.validate import validate_layout  # noqa: E402
from megaclm.logging import get_logger  # noqa: E402
from megaclm.utils.errors import UserError, cli_main  # noqa: E402

log = get_logger("megaclm.reshard")
# meta.json keys that describe the run rather than the layout; the layout keys are rewritten.
KEPT_META = ("iteration", "consumed_samples", "consumed_tokens", "skipped_steps", "best_val_loss", "rollbacks",
             "tokenizer_vocab_size", "hf_vocab_size", "hf_model_type", "zero_stage", "data_fingerprint", "client")


def _client_state(ckpt_dir: str) -> dict | None:
    """megaclm's client state (progress, data sampler) from a DeepSpeed model-states file, if any."""
    path = os.path.join(ckpt_dir, ds_model_states(0))
    if not os.path.isfile(path):
        return None
    # mmap: the file may hold a large 16-bit module; only the small client state is read.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True).get(CLIENT_KEY)


def _check_layout(load: str, tag: str | None, tp: int, pp: int) -> None:
    """The new layout must fit the model: checked from config.json before any weights are read."""
    tag = tag or read_latest(load)
    if tag is None:
        raise UserError(f"--load {load}: no `latest` checkpoint there; pass a checkpoint directory")
    read_meta(load, tag)  # a clear error for an incomplete checkpoint
    with open(os.path.join(load, tag, CONFIG)) as f:
        model_cfg = ModelConfig(**json.load(f)["model"])
    validate_layout(model_cfg, ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))


def reshard(load: str, out: str, tp: int, pp: int, ckpt_step: int | str | None = None) -> str:
    check_fresh_output(out)
    tag = tag_at_step(load, ckpt_step)
    _check_layout(load, tag, tp, pp)
    # DeepSpeed's files -> megaclm's layout-independent ones first, if the save did not write them
    src = ensure_shards(load, tag or read_latest(load))
    ckpt = load_full_state_dict(src, tag)
    meta, tree = ckpt.meta, ckpt.config
    rows = vocab_rows(ckpt.state_dict)
    vocab = max(meta.get("tokenizer_vocab_size", 0), meta.get("hf_vocab_size", 0)) or rows
    padded = pad_vocab_size(vocab, tree["model"]["make_vocab_size_divisible_by"], tp)
    sd = pad_vocab(unpad_vocab(ckpt.state_dict, min(rows, padded)), padded)
    client = _client_state(os.path.join(load, meta["tag"]))
    if client is not None:
        client = {**client, "world_size": None}  # the RNG files of the old ranks are not carried over
    kept = {k: meta[k] for k in KEPT_META if k in meta}
    optim = None
    if has_optimizer_shards(src, meta["tag"]):
        optim = {m: pad_vocab(unpad_vocab(load_full_state_dict(src, meta["tag"], kind="optim", field=m).state_dict,
                                          min(rows, padded)), padded) for m in MOMENTS}
        optim["step"] = saved_adam_step(src, meta["tag"])
    tag = write_checkpoint(out, tree, sd, tp=tp, pp=pp, meta=kept, client_state=client,
                           iteration=meta.get("iteration", 0), optimizer_state=optim)
    log.info(f"resharded {os.path.join(load, meta['tag'])} (tp {meta['tensor_model_parallel_size']} x pp "
             f"{meta['pipeline_model_parallel_size']}, vocab rows {rows}) into {out} (tp {tp} x pp {pp}, vocab rows "
             f"{padded}); " + ("with the Adam moments and step" if optim else
                               "no optimizer state in the source (an older checkpoint): continue with --no-load-optim"))
    return tag


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="megaclm checkpoint directory.")
    p.add_argument("--out", required=True, help="New checkpoint directory (must not exist or be empty).")
    p.add_argument("--tensor-model-parallel-size", type=int, required=True)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--ckpt-step", type=parse_ckpt_step, default=None,
                   help="Reshard iteration N instead of `latest`; `best`: the lowest validation loss's.")
    a = p.parse_args()
    if a.tensor_model_parallel_size < 1 or a.pipeline_model_parallel_size < 1:
        raise UserError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    tag = reshard(a.load, a.out, a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.ckpt_step)
    print(json.dumps({"out": a.out, "tag": tag, "tensor_model_parallel_size": a.tensor_model_parallel_size,
                      "pipeline_model_parallel_size": a.pipeline_model_parallel_size}))


if __name__ == "__main__":
    cli_main(main)
