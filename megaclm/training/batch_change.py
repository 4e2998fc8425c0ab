"""Resuming with another --global-batch-size: allowed when the run can continue exactly, else refused.

Megatron-LM changes the global batch within a run (--rampup-batch-size); megaclm allows one change
per resume, from G (the checkpoint's) to G':

    data        the sampler continues at the checkpoint's consumed samples C: the next step reads
                samples C .. C+G'-1 (the sample order itself does not depend on the batch size)
    progress    iteration, consumed samples and consumed tokens carry over; each step now adds G'
    lr          a pure function of (iteration, consumed tokens), so it continues if the schedule's
                lengths do not depend on the batch: lengths in tokens (--lr-decay-tokens/--train-tokens)
                or in iterations (--train-iters, --lr-*-iters). Lengths in samples (--lr-*-samples,
                --train-samples as the decay length) are iterations of G: at G' the lr would jump to
                another point of its curve, so that change is refused.
    the end     --train-iters, --train-samples or --train-tokens, counted as before

Also refused: a sequence-length warmup or data-mixing schedule (both are placed at steps x G), and a
--train-epochs run (its iterations are counted in global batches of G).
"""
from __future__ import annotations


from megaclm.config import MegaclmConfig
from megaclm.config.derived import train_iters_for
from megaclm.config.derived import Derived
from megaclm.config.training import TrainingConfig
from megaclm.utils.errors import UserError


def saved_global_batch(config_tree: dict | None, meta: dict) -> int | None:
    """The checkpoint's global batch: its --global-batch-size, or the default micro batch x dp (None: unknown)."""
    training = (config_tree or {}).get("training", {})
    if training.get("global_batch_size"):
        return training["global_batch_size"]
    if training.get("micro_batch_size") and meta.get("data_parallel_size"):
        return training["micro_batch_size"] * meta["data_parallel_size"]
    return None


def check_batch_change(cfg: MegaclmConfig, derived: Derived, saved: int | None, iteration: int,
                       where: str) -> str | None:
    """None if the global batch is unchanged (or unknown); the info line saying what continues; or UserError."""
    new = derived.global_batch_size
    if saved is None or saved == new:
        return None
    change = f"--global-batch-size {new} differs from the checkpoint's {saved} ({where})"
    keep = f"resume with --global-batch-size {saved}"
    d, s, t = cfg.data, cfg.scheduler, cfg.training
    if t.train_epochs is not None:
        raise UserError(f"{change}: --train-epochs fixed the run's end and its lr schedule in iterations of {saved} "
                        f"samples; {keep}")
    if d.curriculum_seqlen_start is not None or d.mixing_phases:
        raise UserError(f"{change}: the sequence-length warmup and data-mixing phases are placed at steps of {saved} "
                        f"samples and would move; {keep}")
    seq = derived.seq_length

    def lengths(gbs: int):
        return s.lengths(train_iters_for(t, gbs, seq), gbs * seq, t.train_tokens, gbs)

    (unit, *before), (_, *after) = lengths(saved), lengths(new)
    unit = "iterations" if unit == "iters" else unit
    if before != after:
        names = ("warmup", "decay", "WSD decay")
        moved = ", ".join(f"{n} {a:g} -> {b:g} {unit}" for n, a, b in zip(names, before, after) if a != b)
        raise UserError(f"{change}: the lr schedule counts {unit} but its lengths are given in samples or tokens "
                        f"({moved}), so the lr would jump; give them in tokens (--lr-decay-tokens, --lr-warmup-tokens) "
                        f"or iterations (--lr-decay-iters, --lr-warmup-iters), or {keep}")
    lr = ("tokens: it continues exactly" if unit == "tokens" else
          f"iterations: it continues from iteration {iteration} on the same curve, each iteration now {new} samples")
    return (f"resuming with global batch size {new} (the checkpoint's: {saved}, {where}): the data continues at the "
            f"checkpoint's consumed samples, each step now reads {new}; iteration {iteration}, consumed samples and "
            f"tokens carry over; the lr schedule counts {lr}")


def samples_needed(training: TrainingConfig, gbs: int, seq_length: int, iteration: int, consumed_samples: int,
                   consumed_tokens: int) -> int:
    """Training samples a resumed run reads until its first limit (as Trainer.done counts them)."""
    t, steps = training, []
    if t.train_iters is not None:
        steps.append(t.train_iters - iteration)
    if t.train_samples is not None:
        steps.append(-(-(t.train_samples - consumed_samples) // gbs))
    if t.train_tokens is not None:
        steps.append(-(-(t.train_tokens - consumed_tokens) // (gbs * seq_length)))
    return consumed_samples + max(0, min(steps, default=0)) * gbs
