"""Builds fastkd; the CUDA extension ``fastkd._C`` (csrc/) only where it can be built.

Switches: ``FASTKD_SKIP_CUDA_BUILD=1`` never builds it; ``TORCH_CUDA_ARCH_LIST`` picks the GPU
architectures (needed when no GPU is visible at build time); ``MAX_JOBS`` caps parallel nvcc jobs
(default: the machine's cores, at most 8). Sources: every ``csrc/*.cu`` and ``csrc/*.cpp``
(``csrc/host/`` is the CPU test harness, not part of the build), compiled with ninja. Without the
extension ``import fastkd`` works and ``impl="cuda"`` either builds the same sources on first use
(``fastkd/backends/cuda_build.py``, on a GPU machine with nvcc) or says why it is unavailable.
Build with ``pip install --no-build-isolation`` so the installed torch is the one the extension is
built against.
"""
import glob
import os
import sys

from setuptools import setup


def _skip(reason):
    print(f"fastkd: not building the CUDA extension: {reason}", file=sys.stderr)
    return {}


def cuda_build():
    if os.environ.get("FASTKD_SKIP_CUDA_BUILD", "") not in ("", "0"):
        return _skip("FASTKD_SKIP_CUDA_BUILD is set")
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return _skip("csrc/ holds no CUDA sources in this version")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return _skip("torch is not importable at build time (use pip install --no-build-isolation)")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None:
        return _skip("no CUDA toolkit found (set CUDA_HOME)")
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return _skip("no GPU is visible and TORCH_CUDA_ARCH_LIST is unset, so no architecture to build for")
    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, 8))))
    extension = CUDAExtension(
        "fastkd._C", sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]})
    print(f"fastkd: building the CUDA extension from {len(sources)} sources "
          f"(TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'the visible GPU')}, "
          f"MAX_JOBS={os.environ['MAX_JOBS']})", file=sys.stderr)
    return {"ext_modules": [extension],
            "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**cuda_build())
