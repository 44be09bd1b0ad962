"""Builds deqkern: the CPU extension always, the CUDA extension when torch has CUDA and nvcc is found.

Environment flags (see the README's table):
  DEQKERN_FORCE_CUDA=1   build the CUDA extension even when no GPU is visible (fails if it cannot)
  DEQKERN_SKIP_CUDA=1    never build the CUDA extension
  DEQKERN_DEBUG=1        -O0 -g (and -G for CUDA, with device-side asserts) instead of -O3
  TORCH_CUDA_ARCH_LIST   GPU architectures; default "8.0;9.0" when no GPU is visible to pick from
  MAX_JOBS, NVCC_THREADS parallel compile jobs (ninja) and nvcc threads per job
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def build_extensions():
    """The extension modules; shared with nothing else so the flags live in one place."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    include_dirs = [os.path.join(ROOT, "csrc")]
    debug = _flag("DEQKERN_DEBUG")
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need (C++20 from torch 2.14 on).
    cxx_flags = ["-O0", "-g", "-UNDEBUG"] if debug else ["-O3", "-fno-math-errno"]
    # at::parallel_for is a header template: without -fopenmp it silently runs on one thread. The OpenMP runtime
    # resolves to the libgomp.so.1 that torch has already loaded, so there is one thread pool.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    extensions = [
        CppExtension(
            "deqkern._C",
            # the module, then per op folder its schema (<op>.cpp) and CPU kernel (<op>_cpu.cpp)
            sources=["csrc/module.cpp"] + sorted(glob.glob("csrc/*/*.cpp")),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + openmp},
            extra_link_args=openmp,
        )
    ]
    torch_has_cuda = torch.version.cuda is not None
    want_cuda = not _flag("DEQKERN_SKIP_CUDA") and (
        _flag("DEQKERN_FORCE_CUDA") or (torch_has_cuda and CUDA_HOME is not None)
    )
    if want_cuda:
        if not torch_has_cuda or CUDA_HOME is None:
            raise RuntimeError(
                "DEQKERN_FORCE_CUDA=1 but torch has no CUDA (torch.version.cuda is None) or no CUDA toolkit "
                "was found (set CUDA_HOME)"
            )
        if not torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        # No --use_fast_math: it approximates sqrt and division in the residual (the stop decision would differ from
        # Triton's and the reference's correctly rounded one) and flushes denormals; the hot loop is multiply-adds,
        # which it does not change.
        nvcc_flags = ["-O0", "-G", "-g", "-UNDEBUG", "-DDEQKERN_DEBUG=1"] if debug else ["-O3", "-lineinfo"]
        nvcc_flags.append(f"--threads={os.environ.get('NVCC_THREADS', '2')}")
        extensions.append(
            CUDAExtension(
                "deqkern._C_cuda",
                # the module, then per op folder its CUDA kernel (<op>_cuda.cu)
                sources=["csrc/cuda_module.cpp"] + sorted(glob.glob("csrc/*/*_cuda.cu")),
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            )
        )
    return extensions


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="deqkern",
        version="0.2.0",
        description="Fused, certified deep equilibrium (DEQ) solvers for PyTorch: CPU C++, CUDA and Triton kernels",
        packages=find_packages(include=["deqkern", "deqkern.*"]) + ["deqkern.triton_kernels"],
        package_dir={"deqkern.triton_kernels": "triton_kernels"},
        ext_modules=build_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        python_requires=">=3.10",
        install_requires=["torch>=2.11"],
        extras_require={
            "triton": ["triton>=3.6"],
            "demo": ["scikit-learn", "tqdm", "matplotlib"],
            "test": ["pytest", "pytest-benchmark", "scikit-learn", "tqdm", "numpy", "matplotlib", "hypothesis"],
            "bench": ["torchdeq==0.1.0", "pytest-benchmark", "numpy"],
        },
        entry_points={"console_scripts": ["deqkern=deqkern.__main__:main"]},
    )


if __name__ == "__main__":
    main()
