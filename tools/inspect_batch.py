"""Decode the exact samples of one training step of a megaclm run (e.g. the batch behind a loss spike).

    python tools/inspect_batch.py --load runs/x --iteration 1234          # the global batch of step 1234
    python tools/inspect_batch.py --load runs/x --first-sample 19744      # a batch a spike rollback skipped

The datasets are rebuilt (their index caches loaded) from the checkpoint's config.json exactly as
pretrain_gpt.py builds them (megaclm.training.batch.build_batch_source, global batch and run length
of the checkpoint), and the step's global batch is found with the training sampler, skipped batches
included (megaclm.data.sampler; the skip list of the checkpoint, `latest` or --ckpt-step). So
--iteration N gives the batch step N trained on in the timeline of that checkpoint. The loss-spike
guard logs the sample range of every batch it skipped (metrics.jsonl "skipped_batches"): pass its
first sample to --first-sample.

Prints JSON lines: first {"tag", "iteration", "first_sample", "global_batch_size"}, then one per sample
{"sample", "text"} (+ "tokens" with --tokens); --max-chars shortens the text.
"""
import argparse
import json
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaclm.logging.quiet import entry_point  # noqa: E402

entry_point()  # before DeepSpeed is imported: it would guess the accelerator, and warn that it did

from megaclm.checkpoint.layout import CONFIG, read_latest, read_meta, tag_at_step  # noqa: E402
from megaclm.config import MegaclmConfig, compute_derived  # noqa: E402
from megaclm.config.checkpoint import parse_ckpt_step  # noqa: E402
from megaclm.data.sampler import PretrainingSampler  # noqa: E402
from megaclm.tokenizer import build_tokenizer_from_config  # noqa: E402
from megaclm.training.batch import build_batch_source  # noqa: E402
from megaclm.training.pretrain import derive  # noqa: E402
from megaclm.utils.errors import UserError, cli_main  # noqa: E402


def batch_of(load: str, tag: str | None, iteration: int | None, first_sample: int | None) -> tuple[dict, list[dict]]:
    tag = tag or read_latest(load)
    if tag is None:
        raise UserError(f"--load {load}: no `latest` checkpoint there; pass a --save directory of pretrain_gpt.py")
    meta = read_meta(load, tag)
    with open(os.path.join(load, tag, CONFIG)) as f:
        cfg = MegaclmConfig.from_dict(json.load(f))
    tokenizer = build_tokenizer_from_config(cfg.tokenizer, cfg.parallel.tensor_model_parallel_size)
    derived = derive(cfg, compute_derived(cfg, meta["world_size"]), tokenizer.vocab_size)
    gbs = derived.global_batch_size
    one_rank = SimpleNamespace(dp_rank=0, dp_size=1, pp_size=1)  # the whole global batch, read by one reader
    train = build_batch_source(cfg, derived, tokenizer.eod, one_rank).train
    if first_sample is None:
        if iteration < 1:
            raise UserError(f"--iteration {iteration} must be >= 1 (iteration 1 is the first step)")
        sampler = PretrainingSampler(len(train), 0, gbs, 0, 1, gbs)
        sampler.skipped = list(meta.get("client", {}).get("data", {}).get("sampler", {}).get("skipped", []))
        first_sample = sampler.batch_start(iteration - 1)
    if not 0 <= first_sample <= len(train) - gbs:
        raise UserError(f"the global batch at sample {first_sample} is outside the training data "
                        f"({len(train)} samples, global batch {gbs})")
    header = {"tag": tag, "iteration": iteration, "first_sample": first_sample, "global_batch_size": gbs}
    samples = []
    for i in range(first_sample, first_sample + gbs):
        tokens = train[i]["tokens"].tolist()
        samples.append({"sample": i, "tokens": tokens, "text": tokenizer.detokenize(tokens)})
    return header, samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="Checkpoint directory (--save of the run).")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--iteration", type=int, help="The training step (1-based) whose global batch to decode.")
    which.add_argument("--first-sample", type=int, help="Decode the global batch that starts at this sample.")
    p.add_argument("--ckpt-step", type=parse_ckpt_step, default=None,
                   help="Use checkpoint iteration N instead of `latest`; `best`: the lowest validation loss's.")
    p.add_argument("--tokens", action="store_true", help="Also print the token ids.")
    p.add_argument("--max-chars", type=int, default=None, help="Cut each text to this many characters.")
    a = p.parse_args()
    tag = tag_at_step(a.load, a.ckpt_step)
    header, samples = batch_of(a.load, tag, a.iteration, a.first_sample)
    print(json.dumps(header))
    for s in samples:
        out = {"sample": s["sample"], "text": s["text"][: a.max_chars] if a.max_chars else s["text"]}
        if a.tokens:
            out["tokens"] = s["tokens"]
        print(json.dumps(out))


if __name__ == "__main__":
    cli_main(main)
