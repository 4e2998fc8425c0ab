"""Per-token loss normalisation through the real training step (tests/distributed/test_loss_normalisation.py).

One global batch of 8 samples whose loss masks keep very different shares of each sample's tokens runs
through megaclm's Trainer.train_step (megaclm.training.step.TrainStep) on DeepSpeed engines built as pretrain_gpt.py builds them (flags ->
config -> build_model -> build_engine), at micro-batch x accumulation x data-parallel layouts of the same
global batch. Each returns the logged loss and the full gradients the optimizer step receives.
"""
import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from megaclm.config import parse_args
from megaclm.config.deepspeed_json import deepspeed_config
from megaclm.model.gpt import GPTModel
from megaclm.parallel.state import ParallelState
from megaclm.training.engine import build_engine, build_model
from megaclm.training.loop import Progress, Trainer

GBS, SEQ, VOCAB = 8, 32, 128
FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", str(SEQ),
         "--max-position-embeddings", str(SEQ), "--global-batch-size", str(GBS), "--mock-data",
         "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB), "--hidden-dropout", "0",
         "--attention-dropout", "0", "--lr", "1e-3", "--train-iters", "1", "--seed", "7"]


def global_batch() -> dict[str, torch.Tensor]:
    """8 samples; sample i keeps about (i + 1) / 8 of its tokens in the loss (at least one)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB - 8, (GBS, SEQ), generator=g)
    labels = torch.randint(0, VOCAB - 8, (GBS, SEQ), generator=g)
    mask = (torch.rand(GBS, SEQ, generator=g) < torch.linspace(0.05, 1.0, GBS)[:, None]).float()
    mask[:, 0] = 1.0
    return {"tokens": tokens, "labels": labels, "loss_mask": mask,
            "position_ids": torch.arange(SEQ).expand(GBS, SEQ).contiguous()}


class GivenBatch:
    """The part of BatchSource train_step reads: this rank's micro-batches of the global batch, in the
    sampler's order (micro-batch a of dp rank r holds samples (a * dp + r) * mbs ...)."""

    def __init__(self, micro_batch_size: int, accum: int, pstate: ParallelState):
        self.mbs, self.accum, self.pstate = micro_batch_size, accum, pstate

    def micro_batches(self, consumed_samples: int, seq_length: int):
        full = global_batch()
        for a in range(self.accum):
            first = (a * self.pstate.dp_size + self.pstate.dp_rank) * self.mbs
            yield {k: v[first:first + self.mbs] for k, v in full.items()}


def reference(rank: int) -> dict:
    """The plain model, the whole batch at once: sum(loss x mask) / sum(mask); and for contrast the mean of
    per-sample means, which the masks make different."""
    cfg = parse_args(FLAGS + ["--micro-batch-size", "8"], world_size=1).cfg
    torch.manual_seed(cfg.training.seed)
    model = GPTModel(cfg.model, VOCAB)
    b = global_batch()
    losses = model(b["tokens"], position_ids=b["position_ids"], labels=b["labels"])
    loss = (losses * b["loss_mask"]).sum() / b["loss_mask"].sum()
    loss.backward()
    per_sample = ((losses * b["loss_mask"]).sum(1) / b["loss_mask"].sum(1)).mean()
    return {"loss": loss.item(), "mean_of_means": per_sample.item(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def train_step(rank: int, world_size: int, micro_batch_size: int, zero_stage: int) -> dict:
    parsed = parse_args(FLAGS + ["--micro-batch-size", str(micro_batch_size), "--zero-stage", str(zero_stage)],
                        world_size=world_size)
    cfg, derived = parsed.cfg, parsed.derived
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # DeepSpeed's comm on the gloo group
    pstate = ParallelState(world_size, rank)
    pstate.init_process_groups()
    torch.manual_seed(cfg.training.seed)  # the reference's weights
    ds_config = deepspeed_config(cfg, derived, cuda=False)
    engine = build_engine(cfg, build_model(cfg, VOCAB, pstate, ds_config), pstate, ds_config)
    grads, step = {}, engine.step

    def capture_then_step():  # the reduced gradients the optimizer is about to apply
        if engine.is_gradient_accumulation_boundary():
            grads.update({n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()})
        step()

    engine.step = capture_then_step
    trainer = Trainer(cfg, derived, engine, pstate, GivenBatch(micro_batch_size, derived.grad_accum_steps, pstate),
                      schedule=None, metrics=None, progress=Progress(), flops_per_token=lambda seq: 0.0,
                      peak_tflops=None, checkpoint_meta={})
    loss, _ = trainer.train_step(trainer.progress.consumed_samples, SEQ)
    return {"loss": loss, "grads": grads, "accum": derived.grad_accum_steps}


def layouts(rank: int, world_size: int, cases: list[tuple[int, int]]) -> dict:
    out = {(world_size, mbs, zero): train_step(rank, world_size, mbs, zero) for mbs, zero in cases}
    if world_size == 1:
        out["reference"] = reference(rank)
    return out
