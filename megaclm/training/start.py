"""What a run starts from: resume `--load`, or initialise from `--pretrained-checkpoint`, as Megatron-LM does it.

    --load DIR holds a checkpoint       resume from it (optimizer, scheduler, data position; or weights only with
                                        --finetune); --pretrained-checkpoint is ignored (one log line says so)
    otherwise, --pretrained-checkpoint  weights only from it, iteration 0, fresh optimizer and schedule:
      P (a megaclm checkpoint)          its `latest` (any TP/PP layout: megaclm.checkpoint.weights)
      P (an HF model directory)         imported at start-up by rank 0 for the run's TP/PP into
                                        <save>/.pretrained-import/ (megaclm.checkpoint.hf.importer), loaded,
                                        then removed; a leftover of a killed launch is removed by the next one
    otherwise                           random initialisation

So `--save X --load X --pretrained-checkpoint HF_DIR` serves the first launch and every restart. A run that
starts afresh (iteration 0, or a --load older than what --save holds) into a --save that holds checkpoints is
refused (`check_save`): its saves would overwrite another run's, unless --overwrite-save.
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, NamedTuple

import torch.distributed as dist

from megaclm.checkpoint.hf import config_from_hf
from megaclm.checkpoint.hf import files as hf_files
from megaclm.checkpoint.hf.importer import import_hf
from megaclm.checkpoint.layout import is_complete, iteration_of, read_config, read_meta, tag_for, tags_on_disk
from megaclm.checkpoint.manifest import Choice
from megaclm.config import MegaclmConfig, shape_fields
from megaclm.config.arguments import section_to_dict
from megaclm.config.derived import pad_vocab_size
from megaclm.logging import get_logger
from megaclm.utils.errors import UserError

log = get_logger("megaclm.train")

IMPORT_DIR = ".pretrained-import"  # under --save: the on-the-fly import of an HF --pretrained-checkpoint


class Start(NamedTuple):
    """The checkpoint `choice` in `dir` the run loads (Choice(None): none), all of it or `weights_only`;
    `hf`: the HF directory that rank 0 imports into `dir` first; `via`: the flag that named it."""

    dir: str | None
    choice: Choice
    weights_only: bool
    hf: str | None = None
    via: str = "--load"

    def flag(self) -> str:
        """How the user named the source, for messages (e.g. "--pretrained-checkpoint hf/llama")."""
        return f"{self.via} {self.hf or self.dir}"

    def iteration(self) -> int:
        """The iteration the run continues from."""
        if self.weights_only or self.choice.tag is None:
            return 0
        meta = read_meta(self.dir, self.choice.tag)
        return 0 if "client" not in meta and meta.get("hf_model_type") else meta.get("iteration", 0)


def resolve_start(cfg: MegaclmConfig, choice: Choice, choose: Callable[[str, int | None], Choice]) -> Start:
    """The run's Start (a --save it would overwrite refused: `check_save`); `choice` is --load's (choose_tag's),
    `choose` resolves another directory's. Rank 0 logs the decision."""
    c = cfg.checkpoint
    pretrained = c.pretrained_checkpoint
    if choice.tag is not None or pretrained is None:
        start = Start(c.load, choice, c.finetune)
        check_save(cfg, start)
        if choice.tag is not None and pretrained is not None and os.environ.get("RANK", "0") == "0":
            log.info(f"--load {c.load} holds {choice.tag}: resuming from it; --pretrained-checkpoint {pretrained} "
                     "is not used")
        return start
    if choose(pretrained, None).tag is not None:
        start = Start(pretrained, choose(pretrained, None), True, via="--pretrained-checkpoint")
    elif not os.path.isfile(os.path.join(pretrained, "config.json")):
        raise UserError(f"--pretrained-checkpoint {pretrained}: neither a megaclm checkpoint (no `latest`, no "
                        "iter_* checkpoint) nor an HF model directory (no config.json); pass one of those")
    elif c.save is None:
        raise UserError(f"--pretrained-checkpoint {pretrained} is an HF model directory, imported at start-up into "
                        "--save; pass --save DIR")
    elif cfg.lora.enabled:
        raise UserError(f"--pretrained-checkpoint {pretrained}: a LoRA run needs its base as a megaclm checkpoint "
                        "that stays in place; import it once with tools/checkpoint/convert_hf.py import and pass that")
    else:
        start = Start(os.path.join(c.save, IMPORT_DIR, "checkpoint"), Choice(tag_for(0)), True, hf=pretrained,
                      via="--pretrained-checkpoint")
    check_save(cfg, start)
    _check_shapes(cfg, start)
    if os.environ.get("RANK", "0") == "0":
        log.info(f"{'--load ' + c.load + ' holds no checkpoint: ' if c.load else ''}initialising the weights from "
                 f"--pretrained-checkpoint {pretrained}; iteration 0, fresh optimizer and schedule")
    return start


def _check_shapes(cfg: MegaclmConfig, start: Start) -> None:
    """The run's model must have the --pretrained-checkpoint's parameter shapes."""
    if start.hf is not None:
        theirs = section_to_dict(config_from_hf(hf_files.read_config(start.hf)))
    else:
        theirs = read_config(start.dir, start.choice.tag)["model"]
    mine = section_to_dict(cfg.model)
    differ = [f"{k}={theirs[k]!r}" for k in shape_fields(theirs) if k in theirs and theirs[k] != mine[k]]
    if differ:
        raise UserError(f"{start.flag()} has {', '.join(differ)}, unlike this run's model; pass its "
                        "model config (`tools/checkpoint/convert_hf.py config --hf DIR` for an HF model, the "
                        "checkpoint's megaclm/config.json otherwise) or matching model flags")


def hf_padded_vocab(cfg: MegaclmConfig, start: Start) -> int:
    """The embedding rows an HF --pretrained-checkpoint is imported with (its vocabulary padded for the run)."""
    vocab = hf_files.read_config(start.hf).get("vocab_size")
    if not isinstance(vocab, int):
        raise UserError(f"--pretrained-checkpoint {start.hf}: config.json has no integer vocab_size; pass a complete "
                        "HF model directory")
    return pad_vocab_size(vocab, cfg.tokenizer.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size)


def check_save(cfg: MegaclmConfig, start: Start) -> None:
    """Refuse a run whose saves would overwrite another run's checkpoints in --save (see the module docstring)."""
    c = cfg.checkpoint
    if c.save is None or c.overwrite_save:
        return
    if (not start.weights_only and start.choice.tag is not None and start.dir is not None
            and os.path.realpath(start.dir) == os.path.realpath(c.save)):
        return  # resuming the run that saved there
    complete = [t for t in tags_on_disk(c.save) if is_complete(c.save, t)]
    if not complete:
        return
    begin, newest = start.iteration(), iteration_of(complete[0])
    if begin == 0 or newest > begin:
        resume = f"--load {c.save}" + (" --no-finetune" if c.finetune else "")
        raise UserError(f"--save {c.save} already holds checkpoints of another run (newest {complete[0]}) and this "
                        f"run starts at iteration {begin}: its saves would overwrite them; resume that run with "
                        f"{resume}, pass another --save, or pass --overwrite-save to reuse the directory")


def import_pretrained(cfg: MegaclmConfig, start: Start, rank: int) -> UserError | None:
    """Rank 0: remove a killed launch's leftover import and, for an HF --pretrained-checkpoint, import it for the
    run's layout; returns the UserError that stopped it (the caller shares the outcome with every rank)."""
    if rank != 0 or cfg.checkpoint.save is None:
        return None
    shutil.rmtree(os.path.join(cfg.checkpoint.save, IMPORT_DIR), ignore_errors=True)
    if start.hf is None:
        return None
    try:
        p = cfg.parallel
        import_hf(start.hf, start.dir, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                  cfg.tokenizer.make_vocab_size_divisible_by)
    except UserError as e:
        return UserError(f"--pretrained-checkpoint {start.hf}: {e}")
    return None


def remove_import(cfg: MegaclmConfig, start: Start, rank: int) -> None:
    """Once every rank loaded the on-the-fly import: rank 0 removes it."""
    if start.hf is None:
        return
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        shutil.rmtree(os.path.join(cfg.checkpoint.save, IMPORT_DIR), ignore_errors=True)
