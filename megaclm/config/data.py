"""`data:` section - which MMIDIDX datasets feed training, how they are split, blended and scheduled.

Megatron flag names where the feature exists (`--data-path`, `--split`, `--seq-length`,
`--data-cache-path`, `--eod-mask-loss`, `--reset-position-ids`, `--reset-attention-mask`,
`--train-data-path` ...). The pure parsers used to validate the section live here too, so that a bad
`--data-path` or `--split` fails at startup; megaclm.data reuses them:

    parse_blend(["0.3", "A", "0.7", "B"], "data.data_path")  -> ([0.3, 0.7], ["A", "B"])  (normalized)
    parse_blend(["A", "B"], ...)                             -> (None, ["A", "B"])  (weights by size)
    parse_split("969,30,1")                                  -> (0.969, 0.03, 0.001)
    parse_mixing_schedule(["0:0.9,0.1", "1e10:0.5,0.5"])     -> [(0, [0.9, 0.1]), (10**10, [0.5, 0.5])]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from megaclm.utils.errors import UserError

SEQLEN_SCHEDULES = ("fixed_linear", "fixed_root")


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def parse_blend(items: list[str], source: str) -> tuple[list[float] | None, list[str]]:
    """Megatron's blend list: `W1 P1 W2 P2 ...` (weights normalized) or `P1 P2 ...` (no weights).

    `source` names the input in errors (`data.data_path`, or a --data-path-file path).
    """
    items = [str(x) for x in items]
    if not items:
        raise UserError(f"{source} is empty; give at least one dataset prefix")
    numeric = [_number(x) is not None for x in items]
    if not any(numeric):
        return None, items
    if len(items) % 2:
        raise UserError(f"{source} has {len(items)} entries; with weights it must be pairs 'WEIGHT PREFIX ...' "
                        f"(got {' '.join(items[:6])}{' ...' if len(items) > 6 else ''})")
    weights, prefixes = items[0::2], items[1::2]
    for i, (w, p) in enumerate(zip(weights, prefixes)):
        if _number(w) is None:
            raise UserError(f"{source}: entry {2 * i} should be a weight but is {w!r}; write 'WEIGHT PREFIX' pairs")
        if _number(p) is not None:
            raise UserError(f"{source}: entry {2 * i + 1} should be a dataset prefix but is the number {p!r}")
    values = [float(w) for w in weights]
    negative = [f"{w} {p}" for w, p in zip(values, prefixes) if w < 0]
    if negative:
        raise UserError(f"{source}: negative weight(s) {', '.join(negative)}; weights must be >= 0")
    total = sum(values)
    if total <= 0:
        raise UserError(f"{source}: all weights are zero; give at least one dataset a positive weight")
    return [w / total for w in values], prefixes


def parse_split(split: str) -> tuple[float, float, float]:
    """`969,30,1` (or `969/30/1`, or `98,2`) -> normalized (train, valid, test) fractions."""
    # Megatron-LM's Llama-3 example passes `--split '99,1,0'` from a bash array: the quotes arrive literally.
    text = str(split).strip().strip("'\"").replace("/", ",")
    parts = [p.strip() for p in text.split(",")]
    values = [_number(p) for p in parts]
    if not parts or len(parts) > 3 or any(v is None for v in values):
        raise UserError(f"data.split={split!r} must be up to three comma-separated numbers such as '969,30,1'")
    if any(v < 0 for v in values):
        raise UserError(f"data.split={split!r} has a negative part; use non-negative numbers")
    values = values + [0.0] * (3 - len(values))
    total = sum(values)
    if total <= 0 or values[0] <= 0:
        raise UserError(f"data.split={split!r} leaves the training split empty; give train a positive share")
    return tuple(v / total for v in values)  # type: ignore[return-value]


def parse_mixing_schedule(entries: list[str]) -> list[tuple[int, list[float]]]:
    """`START_TOKENS:W1,W2,...` per phase, starts strictly increasing from 0; weights normalized."""
    phases: list[tuple[int, list[float]]] = []
    for i, entry in enumerate(entries):
        where = f"data.data_mixing_schedule[{i}]={entry!r}"
        start_text, sep, weights_text = str(entry).partition(":")
        start = _number(start_text)
        if not sep or start is None or start < 0 or not float(start).is_integer():
            raise UserError(f"{where} must be 'START_TOKENS:W1,W2,...' with a whole token count, e.g. '1e10:0.5,0.5'")
        weights = [_number(w) for w in weights_text.split(",")]
        if any(w is None or w < 0 for w in weights):
            raise UserError(f"{where}: weights must be non-negative numbers separated by commas")
        if sum(weights) <= 0:
            raise UserError(f"{where}: all weights are zero; give at least one dataset a positive weight")
        if phases and len(weights) != len(phases[0][1]):
            raise UserError(f"{where} has {len(weights)} weights but phase 0 has {len(phases[0][1])}; "
                            "give one weight per training dataset in every phase")
        if phases and int(start) <= phases[-1][0]:
            raise UserError(f"{where}: phase starts must increase (previous phase starts at {phases[-1][0]} tokens)")
        phases.append((int(start), [w / sum(weights) for w in weights]))
    if phases and phases[0][0] != 0:
        raise UserError(f"data.data_mixing_schedule starts at {phases[0][0]} tokens; the first phase must start at 0")
    return phases


@dataclass(frozen=True)
class DataConfig:
    """Datasets, splits, blending, caches, sample layout and the data curriculum."""

    seq_length: int = field(default=2048, metadata={"help": "Tokens per training sample (the model's context)."})
    data_path: list[str] = field(default_factory=list, metadata={
        "help": "MMIDIDX prefixes, optionally weighted: 'PREFIX' or '0.3 A 0.7 B' (weights normalized); "
                "split into train/valid/test by --split.", "nargs": "*"})
    mock_data: bool = field(default=False, metadata={
        "help": "Train on synthetic, learnable samples instead of --data-path (megaclm.data.mock_dataset): for "
                "trying a launch script or measuring throughput without a corpus."})
    data_path_file: str | None = field(default=None, metadata={
        "help": "File with the --data-path list for hundreds of datasets: whitespace-separated "
                "'WEIGHT PREFIX' pairs (# comments allowed), or a .yaml/.yml list."})
    train_data_path: list[str] = field(default_factory=list, metadata={
        "help": "Datasets for training only (instead of --data-path + --split); same syntax as --data-path.",
        "nargs": "*"})
    valid_data_path: list[str] = field(default_factory=list, metadata={
        "help": "Datasets for validation only; same syntax as --data-path.", "nargs": "*"})
    test_data_path: list[str] = field(default_factory=list, metadata={
        "help": "Datasets for the final test only; same syntax as --data-path.", "nargs": "*"})
    split: str = field(default="969,30,1", metadata={
        "help": "Train,valid,test proportions of the documents of each --data-path dataset."})
    data_cache_path: str | None = field(default=None, metadata={
        "help": "Directory for the sample-index caches; default: a 'cache' folder beside each dataset. "
                "Unwritable -> a node-local temp directory, with a warning."})
    eod_mask_loss: bool = field(default=False, metadata={
        "help": "Zero the loss where the input token is end-of-document (no prediction across documents)."})
    reset_position_ids: bool = field(default=False, metadata={
        "help": "Restart position ids after every end-of-document token."})
    reset_attention_mask: bool = field(default=False, metadata={
        "help": "Forbid attention across end-of-document tokens (each sample then carries an (S, S) mask)."})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes per rank."})
    curriculum_seqlen_start: int | None = field(default=None, metadata={
        "help": "Sequence-length warmup (DeepSpeed seqlen curriculum): first sequence length; samples are "
                "truncated to the scheduled length until it reaches --seq-length. Unset: no warmup."})
    curriculum_seqlen_steps: int | None = field(default=None, metadata={
        "help": "Length of the sequence-length warmup in optimizer steps."})
    curriculum_seqlen_tokens: int | None = field(default=None, metadata={
        "help": "Length of the sequence-length warmup in consumed tokens (instead of steps)."})
    curriculum_seqlen_schedule: str = field(default="fixed_linear", metadata={
        "help": "Warmup shape: fixed_linear, or fixed_root (progress ** (1/root_degree)).",
        "choices": list(SEQLEN_SCHEDULES)})
    curriculum_seqlen_root_degree: int = field(default=2, metadata={"help": "Root degree of fixed_root."})
    curriculum_seqlen_multiple: int = field(default=8, metadata={
        "help": "Scheduled lengths are rounded down to a multiple of this (8 keeps tensor cores busy)."})
    data_mixing_schedule: list[str] = field(default_factory=list, metadata={
        "help": "Blend weights over consumed tokens, switched in-run: 'START_TOKENS:W1,W2,...' per phase, "
                "first phase at 0, one weight per training dataset; e.g. '0:0.9,0.1' '1e10:0.5,0.5'.",
        "nargs": "*"})

    def __post_init__(self):
        if self.seq_length < 1:
            raise UserError(f"data.seq_length={self.seq_length} must be >= 1")
        if self.num_workers < 0:
            raise UserError(f"data.num_workers={self.num_workers} must be >= 0")
        separate = self.train_data_path or self.valid_data_path or self.test_data_path
        if self.mock_data and (self.data_path or self.data_path_file or separate):
            raise UserError("data.mock_data and data.data_path (or the other data paths) are exclusive; "
                            "drop --mock-data to train on the datasets")
        if (self.data_path or self.data_path_file) and separate:
            raise UserError("data.data_path/data_path_file and data.train_data_path/valid_data_path/test_data_path "
                            "are exclusive; use --data-path with --split, or the separate paths")
        if self.data_path and self.data_path_file:
            raise UserError("data.data_path and data.data_path_file are exclusive; give the list once")
        if (self.valid_data_path or self.test_data_path) and not self.train_data_path:
            raise UserError("data.valid_data_path/test_data_path need data.train_data_path (--train-data-path)")
        for name in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
            if getattr(self, name):
                parse_blend(getattr(self, name), f"data.{name}")
        parse_split(self.split)
        self._check_curriculum()
        phases = parse_mixing_schedule(self.data_mixing_schedule)
        blend = self.data_path or self.train_data_path
        if phases and blend:
            n = len(parse_blend(blend, "data")[1])
            if len(phases[0][1]) != n:
                raise UserError(f"data.data_mixing_schedule has {len(phases[0][1])} weights per phase but "
                                f"{n} training datasets are given; give one weight per dataset")

    def _check_curriculum(self):
        start = self.curriculum_seqlen_start
        if start is None:
            if self.curriculum_seqlen_steps is not None or self.curriculum_seqlen_tokens is not None:
                raise UserError("data.curriculum_seqlen_steps/tokens need data.curriculum_seqlen_start "
                                "(--curriculum-seqlen-start)")
            return
        if not 1 <= start <= self.seq_length:
            raise UserError(f"data.curriculum_seqlen_start={start} must be between 1 and "
                            f"data.seq_length={self.seq_length}")
        given = [n for n in ("curriculum_seqlen_steps", "curriculum_seqlen_tokens") if getattr(self, n) is not None]
        if len(given) != 1:
            raise UserError("data.curriculum_seqlen_start needs exactly one of data.curriculum_seqlen_steps and "
                            "data.curriculum_seqlen_tokens (the warmup length)")
        if getattr(self, given[0]) < 1:
            raise UserError(f"data.{given[0]}={getattr(self, given[0])} must be >= 1")
        if self.curriculum_seqlen_schedule not in SEQLEN_SCHEDULES:
            raise UserError(f"data.curriculum_seqlen_schedule={self.curriculum_seqlen_schedule!r} is not one of "
                            f"{', '.join(SEQLEN_SCHEDULES)}")
        if self.curriculum_seqlen_root_degree < 1:
            raise UserError(f"data.curriculum_seqlen_root_degree={self.curriculum_seqlen_root_degree} must be >= 1")
        if self.curriculum_seqlen_multiple < 1:
            raise UserError(f"data.curriculum_seqlen_multiple={self.curriculum_seqlen_multiple} must be >= 1")

    @property
    def split_fractions(self) -> tuple[float, float, float]:
        return parse_split(self.split)

    @property
    def mixing_phases(self) -> list[tuple[int, list[float]]]:
        return parse_mixing_schedule(self.data_mixing_schedule)
