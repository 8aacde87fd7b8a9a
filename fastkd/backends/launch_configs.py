"""Launch configurations of the Triton kernels, per GPU architecture, and the one launch helper.

Every Triton launch of fastkd goes through :func:`launch`. Its tile sizes, ``num_warps`` and
``num_stages`` come from :func:`tiles`, chosen from the *target* of the call:

- on a CUDA tensor, the device's compute capability (asked at call time, never at import);
- on a CPU tensor (the Triton interpreter of the test lane), small tiles, so tests cross many;
- inside ``with for_target(cc):``, the configuration of compute capability ``cc`` whatever the
  device: the interpreter tests run the kernels at real GPU tile sizes this way;
- inside ``with recording(cc) as records:``, :func:`launch` runs nothing: it appends a
  :class:`Record` (kernel, arguments, meta-parameters, target) to ``records``. The offline compile
  lane (``fastkd.backends.compile_lane``) drives the backends on tiny CPU tensors in this mode and
  compiles every record for ``cc`` with Triton's compiler, so the configurations it checks are the
  launchers' own, never a hand-kept list.

Why per architecture (shared memory per block; 64K registers per SM on all of them):
sm_80 (A100) 163 KB, sm_86/sm_89 (RTX 3090/4090) 99 KB, sm_90 (H100/H200) 227 KB. The 16-bit
backward holds a ``BM x BN`` gradient tile next to the pipelined ``h``/``W`` tiles: three stages
fit sm_80/sm_90, two fit sm_86/sm_89. float32 inputs run IEEE dot products on CUDA cores (no
TF32: the logits keep float32 precision), with smaller tiles so nothing spills.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch

# Shared memory a block may use (bytes, the opt-in maximum) and SMs of the reference part.
SHARED_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
REGISTERS_PER_SM = 64 * 1024
SM_COUNT = {80: 108, 86: 82, 89: 128, 90: 132}  # A100, RTX 3090, RTX 4090, H100 SXM
INTERPRETER = 0  # the "architecture" of CPU tensors in the Triton interpreter


def _arch_row(cc: int) -> int:
    """The table row of a compute capability: 80, 86 (86 and 89 alike), 90 (90 and newer)."""
    if cc >= 90:
        return 90
    if cc >= 86:
        return 86
    return 80


@dataclass(frozen=True)
class Tiles:
    """One kernel family's launch parameters on one target."""

    BM: int
    BN: int
    BD: int
    num_warps: int
    num_stages: int
    whole_register_file: bool = False
    split: int = 1  # backward: a tile's columns recomputed in this many parts (``backward_kernel``)

    def options(self) -> dict:
        """Launch options: warps, stages and, where ``whole_register_file``, ``maxnreg`` = the
        register file for one block (≤ 255 per thread). The float32 kernels need it: their FMA
        dots hold operand tiles in registers, and without it ptxas caps registers to fit a second
        block per SM (128 or 168 per thread) and spills instead; so does sm_80's 16-bit forward
        (mma.sync keeps its operands in registers). The other 16-bit ones do not (on sm_90 it
        even made ptxas allocate worse), so they leave the choice to ptxas."""
        found = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.whole_register_file:
            found["maxnreg"] = min(255, REGISTERS_PER_SM // (32 * self.num_warps))
        return found


# (family, arch row, "16" | "32") -> Tiles, one family per kernel role:
#   "stream"          top-k forward, offline teacher: one logits tile alive;
#   "stream_stats"    the same with the statistics (``return_stats``);
#   "stream_teacher"  top-k forward with an online teacher: a student and a teacher tile plus the
#                     (BM, K) set alive, so narrower tiles, else it spills;
#   "dense"           the dense online teacher's two forward passes;
#   "select"          the running top-K selection (32-row blocks from K > 128, see tiles());
#   "backward"        top-k: a logits tile (in ``split`` parts), then the dh/dW dots;
#   "backward_ce"     the same with CE or a bias (more alive per entry);
#   "backward_deterministic"  the top-k backward's row-owner and column-owner kernels;
#   "backward_dense"  the same with the online dense teacher's tile recomputed beside it;
#   "byte_stream", "byte_backward"  the byte-level kernels (``triton_bytes``);
#   "gather"          tail="renormalize": K rows of W per row;
#   "correction"      the top-k backward's ids of S (``topk_correction_kernel``).
# Each row is what the compile lane found to fit that target without spills (a choice ptxas's
# register allocator makes near its limits, hence per architecture); the lane checks them all.
_SIXTEEN = {
    # sm_90: 128-row blocks (S marked by a bit mask per row, not a (BM, BN) tile); with CE or a
    # bias that spills on sm_80/89, so they keep 64-row blocks
    "stream": {80: Tiles(64, 64, 64, 8, 3, True), 86: Tiles(64, 128, 64, 8, 2), 90: Tiles(128, 128, 64, 8, 3)},
    # ... with statistics (Σ e·z beside the tail sum): 128 x 128 spills on sm_90
    "stream_stats": {80: Tiles(64, 64, 64, 8, 3, True), 86: Tiles(64, 128, 64, 8, 2),
                     90: Tiles(64, 128, 64, 8, 3)},
    "stream_teacher": {80: Tiles(64, 64, 64, 8, 3), 86: Tiles(64, 64, 64, 8, 2), 90: Tiles(64, 64, 64, 8, 3)},
    "dense": {80: Tiles(64, 128, 64, 8, 3), 86: Tiles(64, 128, 64, 8, 2), 90: Tiles(64, 128, 64, 8, 3)},
    "select": {80: Tiles(64, 64, 64, 8, 3), 86: Tiles(64, 64, 64, 8, 2), 90: Tiles(64, 64, 64, 8, 3)},
    # sm_80 has no wgmma: its mma.sync accumulators and operands live in registers, so 64-wide
    # vocabulary tiles there (128 spills in the bias/softcap/CE variants at 255 registers).
    # top-k backward tiles write the tail formula only (the ids of S: the correction kernel), the
    # logits in two 128-column parts (split=2): 128 x 256 holds one 128 x 128 fp32 part at a time.
    # (sm_80: mma.sync keeps its operands in registers, 128 x 256 spills with a softcap there)
    "backward": {80: Tiles(128, 128, 32, 8, 3, split=2), 86: Tiles(128, 256, 32, 8, 2, split=2),
                 90: Tiles(128, 256, 64, 8, 3, split=2)},
    # ... with CE or a bias (a second exp per entry, column sums): 128 x 256 spills there,
    # 128 x 128 in two 64-column parts does not; deterministic (MODE 1/2) needs 32-wide D there.
    "backward_ce": {80: Tiles(128, 128, 32, 8, 3, split=2), 86: Tiles(128, 128, 32, 8, 2, split=2),
                    90: Tiles(128, 128, 64, 8, 3, split=2)},
    "backward_deterministic": {80: Tiles(128, 128, 32, 8, 3, split=2),
                               86: Tiles(128, 128, 32, 8, 2, split=2),
                               90: Tiles(128, 128, 32, 8, 3, split=2)},
    "backward_dense": {80: Tiles(64, 64, 64, 8, 3), 86: Tiles(64, 128, 64, 8, 2),
                       90: Tiles(64, 128, 64, 8, 3)},
    # byte-level bucket log-sum-exp (triton_bytes), forward and backward
    "byte_stream": {80: Tiles(64, 64, 64, 8, 3, True), 86: Tiles(64, 128, 64, 8, 2),
                    90: Tiles(64, 128, 64, 8, 3)},
    "byte_backward": {80: Tiles(64, 64, 64, 8, 3), 86: Tiles(64, 128, 64, 8, 2),
                      90: Tiles(64, 128, 64, 8, 3)},
}
# float32: IEEE dots on CUDA cores (FMA), operands held in registers: smaller tiles, 8 warps.
_THIRTY_TWO = {
    "stream": {a: Tiles(32, 32, 32, 8, 2, True) for a in (80, 86, 90)},
    "stream_stats": {a: Tiles(32, 32, 32, 8, 2, True) for a in (80, 86, 90)},
    "stream_teacher": {a: Tiles(32, 32, 32, 8, 2, True) for a in (80, 86, 90)},
    "dense": {a: Tiles(32, 32, 32, 8, 2, True) for a in (80, 86, 90)},
    "select": {a: Tiles(32, 32, 32, 8, 2, True) for a in (80, 86, 90)},
    "backward": {a: Tiles(32, 32, 32, 8, 2, True) for a in (80, 86, 90)},
    "backward_ce": {a: Tiles(32, 32, 32, 8, 2, True) for a in (80, 86, 90)},
    "backward_deterministic": {a: Tiles(32, 32, 32, 8, 2, True) for a in (80, 86, 90)},
    "backward_dense": {a: Tiles(32, 32, 32, 8, 2, True) for a in (80, 86, 90)},
    "byte_stream": {a: Tiles(32, 32, 32, 8, 2, True) for a in (80, 86, 90)},
    "byte_backward": {a: Tiles(32, 32, 32, 8, 2, True) for a in (80, 86, 90)},
}
_GPU = {(family, arch, width): tiles
        for width, table in (("16", _SIXTEEN), ("32", _THIRTY_TWO))
        for family, rows in table.items() for arch, tiles in rows.items()}
_GATHER_GPU = Tiles(1, 1, 32, 8, 2)
# top-k correction (the ids of S after the backward tiles): BM rows x BD columns of dh per
# program, a gathered (BM, BD) block of W per slot; BN: ids per program of the deterministic dW
# pass. Float32 products on CUDA cores for every input dtype, so one row for all.
_CORRECTION_GPU = Tiles(16, 64, 128, 8, 2)
_INTERPRETED = Tiles(16, 32, 16, 4, 1)
_INTERPRETED_SPLIT = Tiles(16, 32, 16, 4, 1, split=2)  # the top-k backward's two-part tiles
_GATHER_INTERPRETED = Tiles(1, 1, 16, 4, 1)
_CORRECTION_INTERPRETED = Tiles(8, 16, 16, 4, 1)


@dataclass
class Record:
    """One launch seen in recording mode: enough to compile exactly what a GPU would run."""

    kernel: Any          # the triton.jit function
    grid: tuple
    args: tuple
    kwargs: dict         # constexprs and launch options (num_warps, num_stages)
    target: int          # compute capability, e.g. 89


@dataclass
class _State:
    target: Optional[int] = None
    records: Optional[list] = None


_state = _State()


@contextlib.contextmanager
def for_target(cc: int):
    """Launch configurations of compute capability ``cc`` (e.g. 89) inside the block, on any device."""
    saved = (_state.target, _state.records)
    _state.target = int(cc)
    try:
        yield
    finally:
        _state.target, _state.records = saved


@contextlib.contextmanager
def recording(cc: int):
    """Inside the block :func:`launch` records instead of running, for compute capability ``cc``.

    Yields the list the records are appended to. Outputs of the kernels stay as allocated (zeros
    or garbage): only the launches matter in this mode, never the values."""
    saved = (_state.target, _state.records)
    _state.target, _state.records = int(cc), []
    try:
        yield _state.records
    finally:
        _state.target, _state.records = saved


def is_recording() -> bool:
    return _state.records is not None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target(device: torch.device) -> int:
    """Compute capability the launch is configured for; :data:`INTERPRETER` for CPU tensors."""
    if _state.target is not None:
        return _state.target
    if device.type == "cuda":
        return _capability(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill: the device's own, or the reference part of the target."""
    cc = target(device)
    if _state.target is None and device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if cc == INTERPRETER:
        return 4
    return SM_COUNT.get(cc, SM_COUNT[_arch_row(cc)])


def tiles(family: str, device: torch.device, dtype: torch.dtype, kp: int = 1) -> Tiles:
    """The launch parameters of kernel ``family`` for tensors of ``dtype`` on ``device``; ``kp``:
    the top-k width rounded up to a power of two (the selection keeps ``(BM, kp)`` values and
    columns in registers: from 128 on it takes 32-row blocks, so they fit without spilling)."""
    cc = target(device)
    if family == "gather":
        return _GATHER_INTERPRETED if cc == INTERPRETER else _GATHER_GPU
    if family == "correction":
        return _CORRECTION_INTERPRETED if cc == INTERPRETER else _CORRECTION_GPU
    if cc == INTERPRETER:
        return _INTERPRETED_SPLIT if family.startswith("backward") and family != "backward_dense" else _INTERPRETED
    width = "32" if dtype == torch.float32 else "16"
    found = _GPU[(family, _arch_row(cc), width)]
    if family == "select" and kp >= 128:
        return dataclasses.replace(found, BM=32)
    return found


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or a :class:`Record` of it in :func:`recording` mode."""
    if _state.records is not None:
        _state.records.append(Record(kernel, tuple(grid), args, dict(kwargs), _state.target))
        return
    kernel[tuple(grid)](*args, **kwargs)
