"""megaclm install: pure-Python package plus optional compiled extensions.

Extensions are `optional=True`: a machine without a compiler (or without CUDA) still
installs megaclm and falls back to the numpy / PyTorch reference implementations.
They are built here, at install time, on every node that installs the package -
never compiled at run time on rank 0 only.

The CUDA kernels (csrc/kernels -> megaclm._cuda_kernels) are built only when a CUDA toolkit (nvcc)
and a CUDA build of torch are both present. MEGACLM_CUDA_EXT=1 forces the build (and makes a failure
an error), MEGACLM_CUDA_EXT=0 skips it. Arches come from TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
pip builds in an isolated environment without torch; on a GPU machine install with
`pip install --no-build-isolation -e .` so the build can see the CUDA torch.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_extension():
    """(extension, BuildExtension) for csrc/kernels, or None when the CUDA build is skipped.

    torch is imported only when MEGACLM_CUDA_EXT is not 0 and nvcc exists (or the build is forced),
    so a CPU install neither needs nvcc nor pays for the import.
    """
    mode = os.environ.get("MEGACLM_CUDA_EXT", "auto")
    if mode not in ("0", "1", "auto"):
        sys.exit(f"error: MEGACLM_CUDA_EXT={mode!r} must be 0 (skip), 1 (force) or unset (build when CUDA is present)")
    forced = mode == "1"
    if mode == "0" or not os.path.exists("csrc/kernels/bindings.cpp"):
        return None
    if _find_nvcc() is None and not forced:
        return None
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        if forced:
            sys.exit("error: MEGACLM_CUDA_EXT=1 needs torch at build time; install torch first and run pip with "
                     "--no-build-isolation")
        return None
    if torch.version.cuda is None:
        if forced:
            sys.exit(f"error: MEGACLM_CUDA_EXT=1 but torch {torch.__version__} is a CPU build; install a CUDA torch")
        return None
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    ext = CUDAExtension(
        "megaclm._cuda_kernels",
        sorted(glob.glob("csrc/kernels/*.cu")) + ["csrc/kernels/bindings.cpp"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},  # no fast math: RoPE needs accurate sincosf
        optional=not forced,
    )
    return ext, BuildExtension

ext_modules = []
cmdclass = {}

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    if os.path.exists("csrc/helpers.cpp"):
        ext_modules.append(
            Pybind11Extension(
                "megaclm.data._helpers",
                ["csrc/helpers.cpp"],
                extra_compile_args=["-O3", "-ffp-contract=off"],  # bit-exact with numpy
                optional=True,
            )
        )
    cmdclass["build_ext"] = build_ext
except ImportError:  # pybind11 missing: pure-Python install, numpy fallback at run time
    pass

_cuda = _cuda_extension()
if _cuda is not None:
    ext_modules.append(_cuda[0])
    cmdclass["build_ext"] = _cuda[1]  # torch's build_ext compiles the pybind11 helpers too

setup(
    packages=find_packages(include=["megaclm", "megaclm.*"]),
    package_data={"megaclm.planner": ["profiles/*.json"]},  # tools/plan_layout.py --gpu h100-80gb etc.
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
