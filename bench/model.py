"""Cost model: a lower bound on the time of every fastkd path, from FLOPs and bytes (``python -m bench --model``).

Every path is written once here as a list of kernels (:class:`Kernel`), each with the work it
must do: tensor-core FLOPs, CUDA-core FLOPs, special-function operations (``exp``/``tanh``),
HBM bytes, L2 bytes (operand tiles re-read from L2) and fp32 atomic bytes (resolved in L2), and
its number of programs (thread blocks). A kernel's time is bounded below by the slowest of its
resources (a roofline: the resources of one kernel overlap, different kernels on one stream do
not)::

    t(kernel) = max(tc_flops / (R_tc·u), fp32_flops / (R_fp32·u), sfu_ops / (R_sfu·u),
                    hbm_bytes / B_hbm, (l2_bytes + atomic_bytes) / B_l2)

where ``u = min(1, programs / SMs)`` for kernels whose programs are long walks that cannot
rebalance (the streaming kernels; a cuBLAS GEMM or an epilogue has enough programs). A path's
bound is the sum of its kernels' bounds, plus communication over NVLink for the vocabulary-
parallel path. The reference, "the three bare GEMMs", is ``6·N·D·V / R_tc`` (logits, dh, dW at
peak tensor-core rate); the online-teacher cases also carry the teacher's one GEMM,
``2·N·D_t·V / R_tc``, in their floor.

What the bound is and is not: every rate is a peak (datasheet, or an optimistic assumption where
no datasheet figure exists, stated in :data:`GPUS`), every byte count is a minimum (operands read
once from HBM, outputs written once), so a measured time can only be above it. A path whose bound
misses its target cannot meet it however well it is tuned; a path whose bound meets it may still
miss it in practice. The formulas are documented in ``bench/README.md`` ("Cost model") and tested
on hand-computed cases in ``tests/test_cost_model.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

GiB = 2**30


@dataclass(frozen=True)
class Gpu:
    """Peak rates of one GPU (per second) and the figures the model needs."""

    name: str
    tc_flops: float        # dense bf16/fp16 tensor-core FLOP/s (fp32 accumulation)
    fp32_flops: float      # CUDA-core fp32 FLOP/s (what an fp32 matmul without TF32 gets)
    hbm_bytes: float       # HBM bandwidth, bytes/s
    l2_bytes: float        # L2 bandwidth, bytes/s (assumed; no datasheet figure)
    sfu_ops: float         # exp2/tanh results/s (MUFU: 16 per clock per SM)
    sms: int
    l2_size: int           # bytes
    link_bytes: float      # NVLink, bytes/s per direction per GPU
    source: str
    memory: int = 80 * 10**9  # device memory, bytes (what sets fastkd's default chunk budget)


# Datasheet rates. Tensor-core figures are the datasheets' "BF16 Tensor Core" rates without
# sparsity (the datasheets print 1,979 TFLOPS *with* 2:4 sparsity; dense is half).
GPUS = {
    "H100": Gpu(
        name="H100 SXM5 80GB", tc_flops=989.4e12, fp32_flops=66.9e12, hbm_bytes=3.35e12,
        l2_bytes=12e12, sfu_ops=132 * 16 * 1.98e9, sms=132, l2_size=50 * 2**20, link_bytes=450e9,
        memory=78 * GiB, source=("NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): BF16 tensor core 1,979 "
                "TFLOPS with sparsity -> 989.4 dense, FP32 67 TFLOPS, HBM3 3.35 TB/s, NVLink 900 GB/s "
                "(bidirectional -> 450 GB/s each way); 132 SMs and 50 MB L2 (Hopper whitepaper; "
                "PyTorch reports both on this workplace's H100, /work/.library/device/KINDS.md); "
                "MUFU exp/tanh 16/clk/SM (CUDA C++ Programming Guide, arithmetic instruction "
                "throughput, cc 9.0) at 1.98 GHz (max SM clock read here, KINDS.md). L2 bandwidth: "
                "no vendor figure; 12 TB/s assumed, deliberately optimistic so the bound stays a "
                "lower bound (for measurements see chipsandcheese.com/2023/07/02/"
                "nvidias-h100-funny-l2-and-tons-of-bandwidth)")),
    "H200": Gpu(
        name="H200 SXM 141GB", tc_flops=989.4e12, fp32_flops=66.9e12, hbm_bytes=4.8e12,
        l2_bytes=12e12, sfu_ops=132 * 16 * 1.98e9, sms=132, l2_size=60 * 2**20, link_bytes=450e9,
        memory=139 * GiB, source=("NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): BF16 tensor core 1,979 "
                "TFLOPS with sparsity -> 989.4 dense, FP32 67 TFLOPS, HBM3e 4.8 TB/s, NVLink 900 GB/s; "
                "132 SMs and 60 MB L2 as PyTorch reports them on this workplace's H200 (KINDS.md); "
                "MUFU and L2 as for the H100")),
}

# Measured on this workplace's machines (KINDS.md): an 8192^3 bf16 matmul and a device-to-device
# copy. ``--rates measured`` uses these instead of the datasheet peaks.
MEASURED = {
    "H100": {"tc_flops": 798e12, "hbm_bytes": 3.0e12},
    "H200": {"tc_flops": 788e12, "hbm_bytes": 4.3e12},
}


def measured_gpu(key: str) -> Gpu:
    gpu = GPUS[key]
    return replace(gpu, name=gpu.name + " (measured rates)", **MEASURED[key],
                   source="KINDS.md: 8192^3 bf16 matmul and device-to-device copy measured here")


@dataclass(frozen=True)
class Shape:
    """One loss call: N rows, the student head (D, V), optional online teacher width, K."""

    model: str
    tokens: int
    dim: int
    vocab: int
    topk: int = 64
    teacher_dim: Optional[int] = None   # online teacher's hidden width (dense or top-k online)
    softcap: Optional[float] = None
    element_bytes: int = 2              # bf16

    @property
    def bare_gemm_flops(self) -> float:
        """The three GEMMs of any fused linear loss: logits, dh, dW (6·N·D·V)."""
        return 6.0 * self.tokens * self.dim * self.vocab

    @property
    def floor_flops(self) -> float:
        """The bare GEMMs plus the online teacher's one logits GEMM (2·N·D_t·V) when there is one."""
        teacher = 2.0 * self.tokens * self.teacher_dim * self.vocab if self.teacher_dim else 0.0
        return self.bare_gemm_flops + teacher


@dataclass
class Kernel:
    """The work of one kernel launch (``count`` identical launches)."""

    name: str
    tc_flops: float = 0.0
    fp32_flops: float = 0.0
    sfu_ops: float = 0.0
    hbm_bytes: float = 0.0
    l2_bytes: float = 0.0
    atomic_bytes: float = 0.0
    programs: int = 0
    long_programs: bool = False   # programs walk a long loop: fewer than SMs leaves SMs idle
    logit_passes: float = 0.0     # how many times this kernel computes h·Wᵀ (student), as a fraction
    count: int = 1

    def times(self, gpu: Gpu) -> dict:
        """Seconds each resource needs for all ``count`` launches."""
        use = min(1.0, self.programs / gpu.sms) if (self.long_programs and self.programs) else 1.0
        return {
            "tensor cores": self.count * self.tc_flops / (gpu.tc_flops * use),
            "fp32 cores": self.count * self.fp32_flops / (gpu.fp32_flops * use),
            "exp/tanh": self.count * self.sfu_ops / (gpu.sfu_ops * use),
            "HBM": self.count * self.hbm_bytes / gpu.hbm_bytes,
            "L2": self.count * (self.l2_bytes + self.atomic_bytes) / gpu.l2_bytes,
        }

    def bound(self, gpu: Gpu) -> tuple[float, str]:
        times = self.times(gpu)
        limit = max(times, key=times.get)
        return times[limit], limit


@dataclass
class Plan:
    """A path at one shape: its kernels, and what crosses NVLink (vocabulary parallel)."""

    path: str
    shape: Shape
    kernels: list[Kernel]
    comm_bytes: float = 0.0          # bytes each rank sends over NVLink per call
    ranks: int = 1
    notes: str = ""
    extra: dict = field(default_factory=dict)
    launches: int = 0                # launches whose gaps are counted (the streaming backward's slabs)

    def total(self, attribute: str) -> float:
        return sum(k.count * getattr(k, attribute) for k in self.kernels)

    @property
    def logit_passes(self) -> float:
        return self.total("logit_passes")

    @property
    def min_programs(self) -> int:
        """Programs of the least parallel launch (against the SMs)."""
        return min((k.programs for k in self.kernels if k.programs), default=0)

    def comm_time(self, gpu: Gpu) -> float:
        return self.comm_bytes / gpu.link_bytes

    def bound(self, gpu: Gpu) -> float:
        return sum(k.bound(gpu)[0] for k in self.kernels) + self.comm_time(gpu) + self.launch_time()

    def launch_time(self) -> float:
        """The gaps between ``launches`` back-to-back kernel launches (``LAUNCH_GAP`` each)."""
        return self.launches * LAUNCH_GAP

    def floor(self, gpu: Gpu) -> float:
        """The case's GEMM floor at peak rate (per rank for vocabulary parallel)."""
        return self.shape.floor_flops / self.ranks / gpu.tc_flops

    def ratio(self, gpu: Gpu) -> float:
        return self.bound(gpu) / self.floor(gpu)

    def dominant(self, gpu: Gpu) -> str:
        """What costs most beyond the GEMM floor: the kernel and resource with the largest excess."""
        excess = []
        for k in self.kernels:
            time, limit = k.bound(gpu)
            excess.append((time - k.count * k.tc_flops / gpu.tc_flops, f"{k.name} ({limit})"))
        if self.comm_bytes:
            excess.append((self.comm_time(gpu), "communication (NVLink)"))
        worst = max(excess)
        return worst[1] if worst[0] > 0.005 * self.floor(gpu) else "GEMMs (at the floor)"


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------

# The idle time between two back-to-back kernel launches on one stream (assumed: a few µs is what
# a launch-bound loop of small kernels shows; no vendor figure). Counted only where a path launches
# per vocabulary slab (the streaming backward: hundreds of launches); the chunked paths launch a
# few dozen kernels per call (< 0.1 ms) and are not charged.
LAUNCH_GAP = 3e-6

# cuBLAS on Hopper: 128x256 tiles in 2-CTA clusters sharing operands (TMA multicast), so each
# operand element is fetched from L2 once per 256 rows/columns of the other operand.
CUBLAS_TILE = (256, 256)
CUBLAS_PROGRAM = (128, 256)


def gemm(name: str, m: int, n: int, k: int, *, in_bytes: int = 2, out_bytes: int = 2,
         accumulate: bool = False, fp32_cores: bool = False, logit_passes: float = 0.0,
         extra_read: float = 0.0, count: int = 1) -> Kernel:
    """``C (m x n) (+)= A (m x k) · B (k x n)``: operands read once from HBM, ``C`` written once
    (read too when accumulated); L2 traffic with cuBLAS tiles; ``extra_read``: bytes an epilogue
    of the GEMM reads (a bias, say)."""
    flops = 2.0 * m * n * k
    hbm = (m * k + n * k) * in_bytes + m * n * out_bytes * (2 if accumulate else 1) + extra_read
    l2 = m * n * k * in_bytes * (1 / CUBLAS_TILE[0] + 1 / CUBLAS_TILE[1])
    programs = math.ceil(m / CUBLAS_PROGRAM[0]) * math.ceil(n / CUBLAS_PROGRAM[1])
    return Kernel(name, tc_flops=0.0 if fp32_cores else flops, fp32_flops=flops if fp32_cores else 0.0,
                  hbm_bytes=hbm, l2_bytes=l2, programs=programs, logit_passes=logit_passes, count=count)


def rowwise(name: str, rows: int, cols: int, *, read: float, write: float, sfu: float,
            count: int = 1) -> Kernel:
    """An epilogue over a ``rows x cols`` block: ``read``/``write`` bytes and ``sfu`` exp/tanh
    per element, one program per row."""
    elements = float(rows) * cols
    return Kernel(name, sfu_ops=sfu * elements, hbm_bytes=(read + write) * elements, programs=rows,
                  count=count)


def chunk_rows(tokens: int, vocab: int, budget_bytes: int, bytes_per_row_element: int,
               multiple: int = 128) -> int:
    """Rows per chunk: the most whose blocks fit the budget, rounded down to a multiple, then
    evened out over the chunks that takes (``fastkd.backends.chunked.chunk_rows``)."""
    rows = budget_bytes // (vocab * bytes_per_row_element)
    rows = max(multiple, rows // multiple * multiple)
    even = -(-tokens // -(-tokens // rows))
    rows = min(rows, -(-even // multiple) * multiple)
    return min(rows, tokens)


def _chunks(tokens: int, rows: int) -> list[tuple[int, int]]:
    """``[(chunk height, how many), ...]``: full chunks and the remainder."""
    full, rest = divmod(tokens, rows)
    return [(rows, full)] + ([(rest, 1)] if rest else [])


# ------------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------------

# The engine's memory budget for its logits buffers (``fastkd.config.chunk_bytes``) and row
# alignment (``fastkd.backends.chunked.ROW_ALIGN``), as on the engine branch.
CHUNK_BYTES = 512 * 2**20
ROW_ALIGN = 64


def default_budget(gpu: Gpu) -> int:
    """``fastkd.config.chunk_bytes = None`` on ``gpu`` (``fastkd.backends.chunked.budget_bytes``):
    1/64 of its memory, at least 512 MiB, at most 2 GiB (about 78 GiB PyTorch reports on this
    workplace's H100 -> 1.22 GiB, 139 GiB on its H200 -> 2 GiB; device/KINDS.md)."""
    return int(min(2 * GiB, max(CHUNK_BYTES, gpu.memory // 64)))


def chunked(shape: Shape, *, teacher: Optional[str] = None, budget_bytes: int = CHUNK_BYTES,
            byte_level: bool = False, epilogue: str = "triton") -> Plan:
    """The chunked engine with cuBLAS and the Triton epilogues (``chunked_epilogue="triton"``, and
    the default for float32 operands and the online top-k teacher), summing reduction: per chunk
    of rows (``budget_bytes`` of fp32 logits buffers and the 16-bit ``dz``, rows rounded down to
    ``ROW_ALIGN``), the logits GEMM (bf16 x bf16 -> fp32 buffer), a stats epilogue reading the fp32 logits, a grad epilogue
    reading them again and writing bf16 ``dz`` (the Triton epilogues' ``out=``), then
    ``dh = dz·W`` and ``dW += dzᵀ·h`` (fp32 accumulator). ``teacher="dense"|"topk"``: the online
    teacher's GEMM once per chunk into a second fp32 buffer; the dense loss runs three passes over
    both buffers (``dense_stats``, ``dense_divergence``, ``dense_grad``), top-k reads the teacher
    only in the stats epilogue (the grad epilogue needs its K values). ``byte_level``: the stats
    are 257 bucket log-sum-exps, same bytes. ``epilogue="cuda"`` (``impl="cuda"``): the same plan
    with the csrc epilogues, whose grad pass writes ``dz`` in place over the fp32 buffer (4 B);
    the plan then rounds it to the operand dtype (``_Head.grad_operand``: one more pass reading
    4 B and writing 2 B per element)."""
    if epilogue not in ("triton", "cuda"):
        raise ValueError(f"epilogue must be 'triton' or 'cuda', got {epilogue!r}")
    n, d, v, e = shape.tokens, shape.dim, shape.vocab, shape.element_bytes
    dt = shape.teacher_dim if teacher else None
    buffers = 2 if teacher else 1
    # the budget holds the fp32 buffers and dz in the operand dtype (fastkd.backends.chunked._Pass)
    rows = chunk_rows(n, v, budget_bytes, 4 * buffers + e, multiple=ROW_ALIGN)
    cap = 1 if shape.softcap else 0
    in_place = epilogue == "cuda"
    kernels = []
    for index, (c, count) in enumerate(_chunks(n, rows)):
        kernels.append(gemm("logits GEMM", c, v, d, in_bytes=e, out_bytes=4, logit_passes=c / n,
                            count=count))
        if teacher:
            kernels.append(gemm("teacher GEMM", c, v, dt, in_bytes=e, out_bytes=4, count=count))
        teacher_read = 4 if teacher else 0
        kernels.append(rowwise("stats epilogue", c, v, read=4 + teacher_read, write=0,
                               sfu=1 + cap + (1 if teacher else 0), count=count))
        if teacher == "dense":
            kernels.append(rowwise("divergence epilogue", c, v, read=8, write=0, sfu=2 + cap,
                                   count=count))
        grad_teacher = 4 if teacher == "dense" else 0
        kernels.append(rowwise("grad epilogue", c, v, read=4 + grad_teacher, write=4 if in_place else e,
                               sfu=1 + cap + (1 if teacher == "dense" else 0), count=count))
        if in_place:
            kernels.append(rowwise("dz cast to bf16", c, v, read=4, write=e, sfu=0, count=count))
        kernels.append(gemm("dh GEMM", c, d, v, in_bytes=e, out_bytes=e, count=count))
        # dW accumulates in fp32 across chunks: read and written by every chunk but the first.
        first = 1 if index == 0 else 0
        kernels.append(gemm("dW GEMM", v, d, c, in_bytes=e, out_bytes=4, accumulate=True,
                            count=count - first))
        if first:
            kernels.append(gemm("dW GEMM", v, d, c, in_bytes=e, out_bytes=4, count=1))
    kernels = [k for k in kernels if k.count]
    # with 16-bit operands the default CUDA path is the fused head (fused_head(), named "chunked");
    # this plan is its Triton-epilogue alternative (chunked_epilogue="triton", and float32 operands),
    # except for the online top-k teacher, whose forward runs these epilogues by default
    base = "cuda" if in_place else "chunked"
    suffix = "" if in_place else ", Triton epilogues"
    name = f"byte ({base})" if byte_level else {None: base + suffix, "dense": f"{base} online dense{suffix}",
                                                   "topk": f"{base} online top-k"}[teacher]
    return Plan(name, shape, kernels, extra={"chunk_rows": rows, "buffer_bytes": rows * v * (4 * buffers + e)})


def cuda(shape: Shape, *, teacher: Optional[str] = None, budget_bytes: int = CHUNK_BYTES) -> Plan:
    """``impl="cuda"``: the chunked plan with the csrc epilogues (see :func:`chunked`)."""
    return chunked(shape, teacher=teacher, budget_bytes=budget_bytes, epilogue="cuda")


# The fused head (``fastkd.backends.triton_fused_head``, the default ``chunked_epilogue="auto"``
# for 16-bit operands):
# the columns of one partial-statistics tile, the float32 partials it writes per (row, tile), and
# the logits GEMM's program tile on sm_90 (rows, columns: ``head_config(90, bf16, wide=True)``,
# which the model's cases get: no CE term; its epilogue runs on two 128-column halves).
FUSED_TILE = 128
FUSED_PARTIALS = 6
FUSED_PROGRAM = (128, 256)
# ``grad_in_gemms`` (``triton_fused_head.GRAD_IN_GEMMS``): the output tile of the two gradient
# GEMMs that make dz from the tile (rows or vocabulary x D: 128 x 256 on sm_90, ``gemm_config``),
# so dz is made once per 256 columns of D; and the fp32 operations that make one dz element
# (tile + m_t, x τ, − lse, x dense scale, the set's select, the cast; + 3 for softcap').
FUSED_GRAD_TILE = (128, 256)
FUSED_GRAD_FP32 = 8
# The scaled tile's reference: the student's logits at the teacher's first PROBE_IDS ids
# (fastkd.backends.triton_fused_head.PROBE_IDS).
PROBE_IDS = 4


def fused_head(shape: Shape, *, teacher: Optional[str] = None, budget_bytes: int = CHUNK_BYTES,
               grad_in_gemms: bool = False, scaled: Optional[bool] = None) -> Plan:
    """The chunked plan with the fused head (the default on CUDA for 16-bit operands,
    ``fastkd.config.chunked_epilogue="auto"``),
    summing reduction, 16-bit operands. Per chunk of ``c`` rows (the budget over 16-bit tiles:
    2 B per element, 4 B with the dense teacher's second tile):

    ``scaled`` (top-k; by default unless ``grad_in_gemms``: the bfloat16 default,
    ``triton_fused_head.SCALED_TILE``): GEMM 1 stores ``G = e^{z − R}`` (+ one exp per element
    with a softcap), no grad pass; before GEMM 1 the probe gathers ``PROBE_IDS`` rows of W per row
    (``R``), after the combine ``K + 1`` entries per row are written into G (a 32 B sector each);
    the dh GEMM writes float32 and is scaled per row into the 16-bit dh, ``h`` is scaled per row
    into a 16-bit copy for the dW GEMM. GEMM 1 run again for the program tiles of a row whose
    reference is far from its max is not counted (it takes a student whose max lies > 40 nats
    above its logits at all of the teacher's first ids; otherwise that launch's programs return at
    once). The gradient-pass plan (``scaled=False``) is what float16 operands run:

    - fused logits GEMM: ``2·c·V·D`` tensor FLOPs, reads ``h_c`` and W, writes the 16-bit tile
      and ``FUSED_PARTIALS`` float32 partials per (row, ``FUSED_TILE``-column tile) plus the
      tile bounds of S (top-k; the dense teacher: the partials only); one exp per element
      (+ tanh with a softcap) in its epilogue; L2 traffic of ``FUSED_PROGRAM`` (128 x 256)
      program tiles: each W element read from L2 once per 128 rows, each h element once per 256
      columns;
    - top-k: a torch combine reading the partials (``c·V/128·24`` B), a grad pass reading the
      tile (2 B) and the per-tile max and bounds, writing dz (2 B);
    - dense teacher: the teacher's fused GEMM likewise, a divergence pass reading both tiles
      (4 B), a grad pass reading both and writing dz (6 B);
    - dh and dW GEMMs as in :func:`chunked` (16-bit dz, fp32 dW accumulated across chunks).

    ``grad_in_gemms`` (top-k only; opt-in ``triton_fused_head.GRAD_IN_GEMMS``): no grad pass and
    no dz; the two gradient GEMMs read the 16-bit tile as their dz operand (plus the tile max
    and bounds) and make each dz element again for every ``FUSED_GRAD_TILE`` columns of D: one
    exp and ``FUSED_GRAD_FP32`` (+3 with a softcap) fp32 operations each time, on the CUDA
    cores beside the tensor cores (the roofline lets them overlap: a lower bound); L2 traffic of
    ``FUSED_GRAD_TILE`` (128 x 256) output tiles.
    """
    n, d, v, e = shape.tokens, shape.dim, shape.vocab, shape.element_bytes
    dense = teacher == "dense"
    if teacher not in (None, "dense"):
        raise ValueError(f"teacher must be None or 'dense', got {teacher!r}")
    if dense and grad_in_gemms:
        raise ValueError("grad_in_gemms is built for the top-k plan only (teacher=None)")
    if scaled is None:
        scaled = not dense and not grad_in_gemms
    if scaled and (dense or grad_in_gemms):
        raise ValueError("scaled is built for the top-k plan with its own gradient GEMMs only")
    # per row and head, as fastkd's _FusedPass counts it: the 16-bit tile, and per 128 columns the
    # float32 partials and the two int32 bounds of S
    heads_count = 2 if dense else 1
    row_bytes = heads_count * (v * 2 + math.ceil(v / 128) * (FUSED_PARTIALS + 2) * 4)
    if scaled:  # the float32 dh and the 16-bit σ ⊙ h per row count against the budget too
        row_bytes += d * (4 + 2)
    rows = chunk_rows(n, row_bytes, budget_bytes, 1, multiple=ROW_ALIGN)
    cap = 1 if shape.softcap else 0
    tiles = math.ceil(v / FUSED_TILE)
    heads = [("fused logits GEMM", d)] + ([("fused teacher GEMM", shape.teacher_dim)] if dense else [])
    kernels = []
    for index, (c, count) in enumerate(_chunks(n, rows)):
        if scaled:
            kernels.append(Kernel("probe (R)", hbm_bytes=c * (PROBE_IDS + 1) * d * e,
                                  tc_flops=2.0 * c * PROBE_IDS * d, programs=c, count=count))
        for name, width in heads:
            partials = FUSED_PARTIALS if dense else FUSED_PARTIALS + 1
            head = gemm(name, c, v, width, in_bytes=e, out_bytes=2, count=count,
                        logit_passes=c / n if name == "fused logits GEMM" else 0.0,
                        extra_read=c * tiles * partials * 4)
            head.l2_bytes = c * v * width * e * (1 / FUSED_PROGRAM[0] + 1 / FUSED_PROGRAM[1])
            head.programs = math.ceil(c / FUSED_PROGRAM[0]) * math.ceil(v / FUSED_PROGRAM[1])
            head.sfu_ops = (1 if dense else 1 + cap + (cap if scaled else 0)) * c * v
            kernels.append(head)
        if dense:
            kernels.append(rowwise("divergence pass", c, v, read=4, write=0, sfu=3, count=count))
            kernels.append(rowwise("grad pass", c, v, read=4, write=e, sfu=3, count=count))
        else:
            kernels.append(rowwise("combine", c, tiles, read=FUSED_PARTIALS * 4, write=0, sfu=2, count=count))
            if scaled:  # per slot of S and the label: id, value, z read; one 32 B sector written
                kernels.append(rowwise("S into G", c, shape.topk + 1, read=12, write=32, sfu=2, count=count))
            elif not grad_in_gemms:
                grad = rowwise("grad pass", c, v, read=2, write=e, sfu=1 + cap, count=count)
                grad.hbm_bytes += c * tiles * 2 * 4  # the tile max and the bounds of S
                kernels.append(grad)
        first = 1 if index == 0 else 0
        grads = [gemm("dh GEMM", c, d, v, in_bytes=e, out_bytes=4 if scaled else e, count=count),
                 gemm("dW GEMM", v, d, c, in_bytes=e, out_bytes=4, accumulate=True, count=count - first)]
        if first:
            grads.append(gemm("dW GEMM", v, d, c, in_bytes=e, out_bytes=4, count=1))
        if scaled:  # dh = σ ⊙ (G·W) from float32; σ ⊙ h for the dW GEMM
            grads.append(rowwise("dh × σ", c, d, read=4, write=e, sfu=0, count=count))
            grads.append(rowwise("h × σ", c, d, read=e, write=e, sfu=0, count=count))
        if grad_in_gemms:  # the tile is the dz operand; dz made per FUSED_GRAD_TILE[1] columns of D
            tile_rows, tile_d = FUSED_GRAD_TILE
            remade = math.ceil(d / tile_d)
            for k, outer in zip(grads, (c, v, v)):
                k.hbm_bytes += c * tiles * 2 * 4  # the tile max and the bounds of S
                k.l2_bytes = c * v * d * e * (1 / tile_rows + 1 / tile_d)
                k.sfu_ops = remade * c * v
                k.fp32_flops = remade * (FUSED_GRAD_FP32 + 3 * cap) * c * v
                k.programs = math.ceil(outer / tile_rows) * remade
        kernels.extend(grads)
    kernels = [k for k in kernels if k.count]
    # the default CUDA path (bfloat16 operands: the scaled tile)
    name = "chunked online dense" if dense else "chunked"
    if grad_in_gemms:
        name += ", dz in the GEMMs (opt-in)"
    elif not dense and not scaled:
        name += ", gradient pass"
    return Plan(name, shape, kernels, extra={"chunk_rows": rows})


# sm_90 tiles of fastkd/backends/launch_configs.py (16-bit) per streaming variant:
# (bm_forward, bn_forward, bm, bn_backward, bn_recompute). Top-k backward: 128 x 256 recomputed in
# two 128-column parts ("backward", split=2); the forward 128 x 128 ("stream"); the online top-k
# forward 64 x 64 ("stream_teacher"); the dense teacher and byte kernels 64 x 128.
STREAMING_TILES = {
    None: (128, 128, 128, 256, 128),
    "topk": (64, 64, 128, 256, 128),
    "dense": (64, 128, 64, 128, 128),
    "byte": (64, 128, 64, 128, 128),
}


def streaming(shape: Shape, *, teacher: Optional[str] = None, bm: Optional[int] = None,
              bn_forward: Optional[int] = None, bn_backward: Optional[int] = None,
              bn_recompute: Optional[int] = None, bm_forward: Optional[int] = None,
              byte_level: bool = False, gpu: Optional[Gpu] = None) -> Plan:
    """The streaming Triton kernels (never a logits tile in HBM), with the sm_90 tiles of
    ``launch_configs`` (``STREAMING_TILES``; a tile size given here overrides it, ``bm`` for both
    passes and ``bn_backward`` for the recompute unless those are given too).
    Forward: one program per ``bm_forward`` rows x vocabulary split (split-V, enough splits for 2
    programs per SM), each walking its part of V in ``bn_forward`` tiles (online log-sum-exp),
    then a tiny combine. Backward: one program per (``bm`` rows, ``bn_backward`` columns) tile:
    recompute the logits (``bn_recompute`` columns at a time: each part re-reads the ``h``
    block), form ``dz`` in registers, ``dh += dz·W_tile`` and ``dW_tile += dzᵀ·h`` with relaxed
    fp32 atomics. Operand tiles come from L2 (re-read once per tile of the other operand); the
    atomics resolve in L2 but dW (V x D fp32) does not fit there: with program order grouped by
    row blocks so that a group's dh stays in L2, dW is read and written in HBM once per group.
    Top-k (offline or online teacher, not byte-level): the tiles write the tail formula only, and
    a correction kernel adds the K ids of S per row: ``W[ids]`` gathered from HBM (N·K·D·2 B),
    ``dh`` read and written once (its rows are the program's own), ``dW[ids] += δ·h`` with relaxed
    fp32 atomics (N·K·D·4 B), 4·N·K·D fp32 FLOPs on CUDA cores.
    ``teacher="dense"`` recomputes the teacher's logits in the backward (streaming keeps
    nothing); ``"topk"`` needs the teacher only in the forward."""
    table = STREAMING_TILES["byte" if byte_level else teacher]
    bm_forward = bm_forward or bm or table[0]
    bn_forward = bn_forward or table[1]
    bn_recompute = bn_recompute or bn_backward or table[4]
    bm = bm or table[2]
    bn_backward = bn_backward or table[3]
    gpu = gpu or GPUS["H100"]
    n, d, v, e = shape.tokens, shape.dim, shape.vocab, shape.element_bytes
    dt = shape.teacher_dim or 0
    cap = 1 if shape.softcap else 0
    forward_blocks = math.ceil(n / bm_forward)
    splits = max(1, min(math.ceil(v / bn_forward), math.ceil(2 * gpu.sms / forward_blocks)))
    fwd_flops = 2.0 * n * d * v + (2.0 * n * dt * v if teacher else 0.0)
    fwd_l2 = n * v * d * e * (1 / bn_forward + 1 / bm_forward)
    if teacher:
        fwd_l2 += n * v * dt * e * (1 / bn_forward + 1 / bm_forward)
    fwd_hbm = (n * d + v * d) * e + ((n * dt + v * dt) * e if teacher else 0)
    forward = Kernel("forward (split-V)", tc_flops=fwd_flops, sfu_ops=n * v * (1 + cap + (1 if teacher else 0)),
                     hbm_bytes=fwd_hbm, l2_bytes=fwd_l2, programs=forward_blocks * splits, long_programs=True,
                     logit_passes=1.0)
    row_blocks = math.ceil(n / bm)
    tiles = row_blocks * math.ceil(v / bn_backward)
    recompute_teacher = teacher == "dense"
    bwd_flops = 6.0 * n * d * v + (2.0 * n * dt * v if recompute_teacher else 0.0)
    # per tile: h block and W tile for the recompute, again for dh (W) and dW (h)
    bwd_l2 = n * v * d * e * ((1 / bn_recompute + 1 / bm) + (1 / bn_backward + 1 / bm))
    if recompute_teacher:
        bwd_l2 += n * v * dt * e * (1 / bn_recompute + 1 / bm)
    atomics = n * v * d * 4 * (1 / bn_backward + 1 / bm)
    group_rows = max(bm, (gpu.l2_size // 2) // (d * 4) // bm * bm)   # dh rows a group keeps in L2
    groups = math.ceil(n / group_rows)
    bwd_hbm = (n * d + v * d) * e + n * d * 4 + groups * v * d * 4 * 2
    # 16-bit weights: the float32 dW a vocabulary slab at a time (triton_backend._slabs): h read
    # again per slab, each slab's buffer zeroed, then read and rounded into the 16-bit result
    slab_bytes = min(SLAB_BYTES, max(SLAB_MIN_BYTES, n * d * 4 // SLAB_SHARE))
    slabs = math.ceil(v / max(bn_backward, slab_bytes // (4 * d) // bn_backward * bn_backward)) if e < 4 else 1
    bwd_hbm += (slabs - 1) * n * d * e + (v * d * (4 + 4 + e) if slabs > 1 else 0)
    backward = Kernel("backward (atomics)", tc_flops=bwd_flops,
                      sfu_ops=n * v * (1 + cap + (1 if recompute_teacher else 0)), hbm_bytes=bwd_hbm,
                      l2_bytes=bwd_l2, atomic_bytes=atomics, programs=tiles, long_programs=True,
                      logit_passes=1.0)
    kernels = [forward, backward]
    extra = {"splits": splits, "atomic_bytes": atomics, "dW_groups": groups, "dW_slabs": slabs}
    if teacher != "dense" and not byte_level:
        k = shape.topk
        # per slab its dW part reads the (N, K) ids and coefficients again, and h for the rows
        # with an id in the slab: with ids spread evenly a row hits 1 − (1 − 1/slabs)^K of them
        hit = 1.0 - (1.0 - 1.0 / slabs) ** k if slabs > 1 else 1.0
        correction = Kernel("top-k correction (ids of S)", fp32_flops=4.0 * n * k * d,
                            hbm_bytes=n * k * d * e + n * d * e + n * d * 4 * 2
                            + (slabs - 1) * (hit * n * d * e + n * k * 8),
                            atomic_bytes=n * k * d * 4, programs=row_blocks)
        kernels.append(correction)
        extra["correction_atomic_bytes"] = correction.atomic_bytes
    name = "byte (streaming)" if byte_level else {None: "streaming", "dense": "streaming online dense",
                                                    "topk": "streaming online top-k"}[teacher]
    # per slab the backward tiles and the correction (top-k) are launched again
    launches = (slabs - 1) * (2 if teacher != "dense" and not byte_level else 1)
    extra["slab_bytes"] = slab_bytes if slabs > 1 else 0
    # the backward's peak beside its inputs and results: float32 dh, the slab, and the saved
    # (N, K) slot coefficients with the correction's int32 ids, and a few float32 values per row
    extra["extra_memory_bytes"] = n * d * 4 + extra["slab_bytes"] + n * shape.topk * 8 + n * 8 * 4
    return Plan(name, shape, kernels, extra=extra, launches=launches)


# The streaming backward's float32 dW slab for 16-bit weights (fastkd.backends.triton_backend:
# SLAB_BYTES, SLAB_MIN_BYTES, SLAB_SHARE): at most 1/8 of the float32 dh, 16–64 MiB.
SLAB_BYTES = 64 * 2**20
SLAB_MIN_BYTES = 16 * 2**20
SLAB_SHARE = 8


# The torch backend's element passes over a chunk x V fp32 block, counted from
# fastkd/backends/torch_backend.py (forward: GEMM out, lse, tail lse; backward: GEMM out,
# softmax, scale, set on S, dz read by two GEMMs). Approximate: a lower count, not an upper one.
TORCH_FORWARD_BYTES = 4 + 4 + 4
TORCH_BACKWARD_BYTES = 4 + 8 + 8 + 4 + 8


def torch_backend(shape: Shape) -> Plan:
    """The torch backend on a GPU: fp32 upcast of the weight, four fp32 GEMMs on CUDA cores
    (forward logits; backward recompute, dh, dW) and its element passes over fp32 blocks; with an
    online dense teacher (``shape.teacher_dim``) the teacher's GEMM in the forward and again in
    the backward's recomputation, and one more fp32 read per pass."""
    n, d, v = shape.tokens, shape.dim, shape.vocab
    dt = shape.teacher_dim
    upcast = Kernel("weight fp32 upcast (fwd and bwd)", hbm_bytes=v * d * (shape.element_bytes + 4), count=2)
    teacher_read = 4 if dt else 0
    kernels = [
        upcast,
        gemm("logits GEMM (fp32)", n, v, d, in_bytes=4, out_bytes=4, fp32_cores=True, logit_passes=1.0),
        rowwise("forward element passes", n, v, read=TORCH_FORWARD_BYTES - 4 + teacher_read, write=0, sfu=2),
        gemm("recompute GEMM (fp32)", n, v, d, in_bytes=4, out_bytes=4, fp32_cores=True, logit_passes=1.0),
        rowwise("backward element passes", n, v, read=TORCH_BACKWARD_BYTES - 4 + teacher_read, write=0, sfu=1),
        gemm("dh GEMM (fp32)", n, d, v, in_bytes=4, out_bytes=4, fp32_cores=True),
        gemm("dW GEMM (fp32)", v, d, n, in_bytes=4, out_bytes=4, fp32_cores=True),
    ]
    if dt:
        kernels += [gemm("teacher GEMM (fp32)", n, v, dt, in_bytes=4, out_bytes=4, fp32_cores=True, count=2)]
    return Plan("torch", shape, kernels)


# The chunked plan with torch epilogues (the engine's ``impl="torch"``, the CPU path): bytes per
# logit element of its fused in-place passes (top-k: softmax in place, the tail sum, the dz
# scaling; dense: two log_softmax, exp, divergence, dz), approximate.
TORCH_EPILOGUE_BYTES = {None: 4 + 8 + 4 + 8, "dense": 2 * 8 + 8 + 8 + 8 + 8}


def torch_chunked(shape: Shape, *, budget_bytes: int = CHUNK_BYTES) -> Plan:
    """The engine's ``impl="torch"``: the chunked plan (three GEMMs, gradients in the forward)
    with torch epilogues, on the CPU in float32 (GEMMs counted as fp32 work)."""
    n, d, v = shape.tokens, shape.dim, shape.vocab
    teacher = "dense" if shape.teacher_dim else None
    kernels = [
        gemm("logits GEMM (fp32)", n, v, d, in_bytes=4, out_bytes=4, fp32_cores=True, logit_passes=1.0),
        rowwise("torch epilogue passes", n, v, read=TORCH_EPILOGUE_BYTES[teacher], write=0, sfu=2),
        gemm("dh GEMM (fp32)", n, d, v, in_bytes=4, out_bytes=4, fp32_cores=True),
        gemm("dW GEMM (fp32)", v, d, n, in_bytes=4, out_bytes=4, fp32_cores=True),
    ]
    if teacher:
        kernels.append(gemm("teacher GEMM (fp32)", n, v, shape.teacher_dim, in_bytes=4, out_bytes=4, fp32_cores=True))
    return Plan("torch (chunked plan)", shape, kernels)


# The naive loss as Hugging Face models compute it: bf16 logits, ``.float()``, ``log_softmax``
# (two passes), the loss, autograd's softmax backward and the cast back to bf16. Bytes per
# logit element, counted from those ops (each op reads its inputs and writes its output once).
NAIVE_ELEMENT_BYTES = (2 + 4) + (4 + 4 + 4) + (4 + 4 + 4) + (4 + 2)


def naive(shape: Shape, *, fp32: bool = False) -> Plan:
    """bf16 logits of every row, fp32 ``log_softmax``, autograd: 3 GEMMs and ~38 B per logit;
    an online dense teacher adds its GEMM and its own upcast and ``log_softmax`` (no backward).
    ``fp32``: the operands upcast to fp32 first (``naive-fp32``): fp32 GEMMs on CUDA cores."""
    n, d, v = shape.tokens, shape.dim, shape.vocab
    e = 4 if fp32 else shape.element_bytes
    kernels = [
        gemm("logits GEMM", n, v, d, in_bytes=e, out_bytes=e, fp32_cores=fp32, logit_passes=1.0),
        rowwise("upcast, log_softmax, loss, backward, downcast", n, v,
                read=NAIVE_ELEMENT_BYTES - e, write=0, sfu=2),
        gemm("dh GEMM", n, d, v, in_bytes=e, out_bytes=e, fp32_cores=fp32),
        gemm("dW GEMM", v, d, n, in_bytes=e, out_bytes=e, fp32_cores=fp32),
    ]
    if shape.teacher_dim:
        kernels += [gemm("teacher GEMM", n, v, shape.teacher_dim, in_bytes=e, out_bytes=e, fp32_cores=fp32),
                    rowwise("teacher upcast, log_softmax", n, v, read=e + 4 + 4, write=4 + 4, sfu=1)]
    return Plan("naive (fp32)" if fp32 else "naive (bf16 logits, HF)", shape, kernels)


# ------------------------------------------------------------------------------------------------
# Vocabulary parallel
# ------------------------------------------------------------------------------------------------

# Floats per row all-reduced besides the K logits, as the vp branch's docs/parallel.md counts them
# for topk_kd_loss with the tail bucket and CE: a MAX of 2 + 1 and a SUM of 2 + 2 (+ K).
ROW_STATS = 7


def ring_allreduce_bytes(size: float, ranks: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``size`` bytes."""
    return 2.0 * (ranks - 1) / ranks * size


def vocab_parallel(shape: Shape, ranks: int, *, budget_bytes: int = CHUNK_BYTES, selection: bool = False,
                   as_built: bool = False) -> Plan:
    """fastkd's vocabulary-parallel top-k loss on ``ranks`` GPUs: each rank runs the chunked plan
    on its ``V/ranks`` rows of the head; the row statistics (``ROW_STATS`` floats plus the K
    logits at S) are all-reduced, ``dh`` (fp32) all-reduced, dW stays local. ``selection``: an
    online top-k selection also all-gathers each rank's K candidates (id and value) per row.
    ``as_built``: the shard-local passes on the torch backend's plan (fp32 GEMMs, the logits
    recomputed in the backward), as the vp branch runs them today (its docs/parallel.md, "Limits")."""
    n, d, k = shape.tokens, shape.dim, shape.topk
    local = replace(shape, vocab=math.ceil(shape.vocab / ranks))
    plan = torch_backend(local) if as_built else chunked(local, budget_bytes=budget_bytes)
    stats = ring_allreduce_bytes(n * (k + ROW_STATS) * 4, ranks)
    # all-gather: each rank sends its K (id, value) per row to every other
    candidates = (ranks - 1) * n * k * 8 if selection else 0
    grad_hidden = ring_allreduce_bytes(n * d * 4, ranks)
    comm = stats + candidates + grad_hidden
    return Plan(f"vocab-parallel x{ranks}" + (" (as built)" if as_built else ""), shape, plan.kernels,
                comm_bytes=comm, ranks=ranks,
                extra={"stats_bytes": stats, "candidate_bytes": candidates, "dh_bytes": grad_hidden,
                       "per_shard_logits_bytes": n * local.vocab * 4,
                       "gather_logits_bytes": (ranks - 1) / ranks * n * shape.vocab * shape.element_bytes,
                       "gather_weight_bytes": (ranks - 1) / ranks * shape.vocab * d * shape.element_bytes
                       + (ranks - 1) / ranks * shape.vocab * d * 4})


# ------------------------------------------------------------------------------------------------
# Shapes, targets and the printed table
# ------------------------------------------------------------------------------------------------

MODELS = {  # DESIGN.md §6: (D, V, softcap)
    "llama3-8b": (4096, 128256, None),
    "qwen2.5-1.5b": (1536, 151936, None),
    "gemma2-2b": (2304, 256000, 30.0),
}
TOKENS = (4096, 8192, 16384, 32768)

# Liger-Kernel's own published figure for its chunked LigerFusedLinearJSDLoss: 60.706 ms forward
# + backward, student hidden 2048 (H // 2), teacher 4096, V 128256, B x T 8192, bf16, NVIDIA H100
# 80GB HBM3, liger 0.4.2, 2024-12-03 (with weight_hard_loss 0.5). Source: linkedin/Liger-Kernel,
# benchmark/data/all_benchmark_data.csv, row "distill_jsd_loss,liger,full,speed,ms,BT,...,8192";
# shapes from benchmark/scripts/benchmark_distill_jsd_loss.py.
LIGER_JSD_SHAPE = Shape("liger-jsd", 8192, 2048, 128256, teacher_dim=4096)
LIGER_JSD_MS = 60.706


@dataclass(frozen=True)
class Target:
    """A goal of issue #14 item 7 for one path, checked on the H100 at N = 8192."""

    path: str
    text: str
    max_ratio: Optional[float] = None   # bound / floor
    max_ms: Optional[float] = None
    models: tuple = tuple(MODELS)       # the shapes it is stated for
    gpu: str = "H100"
    tokens: int = 8192


TARGETS = {
    "chunked": Target("chunked", "<= 1.10x bare GEMMs (H100)", max_ratio=1.10),
    "streaming": Target("streaming", "<= 2.0x bare GEMMs (H100)", max_ratio=2.0),
    "chunked online dense": Target("chunked online dense",
                                   f"<= 30 ms at Liger's shape (Liger: {LIGER_JSD_MS} ms)", max_ms=30.0,
                                   models=(LIGER_JSD_SHAPE.model,)),
}


def plans_for(shape: Shape, gpu: Gpu) -> list[Plan]:
    """Every single-GPU path at one student shape (online cases with a teacher twice as wide)."""
    online = replace(shape, teacher_dim=2 * shape.dim)
    b = default_budget(gpu)
    return [
        fused_head(shape, budget_bytes=b), fused_head(shape, budget_bytes=b, scaled=False),
        fused_head(shape, budget_bytes=b, grad_in_gemms=True),
        chunked(shape, budget_bytes=b), streaming(shape, gpu=gpu),
        cuda(shape, budget_bytes=b), torch_backend(shape), naive(shape),
        chunked(shape, byte_level=True, budget_bytes=b), streaming(shape, byte_level=True, gpu=gpu),
        fused_head(online, teacher="dense", budget_bytes=b), chunked(online, teacher="dense", budget_bytes=b),
        chunked(online, teacher="topk", budget_bytes=b), streaming(online, teacher="dense", gpu=gpu),
        streaming(online, teacher="topk", gpu=gpu), cuda(online, teacher="dense", budget_bytes=b),
    ]


def verdict(plan: Plan, gpu: Gpu) -> str:
    """"meets"/"MISSES" and the target's text where issue #14 item 7 states one for this path,
    shape and GPU; else ""."""
    target = TARGETS.get(plan.path)
    if (target is None or plan.shape.model not in target.models or plan.shape.tokens != target.tokens
            or not gpu.name.startswith(target.gpu) or plan.ranks != 1):
        return ""
    if target.max_ratio is not None:
        ok = plan.ratio(gpu) <= target.max_ratio
    else:
        ok = plan.bound(gpu) * 1e3 <= target.max_ms
    return ("meets " if ok else "MISSES ") + target.text


def row(plan: Plan, gpu: Gpu) -> dict:
    return {
        "path": plan.path, "model": plan.shape.model, "tokens": plan.shape.tokens, "gpu": gpu.name,
        "tc_tflop": plan.total("tc_flops") / 1e12, "fp32_tflop": plan.total("fp32_flops") / 1e12,
        "logit_passes": plan.logit_passes, "hbm_gb": plan.total("hbm_bytes") / 1e9,
        "l2_gb": plan.total("l2_bytes") / 1e9, "atomic_gb": plan.total("atomic_bytes") / 1e9,
        "min_programs": plan.min_programs, "sms": gpu.sms, "bound_ms": plan.bound(gpu) * 1e3,
        "floor_ms": plan.floor(gpu) * 1e3, "ratio": plan.ratio(gpu), "dominant": plan.dominant(gpu),
        "verdict": verdict(plan, gpu), "comm_gb": plan.comm_bytes / 1e9,
    }


def _line(r: dict) -> str:
    flops = r["tc_tflop"] + r["fp32_tflop"]
    kind = "" if not r["fp32_tflop"] else "*"
    return (f"{r['path']:<42}{flops:>8.1f}{kind:1}{r['logit_passes']:>6.0f}{r['hbm_gb']:>8.1f}"
            f"{r['l2_gb'] + r['atomic_gb']:>8.0f}{r['atomic_gb']:>7.0f}{r['min_programs']:>7d}"
            f"{r['bound_ms']:>9.1f}{r['floor_ms']:>8.1f}{r['ratio']:>7.2f}  {r['dominant']}"
            + (f"  [{r['verdict']}]" if r["verdict"] else ""))


HEADER = (f"{'path':<42}{'TFLOP':>9}{'h·Wᵀ':>6}{'HBM GB':>8}{'L2 GB':>8}{'atom':>7}{'progs':>7}"
          f"{'bound ms':>9}{'floor':>8}{'ratio':>7}  dominated by (beyond the floor)  [target]")


def report(gpu_keys=("H100", "H200"), models=tuple(MODELS), tokens=TOKENS, rates: str = "datasheet",
           ways=(2, 4, 8)) -> str:
    """The printed model: per GPU, per model at N = 8192 every path; a token sweep of the ratio;
    Liger's JSD shape; vocabulary parallel."""
    out = []
    for key in gpu_keys:
        gpu = GPUS[key] if rates == "datasheet" else measured_gpu(key)
        out.append(f"\n=== {gpu.name}: {gpu.tc_flops / 1e12:.0f} TFLOP/s bf16 tensor, "
                   f"{gpu.fp32_flops / 1e12:.0f} TFLOP/s fp32, {gpu.hbm_bytes / 1e12:.2f} TB/s HBM, "
                   f"{gpu.l2_bytes / 1e12:.0f} TB/s L2 (assumed), {gpu.sms} SMs, "
                   f"{gpu.link_bytes / 1e9:.0f} GB/s NVLink each way")
        out.append(f"rates: {gpu.source}")
        for model in models:
            d, v, cap = MODELS[model]
            n = 8192 if 8192 in tokens else tokens[0]
            shape = Shape(model, n, d, v, softcap=cap)
            out.append(f"\n{model}  N={n} D={d} V={v}{' softcap ' + format(cap, 'g') if cap else ''} "
                       f"bf16, top-k K=64 (online: teacher D={2 * d}); floor = 3 bare GEMMs "
                       f"(+ teacher GEMM online) at peak")
            out.append(HEADER)
            for plan in plans_for(shape, gpu):
                out.append(_line(row(plan, gpu)))
            stream = streaming(shape, gpu=gpu)
            naive_bytes = n * v * 16  # bf16 logits, their fp32 copy, fp32 log-softmax and its grad, bf16 grad
            out.append(f"streaming extra memory (backward peak: fp32 dh, a {stream.extra['slab_bytes'] / 2**20:g} MiB "
                       f"dW slab x {stream.extra['dW_slabs']}, (N, K) state): "
                       f"{stream.extra['extra_memory_bytes'] / 1e6:.0f} MB = "
                       f"{100 * stream.extra['extra_memory_bytes'] / naive_bytes:.2f} % of the naive loss's "
                       f"{naive_bytes / 1e9:.1f} GB [target <= 1 %]")
        out.append(f"\nratio to the floor against N ({gpu.name})")
        out.append(f"{'model':<14}{'path':<42}" + "".join(f"{'N=' + str(n):>9}" for n in tokens))
        for model in models:
            d, v, cap = MODELS[model]
            names = [p.path for p in plans_for(Shape(model, tokens[0], d, v, softcap=cap), gpu)]
            for i, name in enumerate(names):
                ratios = [plans_for(Shape(model, n, d, v, softcap=cap), gpu)[i].ratio(gpu) for n in tokens]
                out.append(f"{model:<14}{name:<42}" + "".join(f"{r:>9.2f}" for r in ratios))
        out.append(f"\nLiger's JSD benchmark shape: student D 2048, teacher D 4096, V 128256, N 8192, "
                   f"bf16 (Liger publishes {LIGER_JSD_MS} ms fwd+bwd on an H100)")
        out.append(HEADER)
        b = default_budget(gpu)
        for plan in (fused_head(LIGER_JSD_SHAPE, teacher="dense", budget_bytes=b),
                     chunked(LIGER_JSD_SHAPE, teacher="dense", budget_bytes=b),
                     streaming(LIGER_JSD_SHAPE, teacher="dense", gpu=gpu),
                     cuda(LIGER_JSD_SHAPE, teacher="dense", budget_bytes=b)):
            out.append(_line(row(plan, gpu)))
        out.append(f"\nthe default path (chunked, fused head) against its memory budget (fastkd.config.chunk_bytes; "
                   f"N=8192, {gpu.name}): "
                   "ratio to the floor, rows per chunk")
        budgets = (256 * 2**20, 512 * 2**20, GiB, 2 * GiB, 4 * GiB)
        out.append(f"{'model':<14}{'loss':<14}" + "".join(f"{format(b / GiB, 'g') + ' GiB':>16}" for b in budgets))
        for model in models:
            d, v, cap = MODELS[model]
            for teacher in (None, "dense"):
                shape = Shape(model, 8192, d, v, softcap=cap, teacher_dim=2 * d if teacher else None)
                cells = []
                for b in budgets:
                    plan = fused_head(shape, teacher=teacher, budget_bytes=b)
                    cells.append(f"{plan.ratio(gpu):.2f} ({plan.extra['chunk_rows']})")
                out.append(f"{model:<14}{teacher or 'top-k':<14}" + "".join(f"{c:>16}" for c in cells))
        out.append("\nvocabulary parallel (per rank; top-k K=64, N=8192; comm = bytes each rank sends; "
                   "cand = online top-k selection only; 'as built' = the vp branch's torch plan per shard)")
        out.append(f"{'model':<14}{'ways':>5}{'TFLOP/rank':>11}{'HBM GB':>8}{'bound ms':>9}"
                   f"{'floor ms':>9}{'ratio':>7}{'as built':>9}{'stats MB':>9}{'cand MB':>8}{'dh MB':>8}{'comm ms':>8}"
                   f"{'| per-shard logits MiB':>22}{'gather logits GB':>17}{'gather W GB':>12}")
        for model in ("llama3-8b", "gemma2-2b"):
            d, v, cap = MODELS[model]
            for ranks in ways:
                plan = vocab_parallel(Shape(model, 8192, d, v, softcap=cap), ranks, selection=True)
                built = vocab_parallel(Shape(model, 8192, d, v, softcap=cap), ranks, as_built=True)
                x = plan.extra
                out.append(f"{model:<14}{ranks:>5}{plan.total('tc_flops') / 1e12:>11.1f}"
                           f"{plan.total('hbm_bytes') / 1e9:>8.1f}{plan.bound(gpu) * 1e3:>9.2f}"
                           f"{plan.floor(gpu) * 1e3:>9.2f}{plan.ratio(gpu):>7.2f}{built.ratio(gpu):>9.1f}"
                           f"{x['stats_bytes'] / 1e6:>9.1f}"
                           f"{x['candidate_bytes'] / 1e6:>8.1f}{x['dh_bytes'] / 1e6:>8.1f}"
                           f"{plan.comm_time(gpu) * 1e3:>8.2f}{x['per_shard_logits_bytes'] / 2**20:>22.0f}"
                           f"{x['gather_logits_bytes'] / 1e9:>17.2f}{x['gather_weight_bytes'] / 1e9:>12.2f}")
    out.append(LEGEND)
    return "\n".join(out)


LEGEND = """
Columns: TFLOP = tensor-core work (* = on fp32 CUDA cores); h·Wᵀ = passes computing the student's
logits; HBM GB and L2 GB (L2 = operand tiles re-read from L2 + fp32 atomics, 'atom' the atomics
alone); progs = programs of the least parallel launch (against the SMs); bound = the sum of each
kernel's roofline bound; floor = 6·N·D·V (+ 2·N·D_t·V online) at the peak tensor rate; ratio =
bound / floor. The bound is a lower bound: peak rates, minimum bytes (see bench/README.md,
"Cost model"). Vocabulary parallel: stats = all-reduce of N·(K+4) fp32 row statistics, cand =
all-gather of K (id, value) candidates per row per rank (top-k from the student or the union),
dh = all-reduce of the fp32 hidden-state gradient (the same all-reduce tensor parallelism does for
any ColwiseParallel head); per-shard logits = the N x V/P fp32 block a per-shard-logits design
keeps per rank; gather logits / gather W = what each rank receives when the logits (bf16) or the
weight (bf16, plus its fp32 gradient reduce-scattered) are gathered instead."""


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench --model", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--gpus", nargs="+", choices=list(GPUS), default=list(GPUS), help="GPUs to model")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                        help="head shapes of DESIGN.md §6 (" + "; ".join(
                            f"{m}: D {d}, V {v}" + (f", softcap {c:g}" if c else "") for m, (d, v, c) in MODELS.items()) + ")")
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS),
                        help="token counts of the sweep (the per-path tables use 8192)")
    parser.add_argument("--rates", choices=("datasheet", "measured"), default="datasheet",
                        help="peak rates from the datasheets, or the matmul/copy rates measured on "
                             "this workplace's machines")
    args = parser.parse_args(argv)
    print(report(args.gpus, tuple(args.models), tuple(args.tokens), args.rates))


if __name__ == "__main__":
    main()
