"""`lora:` section - low-rank adapters on the transformer blocks' linears (Hu et al. 2021, PEFT's layout).

With `lora_rank > 0` every targeted linear W (out, in) gets y = W x + (alpha / r) B A dropout(x), with
A (r, in) random and B (out, r) zero, so training starts from the base model exactly; every other
weight is frozen (no gradient, no optimizer state). Targets are megaclm's module names: `qkv` (the
fused q/k/v projection), `proj` (attention output), `fc1` (MLP in, [gate; up] under SwiGLU), `fc2`
(MLP out), or the HF module names of HF_TARGETS, mixed freely. An HF name for part of a fused linear
(q_proj, k_proj, v_proj; gate_proj, up_proj) adapts only its row block: B's other rows are held at zero.
A checkpoint of a LoRA run holds the adapters only, plus the base checkpoint it started from.

QLoRA (`base_quantization`): the frozen base's block linears are stored in NF4 or int8 (megaclm.model.quantize).
"""
from dataclasses import dataclass, field

from megaclm.utils.errors import UserError

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
# Row blocks of the fused column-parallel linears, in row order; fc1 has "gate" under SwiGLU only.
LINEAR_BLOCKS = {"qkv": ("q", "k", "v"), "fc1": ("gate", "up")}
# HF module name -> the (megaclm linear, its row block or None for all of it) it names. Llama/Mistral/Qwen
# names and GPT-2's Conv1D ones, whose c_proj is both the attention output and the MLP out (PEFT matches both).
HF_TARGETS = {"q_proj": (("qkv", "q"),), "k_proj": (("qkv", "k"),), "v_proj": (("qkv", "v"),),
              "o_proj": (("proj", None),), "gate_proj": (("fc1", "gate"),), "up_proj": (("fc1", "up"),),
              "down_proj": (("fc2", None),), "c_attn": (("qkv", None),), "c_fc": (("fc1", None),),
              "c_proj": (("proj", None), ("fc2", None))}
BASE_QUANTIZATIONS = ("none", "nf4", "int8")


def parse_targets(lora_target: str) -> dict[str, tuple[str, ...] | None]:
    """`--lora-target` -> {megaclm linear: the row blocks it adapts, None for all of them}, in LORA_TARGETS order.

    >>> parse_targets("q_proj,v_proj,o_proj")
    {'qkv': ('q', 'v'), 'proj': None}
    """
    names = [t.strip() for t in lora_target.split(",") if t.strip()]
    unknown = [t for t in names if t not in LORA_TARGETS and t not in HF_TARGETS]
    if unknown or not names:
        raise UserError(f"lora.lora_target={lora_target!r}: choose a non-empty comma-separated subset of "
                        f"{','.join(LORA_TARGETS)} or the HF names {','.join(HF_TARGETS)}"
                        + (f" ({', '.join(unknown)} is neither)" if unknown else ""))
    picked: dict[str, set[str] | None] = {}
    for name in names:
        for linear, block in HF_TARGETS.get(name, ((name, None),)):
            if block is None or picked.get(linear, set()) is None:
                picked[linear] = None
            else:
                picked.setdefault(linear, set()).add(block)
    for linear, blocks in picked.items():
        if blocks is not None and set(LINEAR_BLOCKS[linear]) <= blocks:
            picked[linear] = None  # every block named: the whole linear
    return {t: (None if picked[t] is None else tuple(b for b in LINEAR_BLOCKS[t] if b in picked[t]))
            for t in LORA_TARGETS if t in picked}


@dataclass(frozen=True)
class LoraConfig:
    lora_rank: int = field(default=0, metadata={
        "help": "Rank r of the LoRA adapters; 0 trains the full model. Needs --load BASE (the frozen base model)."})
    lora_alpha: float = field(default=16.0, metadata={
        "help": "LoRA scaling: the adapter output is multiplied by lora_alpha / lora_rank (PEFT's rule)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapters' input."})
    lora_target: str = field(default=",".join(LORA_TARGETS), metadata={
        "help": "Linears that get adapters, comma-separated: megaclm's qkv,proj,fc1,fc2 and/or HF module names "
                "(q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; GPT-2's c_attn,c_proj,c_fc). A part of a "
                "fused linear (e.g. q_proj,v_proj) adapts only its rows of qkv."})
    base_quantization: str = field(default="none", metadata={
        "choices": BASE_QUANTIZATIONS,
        "help": "QLoRA: store the frozen base's block linears (qkv, proj, fc1, fc2) in nf4 (4-bit NormalFloat, "
                "blocks of 64) or int8 (per output row), via torchao; none keeps them in the training dtype. "
                "Needs --lora-rank > 0."})

    def __post_init__(self):
        if self.lora_rank < 0:
            raise UserError(f"lora.lora_rank={self.lora_rank} must be >= 0 (0 disables LoRA)")
        if self.lora_alpha <= 0:
            raise UserError(f"lora.lora_alpha={self.lora_alpha} must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"lora.lora_dropout={self.lora_dropout} must be in [0, 1)")
        parse_targets(self.lora_target)  # raises on unknown names
        if self.base_quantization not in BASE_QUANTIZATIONS:
            raise UserError(f"lora.base_quantization={self.base_quantization!r}: choose one of "
                            f"{', '.join(BASE_QUANTIZATIONS)}")
        if self.base_quantization != "none" and not self.enabled:
            raise UserError(f"lora.base_quantization={self.base_quantization}: a quantized base cannot be trained, "
                            "only adapters on it; pass --lora-rank R (e.g. 8), or drop --base-quantization")

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0

    @property
    def target_names(self) -> tuple[str, ...]:
        """The megaclm linears that get adapters (qkv, proj, fc1, fc2), whatever names lora_target used."""
        return tuple(parse_targets(self.lora_target))

    @property
    def quantized(self) -> bool:
        return self.enabled and self.base_quantization != "none"

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def targets(self, name: str) -> bool:
        """Whether the linear `name` (qkv, proj, fc1, fc2) gets an adapter."""
        return self.enabled and name in self.target_names

    def block_mask(self, name: str, blocks: tuple[str, ...]) -> list[bool] | None:
        """Which of the fused linear `name`'s row `blocks` (e.g. q, k, v) get the adapter; None: all of them."""
        picked = parse_targets(self.lora_target).get(name)
        return None if picked is None else [b in picked for b in blocks]
