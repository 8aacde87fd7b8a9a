"""CUDA backend (``impl="cuda"``): cuBLAS GEMMs per row chunk, hand-written CUDA epilogues between.

Per chunk of rows, in the input dtype (float16/bfloat16/float32):

1. ``logits = h_chunk · Wᵀ (+ b)`` with ``torch.mm``/``addmm`` (cuBLAS) into one reused
   ``chunk x V`` buffer;
2. ``topk_stats`` (CUDA, ``csrc/topk_epilogue.cu``) reads it once: per row the lse over V of
   ``z = softcap(x)/τ``, the exact lse over ``V∖S``, the CE lse, ``E_p[z]``;
3. the ``(chunk, K)`` epilogue — bucket masses, divergence, bucket weights, per-row gradient
   coefficients — is the shared PyTorch code of the torch backend (``torch_backend._topk_epilogue``
   on ``fastkd.divergences``), so no divergence is re-derived here;
4. ``topk_grad`` (CUDA) writes ``dz`` over the buffer in place (DESIGN.md §1: set semantics on S,
   the CE term, the softcap derivative, the 1/τ folded into the row scales);
5. ``dh_chunk = dz · W`` and ``dW += dzᵀ · h_chunk`` (cuBLAS; ``db += Σ_rows dz``).

The dense online teacher does the same with a second (teacher) buffer and three CUDA passes
(statistics; divergence and ``W = Σ_v w_v``; ``dz``), see ``csrc/dense_epilogue.cu``.

**Where the gradient is computed.** The gradient of the loss rows depends on ``grad_output``
only through a per-row factor ``g_n``: ``dh_n = g_n · dh⁽¹⁾_n`` rescales row by row, but
``dW = Σ_n g_n · dz_nᵀ h_n`` factors out only when every ``g_n`` is the same number. fastkd's
``reduction="mean"``/``"sum"`` guarantee exactly that (the loss rows feed nothing but one sum),
so for them the forward runs steps 4–5 with unit scales (``grads_in_forward=True``: three GEMMs
per chunk, no recomputation) and keeps ``dh⁽¹⁾ (N, D)``, ``dW⁽¹⁾ (V, D)`` and ``db⁽¹⁾``; the
backward only rescales: ``dh = g ⊙ dh⁽¹⁾`` row-wise and ``dW = g_0 · dW⁽¹⁾`` with the scalar
read on the device (no host sync). For ``reduction="none"`` (per-row ``grad_output``) and when
no input needs a gradient, the forward stops after step 3 and the backward recomputes the logits
(one more GEMM per chunk) and runs steps 4–5 with the real ``g_n``. The ops' contract: with
``grads_in_forward=True`` the caller guarantees a uniform ``grad_rows``; ``fastkd.api`` sets it
only for the summing reductions. Cost: the unit gradients (the size of the gradients
themselves) are held from the forward to the backward.

**Memory.** One ``chunk x V`` buffer (two for the dense teacher) whose height comes from a byte
budget (``fastkd.config.cuda_chunk_bytes``, :func:`chunk_rows`), plus ``(N, K)``/``(N,)``
float32 state. The weight gradient accumulates in the weight's dtype through cuBLAS ``addmm``
(float32 accumulation inside each GEMM, one rounding per chunk for 16-bit weights).

Not handled here (``fastkd.api`` sends them elsewhere): ``tail="renormalize"`` without CE and
without stats needs no pass over the vocabulary at all and runs on the torch backend's O(N·K·D)
gathered path; float64 inputs are the torch backend's. Ignored rows are computed by the GEMMs
(cuBLAS cannot skip rows) and get exactly zero gradient from zero row scales.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .. import divergences as dv
from . import cuda_build
from .torch_backend import _topk_epilogue, counted_rows, sorted_topk_ids

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
# Columns of the top-k state (as the torch backend): kd_lse, dense coef, top-k coef, CE lse.
_KD_LSE, _DENSE_COEF, _TOPK_COEF, _LSE_CE = range(4)
# Columns of the dense state: student lse, teacher lse, W = Σ_v w_v, CE lse.
_LSE, _TEACHER_LSE, _WSUM = range(3)
# Chunk heights are rounded down to a multiple of this (whole GEMM tiles) when at least one fits.
ROW_ALIGN = 64


def chunk_rows(n_rows: int, vocab: int, element_bytes: int, budget_bytes: int, buffers: int = 1) -> int:
    """Rows per chunk: the most whose ``buffers x rows x vocab`` buffer fits in ``budget_bytes``.

    At least 1 (a budget below one row still makes progress, one row at a time), at most
    ``n_rows``, and a multiple of ``ROW_ALIGN`` when at least that many fit.
    """
    if budget_bytes <= 0:
        raise ValueError(f"the chunk budget must be a positive number of bytes, got {budget_bytes}")
    rows = budget_bytes // max(1, buffers * vocab * element_bytes)
    if rows >= ROW_ALIGN:
        rows -= rows % ROW_ALIGN
    return int(max(1, min(n_rows, rows)))


def _chunks(n_rows: int, step: int):
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


class _Launch:
    """The extension, the device guard and the caller's current stream for one call."""

    def __init__(self, device: torch.device):
        self.ext = cuda_build.extension()
        self.device = device
        self.stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0

    def guard(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()


def _ptr(x: Optional[Tensor]) -> int:
    return 0 if x is None else x.data_ptr()


def _cap(cap: Optional[float]) -> float:
    return 0.0 if cap is None else float(cap)


def _check_buffer_dtype(hidden: Tensor) -> int:
    if hidden.dtype not in _DTYPE_CODES:
        raise TypeError(f"impl='cuda' takes float16, bfloat16 or float32 hidden, got {hidden.dtype}")
    return _DTYPE_CODES[hidden.dtype]


class _Head:
    """``h · Wᵀ + b`` of a chunk into a given buffer, in the buffer's dtype (cuBLAS on CUDA)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype):
        self.weight = weight.to(dtype).contiguous()
        self.bias = None if bias is None else bias.to(dtype).contiguous()
        self.dtype = dtype

    def logits_into(self, out: Tensor, hidden_chunk: Tensor) -> Tensor:
        hidden_chunk = hidden_chunk.to(self.dtype)
        if self.bias is None:
            return torch.mm(hidden_chunk, self.weight.t(), out=out)
        return torch.addmm(self.bias, hidden_chunk, self.weight.t(), out=out)


class _Grads:
    """``dh`` (written per chunk), ``dW`` (cuBLAS ``addmm_`` in the buffer dtype), ``db`` (float32)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype):
        self.hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device)
        self.weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        self.bias = None if bias is None else torch.zeros(weight.shape[0], dtype=torch.float32,
                                                         device=weight.device)
        self.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)

    def add(self, rows: slice, grad_logits: Tensor, hidden_chunk: Tensor, head: _Head) -> None:
        torch.mm(grad_logits, head.weight, out=self.hidden[rows])
        self.weight.addmm_(grad_logits.t(), hidden_chunk.to(head.dtype))
        if self.bias is not None:
            self.bias += grad_logits.sum(dim=0, dtype=torch.float32)

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        hidden_dtype, weight_dtype, bias_dtype = self.dtypes
        bias = self.weight.new_empty(0, dtype=weight_dtype) if self.bias is None else self.bias.to(bias_dtype)
        return self.hidden.to(hidden_dtype), self.weight.to(weight_dtype), bias


class _Pass:
    """What every forward and recomputing backward sets up: the buffer dtype code, the launch
    context, the student's head, the counted rows with in-range labels, and row chunks sized to
    the memory budget with ``buffers`` logits buffers of the student's dtype."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Optional[Tensor],
                 ignore_index: int, chunk_bytes: int, buffers: int = 1):
        self.n_rows, self.vocab = hidden.shape[0], weight.shape[0]
        self.code = _check_buffer_dtype(hidden)
        self.launch = _Launch(hidden.device)
        self.head = _Head(weight, bias, hidden.dtype)
        self.counted = counted_rows(labels, self.n_rows, ignore_index, hidden.device)
        self.safe_labels = None if labels is None else torch.where(self.counted, labels, 0).long().contiguous()
        self.step = chunk_rows(self.n_rows, self.vocab, hidden.element_size(), chunk_bytes, buffers=buffers)
        shape = (min(self.step, self.n_rows), self.vocab)
        self.buffers = [torch.empty(shape, dtype=hidden.dtype, device=hidden.device) for _ in range(buffers)]

    def chunks(self):
        return _chunks(self.n_rows, self.step)

    def labels(self, rows: slice) -> Optional[Tensor]:
        return None if self.safe_labels is None else self.safe_labels[rows]


def _no_grads(hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)


def _rescale(grad_rows: Tensor, grad_hidden: Tensor, grad_weight: Tensor, grad_bias: Tensor,
             has_bias: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Unit-scale gradients times ``grad_rows``: row-wise for ``dh``, its (uniform) value for ``dW``."""
    g = grad_rows.float()
    dh = (grad_hidden * g.unsqueeze(1)).to(grad_hidden.dtype)
    uniform = g[0] if g.numel() else g.new_zeros(())  # a 0-dim device tensor: no host sync
    dw = grad_weight * uniform  # 0-dim: computed in float32, rounded once to the weight's dtype
    db = grad_bias * uniform if has_bias else None
    return dh, dw, db


# ------------------------------------------------------------------------------------------------
# top-k (offline teacher ids and log-probs, or an online teacher's S with its exact tail)
# ------------------------------------------------------------------------------------------------

def _topk_grad_in_place(launch: _Launch, code: int, logits: Tensor, sorted_ids: Tensor, perm: Tensor,
                        topk_logits: Tensor, topk_weights: Tensor, valid: Tensor, kd_lse: Tensor,
                        dense: Tensor, topk_coef: Tensor, kd_scale: Tensor, lse_ce: Tensor,
                        ce_scale: Tensor, labels: Optional[Tensor], temperature: float,
                        softcap: Optional[float], with_tail: bool, use_ce: bool) -> None:
    """``dz`` of one chunk over ``logits``: the values on S come from the (c, K) epilogue."""
    on_topk = kd_scale.unsqueeze(1) * (
        topk_weights - torch.exp(topk_logits - kd_lse.unsqueeze(1)) * topk_coef.unsqueeze(1))
    on_topk = torch.where(valid, on_topk, 0.0).gather(1, perm).contiguous()
    kd_lse = kd_lse.contiguous()
    dense_scale = (kd_scale * dense).contiguous()
    lse_ce, ce_scale = lse_ce.contiguous(), ce_scale.contiguous()
    launch.ext.topk_grad(
        logits.data_ptr(), code, logits.shape[0], logits.shape[1], sorted_ids.data_ptr(),
        on_topk.data_ptr(), sorted_ids.shape[1], kd_lse.data_ptr(), dense_scale.data_ptr(),
        lse_ce.data_ptr(), ce_scale.data_ptr(), _ptr(labels), 1.0 / temperature, _cap(softcap),
        with_tail, use_ce, launch.stream)


def _gathered(logits: Tensor, ids: Tensor, softcap: Optional[float], temperature: float) -> Tensor:
    """``softcap(x)/τ`` at ``ids``, float32 (the same rounding path as the kernels: x → fp32)."""
    return dv.softcap(logits.gather(1, ids).float(), softcap) * (1.0 / temperature)


@torch.library.custom_op("fastkd::cuda_topk_kd_forward", mutates_args=())
def topk_kd_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_ids: Tensor,
    teacher_logprobs: Tensor, teacher_log_tail: Optional[Tensor], labels: Optional[Tensor],
    divergence: str, beta: float, tail: str, temperature: float, softcap: Optional[float],
    ignore_index: int, ce_weight: float, kd_weight: float, chunk_bytes: int, with_stats: bool,
    grads_in_forward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss_rows (N,), kd_rows (N,), state (N, 4), topk_weights (N, K), stats (N|0, 3),
    grad_hidden, grad_weight, grad_bias)``, float32 except the gradients.

    As ``fastkd::topk_kd_forward`` of the torch backend (same state layout), for contiguous CUDA
    ``hidden (N, D)``, ``weight (V, D)`` in float16/bfloat16/float32 and ids ``(N, K)`` int64 with
    ``-1`` on unused slots and ignored rows. With ``grads_in_forward`` the last three outputs are
    the gradients of ``Σ_n loss_rows[n]`` (unit ``grad_output``) with the shapes and dtypes of
    ``hidden``, ``weight``, ``bias`` (``bias``'s empty when None); else all three are empty.
    """
    ps = _Pass(hidden, weight, bias, labels, ignore_index, chunk_bytes)
    n_rows, vocab, k, counted = ps.n_rows, ps.vocab, teacher_ids.shape[1], ps.counted
    device, code, launch = hidden.device, ps.code, ps.launch
    use_ce = ce_weight != 0.0
    with_tail = tail == "bucket"
    valid = teacher_ids >= 0
    safe_ids = teacher_ids.clamp(min=0)
    sorted_ids, perm = sorted_topk_ids(teacher_ids, vocab)
    f32 = dict(dtype=torch.float32, device=device)
    lse, tail_lse, lse_ce, mean_z, target, kd_rows = (torch.zeros(n_rows, **f32) for _ in range(6))
    state = torch.zeros((n_rows, 4), **f32)
    topk_weights = torch.zeros((n_rows, k), **f32)
    stats = torch.zeros((n_rows if with_stats else 0, 3), **f32)
    kd_scale = torch.where(counted, kd_weight * temperature, 0.0).float()  # τ² of the loss × 1/τ of z
    ce_scale = torch.where(counted, ce_weight, 0.0).float()
    grads = _Grads(hidden, weight, bias, hidden.dtype) if grads_in_forward else None
    with launch.guard():
        for rows in ps.chunks():
            h = hidden[rows]
            logits = ps.head.logits_into(ps.buffers[0][: rows.stop - rows.start], h)
            ids_c, valid_c = safe_ids[rows], valid[rows]
            topk_logits = _gathered(logits, ids_c, softcap, temperature)
            if use_ce:
                target[rows] = _gathered(logits, ps.labels(rows).unsqueeze(1), softcap, 1.0).squeeze(1)
            launch.ext.topk_stats(
                logits.data_ptr(), code, logits.shape[0], vocab, sorted_ids[rows].data_ptr(), k,
                1.0 / temperature, _cap(softcap), with_tail, use_ce, with_stats,
                lse[rows].data_ptr(), tail_lse[rows].data_ptr(), lse_ce[rows].data_ptr(),
                mean_z[rows].data_ptr(), launch.stream)
            teacher_tail = None if teacher_log_tail is None else teacher_log_tail[rows].float()
            kd, w, kd_lse, dense, topk_coef = _topk_epilogue(
                topk_logits, lse[rows], tail_lse[rows] if with_tail else None,
                teacher_logprobs[rows].float(), teacher_tail, valid_c, tail, divergence, beta)
            kd_rows[rows] = kd
            topk_weights[rows] = w
            state[rows, _KD_LSE], state[rows, _DENSE_COEF], state[rows, _TOPK_COEF] = kd_lse, dense, topk_coef
            if with_stats:
                topk_mass = dv.masked_logsumexp(topk_logits, valid_c).sub(lse[rows]).exp()
                stats[rows] = torch.stack([lse[rows] - mean_z[rows], lse[rows], topk_mass], dim=1)
            if grads is not None:
                _topk_grad_in_place(
                    launch, code, logits, sorted_ids[rows], perm[rows], topk_logits, w, valid_c,
                    kd_lse, dense, topk_coef, kd_scale[rows], lse_ce[rows], ce_scale[rows],
                    ps.labels(rows), temperature, softcap, with_tail, use_ce)
                grads.add(rows, logits, h, ps.head)
    # lse_ce stays real on ignored rows: the recomputing backward multiplies exp(s − lse_ce) by 0.
    state[:, _LSE_CE] = lse_ce
    zero = torch.zeros((), **f32)
    kd_rows = torch.where(counted, kd_rows, zero)
    loss_rows = kd_weight * temperature**2 * kd_rows
    if use_ce:
        loss_rows = loss_rows + torch.where(counted, ce_weight * (lse_ce - target), zero)
    topk_weights = torch.where(counted.unsqueeze(1), topk_weights, zero)
    grad_outputs = grads.result() if grads is not None else _no_grads(hidden)
    return (loss_rows, kd_rows, state, topk_weights, stats) + grad_outputs


def _grad_fakes(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], grads_in_forward: bool):
    if not grads_in_forward:
        return _no_grads(hidden)
    bias_grad = weight.new_empty(0) if bias is None else torch.empty_like(bias)
    return torch.empty_like(hidden), torch.empty_like(weight), bias_grad


@topk_kd_forward.register_fake
def _(hidden, weight, bias, teacher_ids, teacher_logprobs, teacher_log_tail, labels, divergence,
      beta, tail, temperature, softcap, ignore_index, ce_weight, kd_weight, chunk_bytes, with_stats,
      grads_in_forward):
    n_rows = hidden.shape[0]
    rows = hidden.new_empty(n_rows, dtype=torch.float32)
    return (rows, torch.empty_like(rows), hidden.new_empty((n_rows, 4), dtype=torch.float32),
            hidden.new_empty(teacher_ids.shape, dtype=torch.float32),
            hidden.new_empty((n_rows if with_stats else 0, 3), dtype=torch.float32),
            *_grad_fakes(hidden, weight, bias, grads_in_forward))


@torch.library.custom_op("fastkd::cuda_topk_kd_backward", mutates_args=())
def topk_kd_backward(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_ids: Tensor,
    labels: Optional[Tensor], state: Tensor, topk_weights: Tensor, tail: str, temperature: float,
    softcap: Optional[float], ignore_index: int, ce_weight: float, kd_weight: float, chunk_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(d hidden, d weight, d bias or empty)`` of ``Σ_n grad_rows[n] · loss_rows[n]``,
    recomputing each chunk's logits (the path for a per-row ``grad_rows``)."""
    ps = _Pass(hidden, weight, bias, labels, ignore_index, chunk_bytes)
    g = torch.where(ps.counted, grad_rows.float(), 0.0)
    kd_scale, ce_scale = kd_weight * temperature * g, ce_weight * g
    valid = teacher_ids >= 0
    safe_ids = teacher_ids.clamp(min=0)
    sorted_ids, perm = sorted_topk_ids(teacher_ids, ps.vocab)
    grads = _Grads(hidden, weight, bias, hidden.dtype)
    with ps.launch.guard():
        for rows in ps.chunks():
            h = hidden[rows]
            logits = ps.head.logits_into(ps.buffers[0][: rows.stop - rows.start], h)
            topk_logits = _gathered(logits, safe_ids[rows], softcap, temperature)
            _topk_grad_in_place(
                ps.launch, ps.code, logits, sorted_ids[rows], perm[rows], topk_logits, topk_weights[rows],
                valid[rows], state[rows, _KD_LSE], state[rows, _DENSE_COEF],
                state[rows, _TOPK_COEF], kd_scale[rows], state[rows, _LSE_CE], ce_scale[rows],
                ps.labels(rows), temperature, softcap, tail == "bucket", ce_weight != 0.0)
            grads.add(rows, logits, h, ps.head)
    return grads.result()


@topk_kd_backward.register_fake
def _(grad_rows, hidden, weight, bias, teacher_ids, labels, state, topk_weights, tail, temperature,
      softcap, ignore_index, ce_weight, kd_weight, chunk_bytes):
    return _grad_fakes(hidden, weight, bias, True)


def _topk_setup_context(ctx, inputs, output):
    (hidden, weight, bias, teacher_ids, _lp, _tail, labels, _divergence, _beta, tail, temperature,
     softcap, ignore_index, ce_weight, kd_weight, chunk_bytes, _with_stats, grads_in_forward) = inputs
    ctx.grads_in_forward, ctx.has_bias = grads_in_forward, bias is not None
    if grads_in_forward:
        ctx.save_for_backward(*output[5:])
    else:
        ctx.save_for_backward(hidden, weight, bias, teacher_ids, labels, output[2], output[3])
        ctx.options = (tail, temperature, softcap, ignore_index, ce_weight, kd_weight, chunk_bytes)


def _topk_backward(ctx, grad_loss_rows, *_unused):
    if ctx.grads_in_forward:
        grads = _rescale(grad_loss_rows, *ctx.saved_tensors, ctx.has_bias)
    else:
        hidden, weight, bias, teacher_ids, labels, state, topk_weights = ctx.saved_tensors
        dh, dw, db = topk_kd_backward(grad_loss_rows, hidden, weight, bias, teacher_ids, labels,
                                      state, topk_weights, *ctx.options)
        grads = (dh, dw, db if ctx.has_bias else None)
    return grads + (None,) * 15


torch.library.register_autograd(
    "fastkd::cuda_topk_kd_forward", _topk_backward, setup_context=_topk_setup_context)


# ------------------------------------------------------------------------------------------------
# online teacher, full vocabulary (every token its own bucket)
# ------------------------------------------------------------------------------------------------

def _kind(divergence: str, beta: float) -> int:
    return _KINDS[dv._resolve(divergence, beta)[0]]


def _dense_grad_in_place(launch: _Launch, code: int, student: Tensor, teacher: Tensor,
                         state: Tensor, kd_scale: Tensor, ce_scale: Tensor,
                         labels: Optional[Tensor], divergence: str, beta: float,
                         temperature: float, softcap: Optional[float],
                         teacher_softcap: Optional[float], use_ce: bool) -> None:
    lse, teacher_lse, wsum, lse_ce = (state[:, i].contiguous() for i in range(4))
    kd_scale, ce_scale = kd_scale.contiguous(), ce_scale.contiguous()
    launch.ext.dense_grad(
        student.data_ptr(), teacher.data_ptr(), code, student.shape[0], student.shape[1],
        1.0 / temperature, _cap(softcap), _cap(teacher_softcap), _kind(divergence, beta),
        float(beta), lse.data_ptr(), teacher_lse.data_ptr(), wsum.data_ptr(), kd_scale.data_ptr(),
        lse_ce.data_ptr(), ce_scale.data_ptr(), _ptr(labels), use_ce, launch.stream)


@torch.library.custom_op("fastkd::cuda_dense_kd_forward", mutates_args=())
def dense_kd_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_hidden: Tensor,
    teacher_weight: Tensor, teacher_bias: Optional[Tensor], labels: Optional[Tensor],
    divergence: str, beta: float, temperature: float, softcap: Optional[float],
    teacher_softcap: Optional[float], ignore_index: int, ce_weight: float, kd_weight: float,
    chunk_bytes: int, with_stats: bool, grads_in_forward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss_rows (N,), kd_rows (N,), state (N, 4): lse, teacher lse, W = Σ w, CE lse,
    stats (N|0, 2): entropy, lse, grad_hidden, grad_weight, grad_bias)``; the gradients as in
    :func:`topk_kd_forward`. The teacher's logits go through a buffer of the student's dtype."""
    ps = _Pass(hidden, weight, bias, labels, ignore_index, chunk_bytes, buffers=2)
    n_rows, vocab, counted = ps.n_rows, ps.vocab, ps.counted
    device, code, launch = hidden.device, ps.code, ps.launch
    teacher_head = _Head(teacher_weight, teacher_bias, hidden.dtype)
    use_ce = ce_weight != 0.0
    kind = _kind(divergence, beta)
    f32 = dict(dtype=torch.float32, device=device)
    state = torch.zeros((4, n_rows), **f32)  # column-major while filled: each column contiguous
    mean_z, target, kd_rows = (torch.zeros(n_rows, **f32) for _ in range(3))
    kd_scale = torch.where(counted, kd_weight * temperature, 0.0).float()
    ce_scale = torch.where(counted, ce_weight, 0.0).float()
    grads = _Grads(hidden, weight, bias, hidden.dtype) if grads_in_forward else None
    with launch.guard():
        for rows in ps.chunks():
            c = rows.stop - rows.start
            h = hidden[rows]
            student = ps.head.logits_into(ps.buffers[0][:c], h)
            teacher = teacher_head.logits_into(ps.buffers[1][:c], teacher_hidden[rows])
            if use_ce:
                target[rows] = _gathered(student, ps.labels(rows).unsqueeze(1), softcap, 1.0).squeeze(1)
            lse, teacher_lse, wsum, lse_ce = (state[i, rows] for i in range(4))
            args = (student.data_ptr(), teacher.data_ptr(), code, c, vocab, 1.0 / temperature,
                    _cap(softcap), _cap(teacher_softcap))
            launch.ext.dense_stats(*args, use_ce, with_stats, lse.data_ptr(), teacher_lse.data_ptr(),
                                   lse_ce.data_ptr(), mean_z[rows].data_ptr(), launch.stream)
            launch.ext.dense_divergence(*args, kind, float(beta), lse.data_ptr(),
                                        teacher_lse.data_ptr(), kd_rows[rows].data_ptr(),
                                        wsum.data_ptr(), launch.stream)
            if grads is not None:
                _dense_grad_in_place(
                    launch, code, student, teacher, state[:, rows].t(), kd_scale[rows],
                    ce_scale[rows], ps.labels(rows), divergence, beta, temperature, softcap,
                    teacher_softcap, use_ce)
                grads.add(rows, student, h, ps.head)
    state = state.t().contiguous()
    zero = torch.zeros((), **f32)
    kd_rows = torch.where(counted, kd_rows, zero)
    loss_rows = kd_weight * temperature**2 * kd_rows
    if use_ce:
        loss_rows = loss_rows + torch.where(counted, ce_weight * (state[:, 3] - target), zero)
    if with_stats:
        stats = torch.stack([state[:, _LSE] - mean_z, state[:, _LSE]], dim=1)
    else:
        stats = torch.zeros((0, 2), **f32)
    grad_outputs = grads.result() if grads is not None else _no_grads(hidden)
    return (loss_rows, kd_rows, state, stats) + grad_outputs


@dense_kd_forward.register_fake
def _(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, divergence, beta,
      temperature, softcap, teacher_softcap, ignore_index, ce_weight, kd_weight, chunk_bytes,
      with_stats, grads_in_forward):
    n_rows = hidden.shape[0]
    rows = hidden.new_empty(n_rows, dtype=torch.float32)
    return (rows, torch.empty_like(rows), hidden.new_empty((n_rows, 4), dtype=torch.float32),
            hidden.new_empty((n_rows if with_stats else 0, 2), dtype=torch.float32),
            *_grad_fakes(hidden, weight, bias, grads_in_forward))


@torch.library.custom_op("fastkd::cuda_dense_kd_backward", mutates_args=())
def dense_kd_backward(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
    labels: Optional[Tensor], state: Tensor, divergence: str, beta: float, temperature: float,
    softcap: Optional[float], teacher_softcap: Optional[float], ignore_index: int,
    ce_weight: float, kd_weight: float, chunk_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(d hidden, d weight, d bias or empty)``; both heads' logits recomputed."""
    ps = _Pass(hidden, weight, bias, labels, ignore_index, chunk_bytes, buffers=2)
    teacher_head = _Head(teacher_weight, teacher_bias, hidden.dtype)
    g = torch.where(ps.counted, grad_rows.float(), 0.0)
    kd_scale, ce_scale = kd_weight * temperature * g, ce_weight * g
    grads = _Grads(hidden, weight, bias, hidden.dtype)
    with ps.launch.guard():
        for rows in ps.chunks():
            c = rows.stop - rows.start
            h = hidden[rows]
            student = ps.head.logits_into(ps.buffers[0][:c], h)
            teacher = teacher_head.logits_into(ps.buffers[1][:c], teacher_hidden[rows])
            _dense_grad_in_place(
                ps.launch, ps.code, student, teacher, state[rows], kd_scale[rows], ce_scale[rows],
                ps.labels(rows), divergence, beta, temperature, softcap, teacher_softcap, ce_weight != 0.0)
            grads.add(rows, student, h, ps.head)
    return grads.result()


@dense_kd_backward.register_fake
def _(grad_rows, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, state,
      divergence, beta, temperature, softcap, teacher_softcap, ignore_index, ce_weight, kd_weight,
      chunk_bytes):
    return _grad_fakes(hidden, weight, bias, True)


def _dense_setup_context(ctx, inputs, output):
    (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, divergence, beta,
     temperature, softcap, teacher_softcap, ignore_index, ce_weight, kd_weight, chunk_bytes,
     _with_stats, grads_in_forward) = inputs
    ctx.grads_in_forward, ctx.has_bias = grads_in_forward, bias is not None
    if grads_in_forward:
        ctx.save_for_backward(*output[4:])
    else:
        ctx.save_for_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                              labels, output[2])
        ctx.options = (divergence, beta, temperature, softcap, teacher_softcap, ignore_index,
                       ce_weight, kd_weight, chunk_bytes)


def _dense_backward(ctx, grad_loss_rows, *_unused):
    if ctx.grads_in_forward:
        grads = _rescale(grad_loss_rows, *ctx.saved_tensors, ctx.has_bias)
    else:
        (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels,
         state) = ctx.saved_tensors
        dh, dw, db = dense_kd_backward(grad_loss_rows, hidden, weight, bias, teacher_hidden,
                                       teacher_weight, teacher_bias, labels, state, *ctx.options)
        grads = (dh, dw, db if ctx.has_bias else None)
    return grads + (None,) * 15


torch.library.register_autograd(
    "fastkd::cuda_dense_kd_forward", _dense_backward, setup_context=_dense_setup_context)
