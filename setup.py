"""Build and install ms_syncbn.

The CPU kernels (ops/cpu/syncbn_cpu.cc) are a plain C-ABI shared library that
mindspore.ops.Custom(func_type="aot") loads by path; they are built with the
ordinary extension machinery but are never imported as a Python module.
"""
import os

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class BuildKernelLibrary(build_ext):
    """Name the library plainly (ms_syncbn/_cpu_kernels.so): no Python-ABI suffix, no PyInit."""

    def get_ext_filename(self, fullname):
        return os.path.join(*fullname.split(".")) + ".so"

    def get_export_symbols(self, ext):
        return []


cpu_kernels = Extension(
    "ms_syncbn._cpu_kernels",
    sources=["ops/cpu/syncbn_cpu.cc"],
    language="c++",
    extra_compile_args=["-O3", "-std=c++17", "-fno-math-errno"],
)

setup(
    name="ms_syncbn",
    version="0.1.0",
    description="Cross-device synchronized BatchNorm for MindSpore (Ascend, CPU)",
    packages=find_packages(include=["ms_syncbn", "ms_syncbn.*"]),
    ext_modules=[cpu_kernels],
    cmdclass={"build_ext": BuildKernelLibrary},
    python_requires=">=3.9",
    install_requires=["mindspore>=2.5", "numpy<2"],
)
