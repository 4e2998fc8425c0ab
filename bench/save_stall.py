"""Checkpoint save stall: how long the training loop stops for a save, synchronous vs --async-save.

    python bench/save_stall.py                          # GPT 12 x 768 (~124M parameters with a 50k vocabulary)
    python bench/save_stall.py --num-layers 4 --hidden-size 256 --repeats 2   # a quick look

One process (world of one), a DeepSpeed engine built by megaclm (ZeRO-1, AdamW, fp32 on the CPU,
bf16 with --bf16), a few optimizer steps so the Adam moments exist, then per repeat:
  sync   megaclm.checkpoint.deepspeed_ckpt.save_checkpoint: the stall is the whole save;
  async  the same with an AsyncCheckpointWriter: the stall is the time until save_checkpoint returns
         (DeepSpeed's state dicts + RNG + fp32 shard copied to CPU memory); the background write time
         until every file is fsynced is reported too (the loop would overlap it with training steps).
Prints each save's bytes written and stall, the median of each and the ratio sync stall / async stall.
A save writes DeepSpeed's files and megaclm's small ones; --layout-independent also gathers and writes
megaclm's fp32 shards and full Adam moments (what --save-layout-independent-interval does every Nth
save, and what every save did before). The figures depend on the disk (here: whatever --dir is on)
and on host-memory bandwidth.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megaclm.checkpoint.async_save import AsyncCheckpointWriter  # noqa: E402
from megaclm.checkpoint.deepspeed_ckpt import save_checkpoint  # noqa: E402
from megaclm.config import MegaclmConfig, compute_derived  # noqa: E402
from megaclm.config.data import DataConfig  # noqa: E402
from megaclm.config.deepspeed_json import deepspeed_config  # noqa: E402
from megaclm.config.model import ModelConfig  # noqa: E402
from megaclm.config.precision import PrecisionConfig  # noqa: E402
from megaclm.config.training import TrainingConfig  # noqa: E402
from megaclm.config.zero import ZeroConfig  # noqa: E402
from megaclm.training.engine import build_engine, build_model, init_distributed  # noqa: E402


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--hidden-size", type=int, default=768)
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="Where to write (default: a temporary directory).")
    p.add_argument("--layout-independent", action="store_true",
                   help="Also write megaclm's layout-independent files at every save (gathered).")
    a = p.parse_args()
    heads = max(1, a.hidden_size // 64)
    cfg = MegaclmConfig(model=ModelConfig(num_layers=a.num_layers, hidden_size=a.hidden_size,
                                          num_attention_heads=heads, max_position_embeddings=128),
                        data=DataConfig(seq_length=128),
                        training=TrainingConfig(micro_batch_size=1, train_iters=10),
                        precision=PrecisionConfig(bf16=a.bf16), zero=ZeroConfig(zero_stage=1))
    derived = compute_derived(cfg, 1, vocab_size=a.vocab_size)
    pstate = init_distributed(cfg)
    ds = deepspeed_config(cfg, derived, cuda=torch.cuda.is_available())
    engine = build_engine(cfg, build_model(cfg, derived.padded_vocab_size, pstate, ds), pstate, ds)
    device = next(engine.module.parameters()).device
    for _ in range(2):  # Adam moments exist after a step
        tokens = torch.randint(0, a.vocab_size, (1, 128), device=device)
        engine.backward(engine(tokens, labels=tokens).float().mean())
        engine.step()
    root = tempfile.mkdtemp(prefix="save_stall.", dir=a.dir)
    writer = AsyncCheckpointWriter()
    times = {"sync": [], "async": [], "async_write": []}
    size = 0
    try:
        for r in range(a.repeats):
            for mode in ("sync", "async"):
                out = os.path.join(root, f"{mode}{r}")
                start = time.perf_counter()
                save_checkpoint(engine, out, 1, {"bench": True}, pstate=pstate, config_tree=cfg.to_dict(), meta={},
                                writer=writer if mode == "async" else None, layout_independent=a.layout_independent)
                times[mode].append(time.perf_counter() - start)
                if mode == "async":
                    writer.wait()
                    times["async_write"].append(time.perf_counter() - start)
                size = dir_size(out)
                print(f"save {r} {mode:5s}: {size / 1e6:8.1f} MB written, stall {times[mode][-1]:.3f} s", flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in engine.module.parameters())
    print(f"model {params / 1e6:.1f}M parameters, checkpoint {size / 1e9:.2f} GB, {a.repeats} repeats (median)")
    print(f"  sync  save stall            {med['sync']:8.3f} s")
    print(f"  async save stall            {med['async']:8.3f} s   (CPU copy; x{med['sync'] / med['async']:.1f} "
          "shorter than sync)")
    print(f"  async write until fsynced   {med['async_write']:8.3f} s   (in the background)")
    print(f"ratio sync stall / async stall: {med['sync'] / med['async']:.2f}")


if __name__ == "__main__":
    main()
