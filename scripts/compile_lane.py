#!/usr/bin/env python
"""The offline compile lane (docs/gpu_checks.md): ``python scripts/compile_lane.py [--full]``.

Compiles every Triton kernel the launchers use for sm_90/sm_89/sm_80 with Triton's compiler and
its bundled ptxas (no GPU, no interpreter), checks compile time, shared memory, registers, spills,
tensor-core instructions and fences around atomics, and the csrc kernels with ``nvcc -Xptxas -v``.
Exit status 1 and one line per violation when a rule is broken.
"""
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # the lane compiles; the interpreter would not
    os.environ.pop("TRITON_INTERPRET")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastkd.backends.compile_lane import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
