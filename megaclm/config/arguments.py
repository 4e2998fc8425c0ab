"""Megatron-style flags and YAML, generated from the config dataclasses (no hand-written argparse).

Every field of a section dataclass becomes one flag:
    name            `--` + field name with `_` -> `-`  (`num_attention_heads` -> `--num-attention-heads`),
                    or `metadata["flag"]` (a string, or a list whose first entry is the main name)
    bool            a switch: the flag stores True (`metadata["invert"]`: False, `--disable-bias-linear` for
                    `add_bias_linear=True`), its negation the opposite; every flag has one: `--no-<name>`, and
                    `--<name>` for a flag spelled `--no-<name>` (`--no-load-optim` / `--load-optim`)
    int/float/str   typed value; `metadata["choices"]`, `metadata["nargs"]` ("*", "+") as in argparse
    list/dict       element-typed list (`nargs`), or a YAML/JSON literal for nested structures
    help            `metadata["help"]` (required: the field docstring)
    `metadata["cli"] = False` keeps a field YAML-only; `metadata["yaml_aliases"]`: former field names a YAML
    file or a stored config may still use (`kernels.kernels` for `kernels.op_backend`); a class attribute
    `former_section`: the section its fields were read from before (`training:` for `precision.bf16`).

Sources merge as defaults < YAML (`--config run.yaml`, the same tree: `{section: {field: value}}`)
< flags. Unknown YAML keys get a difflib "did you mean"; a value of the wrong type is reported with its
path (`model.hidden_size expects an integer, got 'abc'`). Every problem raises `UserError`; nothing
here imports torch or deepspeed.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from typing import Any, Iterable

import yaml

from megaclm.logging import get_logger
from megaclm.utils.errors import UserError

log = get_logger(__name__)

class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one `error:` line via cli_main) instead of printing usage."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------------------------
# YAML


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2's floats with an exponent and no dot or no exponent sign.

    PyYAML follows YAML 1.1, where `1e-3`, `3e-4`, `1E5`, `6e+2` and `1.0e5` are strings; YAML 1.2
    (and every config in the wild) reads them as numbers. Quoted values stay strings.
    """


class _Yaml12Dumper(yaml.SafeDumper):
    """The matching dumper: a string such as "1e-3" is written quoted, so it reads back as a string."""


for _cls in (_Yaml12Loader, _Yaml12Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."))


def yaml_load(text_or_stream: Any) -> Any:
    """yaml.safe_load with YAML 1.2 floats (`lr: 1e-3` is the number 0.001)."""
    return yaml.load(text_or_stream, Loader=_Yaml12Loader)


# ---------------------------------------------------------------------------------------------
# Types


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True); `int` -> (int, False); `int | Literal["best"] | None` ->
    (int | Literal["best"], True)."""
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return tp, False


def _type_name(tp: Any) -> str:
    tp, optional = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if _is_union(tp):
        name = " or ".join(_type_name(a) for a in typing.get_args(tp))
    elif origin in (list, tuple):
        inner = typing.get_args(tp)
        name = f"a list of {_type_name(inner[0])}s" if inner else "a list"
    elif origin is dict or tp is dict:
        name = "a mapping"
    elif origin is typing.Literal:
        name = "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    else:
        name = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))
    return name + (" or null" if optional else "")


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Check/convert a YAML value against a field's type; errors name `path` (e.g. `model.hidden_size`)."""
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{path} expects {_type_name(tp)}, got null")
    bad = UserError(f"{path} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    origin = typing.get_origin(inner)
    if inner is Any:
        return value
    if _is_union(inner):  # the first member that takes the value
        for member in typing.get_args(inner):
            try:
                return coerce(value, member, path)
            except UserError:
                pass
        raise bad
    if inner is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            # 1e9 in YAML is a float; accept it when it is integral (train_tokens: 1.0e+11).
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return finite(float(value), path)
    if inner is str:
        # Numbers are accepted as strings: blend weights in `data_path: [0.3, A, 0.7, B]`.
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad
        return str(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(inner)
        elem = args[0] if args else Any
        out = [coerce(v, elem, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or inner is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    if origin is typing.Literal:
        if value not in typing.get_args(inner):
            raise bad
        return value
    return value


def finite(value: float, path: str) -> float:
    """Every float field of the config is a finite quantity (a rate, a coefficient, a length, a timeout):
    inf and nan have no meaning for any of them, and would train on nan or never stop. Absent is null."""
    if not math.isfinite(value):
        raise UserError(f"{path}={value} is not a finite number; give a finite value")
    return value


def _scalar_converter(tp: Any, path: str):
    """argparse `type=` for one flag value, with an error naming the config path."""

    def convert(text: str):
        if _is_union(tp):  # the first member that takes the text (`--ckpt-step 100`, `--ckpt-step best`)
            for member in typing.get_args(tp):
                try:
                    return _scalar_converter(member, path)(text)
                except (argparse.ArgumentTypeError, UserError):
                    pass
            raise argparse.ArgumentTypeError(f"{path} expects {_type_name(tp)}, got {text!r}")
        if tp in (int, float):
            try:
                return finite(float(text), path) if tp is float else int(text)
            except UserError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
            except ValueError:
                try:  # --train-tokens 1e11
                    f = float(text)
                    if tp is int and f.is_integer():
                        return int(f)
                except ValueError:
                    pass
                raise argparse.ArgumentTypeError(f"{path} expects {_type_name(tp)}, got {text!r}")
        if tp is str:
            return text
        try:  # nested structure on the command line: a YAML/JSON literal
            return coerce(yaml_load(text), tp, path)
        except yaml.YAMLError as e:
            raise argparse.ArgumentTypeError(f"{path} expects {_type_name(tp)} as YAML/JSON, got {text!r}: {e}")

    convert.__name__ = _type_name(tp)
    return convert


# ---------------------------------------------------------------------------------------------
# Parser


def negation(flag: str) -> str:
    """The flag that undoes a boolean flag: `--finetune` -> `--no-finetune`, `--no-load-optim` -> `--load-optim`."""
    return "--" + flag[len("--no-"):] if flag.startswith("--no-") else "--no-" + flag[2:]


class _Switch(argparse.Action):
    """A boolean field's flags and their negations (`negation`): each stores `values[option]`."""

    def __init__(self, option_strings, dest, values: dict[str, bool], **kw):
        super().__init__(option_strings, dest, nargs=0, **kw)
        self.values = values

    def __call__(self, parser, namespace, _values, option_string=None):
        setattr(namespace, self.dest, self.values[option_string])

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def flag_names(f: dataclasses.Field) -> list[str]:
    flag = f.metadata.get("flag")
    names = [flag] if isinstance(flag, str) else list(flag or ["--" + f.name.replace("_", "-")])
    return names + list(f.metadata.get("aliases", []))


@dataclasses.dataclass
class _Registry:
    """Flags seen so far while building one parser."""

    owner: dict[str, str] = dataclasses.field(default_factory=dict)  # flag -> first field path
    signature: dict[str, tuple] = dataclasses.field(default_factory=dict)  # path -> (type, default)
    shared: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # path -> paths it also sets


def _add_field(group, section: str, f: dataclasses.Field, hints: dict, reg: _Registry) -> None:
    path = f"{section}.{f.name}"
    if "help" not in f.metadata:
        raise RuntimeError(f"config field {path} has no metadata['help']")
    if f.metadata.get("cli", True) is False:
        return
    names = flag_names(f)
    dest = f"{section}.{f.name}"
    clash = [n for n in names if n in reg.owner]
    if clash:
        # The same Megatron flag in two sections (e.g. --make-vocab-size-divisible-by in model and
        # tokenizer): one flag sets both, provided the fields agree in type and default.
        first = reg.owner[clash[0]]
        if reg.signature[first] != (hints[f.name], f.default):
            raise RuntimeError(f"flag {clash[0]} is defined by both {first} and {path} with different types/defaults")
        reg.shared.setdefault(first, []).append(dest)
        return
    for n in names:
        reg.owner[n] = path
    reg.signature[path] = (hints[f.name], f.default)
    tp, _ = _strip_optional(hints[f.name])
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    shown = "" if default in (None, [], False) or tp is bool else f" (default: {default})"
    # Defaults are SUPPRESSed so that only flags the user gave override the YAML layer.
    kw: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS,
                              help=(f.metadata["help"] + shown).replace("%", "%%"))
    if tp is bool:
        on = not f.metadata.get("invert", False)
        values = {**{n: on for n in names}, **{negation(n): not on for n in names}}
        for n in values:
            reg.owner.setdefault(n, path)
        group.add_argument(*values, action=_Switch, values=values, **kw)
        return
    origin = typing.get_origin(tp)
    if origin in (list, tuple) and "nargs" in f.metadata:
        args = typing.get_args(tp)
        kw["type"] = _scalar_converter(args[0] if args else str, path)
        kw["nargs"] = f.metadata["nargs"]
    else:
        kw["type"] = _scalar_converter(tp, path)
    if "choices" in f.metadata:
        kw["choices"] = f.metadata["choices"]
    kw["metavar"] = f.metadata.get("metavar", f.name.upper())
    group.add_argument(*names, **kw)


def build_parser(sections: dict[str, type], prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """One flag per field of each section class, grouped by section, plus the meta flags."""
    parser = _Parser(prog=prog, description=description, allow_abbrev=False)
    meta = parser.add_argument_group("run")
    meta.add_argument("--config", dest="config", default=None, metavar="YAML",
                      help="YAML file with the same tree as the flags ({section: {field: value}}); flags override it.")
    meta.add_argument("--validate-only", dest="validate_only", action="store_true",
                      help="Print the resolved config and derived values, then exit without training.")
    meta.add_argument("--estimate-for", dest="estimate_for", choices=("gpu", "cpu"), default="gpu",
                      help="Kernels the memory estimate assumes: 'gpu' the fused CUDA ops and flash attention "
                           "(whatever host prints it), 'cpu' the PyTorch reference ops a CPU run executes.")
    meta.add_argument("--world-size", dest="world_size", type=int, default=None,
                      help="World size assumed by --validate-only outside a launcher (a launcher's WORLD_SIZE wins).")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment is what we use.
    meta.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    meta.add_argument("--deepspeed", dest="deepspeed", action="store_true",
                      help="Accepted for Megatron-DeepSpeed compatibility; megaclm always runs on DeepSpeed.")
    reg = _Registry()
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        group = parser.add_argument_group(section, (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None)
        for f in dataclasses.fields(cls):
            _add_field(group, section, f, hints, reg)
    parser.shared_dests = reg.shared  # read by flag_values
    return parser


# ---------------------------------------------------------------------------------------------
# YAML and merging


def _did_you_mean(key: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file; pass the path of a YAML config file")
    try:
        with open(path, encoding="utf-8") as fh:
            tree = yaml_load(fh)
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML: {e}")
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise UserError(f"--config {path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    return tree


def move_former_keys(tree: dict, sections: dict[str, type], source: str, note: bool = True) -> dict:
    """`tree` with the keys of a section's former home moved to it: a section class whose fields once lived in
    another section says so in `former_section` (precision, zero and resilience were part of `training:`). Both
    places given is refused; `note`: one deprecation line naming the new sections (not for a stored config,
    which the user does not edit)."""
    homes = {(cls.former_section, f.name): name for name, cls in sections.items()
             if getattr(cls, "former_section", None) for f in dataclasses.fields(cls)}
    out = {section: dict(body) if isinstance(body, dict) else body for section, body in tree.items()}
    moved = []
    for section, body in tree.items():
        if not isinstance(body, dict):
            continue
        for key in body:
            name = str(key).replace("-", "_")
            home = homes.get((section, name))
            if home is None:
                continue
            if out.get(home) is None:
                out[home] = {}
            if not isinstance(out[home], dict):
                continue  # yaml_values names the malformed section
            if any(str(k).replace("-", "_") == name for k in out[home]):
                raise UserError(f"{source}: '{key}' is given under both '{section}:' and '{home}:'; keep the "
                                f"'{home}:' one")
            out[home][key] = out[section].pop(key)
            moved.append(f"{section}.{key} -> {home}.{key}")
    if moved and note and os.environ.get("RANK", "0") == "0":
        log.warning(f"{source}: deprecated keys, read from their new sections: {', '.join(moved)}; move them "
                    "there in the file")
    return out


def yaml_values(tree: dict, sections: dict[str, type], source: str = "config",
                note_moved: bool = True) -> dict[str, dict[str, Any]]:
    """Type-checked {section: {field: value}} from a YAML tree; unknown keys get a did-you-mean; keys in a
    section's former home are moved to it (`move_former_keys`)."""
    tree = move_former_keys(tree, sections, source, note_moved)
    out: dict[str, dict[str, Any]] = {}
    all_fields = {f.name: s for s, c in sections.items() for f in dataclasses.fields(c)}
    for section, body in tree.items():
        if section not in sections:
            # A field name placed at the top level says more than a near-miss section name ('lr' vs 'lora').
            hint = (f"; '{section}' belongs under '{all_fields[section]}:'" if section in all_fields
                    else _did_you_mean(str(section), sections))
            raise UserError(f"{source}: unknown section '{section}'{hint} (sections: {', '.join(sections)})")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise UserError(f"{source}: section '{section}' must be a mapping of field: value, got {body!r}")
        cls = sections[section]
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        former = {old: f.name for f in fields.values() for old in f.metadata.get("yaml_aliases", ())}
        values = out.setdefault(section, {})
        for key, value in body.items():
            written = str(key).replace("-", "_")
            name = former.get(written, written)
            if name not in fields:
                raise UserError(f"{source}: unknown key '{section}.{key}'{_did_you_mean(name, fields)}")
            path = f"{section}.{written}"  # errors name the key as the file spells it
            value = coerce(value, hints[name], path)
            choices = fields[name].metadata.get("choices")
            if choices is not None and value is not None and not isinstance(value, list) and value not in choices:
                raise UserError(f"{path}={value!r} is not one of {list(choices)}")
            values[name] = value
    return out


def flag_values(ns: argparse.Namespace, sections: dict[str, type],
                shared: dict[str, list[str]] | None = None) -> dict[str, dict[str, Any]]:
    """The section values the user actually gave as flags (defaults are SUPPRESSed)."""
    out: dict[str, dict[str, Any]] = {}
    for dest, value in vars(ns).items():
        for d in [dest, *(shared or {}).get(dest, [])]:
            section, _, name = d.partition(".")
            if name and section in sections:
                out.setdefault(section, {})[name] = value
    return out


def propagate_shared(values: dict[str, dict[str, Any]], shared: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """A YAML value for one of the fields behind a shared flag also sets the others it left unset."""
    for first, others in shared.items():
        paths = [first, *others]
        given = [(p, values[p.partition(".")[0]][p.partition(".")[2]]) for p in paths
                 if p.partition(".")[2] in values.get(p.partition(".")[0], {})]
        if given:
            for p in paths:
                section, _, name = p.partition(".")
                values.setdefault(section, {}).setdefault(name, given[0][1])
    return values


def merge(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            out.setdefault(section, {}).update(values)
    return out


def build_sections(values: dict[str, dict[str, Any]], sections: dict[str, type]) -> dict[str, Any]:
    """Instantiate every section (each __post_init__ validates locally and raises UserError)."""
    return {name: cls(**values.get(name, {})) for name, cls in sections.items()}


def section_to_dict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def dump_yaml(tree: dict) -> str:
    """YAML text of a {section: {field: value}} tree, readable back by --config."""
    return yaml.dump(json.loads(json.dumps(tree, default=list)), Dumper=_Yaml12Dumper, sort_keys=False)
