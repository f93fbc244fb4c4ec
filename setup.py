"""Build llumigrate and its extension `llumigrate._C`.

CPU sources in csrc/ are always built. CUDA sources (csrc/cuda/: the kernels in
*.cu, which need only the CUDA runtime, and the torch bindings in *.cpp) are
added only when torch was built with CUDA and nvcc is found (or when
LLUMIGRATE_FORCE_CUDA=1); the architectures follow TORCH_CUDA_ARCH_LIST.
Install with `pip install --no-build-isolation -e .` so the build uses the
venv's torch instead of downloading another one.
"""

from __future__ import annotations

import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension


def _want_cuda() -> bool:
    if os.environ.get("LLUMIGRATE_FORCE_CUDA") == "1":
        return True
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extensions():
    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if _want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        return [
            cpp_extension.CUDAExtension(
                "llumigrate._C",
                sources,
                extra_compile_args={"cxx": cxx + ["-DLLUMIGRATE_WITH_CUDA"], "nvcc": ["-O3", "-std=c++17"]},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        cpp_extension.CppExtension(
            "llumigrate._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"]
        )
    ]


setup(
    name="llumigrate",
    version="0.1.0",
    description="Live KV-cache migration of in-flight requests between vLLM instances",
    packages=find_packages(include=["llumigrate", "llumigrate.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "grpcio", "protobuf", "numpy", "msgpack"],
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["llumigrate=llumigrate.cli.main:main"]},
)
