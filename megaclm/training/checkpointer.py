"""Checkpointer: when to save, what (every stateful part's state_dict), and the one restore path.

The client state of a checkpoint holds each part's state_dict under its key ("progress", "data", "spike"
(None without the guard)) and "world_size". `restore` loads them back into the parts and the RNG states
last; it serves `--load` at start (megaclm.training.pretrain, after its checksum check and fallback to
the newest healthy checkpoint chose the tag) and the loss-spike guard's rollback.

No checkpoint is written while a guard counts bad steps (a NaN/inf loss, a loss spike): a periodic
save waits for the next healthy step, the final or stop save is skipped (after the last step the run
exits with status 1: its end state was not saved) and nothing is pruned, so `latest` and the newest
healthy checkpoint survive a divergence; before every save the weights themselves must be finite
(DeepSpeed's bf16 optimizer without ZeRO applies non-finite gradients on the CPU). With --async-save
the files are written in the background; the loop's per-step all-reduce (megaclm.training.callbacks
StopConditions) agrees on when every rank's write is done, and only then does `latest` move.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch
import torch.distributed as dist

from megaclm.checkpoint.async_save import AsyncCheckpointWriter
from megaclm.checkpoint.deepspeed_ckpt import load_checkpoint, mark_best, restore_rng, run_layout, save_checkpoint
from megaclm.checkpoint.layout import read_latest, tag_for
from megaclm.config import MegaclmConfig
from megaclm.logging import get_logger
from megaclm.parallel.state import ParallelState
from megaclm.training.metrics import MetricsLogger
from megaclm.training.progress import TrainingDiverged

log = get_logger("megaclm.train")


def load_engine(engine: Any, pstate: ParallelState, zero_stage: int, directory: str, tag: str,
                **options) -> dict | None:
    """Collective: the engine's weights and optimizer from `directory/tag`; returns the client state with the RNG
    states read (megaclm.checkpoint.deepspeed_ckpt.load_checkpoint's options), for `Checkpointer.restore`."""
    return load_checkpoint(engine, directory, tag, layout=run_layout(pstate, zero_stage), **options)


class Checkpointer:
    def __init__(self, cfg: MegaclmConfig, engine: Any, pstate: ParallelState, parts: dict[str, Any], meta: dict, *,
                 bad_steps: Callable[[], int], device: Any, files_written: Callable[[str], None] | None = None):
        """`parts`: key -> object with state_dict()/load_state_dict() (None: absent, saved as None), in the
        client state's key order; `bad_steps`: how many bad steps in a row the guards count now;
        `files_written(tag)`: runs once this rank's files are written (Callbacks.checkpoint_files_written)."""
        self.cfg, self.c, self.engine, self.pstate = cfg, cfg.checkpoint, engine, pstate
        self.parts, self.meta, self.bad_steps, self.device = parts, meta, bad_steps, device
        self.files_written = files_written
        self.writer = AsyncCheckpointWriter() if self.c.async_save else None
        self.last_saved: int | None = None  # the iteration saved last (nothing new to save there)
        self.saves = 0  # saves by this process: every --save-layout-independent-interval-th gathers
        self.save_deferred = False  # a periodic save fell in a streak of bad steps: save at the next healthy one
        self.end_unsaved = False  # the final/stop save was skipped (the run ended in a streak of bad steps)

    @property
    def iteration(self) -> int:
        return self.parts["progress"].iteration

    # ---- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The client state: every part's state_dict, and the world size after data (today's key order)."""
        state = {key: None if part is None else part.state_dict() for key, part in self.parts.items()}
        keys = list(state)
        keys.insert(keys.index("data") + 1, "world_size")
        state["world_size"] = self.pstate.world_size
        return {key: state[key] for key in keys}

    def restore(self, state: dict | None, before_rng: Callable[[], None] | None = None) -> None:
        """The loaded client state into every part (a part absent from the checkpoint keeps its own), then
        `before_rng`, then the RNG states: last, so nothing else draws from the restored streams."""
        if state is not None:
            for key, part in self.parts.items():
                if part is not None and state.get(key) is not None:
                    part.load_state_dict(state[key])
        if before_rng is not None:
            before_rng()
        restore_rng(state)

    # ---- saving ----------------------------------------------------------------------------------------------
    def due(self, iteration: int) -> bool:
        interval = self.c.save_interval
        return bool(interval and iteration % interval == 0) or self.save_deferred

    def last_healthy(self) -> str:
        """The newest complete checkpoint in --save, for messages (every one megaclm saves is healthy).
        Collective with --async-save (a pending save is finished first): call it on every rank."""
        self.wait()
        save = self.c.save
        tag = read_latest(save) if save else None
        return os.path.join(save, tag) if tag else "none (no checkpoint saved yet in --save)"

    def wait(self) -> None:
        """Collective: finish a pending asynchronous save."""
        if self.writer is not None:
            self.writer.wait()

    def _weights_finite(self) -> bool:
        """Whether every rank's weights are finite (its ZeRO-3 partition, else its module parameters)."""
        local = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]
        checks = [torch.isfinite(t).all() for t in local if t.numel()]
        finite = not checks or bool(torch.stack(checks).all())  # one device sync
        flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def save(self, on_complete: Callable[[], None] | None = None, final: bool = False) -> str | None:
        """Save now (sync), or start an asynchronous save after the previous one finished (--async-save);
        `on_complete` runs on rank 0 once the checkpoint is complete and `latest`. During a streak of bad
        steps nothing is saved: a periodic save is deferred to the next healthy step, a `final` one skipped.
        Returns the tag, None when nothing was saved."""
        c, it = self.c, self.iteration
        if c.save is None or self.last_saved == it:
            return None
        bad = self.bad_steps()
        if bad:
            if final or not self.save_deferred:  # once per deferral, not at every bad step after it
                healthy = self.last_healthy()  # collective with --async-save: every rank asks
                if self.pstate.rank == 0:
                    log.warning(f"iteration {it}: not saving during a streak of bad steps (NaN/inf loss or loss "
                                f"spike; {bad} so far); " + ("the run ends without saving its last steps" if final else
                                                             "saving at the next healthy step instead")
                                + f"; the last healthy checkpoint is {healthy}")
            self.save_deferred, self.end_unsaved = not final, final
            return None
        if not self._weights_finite():
            raise TrainingDiverged(f"iteration {it}: the model's weights are not finite; not saving them. Resume from "
                                   f"the last healthy checkpoint, {self.last_healthy()}, with a lower --lr, more "
                                   "warmup or --clip-grad")
        self.save_deferred = False
        self.wait()
        client = self.state_dict()
        progress = client["progress"]
        tag = tag_for(it)
        written = None if self.files_written is None else (lambda: self.files_written(tag))
        self.saves += 1
        every = c.save_layout_independent_interval
        save_checkpoint(self.engine, c.save, it, client, pstate=self.pstate, config_tree=self.cfg.to_dict(),
                        meta={**self.meta, **progress, "client": client}, total_limit=c.save_total_limit,
                        writer=self.writer, on_complete=on_complete, files_written=written,
                        layout_independent=bool(every and self.saves % every == 0))
        self.last_saved = it
        return tag

    def after_eval(self, val_loss: float | None) -> None:
        """--save-best: a new best validation loss saves this iteration (if not saved already) and marks it."""
        c, p = self.c, self.parts["progress"]
        if val_loss is None or not c.save_best or not math.isfinite(val_loss) or self.bad_steps():
            return  # during bad steps nothing is saved, so nothing can be marked best
        if p.best_val_loss is None or val_loss < p.best_val_loss:
            p.best_val_loss = val_loss
            tag = tag_for(p.iteration)
            if self.save(on_complete=lambda: mark_best(c.save, tag, val_loss)) is None:  # saved already
                self.wait()  # `best` names complete checkpoints only
                mark_best(c.save, tag, val_loss)

    # ---- rollback --------------------------------------------------------------------------------------------
    def rollback(self, offending: list[dict], max_rollbacks: int, metrics: MetricsLogger,
                 global_batch_size: int) -> str:
        """K spikes in a row (`offending`, the spike guard's): reload the last checkpoint and pass over the
        offending global batches from now on; returns the tag rolled back to."""
        p, data = self.parts["progress"], self.parts["data"]
        self.wait()
        tag = read_latest(self.c.save)
        seen = ", ".join(str(o["iteration"]) for o in offending)
        if tag is None or p.rollbacks >= max_rollbacks:
            why = (f"there is no checkpoint in {self.c.save} to roll back to" if tag is None else
                   f"the run rolled back {p.rollbacks} times already (--spike-max-rollbacks)")
            raise TrainingDiverged(f"{len(offending)} loss spikes in a row (iterations {seen}) and {why}; stopping. "
                                   "Look at their batches with tools/inspect_batch.py --first-sample")
        rollbacks = p.rollbacks + 1

        def skip_offending() -> None:
            p.rollbacks = rollbacks
            data.skip_batches([o["first_sample"] for o in offending])
            p.consumed_samples = data.consumed_samples

        self.restore(load_engine(self.engine, self.pstate, self.cfg.zero.zero_stage, self.c.save, tag),
                     before_rng=skip_offending)
        self.last_saved = None
        skipped = [{"iteration": o["iteration"], "samples": [o["first_sample"], o["first_sample"] + global_batch_size - 1],
                    "loss": o["loss"], "z": o["z"]} for o in offending]
        metrics.event({"iteration": p.iteration, "rollback": rollbacks, "rollback_to": tag,
                       "skipped_batches": skipped},
                      f"rollback {rollbacks} to {tag} after loss spikes at iterations {seen}; from now on "
                      "skipping the global batches of samples "
                      + ", ".join(f"{a}..{b}" for a, b in (s["samples"] for s in skipped)))
        return tag
