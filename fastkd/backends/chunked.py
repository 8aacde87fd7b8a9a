"""The chunked plan (DESIGN.md §3 "chunked"): one orchestration, three epilogue providers.

Per chunk of rows (its height from the memory budget ``fastkd.config.chunk_bytes``)::

    1. x   = h_c · Wᵀ (+ b)            GEMM: operands in the operand dtype, float32 accumulation,
                                       written unrounded into a float32 (float64) buffer
    2. gather from x                   the logits at S, the CE target; an online teacher's
                                       logits (its one GEMM per chunk) and, for kd_loss(topk=K),
                                       the set S chosen from the chunk (torch.topk, no sort)
    3. stats epilogue      provider    per row: lse over V, exact lse over V∖S, CE lse, E_p[z]
    4. (c, K) epilogue     torch       bucket masses, divergence, bucket weights and the per-row
                                       gradient coefficients (torch_backend._topk_epilogue on
                                       fastkd.divergences: no formula is re-derived here)
    5. grad epilogue       provider    dz over the chunk (set semantics on S, CE, softcap')
    6. dh_c = dz · W,  dW += dzᵀ · h_c  GEMMs, dW accumulated in float32 and returned in the
                                       weight's dtype (no dW GEMM and no buffer when the head is
                                       frozen)

Providers (``epilogue=``): ``"torch"`` (``torch_epilogue.TorchEpilogue``: torch ops, the CPU
path), ``"triton"`` (``triton_epilogue``: Triton kernels, the default on CUDA) and ``"cuda"``
(``cuda_backend.CsrcEpilogue``: the csrc kernels). They share one interface, the csrc extension's
argument order with tensors for pointers; the plan and the numerics are the same for all three.
``"fused"`` (``triton_fused_head``, the CUDA default for 16-bit operands through
``fastkd.config.chunked_epilogue``) replaces steps 1, 3 and 5: the logits GEMM is a Triton kernel
whose epilogue writes per-tile partial statistics and a 16-bit tile, which the gradient pass reads
(offline top-k and the online dense teacher; elsewhere it is ``"triton"``); for the bfloat16 top-k
loss the tile is scaled so that no gradient pass is needed (``triton_fused_head.SCALED_TILE``).

**Gradients in the forward.** The loss rows depend on ``grad_output`` only through a per-row
factor ``g_n``; for ``reduction="mean"``/``"sum"`` every ``g_n`` is the same number, so the forward
runs steps 5–6 with unit scales (``grads_in_forward``: three GEMMs per chunk in all) and the
backward only rescales (``dh = g ⊙ dh¹``, ``dW = g_0 · dW¹``, the scalar read on the device: no
host sync). For ``reduction="none"`` the forward stops after step 4 and the backward recomputes
each chunk's logits once (four GEMMs in all).

**Dtypes** (decided once at the API, ``operand_dtype``): float32 inputs run IEEE float32 GEMMs;
under ``torch.autocast``, or with 16-bit activations and float32 master weights, the GEMM operands
are the 16-bit dtype. On CUDA those GEMMs run on tensor cores with float32 outputs
(``out_dtype``) and ``dz`` is rounded to the operand dtype for steps 6; on the CPU (and wherever
the operands are float32) the operands are rounded to the operand dtype and multiplied in float32,
which gives the same products (a 16-bit·16-bit product is exact in float32) and keeps ``dz``
unrounded. Every softmax statistic comes from the unrounded float32 buffer. float64 inputs run in
float64 throughout (references, gradcheck).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch import Tensor

from .. import divergences as dv
from .torch_backend import _logsumexps_, _topk_epilogue, counted_rows, sorted_topk_ids

# Columns of the top-k state: kd_lse, dense coef, top-k coef, CE lse (as the other backends), and
# the tail's mass Σ_{V∖S} e^{z − kd_lse} as the stats pass summed it (``projected``).
_KD_LSE, _DENSE_COEF, _TOPK_COEF, _LSE_CE, _TAIL_MASS = range(5)
# Columns of the dense state: student lse, teacher lse, W = Σ_v w_v, CE lse.
_LSE, _TEACHER_LSE, _WSUM = range(3)
_KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
# Chunk heights are rounded down to a multiple of this (whole GEMM tiles) when at least one fits.
ROW_ALIGN = 64
EPILOGUES = ("torch", "triton", "cuda", "fused")
# Below this many elements a GEMM output goes through the allocator instead of out= (see _Head).
_OUT_MIN_NUMEL = 1 << 16


# The default memory budget (``fastkd.config.chunk_bytes = None``). On a GPU, 1/64 of its memory,
# at least 512 MiB and at most 2 GiB: 512 MiB on a 24 GB card (1024 rows of Llama-3's vocabulary
# in float32), 1.22 GiB on an H100 (78 GiB), 2 GiB on an H200. The cost model (``python -m bench
# --model``, "the default path ... against its memory budget") puts the dW read and write per chunk
# and the GEMMs' efficiency at small heights behind the gain from 512 MiB to 1-2 GiB, and none
# above 2 GiB. It depends on the card, not on what is free, so the chunking (and the summation
# order of dW) is the same on every call. On the CPU 128 MiB, raised to hold CPU_CHUNK_ROWS rows
# of the blocks, at most 512 MiB: a CPU GEMM runs near its peak from about 256 rows, and each chunk
# reads the weights again and reads and writes the float32 dW (at N 2048, D 512, V 32768 on 2
# cores, 256-row chunks cost the top-k loss 15 % over one 2048-row chunk; 128 MiB gives 1024
# rows there, in a quarter of the memory).
DEFAULT_BUDGET = 512 * 2**20
MAX_GPU_BUDGET = 2 * 2**30
GPU_BUDGET_FRACTION = 64
CPU_BUDGET = 128 * 2**20
CPU_CHUNK_ROWS = 256


@functools.lru_cache(maxsize=None)
def _gpu_budget(index: Optional[int]) -> int:
    device = index if index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    return int(min(MAX_GPU_BUDGET, max(DEFAULT_BUDGET, total // GPU_BUDGET_FRACTION)))


def budget_bytes(chunk_bytes: Optional[int], row_bytes: int, device: torch.device) -> int:
    """``chunk_bytes`` when set (> 0); ``None`` or 0: the default for ``device`` given the bytes one
    row of a path's blocks takes (``row_bytes``), as described above."""
    if chunk_bytes:
        return int(chunk_bytes)
    device = torch.device(device)
    if device.type == "cpu":
        return int(min(DEFAULT_BUDGET, max(CPU_BUDGET, CPU_CHUNK_ROWS * max(1, row_bytes))))
    if device.type == "cuda" and torch.cuda.is_available():
        return _gpu_budget(device.index)
    return DEFAULT_BUDGET


_device_budget = budget_bytes  # chunk_rows' parameter of the same name hides the function there


def chunk_rows(n_rows: int, vocab: int, element_bytes: int, budget_bytes: int, buffers: int = 1,
               device: Optional[torch.device] = None) -> int:
    """Rows per chunk: the most whose ``buffers x rows x vocab`` blocks fit in ``budget_bytes``
    (0 with a ``device``: that device's default, :func:`budget_bytes`).

    At least 1 (a budget below one row still makes progress, one row at a time), at most
    ``n_rows``, and a multiple of ``ROW_ALIGN`` when at least that many fit. The chunks are then
    evened out: as many as the budget needs, each as tall as the others (to ``ROW_ALIGN``), so
    there is no short last chunk that pays the per-chunk costs (the weights read again, the
    float32 dW read and written) for a few rows: 8192 rows at 3776 per chunk run as 2752 + 2752
    + 2688, not 3776 + 3776 + 640.
    """
    if budget_bytes == 0 and device is not None:
        budget_bytes = _device_budget(0, buffers * vocab * element_bytes, device)
    if budget_bytes <= 0:
        raise ValueError(f"the chunk budget must be a positive number of bytes, got {budget_bytes}")
    rows = budget_bytes // max(1, buffers * vocab * element_bytes)
    if rows >= ROW_ALIGN:
        rows -= rows % ROW_ALIGN
        if n_rows > 0:
            even = -(-n_rows // -(-n_rows // rows))  # ceil(n / number of chunks)
            rows = min(rows, -(-even // ROW_ALIGN) * ROW_ALIGN)
    return int(max(1, min(n_rows, rows)))


def accumulate_dtype(operand_dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 operands, else float32: the dtype of the logits buffer and of dW."""
    return torch.float64 if operand_dtype == torch.float64 else torch.float32


def provider(name: str):
    """A fresh epilogue provider for one op call (``"torch"``, ``"triton"`` or ``"cuda"``)."""
    if name == "torch":
        from .torch_epilogue import TorchEpilogue
        return TorchEpilogue()
    if name in ("triton", "fused"):  # "fused": the Triton epilogues wherever the head is not fused
        from . import triton_epilogue
        return FunctionEpilogue("triton", triton_epilogue)
    if name == "cuda":
        from .cuda_backend import CsrcEpilogue
        return CsrcEpilogue()
    raise ValueError(f"epilogue must be one of {EPILOGUES}, got {name!r}")


class FunctionEpilogue:
    """A provider made of module-level functions with the shared signatures (the Triton kernels):
    reads the logits without changing them until the gradient epilogue, accepts ``out=``."""

    keeps_logits = True
    takes_out = True

    @staticmethod
    def scratch_blocks(divergence: Optional[str], general: bool, stats: bool = True) -> int:
        """No ``chunk x V`` scratch: the kernels work in registers and write ``dz`` to ``out``."""
        return 0

    def __init__(self, name: str, module):
        self.name = name
        for fn in ("topk_stats", "topk_grad", "dense_stats", "dense_divergence", "dense_grad"):
            setattr(self, fn, getattr(module, fn))


class _Head:
    """``h · Wᵀ + b`` per chunk and its two gradient GEMMs, with operands in ``operand`` dtype.

    Tensor-core mode (CUDA, 16-bit operands): the weight is held in the operand dtype, the logits
    GEMM writes float32 (``out_dtype``), ``dz`` is rounded to the operand dtype for the gradient
    GEMMs and ``dW`` accumulates in float32. Otherwise the operands are rounded to the operand
    dtype and held in the accumulation dtype (one copy of the weight per call only when its dtype
    differs), so the CPU gives the products a tensor core gives.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], operand: torch.dtype):
        self.operand = operand
        self.acc = accumulate_dtype(operand)
        self.tensor_cores = weight.device.type == "cuda" and operand in (torch.float16, torch.bfloat16)
        self.weight = self.cast(weight)
        self.bias = None if bias is None else bias.detach().to(self.acc)

    def cast(self, x: Tensor) -> Tensor:
        """``x`` as a GEMM operand: rounded to the operand dtype, stored as the GEMMs take it."""
        x = x.detach()
        if self.tensor_cores:
            return x.to(self.operand)
        if x.dtype != self.operand and self.operand != self.acc:
            x = x.to(self.operand)  # round first (16-bit operands), then widen for the GEMM
        return x.to(self.acc)

    def logits_into(self, out: Tensor, hidden_op: Tensor) -> Tensor:
        if self.tensor_cores:
            torch.mm(hidden_op, self.weight.t(), out_dtype=self.acc, out=out)
        else:
            _mm_into(out, hidden_op, self.weight.t())
        if self.bias is not None:
            out += self.bias
        return out

    def grad_operand(self, dz: Tensor) -> Tensor:
        return dz.to(self.operand) if self.tensor_cores and dz.dtype != self.operand else dz

    def grad_hidden(self, dz_op: Tensor, out: Tensor) -> None:
        """``out = dz · W`` (``out`` a row block of the hidden gradient, in the hidden's dtype)."""
        if self.tensor_cores and out.dtype != self.operand:
            torch.mm(dz_op, self.weight, out_dtype=out.dtype, out=out)
        elif out.dtype == dz_op.dtype:
            _mm_into(out, dz_op, self.weight)
        else:
            out.copy_(torch.mm(dz_op, self.weight))

    def add_grad_weight(self, acc: Tensor, dz_op: Tensor, hidden_op: Tensor, first: bool) -> None:
        """``acc (+)= dzᵀ · h`` with ``acc`` float32 (float64), accumulated across the chunks
        (``first``: written, not added: no zero fill of a ``V x D`` buffer)."""
        if self.tensor_cores:
            if first:
                torch.mm(dz_op.t(), hidden_op, out_dtype=acc.dtype, out=acc)
            else:
                torch.addmm(acc, dz_op.t(), hidden_op, out_dtype=acc.dtype, out=acc)
        elif first:
            _mm_into(acc, dz_op.t(), hidden_op)
        else:
            acc.addmm_(dz_op.t(), hidden_op)


def _mm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """``out = a · b`` without a new allocation for large blocks; tiny ones go through the
    allocator (on the CPU ``torch.mm(out=)`` of a tiny float64 block can take a slow threaded path)."""
    if out.numel() >= _OUT_MIN_NUMEL:
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a, b))


class _Grads:
    """``dh`` (hidden's dtype, written per chunk), ``dW`` (float32 accumulator, or the weight's
    own float32 gradient; absent for a frozen head) and ``db`` (float32)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], head: _Head,
                 weight_grad: bool):
        self.head = head
        self.hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        self.weight = torch.empty(weight.shape, dtype=head.acc, device=weight.device) if weight_grad else None
        self.first = True  # the first chunk writes dW (no zero fill), the others add to it
        self.bias = None if bias is None else torch.zeros(weight.shape[0], dtype=head.acc, device=weight.device)
        self.dtypes = (weight.dtype, None if bias is None else bias.dtype)

    def add(self, rows: slice, dz: Tensor, hidden_op: Tensor) -> None:
        dz_op = self.head.grad_operand(dz)
        self.head.grad_hidden(dz_op, self.hidden[rows])
        if self.weight is not None:
            self.head.add_grad_weight(self.weight, dz_op, hidden_op, first=self.first)
        self.first = False
        if self.bias is not None:
            self.bias += dz.sum(dim=0, dtype=self.bias.dtype)

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.first and self.weight is not None:  # no rows, no chunk: dW is zero
            self.weight.zero_()
        weight_dtype, bias_dtype = self.dtypes
        dw = self.hidden.new_empty(0) if self.weight is None else self.weight.to(weight_dtype)
        db = self.hidden.new_empty(0) if self.bias is None else self.bias.to(bias_dtype)
        return self.hidden, dw, db


def _general(softcap: Optional[float], temperature: float, ce_weight: float,
             teacher_softcap: Optional[float] = None) -> bool:
    """Whether the torch epilogues take their general path (a softcap, or CE at τ ≠ 1), which
    keeps the raw logits and needs more scratch than the in-place fast path."""
    return bool(softcap) or bool(teacher_softcap) or (ce_weight != 0.0 and temperature != 1.0)


class _Pass:
    """What every forward and recomputing backward sets up: the provider, the student's head, the
    counted rows with in-range labels, and the row chunks with their reused logits buffers."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Optional[Tensor],
                 ignore_index: int, chunk_bytes: int, epilogue: str, operand: torch.dtype, buffers: int,
                 divergence: Optional[str] = None, general: bool = False, stats: bool = True):
        self.n_rows, self.vocab = hidden.shape[0], weight.shape[0]
        self.ep = provider(epilogue)
        self.head = _Head(weight, bias, operand)
        self.counted = counted_rows(labels, self.n_rows, ignore_index, hidden.device)
        self.safe_labels = None if labels is None else torch.where(self.counted, labels, 0).long().contiguous()
        acc_bytes = torch.finfo(self.head.acc).bits // 8
        # Everything of chunk x V the plan holds counts against the one budget: the logits
        # buffers, the provider's own scratch blocks, and on tensor cores dz in the operand dtype
        # (written there by the provider, or rounded from its float32 dz by grad_operand).
        element_bytes = acc_bytes * (buffers + self.ep.scratch_blocks(divergence, general, stats))
        if self.head.tensor_cores:
            element_bytes += torch.finfo(operand).bits // 8
        self.step = chunk_rows(self.n_rows, self.vocab, element_bytes, chunk_bytes, device=hidden.device)
        shape = (min(self.step, self.n_rows), self.vocab)
        self.buffers = [torch.empty(shape, dtype=self.head.acc, device=hidden.device) for _ in range(buffers)]
        self.out = None  # a dz buffer in the operand dtype for providers that write into one
        if self.head.tensor_cores and getattr(self.ep, "takes_out", False):
            self.out = torch.empty(shape, dtype=operand, device=hidden.device)

    def chunks(self):
        for start in range(0, self.n_rows, self.step):
            yield slice(start, min(self.n_rows, start + self.step))

    def buffer(self, i: int, rows: slice) -> Tensor:
        return self.buffers[i][: rows.stop - rows.start]

    def out_buffer(self, rows: slice) -> Optional[Tensor]:
        return None if self.out is None else self.out[: rows.stop - rows.start]

    def labels(self, rows: slice) -> Optional[Tensor]:
        return None if self.safe_labels is None else self.safe_labels[rows]


def _fused(epilogue: str, operand: torch.dtype) -> bool:
    """Whether the fused head (``triton_fused_head``: GEMM 1 with the stats in its epilogue, 16-bit
    tiles) runs this call; float64 runs the Triton epilogues unfused."""
    return epilogue == "fused" and operand in (torch.float16, torch.bfloat16, torch.float32)


def no_autocast(device: torch.device):
    """Autocast off inside the ops: their GEMMs take the operand dtype they are given."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _gathered(logits: Tensor, ids: Tensor, cap: Optional[float], temperature: float) -> Tensor:
    """``softcap(x)/τ`` at ``ids``, in the buffer's dtype."""
    return dv.softcap(logits.gather(1, ids), cap) * (1.0 / temperature)


def _cap(cap: Optional[float]) -> float:
    return 0.0 if cap is None else float(cap)


def _no_grads(hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)


def _grad_fakes(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], operand, weight_grad: bool):
    dw = torch.empty_like(weight) if weight_grad else hidden.new_empty(0)
    db = weight.new_empty(0) if bias is None else torch.empty_like(bias)
    return torch.empty_like(hidden), dw, db


def _rescale(grad_rows: Tensor, grad_hidden: Tensor, grad_weight: Tensor, grad_bias: Tensor,
             has_bias: bool, weight_grad: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Unit-scale gradients times ``grad_rows``: row-wise for ``dh``, its (uniform) value for ``dW``."""
    g = grad_rows.to(torch.float64 if grad_hidden.dtype == torch.float64 else torch.float32)
    dh = (grad_hidden * g.unsqueeze(1)).to(grad_hidden.dtype)
    uniform = g[0] if g.numel() else g.new_zeros(())  # a 0-dim device tensor: no host sync
    dw = (grad_weight * uniform).to(grad_weight.dtype) if weight_grad else None
    db = (grad_bias * uniform).to(grad_bias.dtype) if has_bias else None
    return dh, dw, db


# ------------------------------------------------------------------------------------------------
# top-k: offline teacher ids and log-probs, or an online teacher whose set S is chosen per chunk
# ------------------------------------------------------------------------------------------------

class _OnlineTeacher:
    """The online teacher of ``kd_loss(topk=K)``: its logits once per chunk, S chosen there, its
    log-probs at S and its exact tail log-mass ``log Q_T`` (summed over ``V∖S``)."""

    def __init__(self, hidden, weight, bias, cap, k, topk_from, temperature, operand):
        self.hidden, self.head = hidden, _Head(weight, bias, operand)
        self.cap, self.k, self.topk_from, self.temperature = cap, k, topk_from, temperature

    def select(self, buffer: Tensor, student_logits: Tensor, rows: slice, counted: Tensor):
        teacher = self.head.logits_into(buffer, self.head.cast(self.hidden[rows]))
        # softcap and 1/τ are increasing: the raw logits rank the vocabulary as the tempered ones.
        ids = dv.select_topk(student_logits, teacher, self.k, self.topk_from)
        ids = torch.where(counted.unsqueeze(1), ids, -1)
        valid = ids >= 0
        safe = ids.clamp(min=0)
        if self.cap is not None:
            teacher.div_(self.cap).tanh_().mul_(self.cap)
        teacher.mul_(1.0 / self.temperature)
        topk_logits = teacher.gather(1, safe)
        lse, tail_lse = _logsumexps_(teacher, safe, valid, with_tail=True)
        logprobs = torch.where(valid, topk_logits - lse.unsqueeze(1), 0.0)
        log_tail = dv.tail_logmass(dv.masked_logsumexp(topk_logits, valid), lse, tail_lse)[0]
        return ids, logprobs, log_tail


def projected(values: Tensor, dense_scale: Tensor, tail_mass: Tensor, sorted_ids: Tensor,
              p_sorted: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """The top-k gradient with its residual along p removed, for the kernel providers: ``(values on
    S, dense scale off S)`` of ``dz = dense_scale·p`` off S and the values on S (sorted order),
    ``tail_mass = Σ_{V∖S} p`` as the stats pass summed it, ``p_sorted`` = p at S.

    Σ_v dz_v is 0 in exact arithmetic; in float32 the residual r = dense_scale·tail_mass + Σ_S
    values (from the row sums behind the coefficients) is a shift along p that dh carries whole
    (the Triton epilogues' dh was 12x plain float32 PyTorch's error for a flat student, against
    float64). dz − r·p: ``dense_scale − r`` off S, ``values − r·p_S`` on S. Only where r is rounding
    next to the row's Σ|dz| and no id repeats (``torch_epilogue._small_residual``, which the torch
    epilogue applies to its own sums)."""
    from .torch_epilogue import _small_residual
    valid = sorted_ids < vocab
    on_s = torch.where(valid, values, 0.0)
    off_total = dense_scale * tail_mass.to(dense_scale.dtype)
    residual = _small_residual(off_total + on_s.sum(dim=1), off_total.abs() + on_s.abs().sum(dim=1),
                               sorted_ids, valid)
    values = values - torch.where(valid, residual.unsqueeze(1).to(values.dtype) * p_sorted, 0.0)
    return values, dense_scale - residual


def _topk_grad(ps: _Pass, x: Tensor, rows: slice, sorted_ids: Tensor, perm: Tensor,
               topk_logits: Tensor, topk_weights: Tensor, valid: Tensor, kd_lse: Tensor,
               dense: Tensor, topk_coef: Tensor, kd_scale: Tensor, lse_ce: Tensor,
               ce_scale: Tensor, temperature: float, softcap: Optional[float], with_tail: bool,
               use_ce: bool, tail_mass: Tensor) -> Tensor:
    """``dz`` of one chunk: the values on S come from the (c, K) epilogue, the rest from the provider
    (the kernel providers' residual projected out here: ``projected``; the torch epilogue does it
    itself)."""
    p_topk = torch.exp(topk_logits - kd_lse.unsqueeze(1))
    on_topk = kd_scale.unsqueeze(1) * (topk_weights - p_topk * topk_coef.unsqueeze(1))
    on_topk = torch.where(valid, on_topk, 0.0).gather(1, perm).to(x.dtype)
    dense_scale = kd_scale * dense
    if with_tail and ps.ep.name != "torch":
        on_topk, dense_scale = projected(on_topk, dense_scale, tail_mass, sorted_ids,
                                         p_topk.gather(1, perm).to(x.dtype), x.shape[1])
    on_topk = on_topk.contiguous()
    return_out = ps.out_buffer(rows)
    kwargs = {} if return_out is None else {"out": return_out}
    dz = ps.ep.topk_grad(
        x, x.shape[0], x.shape[1], sorted_ids, on_topk, sorted_ids.shape[1], kd_lse.contiguous(),
        dense_scale.contiguous() if with_tail else None, lse_ce.contiguous() if use_ce else None,
        ce_scale.contiguous() if use_ce else None, ps.labels(rows) if use_ce else None,
        1.0 / temperature, _cap(softcap), with_tail, use_ce, **kwargs)
    return x if dz is None else dz


@torch.library.custom_op("fastkd::chunked_topk_forward", mutates_args=())
def topk_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_ids: Optional[Tensor],
    teacher_logprobs: Optional[Tensor], teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor], labels: Optional[Tensor],
    divergence: str, beta: float, tail: str, temperature: float, softcap: Optional[float],
    teacher_softcap: Optional[float], topk: int, topk_from: str, ignore_index: int,
    ce_weight: float, kd_weight: float, chunk_bytes: int, with_stats: bool,
    grads_in_forward: bool, weight_grad: bool, epilogue: str, operand_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss_rows (N,), kd_rows (N,), state (N, 5), topk_weights (N, K), stats (N|0, 3),
    ids (N, K) or empty, grad_hidden, grad_weight, grad_bias)``, float32 (float64) except ids and
    the gradients.

    Offline: ``teacher_ids (N, K)`` int64 (``-1`` on unused slots and ignored rows) and
    ``teacher_logprobs (N, K)``; ``ids`` comes back empty. Online (``teacher_hidden`` given): S is
    chosen per chunk (``topk``, ``topk_from``) and returned as ``ids``. ``stats`` columns: entropy,
    lse and top-k mass of the tempered student. With ``grads_in_forward`` the last three are the
    gradients of ``Σ_n loss_rows[n]`` (``grad_weight`` empty unless ``weight_grad``, ``grad_bias``
    empty without a bias); else all three are empty.
    """
    online = teacher_hidden is not None
    if _fused(epilogue, operand_dtype) and not online:
        from . import triton_fused_head
        with no_autocast(hidden.device):
            return triton_fused_head.topk_forward(
                hidden, weight, bias, teacher_ids, teacher_logprobs, labels, divergence, beta, tail,
                temperature, softcap, ignore_index, ce_weight, kd_weight, chunk_bytes, with_stats,
                grads_in_forward, weight_grad, operand_dtype)
    with no_autocast(hidden.device):
        ps = _Pass(hidden, weight, bias, labels, ignore_index, chunk_bytes, epilogue, operand_dtype,
                   buffers=2 if online else 1, general=_general(softcap, temperature, ce_weight))
        n_rows, vocab, counted, acc = ps.n_rows, ps.vocab, ps.counted, ps.head.acc
        k = (2 * topk if topk_from == "union" else topk) if online else teacher_ids.shape[1]
        teacher = (_OnlineTeacher(teacher_hidden, teacher_weight, teacher_bias, teacher_softcap, topk,
                                  topk_from, temperature, operand_dtype) if online else None)
        use_ce, with_tail = ce_weight != 0.0, tail == "bucket"
        f = dict(dtype=acc, device=hidden.device)
        lse, tail_lse, lse_ce, mean_z, target, kd_rows = (torch.zeros(n_rows, **f) for _ in range(6))
        state = torch.zeros((n_rows, 5), **f)
        topk_weights = torch.zeros((n_rows, k), **f)
        stats = torch.zeros((n_rows if with_stats else 0, 3), **f)
        ids_out = torch.empty((n_rows if online else 0, k), dtype=torch.int64, device=hidden.device)
        kd_scale = counted.to(acc) * (kd_weight * temperature)  # τ² of the loss × 1/τ of z
        ce_scale = counted.to(acc) * ce_weight
        grads = _Grads(hidden, weight, bias, ps.head, weight_grad) if grads_in_forward else None
        for rows in ps.chunks():
            h_op = ps.head.cast(hidden[rows])
            x = ps.head.logits_into(ps.buffer(0, rows), h_op)
            if online:
                ids_c, logprobs_c, teacher_tail = teacher.select(ps.buffer(1, rows), x, rows, counted[rows])
                ids_out[rows] = ids_c
            else:
                ids_c, logprobs_c, teacher_tail = teacher_ids[rows], teacher_logprobs[rows].to(acc), None
            valid_c, safe_c = ids_c >= 0, ids_c.clamp(min=0)
            sorted_ids, perm = sorted_topk_ids(ids_c, vocab)
            topk_logits = _gathered(x, safe_c, softcap, temperature)
            if use_ce:
                target[rows] = _gathered(x, ps.labels(rows).unsqueeze(1), softcap, 1.0).squeeze(1)
            ps.ep.topk_stats(
                x, x.shape[0], vocab, sorted_ids, k, 1.0 / temperature, _cap(softcap), with_tail,
                use_ce, with_stats, lse[rows], tail_lse[rows] if with_tail else None,
                lse_ce[rows] if use_ce else None, mean_z[rows] if with_stats else None)
            kd, w, kd_lse, dense, topk_coef = _topk_epilogue(
                topk_logits, lse[rows], tail_lse[rows] if with_tail else None, logprobs_c,
                teacher_tail, valid_c, tail, divergence, beta)
            kd_rows[rows] = kd
            topk_weights[rows] = w
            state[rows, _KD_LSE], state[rows, _DENSE_COEF], state[rows, _TOPK_COEF] = kd_lse, dense, topk_coef
            if with_tail:
                state[rows, _TAIL_MASS] = torch.exp(tail_lse[rows] - kd_lse)
            if with_stats:
                topk_mass = dv.masked_logsumexp(topk_logits, valid_c).sub(lse[rows]).exp()
                stats[rows] = torch.stack([lse[rows] - mean_z[rows], lse[rows], topk_mass], dim=1)
            if grads is not None:
                dz = _topk_grad(ps, x, rows, sorted_ids, perm, topk_logits, w, valid_c, kd_lse, dense,
                                topk_coef, kd_scale[rows], lse_ce[rows], ce_scale[rows], temperature,
                                softcap, with_tail, use_ce, state[rows, _TAIL_MASS])
                grads.add(rows, dz, h_op)
        # lse_ce stays real on ignored rows: the recomputing backward multiplies exp(s − lse_ce) by 0.
        state[:, _LSE_CE] = lse_ce
        zero = torch.zeros((), **f)
        kd_rows = torch.where(counted, kd_rows, zero)
        loss_rows = kd_weight * temperature**2 * kd_rows
        if use_ce:
            loss_rows = loss_rows + torch.where(counted, ce_weight * (lse_ce - target), zero)
        topk_weights = torch.where(counted.unsqueeze(1), topk_weights, zero)
        grad_outputs = grads.result() if grads is not None else _no_grads(hidden)
    return (loss_rows, kd_rows, state, topk_weights, stats, ids_out) + grad_outputs


@topk_forward.register_fake
def _(hidden, weight, bias, teacher_ids, teacher_logprobs, teacher_hidden, teacher_weight,
      teacher_bias, labels, divergence, beta, tail, temperature, softcap, teacher_softcap, topk,
      topk_from, ignore_index, ce_weight, kd_weight, chunk_bytes, with_stats, grads_in_forward,
      weight_grad, epilogue, operand_dtype):
    online = teacher_hidden is not None
    n_rows, acc = hidden.shape[0], accumulate_dtype(operand_dtype)
    k = (2 * topk if topk_from == "union" else topk) if online else teacher_ids.shape[1]
    rows = hidden.new_empty(n_rows, dtype=acc)
    grads = (_grad_fakes(hidden, weight, bias, operand_dtype, weight_grad) if grads_in_forward
             else _no_grads(hidden))
    return (rows, torch.empty_like(rows), hidden.new_empty((n_rows, 5), dtype=acc),
            hidden.new_empty((n_rows, k), dtype=acc),
            hidden.new_empty((n_rows if with_stats else 0, 3), dtype=acc),
            hidden.new_empty((n_rows if online else 0, k), dtype=torch.int64)) + grads


@torch.library.custom_op("fastkd::chunked_topk_backward", mutates_args=())
def topk_backward(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_ids: Tensor,
    labels: Optional[Tensor], state: Tensor, topk_weights: Tensor, tail: str, temperature: float,
    softcap: Optional[float], ignore_index: int, ce_weight: float, kd_weight: float,
    chunk_bytes: int, weight_grad: bool, epilogue: str, operand_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(d hidden, d weight or empty, d bias or empty)`` of ``Σ_n grad_rows[n] ·
    loss_rows[n]``, recomputing each chunk's logits once (the path for a per-row ``grad_rows``)."""
    if _fused(epilogue, operand_dtype):  # offline or online: the gradient needs only S and state
        from . import triton_fused_head
        with no_autocast(hidden.device):
            return triton_fused_head.topk_backward(
                grad_rows, hidden, weight, bias, teacher_ids, labels, state, topk_weights, tail,
                temperature, softcap, ignore_index, ce_weight, kd_weight, chunk_bytes, weight_grad,
                operand_dtype)
    with no_autocast(hidden.device):
        ps = _Pass(hidden, weight, bias, labels, ignore_index, chunk_bytes, epilogue, operand_dtype, 1,
                   general=_general(softcap, temperature, ce_weight))
        acc, vocab, k = ps.head.acc, ps.vocab, teacher_ids.shape[1]
        g = torch.where(ps.counted, grad_rows.to(acc), 0.0)
        kd_scale, ce_scale = kd_weight * temperature * g, ce_weight * g
        use_ce, with_tail = ce_weight != 0.0, tail == "bucket"
        grads = _Grads(hidden, weight, bias, ps.head, weight_grad)
        scratch = torch.empty((4, ps.step), dtype=acc, device=hidden.device)
        for rows in ps.chunks():
            h_op = ps.head.cast(hidden[rows])
            x = ps.head.logits_into(ps.buffer(0, rows), h_op)
            ids_c = teacher_ids[rows]
            sorted_ids, perm = sorted_topk_ids(ids_c, vocab)
            topk_logits = _gathered(x, ids_c.clamp(min=0), softcap, temperature)
            if not ps.ep.keeps_logits:  # the provider's gradient follows its own stats pass
                c = rows.stop - rows.start
                ps.ep.topk_stats(x, c, vocab, sorted_ids, k, 1.0 / temperature, _cap(softcap),
                                 with_tail, use_ce, False, scratch[0, :c],
                                 scratch[1, :c] if with_tail else None,
                                 scratch[2, :c] if use_ce else None, None)
            dz = _topk_grad(ps, x, rows, sorted_ids, perm, topk_logits, topk_weights[rows],
                            ids_c >= 0, state[rows, _KD_LSE], state[rows, _DENSE_COEF],
                            state[rows, _TOPK_COEF], kd_scale[rows], state[rows, _LSE_CE],
                            ce_scale[rows], temperature, softcap, with_tail, use_ce,
                            state[rows, _TAIL_MASS])
            grads.add(rows, dz, h_op)
    return grads.result()


@topk_backward.register_fake
def _(grad_rows, hidden, weight, bias, teacher_ids, labels, state, topk_weights, tail, temperature,
      softcap, ignore_index, ce_weight, kd_weight, chunk_bytes, weight_grad, epilogue, operand_dtype):
    return _grad_fakes(hidden, weight, bias, operand_dtype, weight_grad)


def _topk_setup_context(ctx, inputs, output):
    (hidden, weight, bias, teacher_ids, _lp, teacher_hidden, _tw, _tb, labels, _div, _beta, tail,
     temperature, softcap, _tcap, _topk, _from, ignore_index, ce_weight, kd_weight, chunk_bytes,
     _with_stats, grads_in_forward, weight_grad, epilogue, operand_dtype) = inputs
    ctx.grads_in_forward, ctx.has_bias, ctx.weight_grad = grads_in_forward, bias is not None, weight_grad
    if grads_in_forward:
        ctx.save_for_backward(*output[6:])
    else:
        ids = output[5] if teacher_hidden is not None else teacher_ids
        ctx.save_for_backward(hidden, weight, bias, ids, labels, output[2], output[3])
        ctx.options = (tail, temperature, softcap, ignore_index, ce_weight, kd_weight, chunk_bytes,
                       weight_grad, epilogue, operand_dtype)


def _topk_backward(ctx, grad_loss_rows, *_unused):
    if ctx.grads_in_forward:
        grads = _rescale(grad_loss_rows, *ctx.saved_tensors, ctx.has_bias, ctx.weight_grad)
    else:
        hidden, weight, bias, ids, labels, state, topk_weights = ctx.saved_tensors
        dh, dw, db = topk_backward(grad_loss_rows, hidden, weight, bias, ids, labels, state,
                                   topk_weights, *ctx.options)
        grads = (dh, dw if ctx.weight_grad else None, db if ctx.has_bias else None)
    return grads + (None,) * 23


torch.library.register_autograd(
    "fastkd::chunked_topk_forward", _topk_backward, setup_context=_topk_setup_context)


# ------------------------------------------------------------------------------------------------
# online teacher, full vocabulary (every token its own bucket)
# ------------------------------------------------------------------------------------------------

def _kind(divergence: str, beta: float) -> int:
    return _KINDS[dv._resolve(divergence, beta)[0]]


def _dense_grad(ps: _Pass, student: Tensor, teacher: Tensor, rows: slice, state: Tensor,
                kd_scale: Tensor, ce_scale: Tensor, divergence: str, beta: float,
                temperature: float, softcap: Optional[float], teacher_softcap: Optional[float],
                use_ce: bool) -> Tensor:
    lse, teacher_lse, wsum, lse_ce = (state[i] for i in range(4))
    out = ps.out_buffer(rows)
    kwargs = {} if out is None else {"out": out}
    dz = ps.ep.dense_grad(
        student, teacher, student.shape[0], student.shape[1], 1.0 / temperature, _cap(softcap),
        _cap(teacher_softcap), _kind(divergence, beta), float(beta), lse, teacher_lse, wsum,
        kd_scale.contiguous(), lse_ce if use_ce else None, ce_scale.contiguous() if use_ce else None,
        ps.labels(rows) if use_ce else None, use_ce, **kwargs)
    return student if dz is None else dz


def _dense_passes(ps, student, teacher_head, teacher_hidden, rows, state, kd, mean_z, divergence,
                  beta, temperature, softcap, teacher_softcap, use_ce, with_stats):
    """The teacher's logits of one chunk, and the provider's stats and divergence passes over both."""
    teacher = teacher_head.logits_into(ps.buffer(1, rows), teacher_head.cast(teacher_hidden[rows]))
    c, vocab = student.shape
    lse, teacher_lse, wsum, lse_ce = (state[i] for i in range(4))
    args = (student, teacher, c, vocab, 1.0 / temperature, _cap(softcap), _cap(teacher_softcap))
    ps.ep.dense_stats(*args, use_ce, with_stats, lse, teacher_lse, lse_ce if use_ce else None,
                      mean_z if with_stats else None)
    ps.ep.dense_divergence(*args, _kind(divergence, beta), float(beta), lse, teacher_lse, kd, wsum)
    return student, teacher


@torch.library.custom_op("fastkd::chunked_dense_forward", mutates_args=())
def dense_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_hidden: Tensor,
    teacher_weight: Tensor, teacher_bias: Optional[Tensor], labels: Optional[Tensor],
    divergence: str, beta: float, temperature: float, softcap: Optional[float],
    teacher_softcap: Optional[float], ignore_index: int, ce_weight: float, kd_weight: float,
    chunk_bytes: int, with_stats: bool, grads_in_forward: bool, weight_grad: bool, epilogue: str,
    operand_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss_rows (N,), kd_rows (N,), state (N, 4): lse, teacher lse,
    W = Σ w, CE lse, stats (N|0, 2): entropy, lse, grad_hidden, grad_weight, grad_bias)``; the
    gradients as in :func:`topk_forward`. Both heads' logits are computed once per chunk."""
    if _fused(epilogue, operand_dtype):
        from . import triton_fused_head
        with no_autocast(hidden.device):
            return triton_fused_head.dense_forward(
                hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels,
                divergence, beta, temperature, softcap, teacher_softcap, ignore_index, ce_weight,
                kd_weight, chunk_bytes, with_stats, grads_in_forward, weight_grad, operand_dtype)
    with no_autocast(hidden.device):
        ps = _Pass(hidden, weight, bias, labels, ignore_index, chunk_bytes, epilogue, operand_dtype, 2,
                   divergence, _general(softcap, temperature, ce_weight, teacher_softcap), with_stats)
        n_rows, counted, acc = ps.n_rows, ps.counted, ps.head.acc
        teacher_head = _Head(teacher_weight, teacher_bias, operand_dtype)
        use_ce = ce_weight != 0.0
        f = dict(dtype=acc, device=hidden.device)
        state = torch.zeros((4, n_rows), **f)  # column-major while filled: each column contiguous
        mean_z, target, kd_rows = (torch.zeros(n_rows, **f) for _ in range(3))
        kd_scale = counted.to(acc) * (kd_weight * temperature)
        ce_scale = counted.to(acc) * ce_weight
        grads = _Grads(hidden, weight, bias, ps.head, weight_grad) if grads_in_forward else None
        for rows in ps.chunks():
            h_op = ps.head.cast(hidden[rows])
            student = ps.head.logits_into(ps.buffer(0, rows), h_op)
            if use_ce:  # the target logit, gathered before the provider may reuse the buffer
                target[rows] = _gathered(student, ps.labels(rows).unsqueeze(1), softcap, 1.0).squeeze(1)
            student, teacher = _dense_passes(
                ps, student, teacher_head, teacher_hidden, rows, state[:, rows], kd_rows[rows],
                mean_z[rows], divergence, beta, temperature, softcap, teacher_softcap, use_ce, with_stats)
            if grads is not None:
                dz = _dense_grad(ps, student, teacher, rows, state[:, rows], kd_scale[rows],
                                 ce_scale[rows], divergence, beta, temperature, softcap,
                                 teacher_softcap, use_ce)
                grads.add(rows, dz, h_op)
        state = state.t().contiguous()
        zero = torch.zeros((), **f)
        kd_rows = torch.where(counted, kd_rows, zero)
        loss_rows = kd_weight * temperature**2 * kd_rows
        if use_ce:
            loss_rows = loss_rows + torch.where(counted, ce_weight * (state[:, 3] - target), zero)
        if with_stats:
            stats = torch.stack([state[:, _LSE] - mean_z, state[:, _LSE]], dim=1)
        else:
            stats = torch.zeros((0, 2), **f)
        grad_outputs = grads.result() if grads is not None else _no_grads(hidden)
    return (loss_rows, kd_rows, state, stats) + grad_outputs


@dense_forward.register_fake
def _(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, divergence, beta,
      temperature, softcap, teacher_softcap, ignore_index, ce_weight, kd_weight, chunk_bytes,
      with_stats, grads_in_forward, weight_grad, epilogue, operand_dtype):
    n_rows, acc = hidden.shape[0], accumulate_dtype(operand_dtype)
    rows = hidden.new_empty(n_rows, dtype=acc)
    grads = (_grad_fakes(hidden, weight, bias, operand_dtype, weight_grad) if grads_in_forward
             else _no_grads(hidden))
    return (rows, torch.empty_like(rows), hidden.new_empty((n_rows, 4), dtype=acc),
            hidden.new_empty((n_rows if with_stats else 0, 2), dtype=acc)) + grads


@torch.library.custom_op("fastkd::chunked_dense_backward", mutates_args=())
def dense_backward(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
    labels: Optional[Tensor], state: Tensor, divergence: str, beta: float, temperature: float,
    softcap: Optional[float], teacher_softcap: Optional[float], ignore_index: int,
    ce_weight: float, kd_weight: float, chunk_bytes: int, weight_grad: bool, epilogue: str,
    operand_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(d hidden, d weight or empty, d bias or empty)``; both heads recomputed once."""
    if _fused(epilogue, operand_dtype):
        from . import triton_fused_head
        with no_autocast(hidden.device):
            return triton_fused_head.dense_backward(
                grad_rows, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                labels, state, divergence, beta, temperature, softcap, teacher_softcap,
                ignore_index, ce_weight, kd_weight, chunk_bytes, weight_grad, operand_dtype)
    with no_autocast(hidden.device):
        ps = _Pass(hidden, weight, bias, labels, ignore_index, chunk_bytes, epilogue, operand_dtype, 2,
                   divergence, _general(softcap, temperature, ce_weight, teacher_softcap), False)
        acc = ps.head.acc
        teacher_head = _Head(teacher_weight, teacher_bias, operand_dtype)
        g = torch.where(ps.counted, grad_rows.to(acc), 0.0)
        kd_scale, ce_scale = kd_weight * temperature * g, ce_weight * g
        use_ce = ce_weight != 0.0
        grads = _Grads(hidden, weight, bias, ps.head, weight_grad)
        columns = state.t().contiguous()  # (4, N): lse, teacher lse, W, CE lse
        scratch = torch.empty((2, ps.step), dtype=acc, device=hidden.device)
        for rows in ps.chunks():
            c = rows.stop - rows.start
            h_op = ps.head.cast(hidden[rows])
            student = ps.head.logits_into(ps.buffer(0, rows), h_op)
            if ps.ep.keeps_logits:
                teacher = teacher_head.logits_into(ps.buffer(1, rows), teacher_head.cast(teacher_hidden[rows]))
                chunk_state = columns[:, rows]
            else:  # the provider's gradient follows its own stats and divergence passes
                chunk_state = columns[:, rows].clone()
                student, teacher = _dense_passes(
                    ps, student, teacher_head, teacher_hidden, rows, chunk_state, scratch[0, :c],
                    scratch[1, :c], divergence, beta, temperature, softcap, teacher_softcap,
                    use_ce, False)
                chunk_state[3] = columns[3, rows]
            dz = _dense_grad(ps, student, teacher, rows, chunk_state, kd_scale[rows], ce_scale[rows],
                             divergence, beta, temperature, softcap, teacher_softcap, use_ce)
            grads.add(rows, dz, h_op)
    return grads.result()


@dense_backward.register_fake
def _(grad_rows, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, state,
      divergence, beta, temperature, softcap, teacher_softcap, ignore_index, ce_weight, kd_weight,
      chunk_bytes, weight_grad, epilogue, operand_dtype):
    return _grad_fakes(hidden, weight, bias, operand_dtype, weight_grad)


def _dense_setup_context(ctx, inputs, output):
    (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, divergence, beta,
     temperature, softcap, teacher_softcap, ignore_index, ce_weight, kd_weight, chunk_bytes,
     _with_stats, grads_in_forward, weight_grad, epilogue, operand_dtype) = inputs
    ctx.grads_in_forward, ctx.has_bias, ctx.weight_grad = grads_in_forward, bias is not None, weight_grad
    if grads_in_forward:
        ctx.save_for_backward(*output[4:])
    else:
        ctx.save_for_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                              labels, output[2])
        ctx.options = (divergence, beta, temperature, softcap, teacher_softcap, ignore_index,
                       ce_weight, kd_weight, chunk_bytes, weight_grad, epilogue, operand_dtype)


def _dense_backward(ctx, grad_loss_rows, *_unused):
    if ctx.grads_in_forward:
        grads = _rescale(grad_loss_rows, *ctx.saved_tensors, ctx.has_bias, ctx.weight_grad)
    else:
        (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels,
         state) = ctx.saved_tensors
        dh, dw, db = dense_backward(grad_loss_rows, hidden, weight, bias, teacher_hidden,
                                    teacher_weight, teacher_bias, labels, state, *ctx.options)
        grads = (dh, dw if ctx.weight_grad else None, db if ctx.has_bias else None)
    return grads + (None,) * 18


torch.library.register_autograd(
    "fastkd::chunked_dense_forward", _dense_backward, setup_context=_dense_setup_context)
