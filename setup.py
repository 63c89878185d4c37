"""Build for mmkernels.

The C++ CPU extension ``mmkernels._C`` is always built, with ninja (``torch.utils.cpp_extension``
uses it when the ``ninja`` executable is found; pyproject's build requirements install it). Every
file gets the same baseline x86-64 flags: the SIMD files (``*_avx512.cpp`` / ``*_avx2.cpp``) switch
their own code to their instruction set with ``#pragma GCC target`` (``MMK_TARGET_*`` in
``csrc/cpu/cpu_features.h``), and the kernels pick a path at run time from CPUID (never
``-march=native``, so one wheel runs on any x86-64). ``MAX_JOBS`` bounds ninja's parallel jobs.

The CUDA extension ``mmkernels._cuda`` is built only when torch is a CUDA build and a CUDA toolkit
is found; ``csrc/cuda/*.cu`` are also compiled stand-alone by the nvcc compile gate.
"""

import glob
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


def _extensions():
    import torch
    from torch.utils import cpp_extension

    # -falign-functions=64: a kernel's inner loops sit at the same cache-line offsets whatever the
    # link order puts before them (measured on Zen 4: the same int8 GEMV machine code ran ~1.1x
    # slower at another offset).
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unused-function", "-falign-functions=64"]
    link = ["-fopenmp"]
    # MMKERNELS_SANITIZE=address: an AddressSanitizer build for .ci/asan (out-of-bounds reads and
    # writes of the kernels become errors), never for use.
    if os.environ.get("MMKERNELS_SANITIZE") == "address":
        cxx = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"] + cxx[1:]
        link.append("-fsanitize=address")
    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/ops.cpp"]
    exts = [
        cpp_extension.CppExtension(
            "mmkernels._C",
            sources,
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    ]

    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    if torch.version.cuda and cpp_extension.CUDA_HOME and cuda_sources and os.environ.get("MMKERNELS_NO_CUDA") != "1":
        exts.append(
            cpp_extension.CUDAExtension(
                "mmkernels._cuda",
                cuda_sources,
                include_dirs=[os.path.abspath("csrc")],
                extra_compile_args={
                    "cxx": ["-O3", "-std=c++17"],
                    "nvcc": [
                        "-O3",
                        "-std=c++17",
                        "-gencode=arch=compute_80,code=sm_80",
                        "-gencode=arch=compute_90a,code=sm_90a",
                    ],
                },
            )
        )
    return exts


def _build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    try:  # the pip package's ninja (a build requirement), also when the venv is not activated
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:  # a ninja on PATH, or torch falls back to compiling file by file
        pass
    return BuildExtension.with_options(use_ninja=True)


class BuildPyWithCudaSources(build_py):
    """Ships csrc/cuda inside the package (mmkernels/_csrc/cuda), so that an installed wheel's
    ``mmkernels compile-gate`` finds the CUDA sources it compiles."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "mmkernels", "_csrc", "cuda")
        os.makedirs(target, exist_ok=True)
        for src in sorted(glob.glob("csrc/cuda/*")):
            self.copy_file(src, os.path.join(target, os.path.basename(src)))


# models/ (the thin model layer) installs as mmkernels.models, so nothing named "models" lands in
# site-packages.
MODEL_PACKAGES = ["mmkernels.models"] + [f"mmkernels.models.{p}" for p in find_packages("models")]

setup(
    packages=find_packages(include=["mmkernels", "mmkernels.*"]) + MODEL_PACKAGES,
    package_dir={"mmkernels.models": "models"},
    package_data={"mmkernels.benchmarks": ["gates.toml"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext_class(), "build_py": BuildPyWithCudaSources},
)
