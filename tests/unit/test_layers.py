"""Imports only point down the layers of ../shared/STYLE.md; a violation names file and line."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Layer of each megaclm subpackage; a module may import its own layer or any lower one.
LAYERS = {
    "config": 0, "logging": 0, "utils": 0,
    "parallel": 1, "ops": 1, "data": 1, "tokenizer": 1,
    "model": 2, "planner": 2,
    "checkpoint": 3,
    "training": 4,
}
# Siblings on one layer that must still not import each other (data takes ints, not objects).
FORBIDDEN = {
    "data": {"model", "tokenizer", "parallel", "ops"},
    "tokenizer": {"data", "parallel", "ops"},
    "ops": {"data", "tokenizer"},
    "parallel": {"data", "tokenizer"},
}
# Third-party imports allowed only in some places.
THIRD_PARTY = {
    "deepspeed": {"parallel", "model", "checkpoint", "training"},
}


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def _violations():
    out = []
    for path in sorted((ROOT / "megaclm").rglob("*.py")):
        rel = path.relative_to(ROOT / "megaclm")
        if len(rel.parts) < 2:
            continue
        pkg = rel.parts[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        for lineno, name in _imports(tree):
            parts = name.split(".")
            if parts[0] == "megaclm" and len(parts) > 1 and parts[1] in LAYERS:
                target = parts[1]
                if target == pkg:
                    continue
                if LAYERS[target] > LAYERS[pkg] or target in FORBIDDEN.get(pkg, ()):
                    out.append(f"megaclm/{rel}:{lineno} imports megaclm.{target} (layer {LAYERS[target]}) from {pkg} (layer {LAYERS[pkg]})")
            elif parts[0] in THIRD_PARTY and pkg not in THIRD_PARTY[parts[0]]:
                out.append(f"megaclm/{rel}:{lineno} imports {parts[0]}, allowed only in {sorted(THIRD_PARTY[parts[0]])}")
            elif name == "megatron" or name.startswith("megatron."):
                out.append(f"megaclm/{rel}:{lineno} imports {name}: megatron-core is not a dependency")
    return out


def test_every_module_parses_and_imports_point_down():
    assert _violations() == []


def test_every_subpackage_is_known():
    pkgs = {p.name for p in (ROOT / "megaclm").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert pkgs <= set(LAYERS), f"add {pkgs - set(LAYERS)} to LAYERS"


def test_checker_catches_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "megaclm" / "data"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("import megaclm.model.gpt\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert any("imports megaclm.model" in v for v in _violations())


def _module_graph(root: pathlib.Path) -> dict[str, set[str]]:
    """megaclm module -> the megaclm modules it imports (at top level or inside functions)."""
    graph = {}
    for path in sorted((root / "megaclm").rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("megaclm."):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("megaclm."))
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles between modules of one subpackage (a package importing its own children is not one)."""
    out, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if d.startswith(m + "."):
                continue
            if state.get(d) == "open":
                out.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return out


def test_no_import_cycles():
    """The package reads top-down: e.g. checkpoint.layout <- shards <- weights <- deepspeed_ckpt."""
    assert _cycles(_module_graph(ROOT)) == []


def test_cycle_checker_catches_a_lazy_cycle(tmp_path):
    pkg = tmp_path / "megaclm" / "checkpoint"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from megaclm.checkpoint.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from megaclm.checkpoint.a import f\n")
    assert _cycles(_module_graph(tmp_path)) == [["megaclm.checkpoint.a", "megaclm.checkpoint.b", "megaclm.checkpoint.a"]]
