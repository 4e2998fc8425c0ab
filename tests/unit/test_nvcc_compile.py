"""Every CUDA source in csrc/kernels compiles: nvcc -c with device code generation for sm_90 (syntax,
templates, register allocation), and the torch glue (bindings.cpp) type-checks against the installed
torch headers. Runs without a GPU; skips only where nvcc itself is absent."""
import os
import pathlib
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
KERNELS = ROOT / "csrc" / "kernels"
CU_FILES = sorted(KERNELS.glob("*.cu"))


def _nvcc():
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "bin" / "nvcc").exists():
            return str(pathlib.Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile every .cu (sm_90) and syntax-check bindings.cpp, all in parallel; {name: (rc, output)}."""
    out = tmp_path_factory.mktemp("nvcc")
    cuda_include = pathlib.Path(NVCC).resolve().parents[1] / "include"
    jobs = {f.name: [NVCC, "-std=c++20", "-O3", "-arch=sm_90", "-Xptxas=-warn-spills", "-c", str(f),
                     "-o", str(out / (f.stem + ".o"))] for f in CU_FILES}
    from torch.utils.cpp_extension import include_paths
    import pybind11
    jobs["bindings.cpp"] = ["g++", "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_cuda_kernels",
                            f"-I{cuda_include}", f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}",
                            *(f"-I{p}" for p in include_paths()), str(KERNELS / "bindings.cpp")]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = dict(zip(jobs, pool.map(_run, jobs.values())))
    return results


def test_there_are_kernels_to_compile():
    assert {f.name for f in CU_FILES} >= {"norms.cu", "activations.cu", "rope.cu", "softmax.cu", "cross_entropy.cu"}


@pytest.mark.parametrize("name", [f.name for f in CU_FILES])
def test_cu_file_compiles_for_sm90_without_spills(compiled, name):
    rc, output = compiled[name]
    assert rc == 0, output
    assert "spill" not in output, output  # -warn-spills: register spills to local memory


@pytest.mark.skipif(shutil.which("g++") is None, reason="no host C++ compiler")
def test_bindings_type_check_against_torch_headers(compiled):
    rc, output = compiled["bindings.cpp"]
    assert rc == 0, output


def test_compile_test_sees_errors(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text('#include "common.cuh"\n__global__ void k(float* x) { megaclm::Pack<float, 4> p = x; }\n')
    rc, output = _run([NVCC, "-std=c++20", "-arch=sm_90", f"-I{KERNELS}", "-c", str(bad), "-o", str(tmp_path / "b.o")])
    assert rc != 0 and "error" in output, output

