#!/usr/bin/env bash
# Build the wheel folder that tools/gpu_check.sh installs on the bare GPU machine, and check that it
# travels: the device call carries the working tree plus the named ignored paths, 64 MiB in all.
#
#   bash tools/gpu_wheels.sh [--out DIR] [--python-version 3.12] [extra requirement ...]
#
# The GPU image has Python 3.12, torch with CUDA, triton, transformers (numpy, tqdm, packaging, pyyaml,
# safetensors, tokenizers), sentencepiece, pybind11, ninja and pytest; it lacks DeepSpeed and its
# pure-Python dependencies. So the folder (default .whl/, ignored by git) holds:
#   - deepspeed, built here without ops (DS_BUILD_OPS=0): its ops are JIT-built on the GPU, where
#     gpu_check.sh sets TORCH_CUDA_ARCH_LIST=9.0 (DeepSpeed cannot parse the image's "9.0a");
#   - pydantic, pydantic-core, annotated-types, typing-inspection, hjson, ninja, py-cpuinfo, einops,
#     msgpack, psutil (DeepSpeed's requirements), pytest-timeout (pyproject's pytest addopts use it),
#     as binary wheels for the GPU machine's Python, at the versions installed here (what CI tests).
# megaclm itself is not in it: the carried checkout is the package (PYTHONPATH), and gpu_check.sh
# builds its extensions in place there; an installed copy would shadow them.
# Needs the project's venv (torch importable: DeepSpeed's setup.py imports it) and the package index.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
OUTDIR=$ROOT/.whl
PYVER=3.12
LIMIT_MIB=64
EXTRA=()
while [ $# -gt 0 ]; do
    case $1 in
        --out) [ $# -ge 2 ] || { echo "error: --out needs a folder" >&2; exit 2; }; OUTDIR=$2; shift ;;
        --python-version) [ $# -ge 2 ] || { echo "error: --python-version needs e.g. 3.12" >&2; exit 2; }
            PYVER=$2; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        -*) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
        *) EXTRA+=("$1") ;;
    esac
    shift
done

DEPS=(pydantic pydantic-core annotated-types typing-inspection hjson ninja py-cpuinfo einops msgpack psutil
      pytest-timeout)
PINNED=()
for dep in deepspeed "${DEPS[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dep" 2>/dev/null) || {
        echo "error: $dep is not installed in $PY's environment; run make install first" >&2; exit 2; }
    PINNED+=("$dep==${version%%+*}")
done

# Built in a scratch folder, then swapped in: an interrupted run leaves the old folder intact.
mkdir -p "$(dirname "$OUTDIR")"
TMP=$(mktemp -d "$(dirname "$OUTDIR")/.whl.tmp.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
echo "deepspeed without ops: ${PINNED[0]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$TMP" "${PINNED[0]}"
echo "binary wheels for CPython $PYVER: ${PINNED[*]:1} ${EXTRA[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$TMP" "${PINNED[@]:1}" ${EXTRA[@]+"${EXTRA[@]}"}

# Every requirement of every wheel (for the GPU machine's Python) is another wheel of the folder or a
# package of the image (approximated by the closure of the image's packages as installed here).
"$PY" - "$TMP" "$PYVER" <<'PYEOF'
import importlib.metadata as md, pathlib, re, sys, zipfile
from email.parser import Parser
from packaging.requirements import Requirement

folder, pyver = pathlib.Path(sys.argv[1]), sys.argv[2]
env = {"python_version": pyver, "python_full_version": pyver + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()

def needs(reqs):
    return [r for r in map(Requirement, reqs or []) if r.marker is None or r.marker.evaluate(env)]

image, todo = set(), ["torch", "triton", "transformers", "sentencepiece", "tokenizers", "safetensors",
                      "pybind11", "ninja", "pytest"]
while todo:
    name = norm(todo.pop())
    if name in image:
        continue
    image.add(name)
    try:
        todo += [r.name for r in needs(md.requires(name))]
    except md.PackageNotFoundError:
        pass
carried, missing = {}, []
for wheel in sorted(folder.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    carried[norm(meta["Name"])] = needs(meta.get_all("Requires-Dist"))
for name, reqs in carried.items():
    missing += [f"{name} needs {r}" for r in reqs if norm(r.name) not in carried and norm(r.name) not in image]
if missing:
    sys.exit("error: the wheel folder lacks requirements (pass them as extra arguments): " + "; ".join(missing))
print(f"requirements complete: {len(carried)} wheels, the rest from the image")
PYEOF
rm -rf "$OUTDIR"
mv "$TMP" "$OUTDIR"
ls -1 "$OUTDIR"

# What travels: the tracked and untracked-but-not-ignored files of the checkout, plus the folder.
cd "$ROOT"
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
    | awk '{ s += $1 } END { print s + 0 }')
wheel_bytes=$(du -sb "$OUTDIR" | cut -f1)
awk -v t="$tree_bytes" -v w="$wheel_bytes" -v limit="$LIMIT_MIB" -v dir="$OUTDIR" 'BEGIN {
    m = 1048576; total = (t + w) / m
    printf "wheel folder %s: %.1f MiB; checkout %.1f MiB; carried in all %.1f MiB of %d MiB\n", dir, w / m, t / m, total, limit
    if (total > limit) { print "error: over the carry limit: drop extra wheels or large untracked files" > "/dev/stderr"; exit 1 }
}'
