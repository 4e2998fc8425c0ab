"""No script shadows an installed module. `python bench/x.py` puts bench/ first on sys.path, so a
bench/kernels.py is what `import kernels` inside transformers then finds (it died at import)."""
import importlib.machinery
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT_DIRS = ["bench", "tools", "tools/checkpoint", "examples", "."]


def _installed_elsewhere(name: str, script_dir: pathlib.Path) -> str | None:
    """Where `import name` resolves when script_dir is not on the path (None: nowhere, or a builtin)."""
    if name in sys.builtin_module_names or name in sys.stdlib_module_names:
        return "the standard library"
    path = [p for p in sys.path if p and pathlib.Path(p).resolve() != script_dir.resolve()]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    return spec.origin if spec is not None else None


def _shadows(root: pathlib.Path) -> list[str]:
    out = []
    for d in SCRIPT_DIRS:
        folder = root / d
        for script in sorted(folder.glob("*.py")):
            if d == "." and script.stem in ("setup", "pretrain_gpt"):
                continue  # setup.py and the entry point are never imported by name
            where = _installed_elsewhere(script.stem, folder)
            if where is not None:
                out.append(f"{script.relative_to(root)} shadows {script.stem!r} from {where}")
    return out


def test_no_script_shadows_an_installed_module():
    assert _shadows(ROOT) == []


def test_checker_sees_the_old_bench_kernels(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "json.py").write_text("")
    (tmp_path / "bench" / "yaml.py").write_text("")
    found = _shadows(tmp_path)
    assert any("bench/json.py shadows 'json'" in f for f in found)
    assert any("bench/yaml.py shadows 'yaml'" in f for f in found)
