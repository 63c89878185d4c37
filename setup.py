"""Build for mmkernels.

The C++ CPU extension ``mmkernels._C`` is always built. Its SIMD code paths live in files named
``*_avx512.cpp`` / ``*_avx2.cpp``; only those files get the matching ``-m`` flags, and the kernel
picks a path at run time from CPUID (never ``-march=native``, so one wheel runs on any x86-64).

The CUDA extension ``mmkernels._cuda`` is built only when torch is a CUDA build and a CUDA toolkit
is found; ``csrc/cuda/*.cu`` are also compiled stand-alone by the nvcc compile gate.
"""
import glob
import os
import platform

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ISA_FLAGS = {
    "_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
                    "-mavx512vnni", "-mfma", "-mf16c"],
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
}
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")


def _extensions():
    import torch
    from torch.utils import cpp_extension

    cxx = ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unused-function"]
    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/ops.cpp"]
    if not IS_X86:
        sources = [s for s in sources if not any(s.endswith(sfx) for sfx in ISA_FLAGS)]
        cxx.append("-DMMK_NO_X86")
    exts = [cpp_extension.CppExtension(
        "mmkernels._C", sources, include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]

    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    if torch.version.cuda and cpp_extension.CUDA_HOME and cuda_sources \
            and os.environ.get("MMKERNELS_NO_CUDA") != "1":
        exts.append(cpp_extension.CUDAExtension(
            "mmkernels._cuda", cuda_sources, include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                "nvcc": ["-O3", "-std=c++17", "-gencode=arch=compute_80,code=sm_80",
                                         "-gencode=arch=compute_90a,code=sm_90a"]}))
    return exts


def _build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class BuildWithIsaFlags(BuildExtension):
        """Adds per-file ISA flags. Ninja is off because it compiles all files with one flag set."""

        def build_extensions(self):
            original = self.compiler._compile

            def compile_with_isa(obj, src, ext, cc_args, extra_postargs, pp_opts):
                for suffix, flags in ISA_FLAGS.items():
                    if src.endswith(suffix):
                        if isinstance(extra_postargs, dict):
                            extra_postargs = dict(extra_postargs)
                            extra_postargs["cxx"] = list(extra_postargs.get("cxx", [])) + flags
                        else:
                            extra_postargs = list(extra_postargs) + flags
                return original(obj, src, ext, cc_args, extra_postargs, pp_opts)

            self.compiler._compile = compile_with_isa
            super().build_extensions()

    return BuildWithIsaFlags.with_options(use_ninja=False)


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
