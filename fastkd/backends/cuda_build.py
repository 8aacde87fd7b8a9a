"""Finds fastkd's CUDA extension (``csrc/``), building it just in time when it was not prebuilt.

Order: the ahead-of-time build ``fastkd._C`` (``pip install --no-build-isolation -e .`` on a
machine with a CUDA build of torch and the CUDA toolkit; ``setup.py``), else a JIT build of the
same sources with ``torch.utils.cpp_extension.load`` (ninja + nvcc, cached by torch under
``TORCH_EXTENSIONS_DIR``) on first use, else a ``RuntimeError`` that says why and how to build.
Nothing here runs at ``import fastkd``: the GPU is queried only when ``impl="cuda"`` is asked for.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
JIT_NAME = "fastkd_cuda"
BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the fastkd checkout on a machine "
    "with a CUDA build of torch and the CUDA toolkit (set TORCH_CUDA_ARCH_LIST, e.g. '8.0;9.0', "
    "when no GPU is visible at build time), or run on a GPU machine with nvcc and ninja so fastkd "
    "builds it on first use; meanwhile use impl='torch', impl='triton' or impl='auto'")

_module = None


def sources() -> list[Path]:
    """The extension's sources: every ``csrc/*.cu`` and ``csrc/*.cpp`` (not ``csrc/host/``)."""
    return sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))


def unavailable_reason() -> Optional[str]:
    """None when the extension is loaded, prebuilt, or can be built here; else the reason why not."""
    if _module is not None or importlib.util.find_spec("fastkd._C") is not None:
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        return "it was not prebuilt and no CUDA toolkit (nvcc) is found for a JIT build (set CUDA_HOME)"
    if not sources():
        return f"it was not prebuilt and its sources are not in {CSRC} (an install without csrc/)"
    return None


def extension():
    """The loaded extension module (prebuilt, or JIT-built on the first call)."""
    global _module
    if _module is not None:
        return _module
    if importlib.util.find_spec("fastkd._C") is not None:
        from .. import _C
        _module = _C
        return _module
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"impl='cuda' needs fastkd's CUDA extension, which is unavailable: {reason}; "
                           f"{BUILD_HINT}")
    from torch.utils.cpp_extension import load
    try:
        _module = load(name=JIT_NAME, sources=[str(path) for path in sources()],
                       extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"], verbose=False)
    except Exception as exc:  # a compiler error: say what failed and how to build ahead of time
        raise RuntimeError(f"building fastkd's CUDA extension on first use failed ({exc}); "
                           f"{BUILD_HINT}") from exc
    return _module
