"""megaclm install: pure-Python package plus optional compiled extensions.

Extensions are `optional=True`: a machine without a compiler (or without CUDA) still
installs megaclm and falls back to the numpy / PyTorch reference implementations.
They are built here, at install time, on every node that installs the package -
never compiled at run time on rank 0 only.
"""
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    if os.path.exists("csrc/helpers.cpp"):
        ext_modules.append(
            Pybind11Extension(
                "megaclm.data._helpers",
                ["csrc/helpers.cpp"],
                extra_compile_args=["-O3"],
                optional=True,
            )
        )
    cmdclass["build_ext"] = build_ext
except ImportError:  # pybind11 missing: pure-Python install, numpy fallback at run time
    pass

setup(
    packages=find_packages(include=["megaclm", "megaclm.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
