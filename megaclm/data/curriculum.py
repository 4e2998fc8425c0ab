"""Data curriculum: sequence-length warmup and data-mixing phases, both resumable.

    cur = Curriculum.from_config(cfg.data, global_batch_size=gbs)
    for each optimizer step:
        batch = cur.truncate(batch)          # tokens/labels/loss_mask/position_ids[:, :L], mask[:, :L, :L]
        ... forward/backward/step ...
        cur.step()                           # consumed_tokens += gbs * L; iteration += 1
    cur.seqlen, cur.phase, cur.consumed_tokens      # for logging
    ckpt["curriculum"] = cur.state_dict();  cur.load_state_dict(ckpt["curriculum"])

(a) Sequence-length warmup, as DeepSpeed's seqlen curriculum (fixed_linear / fixed_root): with
progress t/T over T steps (`--curriculum-seqlen-steps`) or T consumed tokens
(`--curriculum-seqlen-tokens`), the length is start + progress' x (seq_length - start), progress' =
progress (linear) or progress ** (1 / root_degree), rounded down to a multiple of
`--curriculum-seqlen-multiple` (never below start) and exactly seq_length once progress reaches 1.
Samples keep their full seq_length + 1 tokens on disk; the step's batch is truncated, so the sample
stream does not depend on the schedule.

(b) Data-mixing phases (`--data-mixing-schedule 0:0.9,0.1 1e10:0.5,0.5`): blend weights by consumed
tokens. A phase starts at the first optimizer step before which at least its start tokens were
consumed; `sample_phases(n)` turns that into sample counts (step x global batch), which is how the
training blend (megaclm.data.blended_dataset) is built, so the mix switches inside one run, at the
same sample whether the run was resumed or not.

The schedule is a pure function of the iteration, so the state is (iteration, consumed_tokens);
consumed_tokens is checked on load.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from megaclm.logging import get_logger
from megaclm.utils.errors import UserError

log = get_logger("megaclm.data")


@dataclass(frozen=True)
class _Stretch:
    """Steps [step, next stretch's step) all run at `seqlen`; `tokens` were consumed before `step`."""

    step: int
    tokens: int
    seqlen: int


class Curriculum:
    def __init__(self, *, seq_length: int, global_batch_size: int, seqlen_start: int | None = None,
                 warmup_steps: int | None = None, warmup_tokens: int | None = None,
                 schedule: str = "fixed_linear", root_degree: int = 2, multiple: int = 8,
                 mixing_phases: list[tuple[int, list[float]]] | None = None):
        if global_batch_size < 1:
            raise UserError(f"global batch size {global_batch_size} must be >= 1")
        if seqlen_start is not None and (warmup_steps is None) == (warmup_tokens is None):
            raise UserError("a sequence-length warmup needs exactly one of warmup steps and warmup tokens")
        self.seq_length = seq_length
        self.global_batch_size = global_batch_size
        self.seqlen_start = seqlen_start
        self.warmup_steps = warmup_steps
        self.warmup_tokens = warmup_tokens
        self.schedule = schedule
        self.root_degree = root_degree
        self.multiple = multiple
        self.mixing_phases = list(mixing_phases or [])
        self.iteration = 0
        self._stretches = self._build_stretches()

    @classmethod
    def from_config(cls, data_cfg, global_batch_size: int) -> "Curriculum":
        """From a megaclm.config.data.DataConfig."""
        return cls(seq_length=data_cfg.seq_length, global_batch_size=global_batch_size,
                   seqlen_start=data_cfg.curriculum_seqlen_start, warmup_steps=data_cfg.curriculum_seqlen_steps,
                   warmup_tokens=data_cfg.curriculum_seqlen_tokens, schedule=data_cfg.curriculum_seqlen_schedule,
                   root_degree=data_cfg.curriculum_seqlen_root_degree, multiple=data_cfg.curriculum_seqlen_multiple,
                   mixing_phases=data_cfg.mixing_phases)

    # ---- the schedule (pure functions of the step) ------------------------------------------

    def _seqlen_rule(self, step: int, tokens: int) -> int:
        if self.seqlen_start is None:
            return self.seq_length
        progress = step / self.warmup_steps if self.warmup_steps is not None else tokens / self.warmup_tokens
        if progress >= 1.0:
            return self.seq_length
        if self.schedule == "fixed_root":
            progress = progress ** (1.0 / self.root_degree)
        value = int(self.seqlen_start + progress * (self.seq_length - self.seqlen_start))
        return min(self.seq_length, max(self.seqlen_start, value - value % self.multiple))

    def _build_stretches(self) -> list[_Stretch]:
        """Runs of steps at one length, up to the first at full length (jumped over by bisection)."""
        gbs = self.global_batch_size
        step, tokens = 0, 0
        stretches = []
        while True:
            length = self._seqlen_rule(step, tokens)
            stretches.append(_Stretch(step, tokens, length))
            if length == self.seq_length:
                return stretches
            # The rule is non-decreasing in (step, tokens): find the first later step that differs.
            hi = 1
            while self._seqlen_rule(step + hi, tokens + hi * gbs * length) == length:
                hi *= 2
            lo = hi // 2  # steps step .. step+lo run at `length`; step+hi does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self._seqlen_rule(step + mid, tokens + mid * gbs * length) == length:
                    lo = mid
                else:
                    hi = mid
            step, tokens = step + hi, tokens + hi * gbs * length

    def _stretch(self, step: int) -> _Stretch:
        return self._stretches[bisect.bisect_right([s.step for s in self._stretches], step) - 1]

    def seqlen_at(self, step: int) -> int:
        return self._stretch(step).seqlen

    def tokens_before(self, step: int) -> int:
        """Tokens consumed by steps 0 .. step-1."""
        s = self._stretch(step)
        return s.tokens + (step - s.step) * self.global_batch_size * s.seqlen

    def first_step_after_tokens(self, tokens: int) -> int:
        """The first step before which at least `tokens` tokens were consumed."""
        i = bisect.bisect_right([s.tokens for s in self._stretches], tokens) - 1
        s = self._stretches[i]
        return s.step + -(-(tokens - s.tokens) // (self.global_batch_size * s.seqlen))

    def phase_at(self, step: int) -> int:
        """Index of the data-mixing phase that step runs in (0 without a schedule)."""
        tokens = self.tokens_before(step)
        return max(0, bisect.bisect_right([start for start, _ in self.mixing_phases], tokens) - 1)

    def sample_phases(self, total_samples: int) -> list[tuple[int, list[float]]]:
        """The mixing phases as (first sample, weights), phases starting before total_samples only."""
        out = []
        for start_tokens, weights in self.mixing_phases:
            first = self.first_step_after_tokens(start_tokens) * self.global_batch_size
            if first < total_samples or not out:
                out.append((first, weights))
        return out

    # ---- the run's position -----------------------------------------------------------------

    @property
    def seqlen(self) -> int:
        return self.seqlen_at(self.iteration)

    @property
    def consumed_tokens(self) -> int:
        return self.tokens_before(self.iteration)

    @property
    def phase(self) -> int:
        return self.phase_at(self.iteration)

    def step(self) -> None:
        """One optimizer step done."""
        self.iteration += 1

    def truncate(self, batch: dict, seqlen: int | None = None) -> dict:
        """Cut a batch (numpy arrays or torch tensors, each (B, S)) to the step's length."""
        length = self.seqlen if seqlen is None else seqlen
        if length >= self.seq_length:
            return batch
        return {key: value[:, :length] if getattr(value, "ndim", 0) >= 2 else value for key, value in batch.items()}

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "consumed_tokens": self.consumed_tokens, "seqlen": self.seqlen,
                "phase": self.phase}

    def load_state_dict(self, state: dict, check_tokens: bool = True) -> None:
        self.iteration = int(state["iteration"])
        if check_tokens and int(state["consumed_tokens"]) != self.consumed_tokens:
            log.warning(f"curriculum: the checkpoint consumed {state['consumed_tokens']} tokens in "
                        f"{self.iteration} steps but this schedule gives {self.consumed_tokens}; the curriculum "
                        "flags changed since it was saved, continuing with the new schedule")
