"""The names of a checkpoint directory and the read-only questions about it (no engine, no torch).

`--save DIR` holds one folder per tag (`iter_0000100`, Megatron's 7-digit naming), megaclm's own
`latest` (the newest complete tag) and `best`; a tag is complete once its `megaclm/meta.json` exists
(written last by megaclm.checkpoint.deepspeed_ckpt.save_checkpoint, right after `megaclm/manifest.json`,
the list of every file with its size and checksum: megaclm.checkpoint.manifest). Everything else in the
package imports these names from here, so the package reads top-down:

    layout  <-  manifest  <-  from_deepspeed  <-  shards  <-  weights  <-  deepspeed_ckpt
                                                            (offline: layout, manifest, from_deepspeed, shards)
"""
from __future__ import annotations

import json
import os
import re

from megaclm.utils.errors import UserError

LATEST = "latest"
BEST = "best"
OWN = "megaclm"  # megaclm's sub-folder of a tag; DeepSpeed's files sit beside it
META = os.path.join(OWN, "meta.json")
CONFIG = os.path.join(OWN, "config.json")
MANIFEST = os.path.join(OWN, "manifest.json")
# The layout-independent per-(tp, pp, ep) files: fp32 weights ("model", megaclm.checkpoint.shards) and full Adam
# moments ("optim", megaclm.checkpoint.universal); written by a save only every --save-layout-independent-interval
# saves, else made from DeepSpeed's files when needed (megaclm.checkpoint.from_deepspeed).
MODEL, OPTIM = "model", "optim"
CLIENT_KEY = "megaclm"  # our namespace inside DeepSpeed's client_state (which also holds DeepSpeed's keys)
_TAG = re.compile(r"^iter_(\d{7,})$")


# A conversion's work folder in a tag's megaclm/ (megaclm.checkpoint.from_deepspeed): who made it (host, pid and the
# pid's start time, to tell a dead converter's leftovers from a live one's), then a random part.
_CONVERT_TMP = re.compile(r"^\.convert\.(?P<host>.+)\.(?P<pid>\d+)\.(?P<start>\d+)\.[0-9a-f]+\.tmp$")


def convert_tmp_name(host: str, pid: int, pid_start: int, unique: str) -> str:
    return f".convert.{host}.{pid}.{pid_start}.{unique}.tmp"


def convert_tmp_owner(name: str) -> tuple[str, int, int] | None:
    """(host, pid, pid start time) of a conversion's work folder name, None for any other name."""
    m = _CONVERT_TMP.match(name)
    return None if m is None else (m["host"], int(m["pid"]), int(m["start"]))


def rng_file(rank: int) -> str:
    """Rank `rank`'s RNG states, relative to the tag."""
    return os.path.join(OWN, "rng", f"rank_{rank:05d}.pt")


def shards_dir(kind: str) -> str:
    """The folder of one kind of layout-independent files (MODEL or OPTIM), relative to the tag."""
    return os.path.join(OWN, kind)


def shard_name(tp_rank: int, pp_rank: int, ep_rank: int = 0) -> str:
    return f"tp{tp_rank:02d}_pp{pp_rank:03d}" + (f"_ep{ep_rank:03d}" if ep_rank else "") + ".pt"


def has_shards(ckpt_dir: str, tag: str, kind: str = MODEL) -> bool:
    return os.path.isdir(os.path.join(ckpt_dir, tag, shards_dir(kind)))


# DeepSpeed's own file names in a tag (its engine's _get_ckpt_name / _get_zero_ckpt_name, PipelineModule's
# ckpt_layer_path, the MoE expert files), which megaclm.checkpoint.offline writes and from_deepspeed reads.
DS_MODEL_STATES = re.compile(r"^(?:zero_pp_rank_\d+_)?mp_rank_(\d+)_model_states\.pt$")  # ZeRO-3: per DP rank
DS_OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")  # (DP rank, MP rank)
DS_EXPERT_STATES = re.compile(r"^layer_\d+_expert_\d+_mp_rank_(\d+)_model_states\.pt$")  # MoE: (MP rank)


def ds_model_states(mp_rank: int) -> str:
    return f"mp_rank_{mp_rank:02d}_model_states.pt"


def ds_layer_states(layer: int, tp_rank: int) -> str:
    """A pipeline layer's weights (`layer` = its index in the flat LayerSpec list)."""
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def ds_expert_states(moe_layer: int, expert: int, tp_rank: int) -> str:
    """Routed expert `expert` (global id) of the `moe_layer`-th MoE layer."""
    return f"layer_{moe_layer}_expert_{expert}_mp_rank_{tp_rank:02d}_model_states.pt"


def ds_expert_optim_states(ep_rank: int, mp_rank: int) -> str:
    """MoE without ZeRO: the optimizer's state dict of expert-parallel rank `ep_rank` (its experts and the rest)."""
    return f"expp_rank_{ep_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_of(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def read_latest(ckpt_dir: str) -> str | None:
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def read_best(ckpt_dir: str) -> dict | None:
    path = os.path.join(ckpt_dir, BEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def tag_at_step(ckpt_dir: str, step: int | str | None) -> str | None:
    """The tag `--ckpt-step step` names in `ckpt_dir`: iter_N, or for `best` the one <dir>/best records;
    None for None (the caller's default, usually `latest`)."""
    if step is None:
        return None
    if step != BEST:
        return tag_for(step)
    best = read_best(ckpt_dir)
    if best is None:
        raise UserError(f"--ckpt-step best: {ckpt_dir} has no `{BEST}` record (a run with --save-best writes it at "
                        "its lowest validation loss); pass --ckpt-step N, or train with --save-best")
    return best["tag"]


def tags_on_disk(ckpt_dir: str) -> list[str]:
    """Every `iter_*` directory in `ckpt_dir`, newest first (complete or not)."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if iteration_of(t) is not None and os.path.isdir(os.path.join(ckpt_dir, t))]
    return sorted(tags, key=iteration_of, reverse=True)


def is_complete(ckpt_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, tag, META))


def read_meta(ckpt_dir: str, tag: str | None = None) -> dict:
    """meta.json of `tag` (default: `latest`): iteration, progress, parallel layout, vocab sizes."""
    tag = tag or read_latest(ckpt_dir)
    if tag is None:
        raise UserError(f"checkpoint directory {ckpt_dir!r} has no `latest` file; pass a directory written by "
                        "pretrain_gpt.py --save, or a tag")
    if not is_complete(ckpt_dir, tag):
        raise UserError(f"checkpoint {os.path.join(ckpt_dir, tag)!r} is incomplete or not a megaclm checkpoint "
                        f"(no {META}); pick another --ckpt-step or drop it to use `latest`")
    with open(os.path.join(ckpt_dir, tag, META)) as f:
        return json.load(f)


def read_config(ckpt_dir: str, tag: str | None = None) -> dict | None:
    """The config tree ({section: {field: value}}) stored with `tag` (default: `latest`); None if there is no
    checkpoint in `ckpt_dir`."""
    tag = tag or read_latest(ckpt_dir)
    if tag is None:
        return None
    path = os.path.join(ckpt_dir, tag, CONFIG)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {os.path.join(ckpt_dir, tag)!r} has no {CONFIG}; it was not written by megaclm "
                        "(convert it with tools/checkpoint/convert_hf.py import) or it is incomplete")
    with open(path) as f:
        return json.load(f)
