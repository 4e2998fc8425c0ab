"""--torch-compile vs eager: one training step (forward + backward + SGD) of a small Llama-shaped GPTModel.

    python bench/torch_compile.py [--layers 4] [--hidden 256] [--seq 256] [--batch 4] [--iters 10]

Both models are built from one seed and timed in this run, alternating (eager step, compiled step) so
that machine noise hits both; the compile time (first steps) is reported separately and left out of
the per-step medians. Prints the medians and the ratio compiled / eager (< 1: compiling is faster).
Runs on CPU (inductor's C++ backend) or on a CUDA GPU (triton).
"""
import argparse
import statistics
import time

import torch

from megaclm.config.kernels import KernelsConfig
from megaclm.config.model import ModelConfig
from megaclm.model.gpt import GPTModel
from megaclm.ops import compile_unavailable
from megaclm.utils.errors import UserError, cli_main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=10, help="Timed steps per model after the warm-up.")
    p.add_argument("--warmup", type=int, default=3, help="Untimed steps per model (compilation happens here).")
    a = p.parse_args()
    reason = compile_unavailable()
    if reason is not None:
        raise UserError(f"torch.compile cannot run here: {reason}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = ModelConfig(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=max(1, a.hidden // 64),
                         max_position_embeddings=a.seq, position_embedding_type="rope", normalization="RMSNorm",
                         swiglu=True, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0)
    vocab = 8192
    models = {}
    for name, flag in (("eager", False), ("compiled", True)):
        torch.manual_seed(0)
        model = GPTModel(config, vocab, kernels=KernelsConfig(torch_compile=flag)).to(device)
        models[name] = (model, torch.optim.SGD(model.parameters(), lr=1e-3))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (a.batch, a.seq + 1), generator=g).to(device)

    def step(name: str) -> float:
        model, opt = models[name]
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    warm = {name: sum(step(name) for _ in range(a.warmup)) for name in models}
    times = {name: [] for name in models}
    for _ in range(a.iters):
        for name in models:
            times[name].append(step(name))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"device {device}, threads {torch.get_num_threads()}: {a.layers} layers, hidden {a.hidden}, "
          f"seq {a.seq}, batch {a.batch}; {a.iters} timed steps each")
    print(f"warm-up ({a.warmup} steps, incl. compilation): eager {warm['eager']:.2f} s, "
          f"compiled {warm['compiled']:.2f} s")
    print(f"step median: eager {med['eager'] * 1e3:.1f} ms, compiled {med['compiled'] * 1e3:.1f} ms")
    print(f"ratio compiled/eager: {med['compiled'] / med['eager']:.3f}")


if __name__ == "__main__":
    cli_main(main)
