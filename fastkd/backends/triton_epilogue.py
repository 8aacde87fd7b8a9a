"""Triton epilogues of the chunked engine: row statistics and ``dz`` over a buffer of logits.

The chunked plan (DESIGN.md §3) computes, per chunk of rows, ``x = h_c·Wᵀ (+ b)`` with a GEMM into a
``(rows, V)`` buffer, then runs these kernels over the buffer, then ``dh = dz·W`` and
``dW += dzᵀ·h_c``. They are the Triton twins of the csrc epilogues (``csrc/topk_epilogue.cu``,
``csrc/dense_epilogue.cu``) with the same names, argument order and numerics, so the plan can use
either; the differences: tensors instead of pointers (``None`` where csrc takes a null pointer), no
dtype code and no stream (the dtype is the tensor's, the launch goes to torch's current stream), and
``out=`` on the two gradient kernels (write ``dz`` into another tensor, e.g. bfloat16, instead of
over the logits).

The math is DESIGN.md §1 as written in ``fastkd.divergences`` (this file re-derives nothing). Per
element of a row, with ``s = softcap(x) = c·tanh(x/c)`` (identity without a cap) and ``z = s/τ``:

    topk_stats        lse = log Σ_V e^z,  tail_lse = log Σ_{V∖S} e^z (S excluded, never 1 − Σ_S),
                      lse_ce = log Σ_V e^s (the CE on untempered logits), mean_z = E_p[z]
    topk_grad         dz = value_j                                  on S (set, not added)
                      dz = dense_scale · e^{z − kd_lse}             off S (0 without a tail)
                         + ce_scale · (e^{s − lse_ce} − 1[v = label])
                         then × (1 − (s/c)²), the softcap's derivative
    dense_stats       lse, mean_z of the student; teacher_lse = log Σ_V e^{t}, t = softcap_t(y)/τ;
                      lse_ce
    dense_divergence  kd = Σ_V term(log p, log q),  wsum = W = Σ_V w(log p, log q)
                      (forward KL: q·(log q − log p), w = −q; reverse KL: p·(log p − log q), w = the
                      term; JSD(β): β·q·(log q − log m) + (1−β)·p·(log p − log m),
                      w = (1−β)·p·(log p − log m), log m = logaddexp(log β + log q, log(1−β) + log p))
    dense_grad        dz = kd_scale · (w_v − p_v·W) + the CE term, × (1 − (s/c)²)

The per-row scales already hold ``grad_output``, the weights and the 1/τ of ``z`` (the caller folds
them: ``kd_scale = g·kd_weight·τ`` as in ``cuda_backend``). A zero scale contributes exactly zero
whatever its factor is (a ``where``, not a product), so an ignored row — whose scales, and values on
S, the caller sets to 0 — comes back as exact zeros even if its statistics are garbage.

Shapes and dtypes (every tensor on the logits' device):
  logits / student / teacher  (rows, vocab), float32 (the engine's default: unrounded statistics),
                              float16 or bfloat16 (computed in float32), or float64 (computed in
                              float64; τ, caps and β then travel as two float32 halves, exact to
                              ~1e-14); unit column stride, any row stride.
  sorted_ids                  (rows, k) int32/int64, ascending per row, unique valid ids; unused
                              slots are any value outside [0, vocab): -1 (sorting first) or vocab
                              (sorting last, as ``torch_backend.sorted_topk_ids`` makes them).
  sorted_values               (rows, k) any float dtype, dz at ``sorted_ids`` (unused slots ignored).
  per-row vectors             (rows,) float32 or float64 (labels int32/int64), any stride, so
                              columns of an (N, 4) state can be passed as they are.
  out                         the logits' shape, any float dtype, unit column stride.
  cap / teacher_cap           a float; ``None`` or ``<= 0`` means no softcap (csrc passes 0).
  kind                        0 forward KL, 1 reverse KL, 2 JSD with 0 < beta < 1 (``KIND_CODES``).

Kernels: one program per row streams the vocabulary in tiles of ``BLOCK_V`` columns with int64 row
offsets (``rows·vocab > 2³¹`` cannot overflow). The statistics use an online log-sum-exp against a
per-row running maximum with per-lane float32 sums (one cross-lane reduction per tile, for the
maximum), ``E_p[z]`` accumulated as ``Σ e^{z−m}·(z − m)`` (no cancellation against a large ``m``).
The set S is found from the sorted ids: per tile, how many ids fall in it (one compare over K), then
only those ids are matched to columns, so S costs ``O(K)`` per tile plus ``O(BLOCK_V)`` per id.
No ``tl.dot``, no atomics, no shared memory beyond Triton's reductions. Launch configurations come
from one small function per kernel (``*_config``), which the offline compile lane reads too
(``compile_specs``).
"""
from __future__ import annotations

import contextlib
import math
import struct
from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from .triton_kernels import _tanh

KIND_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
# Widest tile of the vocabulary one program loads at once (tests lower it to exercise many tiles).
# 1024 columns over 8 warps: 4 per thread, one 16-byte load of float32; about 56 registers for
# the statistics kernel, so 4 blocks fit an SM (2048 columns cost 107, 4096 176; same loads in flight).
MAX_BLOCK_V = 1024
# Masked columns hold this instead of -inf: exp() underflows to 0 and no inf − inf or 0·inf appears.
_MASKED = tl.constexpr(-1e30)


# ------------------------------------------------------------------------------------------------
# shared per-element pieces
# ------------------------------------------------------------------------------------------------

@triton.jit
def _softcap(x, cap, HAS_CAP: tl.constexpr):
    if HAS_CAP:
        x = cap * _tanh(x / cap)
    return x


@triton.jit
def _times_softcap_grad(g, s, cap, HAS_CAP: tl.constexpr):
    """``g · d softcap(x)/dx`` with the derivative ``1 − (s/c)²`` from the capped value ``s``."""
    if HAS_CAP:
        r = s / cap
        g = g * (1.0 - r * r)
    return g


@triton.jit
def _param(hi, lo, ACC: tl.constexpr):
    """A host float passed as two float32 halves ``hi + lo``: ``hi`` for float32 work, both (exact
    to ~1e-14) for float64 buffers, so a float64 chunk is not limited by float32 arguments."""
    if ACC == tl.float64:
        x = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        x = tl.cast(hi, tl.float32)
    return x


@triton.jit
def _load_row_tile(row_ptr, cols, col_mask, ACC: tl.constexpr):
    return tl.load(row_ptr + cols, mask=col_mask, other=0.0).to(ACC)


@triton.jit
def _lse_step(m, acc, x):
    """One tile of an online log-sum-exp with per-lane sums ``acc`` against a scalar maximum ``m``:
    the new maximum, the rescaled sums, the factor ``alpha`` the other sums need and ``e^{x − m}``."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    alpha = tl.exp(m - m_new)
    e = tl.exp(x - m_new)
    return m_new, acc * alpha + e, alpha, e


@triton.jit
def _ids_below(ids_row, k_offs, K, v):
    """How many of the row's K sorted ids are below column ``v`` (the -1 slots included)."""
    ids = tl.load(ids_row + k_offs, mask=k_offs < K, other=2147483647)
    return tl.sum((ids < v).to(tl.int32), axis=0)


@triton.jit
def _cross_entropy_grad(g, s, cols, lse_ce, ce_scale, label):
    """``g + ce_scale·(softmax(s) − onehot(label))``; exactly ``g`` where ``ce_scale`` is 0."""
    onehot = tl.where(cols == label, 1.0, 0.0)
    return g + tl.where(ce_scale != 0.0, ce_scale * (tl.exp(s - lse_ce) - onehot), 0.0)


@triton.jit
def _dense_terms(z, t, lse, teacher_lse, log_beta, log_1m_beta, beta, KIND: tl.constexpr):
    """Per element: the divergence term, the weight ``w = p·G`` and ``p`` (DESIGN.md §1 table)."""
    log_p = z - lse
    log_q = t - teacher_lse
    p = tl.exp(log_p)
    if KIND == 0:  # forward KL
        q = tl.exp(log_q)
        term = q * (log_q - log_p)
        w = -q
    elif KIND == 1:  # reverse KL
        term = p * (log_p - log_q)
        w = term
    else:  # JSD(β): log M by logaddexp in log space
        a = log_q + log_beta
        b = log_p + log_1m_beta
        hi = tl.maximum(a, b)
        log_m = hi + tl.log(1.0 + tl.exp(-tl.abs(a - b)))
        w = (1.0 - beta) * p * (log_p - log_m)
        term = beta * tl.exp(log_q) * (log_q - log_m) + w
    return term, w, p


# ------------------------------------------------------------------------------------------------
# top-k: statistics, then dz
# ------------------------------------------------------------------------------------------------

@triton.jit
def topk_stats_kernel(
    # pointers
    logits_ptr, ids_ptr, lse_ptr, tail_lse_ptr, lse_ce_ptr, mean_z_ptr,
    # shapes
    V, K,
    # strides
    stride_logits, stride_ids, stride_lse, stride_tail_lse, stride_lse_ce, stride_mean_z,
    # meta
    inv_temp, inv_temp_lo, cap, cap_lo,
    HAS_CAP: tl.constexpr, WITH_TAIL: tl.constexpr, HAS_SET: tl.constexpr,
    WITH_CE: tl.constexpr, SEPARATE_CE: tl.constexpr, WITH_STATS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per row: lse of z over V, lse over V∖S, CE lse of s, E_p[z] (see the module docstring)."""
    inv_temp = _param(inv_temp, inv_temp_lo, ACC)
    cap = _param(cap, cap_lo, ACC)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits
    ids_row = ids_ptr + row * stride_ids
    k_offs = tl.arange(0, BLOCK_K)
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), _MASKED, ACC)  # finite: the first rescale is exp(−1e30 − m) = 0, no −inf·0
    acc = tl.zeros((BLOCK_V,), ACC)
    acc_tail = tl.zeros((BLOCK_V,), ACC)
    acc_z = tl.zeros((BLOCK_V,), ACC)  # Σ e^{z−m}·(z − m)
    m_ce = tl.full((), _MASKED, ACC)
    acc_ce = tl.zeros((BLOCK_V,), ACC)
    pos = 0  # slots before `pos` hold ids below the current tile (or unused -1 slots)
    if HAS_SET:
        pos = _ids_below(ids_row, k_offs, K, 0)  # the unused slots that sort first (-1)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        col_mask = cols < V
        s = _softcap(_load_row_tile(row_ptr, cols, col_mask, ACC), cap, HAS_CAP)
        z = tl.where(col_mask, s * inv_temp, _MASKED)
        m_old, acc_old = m, acc
        m, acc, alpha, e = _lse_step(m, acc, z)
        if WITH_STATS:  # re-centre Σ e·(z − m_old) on the new maximum, then add the tile
            acc_z = alpha * (acc_z + (m_old - m) * acc_old) + e * (z - m)
        if WITH_TAIL:
            in_s = tl.zeros((BLOCK_V,), tl.int1)
            if HAS_SET:
                end = _ids_below(ids_row, k_offs, K, v0 + BLOCK_V)
                for j in range(pos, end):  # only the ids inside this tile
                    in_s = in_s | (cols == tl.load(ids_row + j))
                pos = end
            acc_tail = acc_tail * alpha + tl.where(in_s, 0.0, e)
        if SEPARATE_CE:
            m_ce, acc_ce, _alpha, _e = _lse_step(m_ce, acc_ce, tl.where(col_mask, s, _MASKED))
    total = tl.sum(acc, axis=0)
    lse = m + tl.log(total)
    tl.store(lse_ptr + row * stride_lse, lse)
    if WITH_TAIL:
        tail_lse = m + tl.log(tl.sum(acc_tail, axis=0))  # −inf for an empty tail
        tl.store(tail_lse_ptr + row * stride_tail_lse, tail_lse)
    if WITH_CE:
        if SEPARATE_CE:
            tl.store(lse_ce_ptr + row * stride_lse_ce, m_ce + tl.log(tl.sum(acc_ce, axis=0)))
        else:
            tl.store(lse_ce_ptr + row * stride_lse_ce, lse)
    if WITH_STATS:
        tl.store(mean_z_ptr + row * stride_mean_z, m + tl.sum(acc_z, axis=0) / total)


@triton.jit
def topk_grad_kernel(
    # pointers
    logits_ptr, out_ptr, ids_ptr, values_ptr, kd_lse_ptr, dense_scale_ptr, lse_ce_ptr,
    ce_scale_ptr, labels_ptr,
    # shapes
    V, K,
    # strides
    stride_logits, stride_out, stride_ids, stride_values, stride_kd_lse, stride_dense_scale,
    stride_lse_ce, stride_ce_scale, stride_labels,
    # meta
    inv_temp, inv_temp_lo, cap, cap_lo,
    HAS_CAP: tl.constexpr, WITH_TAIL: tl.constexpr, HAS_SET: tl.constexpr, WITH_CE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dz over one row: the value given on S, the dense part off S, the CE term, × softcap'."""
    inv_temp = _param(inv_temp, inv_temp_lo, ACC)
    cap = _param(cap, cap_lo, ACC)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits
    out_row = out_ptr + row * stride_out
    ids_row = ids_ptr + row * stride_ids
    values_row = values_ptr + row * stride_values
    k_offs = tl.arange(0, BLOCK_K)
    offs = tl.arange(0, BLOCK_V)
    kd_lse = tl.load(kd_lse_ptr + row * stride_kd_lse).to(ACC)
    dense_scale = 0.0
    if WITH_TAIL:
        dense_scale = tl.load(dense_scale_ptr + row * stride_dense_scale).to(ACC)
    lse_ce = 0.0
    ce_scale = 0.0
    label = -1
    if WITH_CE:
        lse_ce = tl.load(lse_ce_ptr + row * stride_lse_ce).to(ACC)
        ce_scale = tl.load(ce_scale_ptr + row * stride_ce_scale).to(ACC)
        label = tl.load(labels_ptr + row * stride_labels).to(tl.int32)
    pos = 0
    if HAS_SET:
        pos = _ids_below(ids_row, k_offs, K, 0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        col_mask = cols < V
        s = _softcap(_load_row_tile(row_ptr, cols, col_mask, ACC), cap, HAS_CAP)
        g = tl.zeros((BLOCK_V,), ACC)
        if WITH_TAIL:
            g = tl.where(dense_scale != 0.0, dense_scale * tl.exp(s * inv_temp - kd_lse), 0.0)
        if HAS_SET:
            end = _ids_below(ids_row, k_offs, K, v0 + BLOCK_V)
            for j in range(pos, end):  # set, not add: a huge G_T cannot cancel on S
                g = tl.where(cols == tl.load(ids_row + j), tl.load(values_row + j).to(ACC), g)
            pos = end
        if WITH_CE:
            g = _cross_entropy_grad(g, s, cols, lse_ce, ce_scale, label)
        g = _times_softcap_grad(g, s, cap, HAS_CAP)
        tl.store(out_row + cols, g.to(out_ptr.dtype.element_ty), mask=col_mask)


# ------------------------------------------------------------------------------------------------
# dense (online teacher, every token its own bucket): statistics, divergence, dz
# ------------------------------------------------------------------------------------------------

@triton.jit
def dense_stats_kernel(
    # pointers
    student_ptr, teacher_ptr, lse_ptr, teacher_lse_ptr, lse_ce_ptr, mean_z_ptr,
    # shapes
    V,
    # strides
    stride_student, stride_teacher, stride_lse, stride_teacher_lse, stride_lse_ce, stride_mean_z,
    # meta
    inv_temp, inv_temp_lo, cap, cap_lo, teacher_cap, teacher_cap_lo,
    HAS_CAP: tl.constexpr, TEACHER_HAS_CAP: tl.constexpr, WITH_CE: tl.constexpr,
    SEPARATE_CE: tl.constexpr, WITH_STATS: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per row: student lse and E_p[z], teacher lse, CE lse."""
    inv_temp = _param(inv_temp, inv_temp_lo, ACC)
    cap = _param(cap, cap_lo, ACC)
    teacher_cap = _param(teacher_cap, teacher_cap_lo, ACC)
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * stride_student
    teacher_row = teacher_ptr + row * stride_teacher
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), _MASKED, ACC)
    acc = tl.zeros((BLOCK_V,), ACC)
    acc_z = tl.zeros((BLOCK_V,), ACC)
    m_t = tl.full((), _MASKED, ACC)
    acc_t = tl.zeros((BLOCK_V,), ACC)
    m_ce = tl.full((), _MASKED, ACC)
    acc_ce = tl.zeros((BLOCK_V,), ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        col_mask = cols < V
        s = _softcap(_load_row_tile(student_row, cols, col_mask, ACC), cap, HAS_CAP)
        t = _softcap(_load_row_tile(teacher_row, cols, col_mask, ACC), teacher_cap, TEACHER_HAS_CAP)
        z = tl.where(col_mask, s * inv_temp, _MASKED)
        m_old, acc_old = m, acc
        m, acc, alpha, e = _lse_step(m, acc, z)
        if WITH_STATS:  # re-centre Σ e·(z − m_old) on the new maximum, then add the tile
            acc_z = alpha * (acc_z + (m_old - m) * acc_old) + e * (z - m)
        m_t, acc_t, _alpha_t, _e_t = _lse_step(m_t, acc_t, tl.where(col_mask, t * inv_temp, _MASKED))
        if SEPARATE_CE:
            m_ce, acc_ce, _alpha, _e = _lse_step(m_ce, acc_ce, tl.where(col_mask, s, _MASKED))
    total = tl.sum(acc, axis=0)
    lse = m + tl.log(total)
    tl.store(lse_ptr + row * stride_lse, lse)
    tl.store(teacher_lse_ptr + row * stride_teacher_lse, m_t + tl.log(tl.sum(acc_t, axis=0)))
    if WITH_CE:
        if SEPARATE_CE:
            tl.store(lse_ce_ptr + row * stride_lse_ce, m_ce + tl.log(tl.sum(acc_ce, axis=0)))
        else:
            tl.store(lse_ce_ptr + row * stride_lse_ce, lse)
    if WITH_STATS:
        tl.store(mean_z_ptr + row * stride_mean_z, m + tl.sum(acc_z, axis=0) / total)


@triton.jit
def dense_divergence_kernel(
    # pointers
    student_ptr, teacher_ptr, lse_ptr, teacher_lse_ptr, kd_ptr, wsum_ptr,
    # shapes
    V,
    # strides
    stride_student, stride_teacher, stride_lse, stride_teacher_lse, stride_kd, stride_wsum,
    # meta
    inv_temp, inv_temp_lo, cap, cap_lo, teacher_cap, teacher_cap_lo, beta, beta_lo, log_beta,
    log_beta_lo, log_1m_beta, log_1m_beta_lo,
    HAS_CAP: tl.constexpr, TEACHER_HAS_CAP: tl.constexpr, KIND: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per row, given both lse: the divergence and W = Σ_v w_v / Σ_v p_v (Σp = 1 in exact
    arithmetic; with the p this kernel and dense_grad_kernel compute, Σ_v dz_v is then 0 in
    floating point too, as ``torch_epilogue.dense_divergence`` explains)."""
    inv_temp = _param(inv_temp, inv_temp_lo, ACC)
    cap = _param(cap, cap_lo, ACC)
    teacher_cap = _param(teacher_cap, teacher_cap_lo, ACC)
    beta = _param(beta, beta_lo, ACC)
    log_beta = _param(log_beta, log_beta_lo, ACC)
    log_1m_beta = _param(log_1m_beta, log_1m_beta_lo, ACC)
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * stride_student
    teacher_row = teacher_ptr + row * stride_teacher
    offs = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row * stride_lse).to(ACC)
    teacher_lse = tl.load(teacher_lse_ptr + row * stride_teacher_lse).to(ACC)
    acc_kd = tl.zeros((BLOCK_V,), ACC)
    acc_w = tl.zeros((BLOCK_V,), ACC)
    acc_p = tl.zeros((BLOCK_V,), ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        col_mask = cols < V
        z = _softcap(_load_row_tile(student_row, cols, col_mask, ACC), cap, HAS_CAP) * inv_temp
        y = _load_row_tile(teacher_row, cols, col_mask, ACC)
        t = _softcap(y, teacher_cap, TEACHER_HAS_CAP) * inv_temp
        term, w, _p = _dense_terms(z, t, lse, teacher_lse, log_beta, log_1m_beta, beta, KIND)
        acc_kd += tl.where(col_mask, term, 0.0)
        acc_w += tl.where(col_mask, w, 0.0)
        acc_p += tl.where(col_mask, _p, 0.0)
    tl.store(kd_ptr + row * stride_kd, tl.sum(acc_kd, axis=0))
    tl.store(wsum_ptr + row * stride_wsum, tl.sum(acc_w, axis=0) / tl.sum(acc_p, axis=0))


@triton.jit
def dense_grad_kernel(
    # pointers
    student_ptr, out_ptr, teacher_ptr, lse_ptr, teacher_lse_ptr, wsum_ptr, kd_scale_ptr,
    lse_ce_ptr, ce_scale_ptr, labels_ptr,
    # shapes
    V,
    # strides
    stride_student, stride_out, stride_teacher, stride_lse, stride_teacher_lse, stride_wsum,
    stride_kd_scale, stride_lse_ce, stride_ce_scale, stride_labels,
    # meta
    inv_temp, inv_temp_lo, cap, cap_lo, teacher_cap, teacher_cap_lo, beta, beta_lo, log_beta,
    log_beta_lo, log_1m_beta, log_1m_beta_lo,
    HAS_CAP: tl.constexpr, TEACHER_HAS_CAP: tl.constexpr, KIND: tl.constexpr,
    WITH_CE: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """dz = kd_scale·(w_v − p_v·W) + the CE term, × softcap', over one student row."""
    inv_temp = _param(inv_temp, inv_temp_lo, ACC)
    cap = _param(cap, cap_lo, ACC)
    teacher_cap = _param(teacher_cap, teacher_cap_lo, ACC)
    beta = _param(beta, beta_lo, ACC)
    log_beta = _param(log_beta, log_beta_lo, ACC)
    log_1m_beta = _param(log_1m_beta, log_1m_beta_lo, ACC)
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * stride_student
    teacher_row = teacher_ptr + row * stride_teacher
    out_row = out_ptr + row * stride_out
    offs = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row * stride_lse).to(ACC)
    teacher_lse = tl.load(teacher_lse_ptr + row * stride_teacher_lse).to(ACC)
    wsum = tl.load(wsum_ptr + row * stride_wsum).to(ACC)
    kd_scale = tl.load(kd_scale_ptr + row * stride_kd_scale).to(ACC)
    lse_ce = 0.0
    ce_scale = 0.0
    label = -1
    if WITH_CE:
        lse_ce = tl.load(lse_ce_ptr + row * stride_lse_ce).to(ACC)
        ce_scale = tl.load(ce_scale_ptr + row * stride_ce_scale).to(ACC)
        label = tl.load(labels_ptr + row * stride_labels).to(tl.int32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        col_mask = cols < V
        s = _softcap(_load_row_tile(student_row, cols, col_mask, ACC), cap, HAS_CAP)
        y = _load_row_tile(teacher_row, cols, col_mask, ACC)
        t = _softcap(y, teacher_cap, TEACHER_HAS_CAP) * inv_temp
        _term, w, p = _dense_terms(s * inv_temp, t, lse, teacher_lse, log_beta, log_1m_beta, beta, KIND)
        g = tl.where(kd_scale != 0.0, kd_scale * (w - p * wsum), 0.0)
        if WITH_CE:
            g = _cross_entropy_grad(g, s, cols, lse_ce, ce_scale, label)
        g = _times_softcap_grad(g, s, cap, HAS_CAP)
        tl.store(out_row + cols, g.to(out_ptr.dtype.element_ty), mask=col_mask)


# ------------------------------------------------------------------------------------------------
# launch configurations (one function per kernel; the offline compile lane reads them too)
# ------------------------------------------------------------------------------------------------

def _block_v(vocab: int) -> int:
    return max(16, min(MAX_BLOCK_V, triton.next_power_of_2(max(1, vocab))))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 1024 else 4


def _block_k(k: int) -> int:
    return max(16, triton.next_power_of_2(max(1, k)))


def topk_stats_config(vocab: int, k: int, dtype: torch.dtype) -> dict:
    """Meta-parameters of ``topk_stats_kernel`` for a ``(rows, vocab)`` buffer of ``dtype``."""
    block_v = _block_v(vocab)
    return dict(BLOCK_V=block_v, BLOCK_K=_block_k(k), num_warps=_num_warps(block_v), num_stages=1)


def topk_grad_config(vocab: int, k: int, dtype: torch.dtype) -> dict:
    """Meta-parameters of ``topk_grad_kernel``."""
    block_v = _block_v(vocab)
    return dict(BLOCK_V=block_v, BLOCK_K=_block_k(k), num_warps=_num_warps(block_v), num_stages=1)


def dense_stats_config(vocab: int, dtype: torch.dtype) -> dict:
    """Meta-parameters of ``dense_stats_kernel``."""
    block_v = _block_v(vocab)
    return dict(BLOCK_V=block_v, num_warps=_num_warps(block_v), num_stages=1)


def dense_divergence_config(vocab: int, dtype: torch.dtype) -> dict:
    """Meta-parameters of ``dense_divergence_kernel``."""
    block_v = _block_v(vocab)
    return dict(BLOCK_V=block_v, num_warps=_num_warps(block_v), num_stages=1)


def dense_grad_config(vocab: int, dtype: torch.dtype) -> dict:
    """Meta-parameters of ``dense_grad_kernel``."""
    block_v = _block_v(vocab)
    return dict(BLOCK_V=block_v, num_warps=_num_warps(block_v), num_stages=1)


# ------------------------------------------------------------------------------------------------
# launchers: argument checks (before any kernel runs, no host sync), then one program per row
# ------------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ROW_FLOATS = (torch.float32, torch.float64)
_INTS = (torch.int32, torch.int64)


def _acc(buffer: Tensor):
    """The dtype the kernels compute in: float64 for a float64 buffer, else float32."""
    return tl.float64 if buffer.dtype == torch.float64 else tl.float32


def _halves(x: float) -> tuple[float, float]:
    """``x`` as two float32 values ``hi + lo`` (see ``_param``)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


def _scalars(*values: float) -> tuple[float, ...]:
    return tuple(half for x in values for half in _halves(x))


def _check_buffer(name: str, x, rows: int, vocab: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() != 2 or tuple(x.shape) != (rows, vocab):
        raise ValueError(f"{name} must have shape (rows, vocab) = ({rows}, {vocab}), got {tuple(x.shape)}")
    if vocab > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must have unit column stride, got strides {tuple(x.stride())}")


def _check_sizes(rows, vocab, k=0) -> None:
    for name, value, low in (("rows", rows, 0), ("vocab", vocab, 1), ("k", k, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not low <= value <= 2**31 - 1:
            raise ValueError(f"{name} must be in [{low}, 2**31 - 1], got {value}")


def _check_tensor(name: str, x, shape: tuple, dtypes: tuple, device: torch.device) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be {names}, got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} (the logits' device), got {x.device}")


def _check_ids(name: str, x, rows: int, k: int, device) -> None:
    _check_tensor(name, x, (rows, k), _INTS, device)
    if k > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must have unit column stride, got strides {tuple(x.stride())}")


def _check_scalar(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not math.isfinite(value) or abs(value) > 1e38:
        raise ValueError(f"{name} must be finite (within float32's range), got {value}")
    return float(value)


def _cap(name: str, cap) -> tuple[float, bool]:
    """``(cap, has_cap)``: None or ``<= 0`` is no softcap, as csrc's 0."""
    if cap is None:
        return 1.0, False
    cap = _check_scalar(name, cap)
    return (cap, True) if cap > 0 else (1.0, False)


def _inv_temp(inv_temp) -> float:
    inv_temp = _check_scalar("inv_temp", inv_temp)
    if inv_temp <= 0:
        raise ValueError(f"inv_temp must be > 0 (1/temperature), got {inv_temp}")
    return inv_temp


def _kind(kind, beta) -> tuple[int, float, float, float]:
    """``(kind, beta, log β, log(1 − β))``; JSD needs ``0 < β < 1`` (the caller resolves the limits)."""
    if isinstance(kind, bool) or not isinstance(kind, int) or kind not in (0, 1, 2):
        raise ValueError(f"kind must be 0 (forward_kl), 1 (reverse_kl) or 2 (jsd), got {kind!r}")
    beta = _check_scalar("beta", beta)
    if kind == 2 and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for kind=2 (jsd), got {beta}")
    if kind != 2:
        return kind, beta, 0.0, 0.0
    return kind, beta, math.log(beta), math.log1p(-beta)


def _check_out(out, logits: Tensor) -> Tensor:
    if out is None:
        return logits
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.dtype not in _FLOATS:
        raise TypeError(f"out must be float32, float16, bfloat16 or float64, got {out.dtype}")
    if out.shape != logits.shape:
        raise ValueError(f"out must have the logits' shape {tuple(logits.shape)}, got {tuple(out.shape)}")
    if out.device != logits.device:
        raise ValueError(f"out must be on {logits.device} (the logits' device), got {out.device}")
    if out.shape[1] > 1 and out.stride(1) != 1:
        raise ValueError(f"out must have unit column stride, got strides {tuple(out.stride())}")
    return out


def _stride(x: Optional[Tensor]) -> int:
    return 0 if x is None or x.dim() == 0 else x.stride(0)


# While `recording()` is active the launchers append (kernel, args, meta) here instead of launching.
_RECORDED: Optional[list] = None


def _launch(kernel, rows: int, device: torch.device, args: tuple, meta: dict) -> None:
    """One program per row on torch's current stream of ``device``."""
    if _RECORDED is not None:
        _RECORDED.append((kernel, args, meta))
        return
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[(rows,)](*args, **meta)


def topk_stats(logits: Tensor, rows: int, vocab: int, sorted_ids: Optional[Tensor], k: int,
               inv_temp: float, cap: Optional[float], with_tail: bool, with_ce: bool,
               with_stats: bool, lse: Tensor, tail_lse: Optional[Tensor], lse_ce: Optional[Tensor],
               mean_z: Optional[Tensor]) -> None:
    """Top-k pass 1 over ``logits (rows, vocab)``: writes per row (float32 ``(rows,)`` each)
    ``lse`` of ``z = softcap(x)·inv_temp`` over V; with ``with_tail`` the exact ``tail_lse`` over
    ``V∖S`` (``-inf`` when S covers V), S = ``sorted_ids (rows, k)``; with ``with_ce`` the CE
    ``lse_ce`` of ``softcap(x)``; with ``with_stats`` ``mean_z = E_p[z]``. ``sorted_ids`` is needed
    only with ``with_tail`` and ``k > 0``; outputs not asked for may be None."""
    _check_sizes(rows, vocab, k)
    _check_buffer("logits", logits, rows, vocab)
    device = logits.device
    inv_temp = _inv_temp(inv_temp)
    cap, has_cap = _cap("cap", cap)
    has_set = bool(with_tail) and k > 0
    if has_set:
        _check_ids("sorted_ids", sorted_ids, rows, k, device)
    for name, x, needed in (("lse", lse, True), ("tail_lse", tail_lse, with_tail),
                            ("lse_ce", lse_ce, with_ce), ("mean_z", mean_z, with_stats)):
        if needed:
            _check_tensor(name, x, (rows,), _ROW_FLOATS, device)
    if rows == 0:
        return
    cfg = topk_stats_config(vocab, k, logits.dtype)
    ids = sorted_ids if has_set else lse
    args = (logits, ids, lse, tail_lse if with_tail else lse, lse_ce if with_ce else lse,
            mean_z if with_stats else lse,
            vocab, k,
            logits.stride(0), ids.stride(0), lse.stride(0), _stride(tail_lse), _stride(lse_ce),
            _stride(mean_z),
            *_halves(inv_temp), *_halves(cap))
    meta = dict(HAS_CAP=has_cap, WITH_TAIL=bool(with_tail), HAS_SET=has_set, WITH_CE=bool(with_ce),
                SEPARATE_CE=bool(with_ce) and inv_temp != 1.0, WITH_STATS=bool(with_stats),
                ACC=_acc(logits), **cfg)
    _launch(topk_stats_kernel, rows, device, args, meta)


def topk_grad(logits: Tensor, rows: int, vocab: int, sorted_ids: Optional[Tensor],
              sorted_values: Optional[Tensor], k: int, kd_lse: Tensor, dense_scale: Optional[Tensor],
              lse_ce: Optional[Tensor], ce_scale: Optional[Tensor], labels: Optional[Tensor],
              inv_temp: float, cap: Optional[float], with_tail: bool, with_ce: bool, *,
              out: Optional[Tensor] = None) -> Tensor:
    """Top-k pass 2: ``dz`` with respect to the raw logits, over ``logits`` in place or into ``out``
    (same shape, float32/float16/bfloat16). Per row: ``sorted_values`` on S (set semantics), off S
    ``dense_scale·exp(z − kd_lse)`` with ``with_tail`` (else 0), plus with ``with_ce``
    ``ce_scale·(softmax(softcap(x)) − onehot(labels))`` (``lse_ce`` its log-sum-exp), all times
    the softcap derivative. Returns the tensor written (``out`` or ``logits``)."""
    _check_sizes(rows, vocab, k)
    _check_buffer("logits", logits, rows, vocab)
    out = _check_out(out, logits)
    device = logits.device
    inv_temp = _inv_temp(inv_temp)
    cap, has_cap = _cap("cap", cap)
    has_set = k > 0
    if has_set:
        _check_ids("sorted_ids", sorted_ids, rows, k, device)
        _check_tensor("sorted_values", sorted_values, (rows, k), _FLOATS, device)
        if k > 1 and sorted_values.stride(1) != 1:
            raise ValueError("sorted_values must have unit column stride, got strides "
                             f"{tuple(sorted_values.stride())}")
    _check_tensor("kd_lse", kd_lse, (rows,), _ROW_FLOATS, device)
    if with_tail:
        _check_tensor("dense_scale", dense_scale, (rows,), _ROW_FLOATS, device)
    if with_ce:
        _check_tensor("lse_ce", lse_ce, (rows,), _ROW_FLOATS, device)
        _check_tensor("ce_scale", ce_scale, (rows,), _ROW_FLOATS, device)
        _check_tensor("labels", labels, (rows,), _INTS, device)
    if rows == 0:
        return out
    cfg = topk_grad_config(vocab, k, logits.dtype)
    ids = sorted_ids if has_set else kd_lse
    values = sorted_values if has_set else kd_lse
    args = (logits, out, ids, values, kd_lse, dense_scale if with_tail else kd_lse,
            lse_ce if with_ce else kd_lse, ce_scale if with_ce else kd_lse,
            labels if with_ce else kd_lse,
            vocab, k,
            logits.stride(0), out.stride(0), ids.stride(0), values.stride(0), kd_lse.stride(0),
            _stride(dense_scale), _stride(lse_ce), _stride(ce_scale), _stride(labels),
            *_halves(inv_temp), *_halves(cap))
    meta = dict(HAS_CAP=has_cap, WITH_TAIL=bool(with_tail), HAS_SET=has_set, WITH_CE=bool(with_ce),
                ACC=_acc(logits), **cfg)
    _launch(topk_grad_kernel, rows, device, args, meta)
    return out


def _check_pair(student, teacher, rows, vocab) -> None:
    _check_sizes(rows, vocab)
    _check_buffer("student", student, rows, vocab)
    _check_buffer("teacher", teacher, rows, vocab)
    if teacher.device != student.device:
        raise ValueError(f"teacher must be on {student.device} (the student's device), got {teacher.device}")


def dense_stats(student: Tensor, teacher: Tensor, rows: int, vocab: int, inv_temp: float,
                cap: Optional[float], teacher_cap: Optional[float], with_ce: bool, with_stats: bool,
                lse: Tensor, teacher_lse: Tensor, lse_ce: Optional[Tensor],
                mean_z: Optional[Tensor]) -> None:
    """Dense pass 1 over ``student``/``teacher (rows, vocab)``: float32 ``(rows,)`` ``lse`` of
    ``z = softcap(x)·inv_temp``, ``teacher_lse`` of ``softcap_t(y)·inv_temp``, with ``with_ce``
    ``lse_ce`` of ``softcap(x)``, with ``with_stats`` ``mean_z = E_p[z]``."""
    _check_pair(student, teacher, rows, vocab)
    device = student.device
    inv_temp = _inv_temp(inv_temp)
    cap, has_cap = _cap("cap", cap)
    teacher_cap, teacher_has_cap = _cap("teacher_cap", teacher_cap)
    for name, x, needed in (("lse", lse, True), ("teacher_lse", teacher_lse, True),
                            ("lse_ce", lse_ce, with_ce), ("mean_z", mean_z, with_stats)):
        if needed:
            _check_tensor(name, x, (rows,), _ROW_FLOATS, device)
    if rows == 0:
        return
    cfg = dense_stats_config(vocab, student.dtype)
    args = (student, teacher, lse, teacher_lse, lse_ce if with_ce else lse,
            mean_z if with_stats else lse,
            vocab,
            student.stride(0), teacher.stride(0), lse.stride(0), teacher_lse.stride(0),
            _stride(lse_ce), _stride(mean_z),
            *_halves(inv_temp), *_halves(cap), *_halves(teacher_cap))
    meta = dict(HAS_CAP=has_cap, TEACHER_HAS_CAP=teacher_has_cap, WITH_CE=bool(with_ce),
                SEPARATE_CE=bool(with_ce) and inv_temp != 1.0, WITH_STATS=bool(with_stats),
                ACC=_acc(student), **cfg)
    _launch(dense_stats_kernel, rows, device, args, meta)


def dense_divergence(student: Tensor, teacher: Tensor, rows: int, vocab: int, inv_temp: float,
                     cap: Optional[float], teacher_cap: Optional[float], kind: int, beta: float,
                     lse: Tensor, teacher_lse: Tensor, kd: Tensor, wsum: Tensor) -> None:
    """Dense pass 2, given ``lse`` and ``teacher_lse``: float32 ``(rows,)`` ``kd`` (the divergence
    ``kind`` over the vocabulary) and ``wsum = W = Σ_v w_v``."""
    _check_pair(student, teacher, rows, vocab)
    device = student.device
    inv_temp = _inv_temp(inv_temp)
    cap, has_cap = _cap("cap", cap)
    teacher_cap, teacher_has_cap = _cap("teacher_cap", teacher_cap)
    kind, beta, log_beta, log_1m_beta = _kind(kind, beta)
    for name, x in (("lse", lse), ("teacher_lse", teacher_lse), ("kd", kd), ("wsum", wsum)):
        _check_tensor(name, x, (rows,), _ROW_FLOATS, device)
    if rows == 0:
        return
    cfg = dense_divergence_config(vocab, student.dtype)
    args = (student, teacher, lse, teacher_lse, kd, wsum,
            vocab,
            student.stride(0), teacher.stride(0), lse.stride(0), teacher_lse.stride(0),
            kd.stride(0), wsum.stride(0),
            *_scalars(inv_temp, cap, teacher_cap, beta, log_beta, log_1m_beta))
    meta = dict(HAS_CAP=has_cap, TEACHER_HAS_CAP=teacher_has_cap, KIND=kind, ACC=_acc(student), **cfg)
    _launch(dense_divergence_kernel, rows, device, args, meta)


def dense_grad(student: Tensor, teacher: Tensor, rows: int, vocab: int, inv_temp: float,
               cap: Optional[float], teacher_cap: Optional[float], kind: int, beta: float,
               lse: Tensor, teacher_lse: Tensor, wsum: Tensor, kd_scale: Tensor,
               lse_ce: Optional[Tensor], ce_scale: Optional[Tensor], labels: Optional[Tensor],
               with_ce: bool, *, out: Optional[Tensor] = None) -> Tensor:
    """Dense pass 3: ``dz = kd_scale·(w_v − p_v·W)`` (+ with ``with_ce`` the CE term) times the
    softcap derivative, over ``student`` in place or into ``out``. Returns the tensor written."""
    _check_pair(student, teacher, rows, vocab)
    out = _check_out(out, student)
    device = student.device
    inv_temp = _inv_temp(inv_temp)
    cap, has_cap = _cap("cap", cap)
    teacher_cap, teacher_has_cap = _cap("teacher_cap", teacher_cap)
    kind, beta, log_beta, log_1m_beta = _kind(kind, beta)
    for name, x in (("lse", lse), ("teacher_lse", teacher_lse), ("wsum", wsum), ("kd_scale", kd_scale)):
        _check_tensor(name, x, (rows,), _ROW_FLOATS, device)
    if with_ce:
        _check_tensor("lse_ce", lse_ce, (rows,), _ROW_FLOATS, device)
        _check_tensor("ce_scale", ce_scale, (rows,), _ROW_FLOATS, device)
        _check_tensor("labels", labels, (rows,), _INTS, device)
    if rows == 0:
        return out
    cfg = dense_grad_config(vocab, student.dtype)
    args = (student, out, teacher, lse, teacher_lse, wsum, kd_scale,
            lse_ce if with_ce else lse, ce_scale if with_ce else lse, labels if with_ce else lse,
            vocab,
            student.stride(0), out.stride(0), teacher.stride(0), lse.stride(0),
            teacher_lse.stride(0), wsum.stride(0), kd_scale.stride(0), _stride(lse_ce),
            _stride(ce_scale), _stride(labels),
            *_scalars(inv_temp, cap, teacher_cap, beta, log_beta, log_1m_beta))
    meta = dict(HAS_CAP=has_cap, TEACHER_HAS_CAP=teacher_has_cap, KIND=kind, WITH_CE=bool(with_ce),
                ACC=_acc(student), **cfg)
    _launch(dense_grad_kernel, rows, device, args, meta)
    return out


# ------------------------------------------------------------------------------------------------
# what the offline compile lane compiles: the launches these launchers make, recorded
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def recording():
    """Within the block the launchers record ``(kernel, args, meta)`` (yielded list) instead of
    launching; argument checks still run."""
    global _RECORDED
    previous, _RECORDED = _RECORDED, []
    try:
        yield _RECORDED
    finally:
        _RECORDED = previous


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.float64: "fp64", torch.int8: "i8", torch.int32: "i32", torch.int64: "i64"}


def _compile_spec(kernel, args: tuple, meta: dict) -> dict:
    """``ASTSource`` inputs of one recorded launch, specialised as Triton's launcher would on a GPU:
    tensors become pointers (16-byte aligned, as CUDA allocations are), integers equal to 1
    constexprs, integers divisible by 16 get the divisibility hint, floats fp32."""
    fn = getattr(kernel, "fn", kernel)  # the plain function under the interpreter
    names = list(kernel.arg_names) if hasattr(kernel, "arg_names") else list(fn.__code__.co_varnames)
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(names, args)):
        if isinstance(value, Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int) and value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    options = {key: meta[key] for key in ("num_warps", "num_stages") if key in meta}
    for name, value in meta.items():
        if name not in options:
            signature[name] = "constexpr"
            constexprs[name] = value
    return dict(name=fn.__name__, kernel=kernel, signature=signature, constexprs=constexprs,
                attrs=attrs, options=options)


def compile_specs(vocab: int = 128256, k: int = 64, dtype: torch.dtype = torch.float32,
                  out_dtype: Optional[torch.dtype] = None) -> list[dict]:
    """The five epilogue launches over ``(·, vocab)`` buffers of ``dtype`` with every option on
    (tail, K ids, CE with τ ≠ 1, stats, softcaps, JSD; the gradient kernels write ``out=`` of
    ``out_dtype`` when given, else in place), as ``dict(name, kernel, signature, constexprs,
    attrs, options)`` for ``triton.compile(ASTSource(kernel, signature, constexprs, attrs),
    target=..., options=options)``. Recorded from the launchers on one-row CPU tensors: nothing
    runs and no GPU is needed."""
    buffer = torch.zeros((1, vocab), dtype=dtype)
    out = None if out_dtype is None else torch.zeros((1, vocab), dtype=out_dtype)
    ids = torch.arange(k, dtype=torch.int32).unsqueeze(0)
    values = torch.zeros((1, k), dtype=torch.float32)
    labels = torch.zeros(1, dtype=torch.int64)
    row = [torch.zeros(1, dtype=torch.float32) for _ in range(6)]
    with recording() as launches:
        topk_stats(buffer, 1, vocab, ids, k, 0.5, 30.0, True, True, True, *row[:4])
        topk_grad(buffer, 1, vocab, ids, values, k, row[0], row[1], row[2], row[3], labels, 0.5,
                  30.0, True, True, out=out)
        dense_stats(buffer, buffer, 1, vocab, 0.5, 30.0, 30.0, True, True, *row[:4])
        dense_divergence(buffer, buffer, 1, vocab, 0.5, 30.0, 30.0, 2, 0.5, *row[:4])
        dense_grad(buffer, buffer, 1, vocab, 0.5, 30.0, 30.0, 2, 0.5, *row, labels, True, out=out)
    return [_compile_spec(*launch) for launch in launches]
