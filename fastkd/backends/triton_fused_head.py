"""The fused head of the chunked plan: the logits GEMM with the row statistics in its epilogue,
and a gradient pass over 16-bit tiles (``epilogue="fused"``; DESIGN.md §3 "chunked").

The unfused plan writes each chunk's logits ``x = h_c·Wᵀ`` as float32 (4 B per element of C×V),
reads them in the stats epilogue (4 B), again in the gradient epilogue (4 B) and writes ``dz``
(2 B). Here the GEMM itself finishes the statistics from its unrounded float32 accumulator and
writes the tile once in 16 bits, so per chunk:

    1. head_stats_kernel   tiles of z = softcap(h_c·Wᵀ + b)/τ with ``tl.dot`` (float32
                           accumulation, grouped program order for L2 reuse); per (row, tile of
                           128 columns) it writes, from the unrounded accumulator:
                             m_t    = max_tile z
                             sum_t  = Σ_tile e^{z−m_t}
                             tail_t = Σ_{tile∖S} e^{z−m_t}          (membership, not subtraction)
                             ent_t  = Σ_tile e^{z−m_t}·(z − m_t)    (for E_p[z], the entropy)
                             mce_t, sce_t: the same max/sum on s = softcap(x) = τ·z (CE at
                                           τ ≠ 1): τ·m_t and Σ_tile e^{τ·(z−m_t)}
                           the values z at S (in the sorted order of S), the CE target s[label],
                           and the tile as ``y = z − m_t`` in float16 (float32 for float32
                           operands). y ≤ 0 and its rounding error |y|·2⁻¹¹ is smallest for the
                           entries that carry probability (y near 0), so the softmax is not hurt.
    2. combine (torch)     lse = M + log Σ_t sum_t·e^{m_t−M}, the tail lse the same way, CE lse,
                           E_p[z] = M + Σ_t e^{m_t−lse}·(ent_t + (m_t − M)·sum_t)
    3. (C, K) epilogue     torch, as the unfused plan (``torch_backend._topk_epilogue``)
    4. head_grad_kernel    reads y (2 B) and m_t, writes dz (2 B) in the operand dtype — in place
                           over the tile when the operand is 16-bit (bfloat16 dz through a view) —
                           with ``triton_epilogue.topk_grad``'s semantics: values set on S, the dense
                           part off S, CE, the softcap derivative, ignored rows exact zeros.
    5. dh = dz·W, dW += dzᵀ·h  as the plan (``chunked._Grads``), on tensor cores.
    1, 4–5 with the scaled tile (``SCALED_TILE``: the default for bfloat16 on tensor cores,
                           the bucket tail and/or CE at τ = 1): before GEMM 1 a reference R per
                           row (the student's z at the teacher's first ``PROBE_IDS`` ids), and
                           GEMM 1 stores G = e^{z − R}·softcap'(s) in bfloat16 instead of y (a
                           program tile with a row whose max z lies > ``REF_WINDOW`` above R is
                           written again with that max, on the device). Off S every dz is σ_r·G (the
                           tail's dense·p and CE's p are per-row multiples of e^z), so after the
                           combine only S and the CE label (C·(K + 1) entries) are written into G
                           as dz/σ_r (``scaled_grad``), and dh = σ ⊙ (G·W), dW += Gᵀ·(σ ⊙ h) run
                           on cuBLAS: no gradient pass, no exp outside GEMM 1. The recomputing
                           backward (``reduction="none"``) takes R = the forward's lse.
    4–5 with ``GRAD_IN_GEMMS`` (opt-in, top-k): head_dh_kernel and head_dw_kernel, Triton GEMMs
                           whose dz operand tiles are made in registers from y and m_t (the
                           grad pass's formulas, ``_grad_tile``) for every 256 columns of D:
                           no grad pass, no dz in memory; dW (float32) and db added to in their
                           epilogues.

**Bytes and FLOPs per element of C×V outside the GEMM main loops** (16-bit operands; the floor's
three bare GEMMs write a 16-bit logits matrix and read a 16-bit dz twice):

    unfused plan   GEMM 1 writes float32 (+2 B over the floor), stats epilogue reads 4 B, grad
                   epilogue reads 4 B and writes 2 B                            ≈ 12 B excess
    fused plan     GEMM 1 writes the 16-bit tile (as the floor) + partials and tile bounds
                   (7 × 4 B per row per 128 columns ≈ 0.22 B), combine reads ≈ 0.19 B, grad pass
                   reads 2 B (+ m_t and bounds ≈ 0.06 B) and writes 2 B        ≈ 4.5 B excess
    scaled tile    as the fused plan without its grad pass; (K + 1)·44 B per row for S and the
                   label, 5·D·2 B per row for the probe, ≈ 12·D B per row to scale dh and h
                   (Qwen2.5: ≈ 0.6 B per logit)                                 ≈ 0.5 B excess
    FLOPs          2 exp per element (statistics, gradient), + 2 tanh with a softcap, ≈ 20 fp32
                   operations: on the CUDA cores, next to the 2·D tensor FLOPs per element of
                   each GEMM (a few % of the SM's issue slots at D ≥ 1536)

With the cost model (``bench/model.py``, ``python -m bench --model``, row "chunked, fused head
(opt-in)": 989 TFLOP/s bf16, HBM 3.35 / 4.8 TB/s, L2 12 TB/s assumed), N = 8192, top-k reverse
KL, the bound over the three bare GEMMs (unfused plan → fused plan with 128×128 program tiles →
with the wide 128×256 tile it now gets on sm_90, ``head_config(wide=True)``):

                   Llama-3-8B             Qwen2.5-1.5B           Gemma-2-2B
    H100           1.19 → 1.15 → 1.05     1.51 → 1.24 → 1.14     1.67 → 1.27 → 1.17
    H200           1.08 → 1.13 → 1.04     1.27 → 1.19 → 1.10     1.37 → 1.16 → 1.06

The wide tile reads 3/256 operand bytes per FLOP from L2 instead of 4/256, so GEMM 1 is no longer
L2-bound (Llama: 8.4 ms of L2 traffic under 8.7 ms of tensor work, was 11.2 ms). ≤ 1.10 is met
for Llama-3 (both GPUs) and Qwen/Gemma on the H200. What is left on the H100: the grad pass's
2 + 2 B per element (1.3–2.5 ms), heavy next to Qwen's thin GEMMs (D = 1536) and Gemma's wide
vocabulary; and Gemma's float32 dW accumulator (V×D read and written per chunk), HBM-bound at
1024-row chunks (a larger ``chunk_bytes`` helps).

With ``GRAD_IN_GEMMS`` the grad pass is gone and the bound is 1.00 / 1.01 / 1.09 (H100) and
1.00 / 1.00 / 1.00 (H200) — if the exp and the ~8 float32 operations per dz element, made again
for every 256 columns of D (16× at Llama's D), overlap the tensor cores as the roofline lets
them (they need 4.0 ms of MUFU and 2.0 ms of CUDA-core time beside 8.7 ms of tensor work per
gradient GEMM at Llama's shape), and if these Triton GEMMs run as fast as cuBLAS: no GPU has
timed them, so it is off by default.

The scaled tile removes the grad pass without either assumption: its gradient GEMMs are cuBLAS
on a 16-bit operand as before, and GEMM 1's epilogue stores e^y times a per-row factor instead of
y (one more exp per element only with a softcap). Bound (``bench/model.py``, path "chunked"):
1.01 / 1.01 / 1.01 on the H100 and the H200, against 1.05 / 1.14 / 1.09 (H100) with the grad pass
(path "chunked, gradient pass"). Precision: G carries bfloat16's 8 bits over e^{−87}..e^{64}, so
dz = σ_r·G is as exact as a bfloat16 dz (the grad pass rounds dz to bfloat16 too), and σ ⊙ h is
rounded once more for the dW GEMM; float16 (5 exponent bits: e^{−17}..e^{11}) keeps the grad pass.
``tests/test_triton_fused_head.py`` checks it against float64 (float32 G: the algebra; bfloat16 G
from float16 operands: within 4× the error a bfloat16-rounded exact dz gives).

Scope: the offline top-k teacher (``topk_kd_loss``: every divergence and tail mode, CE, softcap, τ,
``reduction`` summing (gradients in the forward) or ``"none"`` (one recomputation in the
backward)); the recomputing backward of the online top-k teacher (it needs only S and the saved
state); and the online dense teacher (``kd_loss(topk=None)``): both heads' GEMMs run
``head_stats_kernel`` (the teacher's with its own softcap, no set, no CE), then
``dense_pair_kernel`` reads the two 16-bit tiles twice — per-tile sums of the divergence terms and
of ``w`` (so ``kd`` and ``W``), then ``dz = kd_scale·(w − p·W) + CE``, × softcap' — over the formulas
of ``triton_epilogue._dense_terms``. The divergence itself is then computed from the 16-bit tiles
(error ≈ |z − m_t|·2⁻¹¹ per logit, far inside what 16-bit logits give plain PyTorch). At Liger's
dense JSD shape (student D 2048, teacher D 4096, V 128256, N 8192) the model gives 33.4 → 29.8 ms
(128×128 tiles) → 26.0 ms (the wide tile, both heads without CE) on the H100, 1.20× that case's
floor (not ≈ 1.1×: the two passes move 4 + 6 B per logit); 23.9 ms (1.10×) on the H200. The
heads run the wide tile only without a CE term (``wide_flags``); with CE they keep 128×128.
Before this, the heads without a set did not compile for the GPU at all (float32 stand-ins for
the set's pointers; see ``head_stats``). Not fused: the online top-k
teacher's forward (S is chosen with ``torch.topk`` over the teacher's full float32 logits; a
selection kernel over 16-bit tiles is not built), which runs cuBLAS and the Triton epilogues.

Launch configurations come from ``head_config(target, dtype)`` — chosen from the compile target
(sm_80, sm_86–89 with 99 KB of shared memory per block, sm_90), never by querying a GPU at import;
on a GPU the target is read from the tensor's device when the kernel is launched. ``recording()``
and ``compile_specs()`` expose the launches to the offline compile lane
(``scripts/compile_fused_head.py``).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from .triton_epilogue import _dense_terms
from .triton_kernels import _tanh

_MASKED = tl.constexpr(-1e30)
# y = z − m_t is stored in float16; below this it is clamped (e^y is 0 in float32 long before).
_Y_FLOOR = tl.constexpr(-60000.0)
# The scaled tile G = e^{z − R}: its exponent is capped here, so G stays finite in bfloat16 and a
# GEMM's float32 sums of G·W stay far from overflow (e^64 ≈ 6e27); the plan checks that every
# counted row's max z − R is within REF_WINDOW (< this), so the cap never bites there.
_G_LOG_MAX = tl.constexpr(64.0)
# Partials per (row, tile): m, sum, tail, ent, CE max, CE sum.
N_PARTIALS = 6
_M, _SUM, _TAIL, _ENT, _MCE, _SCE = range(N_PARTIALS)
_PM, _PSUM, _PTAIL, _PENT, _PMCE, _PSCE = (tl.constexpr(i) for i in range(N_PARTIALS))


@triton.jit
def _softcap(x, cap, HAS_CAP: tl.constexpr):
    if HAS_CAP:
        x = cap * _tanh(x / cap)
    return x


@triton.jit
def _store_tile(tile_ptr, rows64, row_mask, col_mask, v0, stride_tile, values, SUB_N: tl.constexpr):
    """``values (BLOCK_M, SUB_N)`` into the tile at columns ``v0 + [0, SUB_N)`` in its dtype, with
    int32 offsets from the program's first row (a pointer tile made where it is stored, so it is
    not live across the epilogue)."""
    first_row = tl.min(rows64, axis=0)
    offs = (rows64 - first_row).to(tl.int32)[:, None] * stride_tile + tl.arange(0, SUB_N)[None, :]
    tl.store(tile_ptr + first_row * stride_tile + v0 + offs, values.to(tile_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _tile_epilogue(acc, rows64, row_mask, v0, t, C, V, n_tiles,
                   b_ptr, ids_ptr, bounds_ptr, labels_ptr, tile_ptr, part_ptr, zs_ptr, target_ptr,
                   ref_ptr,
                   stride_ids, stride_bounds, stride_tile, stride_part, stride_zs, inv_temp, cap,
                   HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_SET: tl.constexpr,
                   WITH_TAIL: tl.constexpr, WITH_CE: tl.constexpr, SEPARATE_CE: tl.constexpr,
                   WITH_STATS: tl.constexpr, SCALED: tl.constexpr, SUB_N: tl.constexpr):
    """Partial-statistics tile ``t`` (columns ``v0 + [0, SUB_N)``) of the float32 accumulator
    ``acc (BLOCK_M, SUB_N)``, ordered to keep one tile-sized value live: the accumulator becomes
    ``y = z − m_t`` (stored at once) and the statistics are reductions of it (the CE max and sum
    from ``τ·y``), then ``e^y``, from which S is removed for the tail after the values at S are
    read. The wide sm_90 tile (128 registers of accumulator per thread) fits only so.
    ``SCALED``: the tile stored is ``G = e^{z − R}·softcap'(s)`` instead of ``y`` (``R`` per row
    from ``ref_ptr``; the exponent capped at ``_G_LOG_MAX``): ``e^y`` times a per-row factor, or
    with a softcap one more exp while ``y`` is live."""
    cols = v0 + tl.arange(0, SUB_N)
    col_mask = cols < V
    row_mask = row_mask & ((rows64 * 0 + t) < n_tiles)  # a split's second half may lie past V
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    acc = _softcap(acc, cap, HAS_CAP)  # s
    part_row = part_ptr + rows64 * stride_part + t
    part_stride = C * stride_part  # the 6 partial planes, (C, n_tiles) each, one after another
    if WITH_CE:
        label = tl.load(labels_ptr + rows64, mask=row_mask, other=-1).to(tl.int32)
        here = row_mask & (label >= v0) & (label < v0 + SUB_N)
        target = tl.sum(tl.where(cols[None, :] == label[:, None], acc, 0.0), axis=1)
        tl.store(target_ptr + rows64, target, mask=here)
    acc = tl.where(col_mask[None, :], acc * inv_temp, _MASKED)  # z
    m = tl.max(acc, axis=1)
    acc = acc - m[:, None]  # y
    tl.store(part_row + _PM * part_stride, m, mask=row_mask)
    shift = m * 0.0
    if SCALED:
        ref = tl.load(ref_ptr + rows64, mask=row_mask, other=0.0)
        shift = m - tl.where(ref == ref, ref, m)  # m_t − R (a NaN R: the tile max)
        if HAS_CAP:  # softcap'(s) = 1 − (s/cap)², s = τ·(y + m_t): while y is live
            r = (tl.maximum(acc, _Y_FLOOR) + m[:, None]) * (1.0 / (inv_temp * cap))
            _store_tile(tile_ptr, rows64, row_mask, col_mask, v0, stride_tile,
                        tl.exp(tl.minimum(acc + shift[:, None], _G_LOG_MAX)) * (1.0 - r * r), SUB_N)
        elif WITH_STATS:  # here too, at one more exp: later it spills 8 B on the wide tile
            _store_tile(tile_ptr, rows64, row_mask, col_mask, v0, stride_tile,
                        tl.exp(tl.minimum(acc + shift[:, None], _G_LOG_MAX)), SUB_N)
    else:
        _store_tile(tile_ptr, rows64, row_mask, col_mask, v0, stride_tile,
                    tl.maximum(acc, _Y_FLOOR), SUB_N)
    if WITH_CE:
        if SEPARATE_CE:  # s = τ·z: max s = τ·m_t, s − max s = τ·y (τ > 0)
            temp = 1.0 / inv_temp
            tl.store(part_row + _PMCE * part_stride, m * temp, mask=row_mask)
            tl.store(part_row + _PSCE * part_stride, tl.sum(tl.exp(acc * temp), axis=1),
                     mask=row_mask)
    if HAS_SET:
        lo = tl.load(bounds_ptr + rows64 * stride_bounds + t, mask=row_mask, other=0)
        hi = tl.load(bounds_ptr + rows64 * stride_bounds + t + 1, mask=row_mask, other=0)
        for j in range(0, tl.max(hi - lo, axis=0)):  # ~K·SUB_N/V ids per row per tile: 0 or 1
            has = (lo + j) < hi
            idj = tl.load(ids_ptr + rows64 * stride_ids + lo + j, mask=has, other=-1)
            # an unused slot (id V) meets a masked column: its value is garbage, never read
            zj = tl.sum(tl.where(cols[None, :] == idj[:, None], acc, 0.0), axis=1) + m
            tl.store(zs_ptr + rows64 * stride_zs + lo + j, zj, mask=has)
    if WITH_STATS:  # one exp for Σ e^y·y and e^y
        e = tl.exp(acc)
        tl.store(part_row + _PENT * part_stride, tl.sum(e * acc, axis=1), mask=row_mask)
        acc = e
    else:
        acc = tl.exp(acc)  # e^{z − m_t}
    if SCALED:
        if not HAS_CAP and not WITH_STATS:  # G = e^y·e^{m_t − R} ≤ e^{_G_LOG_MAX}, pointers made here
            _store_tile(tile_ptr, rows64, row_mask, col_mask, v0, stride_tile,
                        acc * tl.exp(tl.minimum(shift, _G_LOG_MAX))[:, None], SUB_N)
    tl.store(part_row + _PSUM * part_stride, tl.sum(acc, axis=1), mask=row_mask)
    if WITH_TAIL:
        if HAS_SET:
            lo = tl.load(bounds_ptr + rows64 * stride_bounds + t, mask=row_mask, other=0)
            hi = tl.load(bounds_ptr + rows64 * stride_bounds + t + 1, mask=row_mask, other=0)
            for j in range(0, tl.max(hi - lo, axis=0)):  # S leaves the tail by membership
                has = (lo + j) < hi
                idj = tl.load(ids_ptr + rows64 * stride_ids + lo + j, mask=has, other=-1)
                acc = tl.where(cols[None, :] == idj[:, None], 0.0, acc)
        tl.store(part_row + _PTAIL * part_stride, tl.sum(acc, axis=1), mask=row_mask)


@triton.jit
def head_stats_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, ids_ptr, bounds_ptr, labels_ptr, tile_ptr, part_ptr, zs_ptr, target_ptr,
    ref_ptr, flags_ptr,
    # shapes (n_tiles: partial-statistics tiles of BLOCK_N // SPLIT columns)
    C, V, D, n_tiles,
    # strides (unit column strides everywhere)
    stride_h, stride_w, stride_ids, stride_bounds, stride_tile, stride_part, stride_zs,
    # meta
    inv_temp, cap,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_SET: tl.constexpr,
    WITH_TAIL: tl.constexpr, WITH_CE: tl.constexpr, SEPARATE_CE: tl.constexpr,
    WITH_STATS: tl.constexpr, SCALED: tl.constexpr, ONLY_FLAGGED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of z = softcap(h·Wᵀ + b)/τ; its epilogue runs on SPLIT column
    halves (partial statistics per BLOCK_N // SPLIT columns) to bound the live registers."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(C, BLOCK_M)
    in_group = GROUP_M * tl.cdiv(V, BLOCK_N)
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    v0 = pid_n * BLOCK_N
    cols = v0 + tl.arange(0, BLOCK_N)
    row_mask = rows < C
    col_mask = cols < V
    if ONLY_FLAGGED:  # a rerun for some rows (scaled_grad): blocks without one leave at once
        flagged = tl.load(flags_ptr + rows, mask=row_mask, other=0)
        if tl.max(flagged, axis=0) == 0:
            return
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    h_ptrs = h_ptr + rows64[:, None] * stride_h + dd[None, :]
    w_ptrs = w_ptr + cols64[:, None] * stride_w + dd[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_mask = (d0 + dd) < D
        h = tl.load(h_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
        h_ptrs += BLOCK_D
        w_ptrs += BLOCK_D

    args = (C, V, n_tiles, b_ptr, ids_ptr, bounds_ptr, labels_ptr, tile_ptr, part_ptr, zs_ptr,
            target_ptr, ref_ptr, stride_ids, stride_bounds, stride_tile, stride_part, stride_zs,
            inv_temp, cap, HAS_BIAS, HAS_CAP, HAS_SET, WITH_TAIL, WITH_CE, SEPARATE_CE, WITH_STATS,
            SCALED)
    if SPLIT == 1:
        _tile_epilogue(acc, rows64, row_mask, v0, pid_n, *args, BLOCK_N)
    else:  # SPLIT 2: the two column halves one after the other
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        _tile_epilogue(left, rows64, row_mask, v0, 2 * pid_n, *args, BLOCK_N // 2)
        _tile_epilogue(right, rows64, row_mask, v0 + BLOCK_N // 2, 2 * pid_n + 1, *args,
                       BLOCK_N // 2)


@triton.jit
def _grad_tile(tile_ptr, part_ptr, ids_ptr, bounds_ptr, values_ptr, row_ptr, labels_ptr,
               rows64, row_mask, cols, col_mask, t, C,
               stride_tile, stride_part, stride_ids, stride_bounds, stride_values, temp, cap,
               HAS_CAP: tl.constexpr, WITH_TAIL: tl.constexpr, HAS_SET: tl.constexpr,
               WITH_CE: tl.constexpr):
    """dz (float32) at ``rows × cols``, columns within partial tile ``t``, from y = z − m_t:
    values set on S, the dense part off S, the CE term, × softcap'; zero outside the masks.
    ``row_ptr`` holds 4 float32 planes of C: kd_lse, dense scale, CE lse, CE scale."""
    mask = row_mask[:, None] & col_mask[None, :]
    y = tl.load(tile_ptr + rows64[:, None] * stride_tile + cols[None, :], mask=mask, other=0.0)
    m = tl.load(part_ptr + rows64 * stride_part + t, mask=row_mask, other=0.0)
    z = y.to(tl.float32) + m[:, None]
    s = z * temp
    kd_lse = tl.load(row_ptr + rows64, mask=row_mask, other=0.0)
    if WITH_TAIL:
        dense = tl.load(row_ptr + C + rows64, mask=row_mask, other=0.0)
        g = tl.where(dense[:, None] != 0.0, dense[:, None] * tl.exp(z - kd_lse[:, None]), 0.0)
    else:
        g = z * 0.0
    if HAS_SET:
        lo = tl.load(bounds_ptr + rows64 * stride_bounds + t, mask=row_mask, other=0)
        hi = tl.load(bounds_ptr + rows64 * stride_bounds + t + 1, mask=row_mask, other=0)
        for j in range(0, tl.max(hi - lo, axis=0)):  # set, not add: a huge G_T cannot cancel on S
            has = (lo + j) < hi
            idj = tl.load(ids_ptr + rows64 * stride_ids + lo + j, mask=has, other=-1)
            val = tl.load(values_ptr + rows64 * stride_values + lo + j, mask=has, other=0.0)
            g = tl.where(cols[None, :] == idj[:, None], val[:, None], g)
    g = _ce_and_softcap(g, s, cols, rows64, row_mask, row_ptr + 2 * C, C, labels_ptr, cap,
                        WITH_CE, HAS_CAP)
    return tl.where(mask, g, 0.0)


@triton.jit
def _ce_and_softcap(g, s, cols, rows64, row_mask, ce_ptr, C, labels_ptr, cap,
                    WITH_CE: tl.constexpr, HAS_CAP: tl.constexpr):
    """``g`` plus the CE term ``ce_scale · (softmax(s) − onehot(label))`` (``ce_ptr``: the CE lse
    plane, the CE scale plane C further), then times ``softcap'`` (``s`` the capped logits)."""
    if WITH_CE:
        lse_ce = tl.load(ce_ptr + rows64, mask=row_mask, other=0.0)
        ce_scale = tl.load(ce_ptr + C + rows64, mask=row_mask, other=0.0)
        label = tl.load(labels_ptr + rows64, mask=row_mask, other=-1).to(tl.int32)
        onehot = tl.where(cols[None, :] == label[:, None], 1.0, 0.0)
        g += tl.where(ce_scale[:, None] != 0.0,
                      ce_scale[:, None] * (tl.exp(s - lse_ce[:, None]) - onehot), 0.0)
    if HAS_CAP:
        r = s / cap
        g = g * (1.0 - r * r)
    return g


@triton.jit
def head_grad_kernel(
    # pointers
    tile_ptr, part_ptr, out_ptr, ids_ptr, bounds_ptr, values_ptr, row_ptr, labels_ptr,
    # shapes
    C, V,
    # strides
    stride_tile, stride_part, stride_out, stride_ids, stride_bounds, stride_values,
    # meta
    temp, cap,
    HAS_CAP: tl.constexpr, WITH_TAIL: tl.constexpr, HAS_SET: tl.constexpr, WITH_CE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dz over one (BLOCK_M, BLOCK_N) tile (``_grad_tile``) into ``out``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < C
    col_mask = cols < V
    rows64 = rows.to(tl.int64)
    g = _grad_tile(tile_ptr, part_ptr, ids_ptr, bounds_ptr, values_ptr, row_ptr, labels_ptr,
                   rows64, row_mask, cols, col_mask, pid_n, C,
                   stride_tile, stride_part, stride_ids, stride_bounds, stride_values, temp, cap,
                   HAS_CAP, WITH_TAIL, HAS_SET, WITH_CE)
    tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :],
             g.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def head_dh_kernel(
    # pointers
    tile_ptr, part_ptr, w_ptr, dh_ptr, ids_ptr, bounds_ptr, values_ptr, row_ptr, labels_ptr,
    # shapes
    C, V, D,
    # strides
    stride_tile, stride_part, stride_w, stride_dh, stride_ids, stride_bounds, stride_values,
    # meta
    temp, cap,
    HAS_CAP: tl.constexpr, WITH_TAIL: tl.constexpr, HAS_SET: tl.constexpr, WITH_CE: tl.constexpr,
    PRECISION: tl.constexpr, TILE_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dh (BLOCK_M, BLOCK_N) = dz · W over the vocabulary, each dz tile made in registers from
    the stored tile (``_grad_tile``; BLOCK_K divides the partial tiles' TILE_N) and never
    written: the A operand of the dot."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < C
    rows64 = rows.to(tl.int64)
    dcols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_mask = dcols < D
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, V, BLOCK_K):
        cols = k0 + kk
        col_mask = cols < V
        g = _grad_tile(tile_ptr, part_ptr, ids_ptr, bounds_ptr, values_ptr, row_ptr, labels_ptr,
                       rows64, row_mask, cols, col_mask, k0 // TILE_N, C,
                       stride_tile, stride_part, stride_ids, stride_bounds, stride_values, temp,
                       cap, HAS_CAP, WITH_TAIL, HAS_SET, WITH_CE)
        w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_w + dcols[None, :],
                    mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.dot(g.to(w.dtype), w, acc, input_precision=PRECISION)
    tl.store(dh_ptr + rows64[:, None] * stride_dh + dcols[None, :], acc.to(dh_ptr.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _add_store(dw_ptr, acc, cols64, col_mask, d0, D, stride_dw, ACCUMULATE: tl.constexpr,
               WIDTH: tl.constexpr):
    """``dw[cols, d0 + [0, WIDTH)] (+)= acc``, float32."""
    dcols = d0 + tl.arange(0, WIDTH)
    mask = col_mask[:, None] & (dcols < D)[None, :]
    ptrs = dw_ptr + cols64[:, None] * stride_dw + dcols[None, :]
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, acc, mask=mask)


@triton.jit
def head_dw_kernel(
    # pointers
    tile_ptr, part_ptr, h_ptr, dw_ptr, db_ptr, ids_ptr, bounds_ptr, values_ptr, row_ptr, labels_ptr,
    # shapes
    C, V, D,
    # strides
    stride_tile, stride_part, stride_h, stride_dw, stride_ids, stride_bounds, stride_values,
    # meta
    temp, cap,
    HAS_CAP: tl.constexpr, WITH_TAIL: tl.constexpr, HAS_SET: tl.constexpr, WITH_CE: tl.constexpr,
    ACCUMULATE: tl.constexpr, WITH_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    TILE_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dW (BLOCK_V, BLOCK_N) (+)= dzᵀ · h over the chunk's rows in float32 (``ACCUMULATE``: added
    to what ``dw`` holds), each dz tile made in registers from the stored tile (BLOCK_V divides
    TILE_N); the programs of the first D block also add db += Σ_rows dz."""
    pid_v = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    cols64 = cols.to(tl.int64)
    t = (pid_v * BLOCK_V) // TILE_N
    dcols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_mask = dcols < D
    rr = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_V, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for r0 in range(0, C, BLOCK_C):
        rows = r0 + rr
        row_mask = rows < C
        rows64 = rows.to(tl.int64)
        g = _grad_tile(tile_ptr, part_ptr, ids_ptr, bounds_ptr, values_ptr, row_ptr, labels_ptr,
                       rows64, row_mask, cols, col_mask, t, C,
                       stride_tile, stride_part, stride_ids, stride_bounds, stride_values, temp,
                       cap, HAS_CAP, WITH_TAIL, HAS_SET, WITH_CE)
        h = tl.load(h_ptr + rows64[:, None] * stride_h + dcols[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        g = g.to(h.dtype)
        acc = tl.dot(tl.trans(g), h, acc, input_precision=PRECISION)
        if WITH_BIAS:
            db += tl.sum(g.to(tl.float32), axis=0)
    # the float32 dW tile read and written in two column halves (one more accumulator-sized
    # tile would not fit the registers at BLOCK_N 256)
    left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_V, 2, BLOCK_N // 2)), (0, 2, 1)))
    _add_store(dw_ptr, left, cols64, col_mask, pid_n * BLOCK_N, D, stride_dw, ACCUMULATE,
               BLOCK_N // 2)
    _add_store(dw_ptr, right, cols64, col_mask, pid_n * BLOCK_N + BLOCK_N // 2, D, stride_dw,
               ACCUMULATE, BLOCK_N // 2)
    if WITH_BIAS:
        if pid_n == 0:  # db is zero-filled before the first chunk: always added to
            db += tl.load(db_ptr + cols64, mask=col_mask, other=0.0)
            tl.store(db_ptr + cols64, db, mask=col_mask)


@triton.jit
def dense_pair_kernel(
    # pointers
    student_ptr, student_part_ptr, teacher_ptr, teacher_part_ptr, row_ptr, labels_ptr, out_ptr,
    # shapes
    C, V, n_tiles,
    # strides
    stride_student, stride_teacher, stride_part, stride_out,
    # meta
    temp, inv_temp, cap, beta, log_beta, log_1m_beta,
    HAS_CAP: tl.constexpr, KIND: tl.constexpr, WITH_CE: tl.constexpr, GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The online dense teacher over two 16-bit tiles (student z − m_t, teacher t − m'_t).
    ``GRAD=False``: per (row, tile) Σ term and Σ w into ``out (2, C, n_tiles)``; ``GRAD=True``:
    dz = kd_scale·(w − p·W) + CE, × softcap', into ``out (C, V)``. ``row_ptr``: float32 planes of
    C — lse, teacher lse, W, kd scale, CE lse, CE scale."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < C
    col_mask = cols < V
    rows64 = rows.to(tl.int64)
    mask = row_mask[:, None] & col_mask[None, :]
    part = rows64 * stride_part + pid_n
    y = tl.load(student_ptr + rows64[:, None] * stride_student + cols[None, :], mask=mask, other=0.0)
    z = y.to(tl.float32) + tl.load(student_part_ptr + part, mask=row_mask, other=0.0)[:, None]
    u = tl.load(teacher_ptr + rows64[:, None] * stride_teacher + cols[None, :], mask=mask, other=0.0)
    t = u.to(tl.float32) + tl.load(teacher_part_ptr + part, mask=row_mask, other=0.0)[:, None]
    lse = tl.load(row_ptr + rows64, mask=row_mask, other=0.0)
    teacher_lse = tl.load(row_ptr + C + rows64, mask=row_mask, other=0.0)
    term, w, p = _dense_terms(z, t, lse[:, None], teacher_lse[:, None], log_beta, log_1m_beta,
                              beta, KIND)
    if GRAD:
        wsum = tl.load(row_ptr + 2 * C + rows64, mask=row_mask, other=0.0)
        kd_scale = tl.load(row_ptr + 3 * C + rows64, mask=row_mask, other=0.0)
        g = tl.where(kd_scale[:, None] != 0.0, kd_scale[:, None] * (w - p * wsum[:, None]), 0.0)
        g = _ce_and_softcap(g, z * temp, cols, rows64, row_mask, row_ptr + 4 * C, C, labels_ptr, cap,
                            WITH_CE, HAS_CAP)
        tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :],
                 g.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        out = out_ptr + part
        tl.store(out, tl.sum(tl.where(mask, term, 0.0), axis=1), mask=row_mask)
        tl.store(out + C * stride_part, tl.sum(tl.where(mask, w, 0.0), axis=1), mask=row_mask)


# ------------------------------------------------------------------------------------------------
# launch configurations, per compile target (never a GPU query at import)
# ------------------------------------------------------------------------------------------------

# Interpreter (tests): small tiles so a tiny problem still spans many tiles and both loops.
INTERPRETER_TILES = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_D=16, SPLIT=2)
_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def head_config(cc: int, operand: torch.dtype, interpreter: bool = False,
                wide: bool = False) -> dict:
    """Launch configuration of ``head_stats_kernel`` for compute capability ``cc`` (e.g. 90, 89,
    80) and the operand dtype, from the target alone (no GPU query).

    16-bit operands: 128×128 program tiles, BLOCK_D 64, 8 warps, grouped by 8 row tiles; 4 stages
    on sm_90 (wgmma; 4 × 32 KB of 227 KB), 3 on sm_80 (163 KB) and sm_86/89 (99 KB per block).
    ``wide`` on sm_90 (see ``_WIDE``): 128×256 program tiles whose epilogue runs on two 128-column
    halves (``SPLIT=2``, partials still per 128 columns), 4 stages (4 × 48 KB = 193 KB): each W
    tile is reused by 256 columns' worth of h, so GEMM 1 reads 3/256 instead of 4/256 operand
    bytes per FLOP from L2. It needs 255 registers with its epilogue (the accumulator alone is 128
    per thread), so it is used only for the flag sets ``scripts/compile_fused_head.py --wide-flags``
    compiles without a spill.
    float32 operands (IEEE dot, CUDA cores; 128 rows spill on sm_90): 64×128, BLOCK_D 32, 2 stages."""
    if interpreter:
        return dict(INTERPRETER_TILES, GROUP_M=2, num_warps=4, num_stages=1)
    if operand == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_D=32, GROUP_M=8, SPLIT=1, num_warps=8,
                    num_stages=2)
    if wide and cc >= 90:
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_D=64, GROUP_M=8, SPLIT=2, num_warps=8,
                    num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, GROUP_M=8, SPLIT=1, num_warps=8,
                num_stages=4 if cc >= 90 else 3)


def wide_flags(has_set: bool, with_tail: bool, with_ce: bool) -> bool:
    """Whether a launch with these flags gets the wide sm_90 tile (``head_config(wide=True)``):
    no CE term, and either the bucket tail with its set (the offline top-k forward) or no set
    (the online dense teacher's two heads). Every other flag (bias, softcap, statistics) free:
    ``scripts/compile_fused_head.py --wide-flags`` compiles them all. The others (the recomputing
    backward's values-at-S pass, ``tail="renormalize"``, CE mixing) spill a few bytes at 128×256
    and keep 128×128."""
    return not with_ce and (with_tail or not has_set)


def grad_config(block_n: int, interpreter: bool = False) -> dict:
    """``head_grad_kernel``: the stats kernel's BLOCK_N (one m_t per row per tile), 16 rows."""
    if interpreter:
        return dict(BLOCK_M=8, BLOCK_N=block_n, num_warps=4)
    return dict(BLOCK_M=16, BLOCK_N=block_n, num_warps=4)


def gemm_config(cc: int, operand: torch.dtype, tile_n: int, interpreter: bool = False) -> tuple[dict, dict]:
    """``(dh, dW)`` launch configurations of ``head_dh_kernel`` and ``head_dw_kernel`` (the
    gradient GEMMs that make dz from the tile, ``GRAD_IN_GEMMS``): the vocabulary step (BLOCK_K,
    BLOCK_V) divides the partial tiles' ``tile_n`` columns. 16-bit operands: 8 warps; sm_90
    128×256 output tiles (rows or vocabulary × D), 3 stages, steps of 32; sm_80/86/89 128×128,
    3 stages (2 on sm_86/89: 99 KB per block), dh's step 32 (64 spills), dW's 64. float32
    operands: 64×64, 2 stages. The wider tiles spill with more than 32-deep steps (the dz tile
    is live next to the accumulator)."""
    step = min(64, tile_n)
    if interpreter:
        return (dict(BLOCK_M=8, BLOCK_N=16, BLOCK_K=step, num_warps=4, num_stages=1),
                dict(BLOCK_V=step, BLOCK_N=16, BLOCK_C=8, num_warps=4, num_stages=1))
    if operand == torch.float32:
        return (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
                dict(BLOCK_V=64, BLOCK_N=64, BLOCK_C=32, num_warps=8, num_stages=2))
    if cc >= 90:  # 256 columns of D per program: dz made half as often, half the L2 reads of W/h
        return (dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=min(32, tile_n), num_warps=8, num_stages=3),
                dict(BLOCK_V=min(128, tile_n), BLOCK_N=256, BLOCK_C=32, num_warps=8, num_stages=3))
    stages = 3 if cc == 80 else 2
    return (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=min(32, tile_n), num_warps=8, num_stages=stages),
            dict(BLOCK_V=min(128, tile_n), BLOCK_N=128, BLOCK_C=64, num_warps=8, num_stages=stages))


def _interpreted(device: torch.device) -> bool:
    return device.type != "cuda"


def _cc(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


# While `recording()` is active the launchers append (kernel, grid, args, meta) instead of launching.
_RECORDED: Optional[list] = None
# The target the recorded launches are configured for (compile_specs sets it).
_RECORD_CC: Optional[int] = None


def _launch(kernel, grid, device, args, meta) -> None:
    if _RECORDED is not None:
        _RECORDED.append((kernel, args, meta))
        return
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[grid](*args, **meta)


def _config(device: torch.device, operand: torch.dtype, wide: bool) -> dict:
    if _RECORDED is not None and _RECORD_CC is not None:
        return head_config(_RECORD_CC, operand, wide=wide)
    if _interpreted(device):
        return head_config(0, operand, interpreter=True)
    return head_config(_cc(device), operand, wide=wide)


def tile_bounds(sorted_ids: Tensor, n_tiles: int, block_n: int) -> Tensor:
    """``(C, n_tiles + 1)`` int32: row n's ids in vocabulary tile t are its sorted slots
    ``[b[n, t], b[n, t + 1])`` (one ``searchsorted`` per chunk; no per-tile scan over K)."""
    edges = torch.arange(n_tiles + 1, device=sorted_ids.device, dtype=sorted_ids.dtype) * block_n
    return torch.searchsorted(sorted_ids, edges.expand(sorted_ids.shape[0], -1).contiguous(),
                              out_int32=True)


class HeadChunk:
    """The outputs of ``head_stats`` for one chunk: the 16-bit (float32) tile, the partials
    ``(6, C, n_tiles)``, the values z at S in sorted order ``(C, K)``, the CE target ``(C,)``, and
    the tile bounds of S (``tile_bounds``, or None without a set)."""

    def __init__(self, tile, partials, zs, target, block_n, bounds):
        self.tile, self.partials, self.zs, self.target = tile, partials, zs, target
        self.block_n, self.bounds = block_n, bounds


def tile_dtype(operand: torch.dtype) -> torch.dtype:
    """float16 tiles for 16-bit operands, float32 for float32 operands."""
    return torch.float16 if operand in (torch.float16, torch.bfloat16) else torch.float32


def head_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], sorted_ids: Optional[Tensor],
               labels: Optional[Tensor], inv_temp: float, cap: float, with_tail: bool,
               with_ce: bool, separate_ce: bool, with_stats: bool,
               tile: Optional[Tensor] = None, reference: Optional[Tensor] = None,
               flags: Optional[Tensor] = None) -> HeadChunk:
    """GEMM 1 of a chunk with its statistics: ``hidden (C, D)`` and ``weight (V, D)`` in the operand
    dtype (float16, bfloat16 or float32), ``bias (V,)`` float32 or None, ``sorted_ids (C, K)`` int32
    ascending (unused slots ``>= V`` or ``< 0``) or None, ``labels (C,)`` in range (with
    ``with_ce``). ``tile`` an optional reused ``(≥C, V)`` buffer of ``tile_dtype``.
    ``reference (C,)`` float32: store the scaled tile ``G = e^{z − R}·softcap'`` (see
    ``scaled_grad``) in ``tile``, which must then be bfloat16 or float32, instead of ``y``.
    ``flags (C,)`` int8: only the program tiles with a flagged row run (the others return at
    once); the rest of the tile and the outputs are left as they are."""
    _check_operands(hidden, weight, bias)
    c, d = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    k = 0 if sorted_ids is None else sorted_ids.shape[1]
    if sorted_ids is not None:
        _check_2d("sorted_ids", sorted_ids, (c, k), (torch.int32,), device)
    if with_ce:
        _check_2d("labels", labels, (c,), (torch.int32, torch.int64), device)
    if reference is not None:
        _check_2d("reference", reference, (c,), (torch.float32,), device)
        if tile is None or tile.dtype not in (torch.bfloat16, torch.float32):
            raise TypeError("head_stats: a reference needs a bfloat16 or float32 tile for the scaled "
                            f"tile G = e^(z - R), got {None if tile is None else tile.dtype}")
    if flags is not None:
        _check_2d("flags", flags, (c,), (torch.int8,), device)
    cfg = _config(device, hidden.dtype, wide_flags(k > 0, with_tail, with_ce))
    bn = cfg["BLOCK_N"] // cfg["SPLIT"]  # columns per partial-statistics tile
    n_tiles = triton.cdiv(vocab, bn)
    if tile is None:
        tile = torch.empty((c, vocab), dtype=tile_dtype(hidden.dtype), device=device)
    else:
        tile = tile[:c]
    partials = torch.empty((N_PARTIALS, c, n_tiles), dtype=torch.float32, device=device)
    zs = torch.zeros((c, max(k, 1)), dtype=torch.float32, device=device)
    target = torch.zeros(c, dtype=torch.float32, device=device)
    has_set = k > 0
    bounds = tile_bounds(sorted_ids, n_tiles, bn) if has_set else None
    if c == 0:
        return HeadChunk(tile, partials, zs[:, :k], target, bn, bounds)
    # int32 stand-ins without a set or labels: with float32 ones the launch without a set (the
    # online teacher's heads) failed to compile for the GPU (TypeError on the set's loop bounds)
    unused = torch.zeros((c, 1), dtype=torch.int32, device=device)
    ids = sorted_ids if has_set else unused
    bnd = bounds if has_set else unused
    args = (hidden, weight, zs if bias is None else bias, ids, bnd, labels if with_ce else unused, tile,
            partials, zs, target, target if reference is None else reference,
            target if flags is None else flags,
            c, vocab, d, n_tiles,
            hidden.stride(0), weight.stride(0), ids.stride(0), bnd.stride(0), tile.stride(0),
            n_tiles, zs.stride(0),
            float(inv_temp), float(cap) if cap else 1.0)
    meta = dict(HAS_BIAS=bias is not None, HAS_CAP=bool(cap), HAS_SET=has_set,
                WITH_TAIL=bool(with_tail), WITH_CE=bool(with_ce),
                SEPARATE_CE=bool(with_ce) and bool(separate_ce), WITH_STATS=bool(with_stats),
                SCALED=reference is not None, ONLY_FLAGGED=flags is not None,
                PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32", **cfg)
    grid = (triton.cdiv(c, cfg["BLOCK_M"]) * triton.cdiv(vocab, cfg["BLOCK_N"]),)
    _launch(head_stats_kernel, grid, device, args, meta)
    return HeadChunk(tile, partials, zs[:, :k], target, bn, bounds)


def _lse_of(m: Tensor, sums: Tensor) -> Tensor:
    """``log Σ_t sums_t·e^{m_t}`` per row, against the row's largest ``m_t``; −inf for a zero sum."""
    top = m.amax(dim=1, keepdim=True)
    return top.squeeze(1) + torch.log((sums * torch.exp(m - top)).sum(dim=1))


def combine(chunk: HeadChunk, with_tail: bool, with_ce: bool, separate_ce: bool,
            with_stats: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(lse, tail_lse, lse_ce, mean_z)`` per row from the partials (float32; None when not asked)."""
    p = chunk.partials
    m, sums = p[_M], p[_SUM]
    lse = _lse_of(m, sums)
    tail_lse = _lse_of(m, p[_TAIL]) if with_tail else None
    lse_ce = None
    if with_ce:
        lse_ce = _lse_of(p[_MCE], p[_SCE]) if separate_ce else lse
    mean_z = None
    if with_stats:
        top = m.amax(dim=1, keepdim=True)
        weight = torch.exp(m - lse.unsqueeze(1))
        mean_z = top.squeeze(1) + (weight * (p[_ENT] + (m - top) * sums)).sum(dim=1)
    return lse, tail_lse, lse_ce, mean_z


def head_grad(chunk: HeadChunk, sorted_ids: Optional[Tensor], sorted_values: Optional[Tensor],
              kd_lse: Tensor, dense_scale: Optional[Tensor], lse_ce: Optional[Tensor],
              ce_scale: Optional[Tensor], labels: Optional[Tensor], temperature: float, cap: float,
              with_tail: bool, with_ce: bool, out: Tensor) -> Tensor:
    """``dz`` of a chunk from its tile into ``out`` (C, V) — the tile itself, or a view of it as
    bfloat16, for in place. Per-row vectors float32 ``(C,)``; ``sorted_values (C, K)`` float32."""
    tile = chunk.tile
    c, vocab = tile.shape
    device = tile.device
    k = 0 if sorted_ids is None else sorted_ids.shape[1]
    _check_2d("out", out, (c, vocab), (torch.float16, torch.bfloat16, torch.float32), device)
    if c == 0:
        return out
    zero = kd_lse.new_zeros(c)
    rows = torch.stack([kd_lse, dense_scale if with_tail else zero, lse_ce if with_ce else zero,
                        ce_scale if with_ce else zero]).to(torch.float32).contiguous()
    has_set = k > 0
    ids = sorted_ids if has_set else rows
    bnd = chunk.bounds if has_set else rows
    values = sorted_values.to(torch.float32).contiguous() if has_set else rows
    n_tiles = chunk.partials.shape[2]
    cfg = grad_config(chunk.block_n, _interpreted(device) and _RECORDED is None)
    args = (tile, chunk.partials, out, ids, bnd, values, rows, labels if with_ce else rows,
            c, vocab,
            tile.stride(0), n_tiles, out.stride(0), ids.stride(0), bnd.stride(0), values.stride(0),
            float(temperature), float(cap) if cap else 1.0)
    meta = dict(HAS_CAP=bool(cap), WITH_TAIL=bool(with_tail), HAS_SET=has_set,
                WITH_CE=bool(with_ce), **cfg)
    grid = (triton.cdiv(c, cfg["BLOCK_M"]), n_tiles)
    _launch(head_grad_kernel, grid, device, args, meta)
    return out


# Whether the fused plan makes dz inside its gradient GEMMs (``head_dh_kernel``, ``head_dw_kernel``:
# no gradient pass, no dz written) instead of the gradient pass and torch's GEMMs. Off by default:
# the cost model (``bench/model.py``, ``fused_head(grad_in_gemms=True)``) shows it at the floor, but
# no GPU has timed these Triton GEMMs against cuBLAS yet.
GRAD_IN_GEMMS = False


def head_grad_gemms(chunk: HeadChunk, sorted_ids: Optional[Tensor], sorted_values: Optional[Tensor],
                    kd_lse: Tensor, dense_scale: Optional[Tensor], lse_ce: Optional[Tensor],
                    ce_scale: Optional[Tensor], labels: Optional[Tensor], temperature: float,
                    cap: float, with_tail: bool, with_ce: bool, weight: Tensor, hidden: Tensor,
                    dh: Tensor, dw: Tensor, db: Optional[Tensor], accumulate: bool) -> None:
    """``dh = dz·W`` into ``dh (C, D)`` and ``dw (V, D)`` float32 (+)= ``dzᵀ·h`` (``accumulate``),
    ``db (V,)`` float32 += Σ_rows dz, with dz made from the chunk's tile inside both GEMMs (the
    arguments of ``head_grad``; ``weight (V, D)``, ``hidden (C, D)`` in the operand dtype)."""
    tile = chunk.tile
    c, vocab = tile.shape
    device = tile.device
    dim = weight.shape[1]
    k = 0 if sorted_ids is None else sorted_ids.shape[1]
    _check_operands(hidden, weight, None)
    _check_2d("dh", dh, (c, dim), (torch.float16, torch.bfloat16, torch.float32), device)
    _check_2d("dw", dw, (vocab, dim), (torch.float32,), device)
    if db is not None:
        _check_2d("db", db, (vocab,), (torch.float32,), device)
    if c == 0:
        return
    zero = kd_lse.new_zeros(c)
    rows = torch.stack([kd_lse, dense_scale if with_tail else zero, lse_ce if with_ce else zero,
                        ce_scale if with_ce else zero]).to(torch.float32).contiguous()
    has_set = k > 0
    unused = torch.zeros((c, 1), dtype=torch.int32, device=device)
    ids = sorted_ids if has_set else unused
    bnd = chunk.bounds if has_set else unused
    values = sorted_values.to(torch.float32).contiguous() if has_set else rows
    n_tiles = chunk.partials.shape[2]
    if _RECORDED is not None and _RECORD_CC is not None:
        dh_cfg, dw_cfg = gemm_config(_RECORD_CC, hidden.dtype, chunk.block_n)
    elif _interpreted(device):
        dh_cfg, dw_cfg = gemm_config(0, hidden.dtype, chunk.block_n, interpreter=True)
    else:
        dh_cfg, dw_cfg = gemm_config(_cc(device), hidden.dtype, chunk.block_n)
    flags = dict(HAS_CAP=bool(cap), WITH_TAIL=bool(with_tail), HAS_SET=has_set,
                 WITH_CE=bool(with_ce), PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
                 TILE_N=chunk.block_n)
    common = (ids, bnd, values, rows, labels if with_ce else unused)
    strides = (ids.stride(0), bnd.stride(0), values.stride(0))
    meta = (float(temperature), float(cap) if cap else 1.0)
    _launch(head_dh_kernel, (triton.cdiv(c, dh_cfg["BLOCK_M"]), triton.cdiv(dim, dh_cfg["BLOCK_N"])),
            device, (tile, chunk.partials, weight, dh) + common + (c, vocab, dim, tile.stride(0), n_tiles,
                     weight.stride(0), dh.stride(0)) + strides + meta, dict(flags, **dh_cfg))
    _launch(head_dw_kernel, (triton.cdiv(vocab, dw_cfg["BLOCK_V"]), triton.cdiv(dim, dw_cfg["BLOCK_N"])),
            device, (tile, chunk.partials, hidden, dw, dw if db is None else db) + common
            + (c, vocab, dim, tile.stride(0), n_tiles, hidden.stride(0), dw.stride(0)) + strides + meta,
            dict(flags, ACCUMULATE=bool(accumulate), WITH_BIAS=db is not None, **dw_cfg))


# The scaled tile (the default for bfloat16 operands on tensor cores, ``SCALED_TILE = "auto"``):
# GEMM 1 stores G = e^{z − R}·softcap' (R per row, near the row's max) instead of y, so that off S
# every dz is σ_r·G (the bucket tail's p·dense and CE's p at τ = 1 are both per-row multiples of
# e^z); S and the CE label are written into G as dz/σ_r (C·(K + 1) entries); then
# dh = σ ⊙ (G·W) and dW += Gᵀ·(σ ⊙ h) are plain cuBLAS GEMMs. No gradient pass (the 2 + 2 B per
# logit that kept Qwen2.5's thin head at 1.14x the floor), no exp in the GEMMs (GRAD_IN_GEMMS).
# bfloat16 only: G spans e^{−87}..e^{64} with 8 bits of mantissa everywhere; float16's range
# (e^{−17}..e^{11}) cannot. True: wherever eligible (the interpreter tests, any operand dtype);
# False: never.
SCALED_TILE = "auto"
# The reference R: the student's logits at the teacher's first PROBE_IDS ids, computed before
# GEMM 1 (FusedPass.probe); GEMM 1 runs again for a chunk where a counted row's max z exceeds it by
# more than REF_WINDOW (then G would lose the entries that carry probability to underflow).
PROBE_IDS = 4
REF_WINDOW = 40.0
# A row whose σ_r is below 2⁻¹¹⁰ of its largest value on S (dz/σ_r would approach bfloat16's
# overflow; σ_r = 0 with values on S) drops its part off S: with max z − R ≤ REF_WINDOW every
# G ≤ e⁴⁰, so that part totals < 2⁻³⁰ of the largest value (V < 2²⁰). GEMM 1 writes its G again
# against R = +inf (G = 0 off S) and σ_r is taken as 1.
_SIGMA_RATIO = 2.0**-110


def scaled_grad(g: Tensor, chunk: HeadChunk, sorted_ids: Optional[Tensor], sorted_values: Tensor,
                kd_lse: Tensor, dense_scale: Optional[Tensor], lse_ce: Optional[Tensor],
                ce_scale: Optional[Tensor], labels: Optional[Tensor], temperature: float, cap: float,
                with_tail: bool, with_ce: bool, reference: Tensor, head, hidden: Tensor, grads,
                rows: slice, rerun) -> Tensor:
    """A chunk's gradients from its scaled tile ``g (C, V)`` (``G = e^{z − R}·softcap'``, written
    by ``head_stats`` against ``reference``), the arguments of ``head_grad`` (CE only at τ = 1),
    into ``grads`` (``chunked._Grads``, rows ``rows``) through ``head`` (``chunked._Head``):

        σ_r   = dense_r·e^{R − kd_lse} + ce_r·e^{R − lse_ce}            (dz = σ_r·G off S and label)
        G[S]  = (value on S + CE term)·softcap' / σ_r,  G[label] likewise where label ∉ S
        dh    = σ ⊙ (G·W)   (float32 out, then the hidden's dtype),   dW += Gᵀ·(σ ⊙ h),
        db   += σᵀ·G

    Rows whose max z lies more than ``REF_WINDOW`` above R (their G lost what carries probability
    to underflow) take their own max as R, rows with a tiny σ (``_SIGMA_RATIO``) R = +inf:
    ``rerun(reference, flags)`` runs GEMM 1 again for the program tiles with such a row only (all
    on the device: no host sync). ``g`` is overwritten on S and the label. Returns the number of
    rows written again (a device scalar)."""
    from .torch_epilogue import _set_at_
    c, vocab = g.shape
    acc = torch.float32
    zero = kd_lse.new_zeros(c)

    def sigma_at(ref):
        sigma = zero
        if with_tail:
            sigma = torch.where(dense_scale != 0, dense_scale * torch.exp(ref - kd_lse), 0.0)
        if with_ce:
            sigma = sigma + torch.where(ce_scale != 0, ce_scale * torch.exp(ref - lse_ce), 0.0)
        return sigma

    def softcap_grad(z):
        return 1.0 - (z * (temperature / cap)) ** 2 if cap else 1.0

    # the entries written into G: S in sorted order (a repeated id takes the value of its last
    # slot, as the gradient pass's set), then the label where it is not in S
    ids, values, z_s = sorted_ids, sorted_values, chunk.zs
    valid = ids < vocab
    if ids.shape[1]:
        last = torch.searchsorted(ids, ids, right=True) - 1  # the last slot of each id's run
        values, z_s = values.gather(1, last), z_s.gather(1, last)
    if with_ce:
        label = labels.to(ids.dtype)
        values = values + ce_scale.unsqueeze(1) * (torch.exp(z_s - lse_ce.unsqueeze(1))
                                                   - (ids == label.unsqueeze(1)).to(acc))
        z_label = chunk.target  # τ = 1: z = s
        v_label = ce_scale * (torch.exp(z_label - lse_ce) - 1.0)
        if with_tail:
            v_label = v_label + dense_scale * torch.exp(z_label - kd_lse)
        ids = torch.cat([ids, label.unsqueeze(1)], dim=1)
        values = torch.cat([values * softcap_grad(z_s), (v_label * softcap_grad(z_label)).unsqueeze(1)],
                           dim=1)
        valid = torch.cat([valid, ~(sorted_ids == label.unsqueeze(1)).any(dim=1, keepdim=True)], dim=1)
    else:
        values = values * softcap_grad(z_s)
    values = torch.where(valid, values, 0.0)
    largest = values.abs().amax(dim=1) if values.shape[1] else zero
    live = largest > 0
    if with_tail:
        live = live | (dense_scale != 0)
    if with_ce:
        live = live | (ce_scale != 0)
    top = chunk.partials[_M].amax(dim=1)
    far = live & ~(top - reference <= REF_WINDOW)
    reference = torch.where(far, torch.where(torch.isfinite(top), top, 0.0), reference)
    sigma = sigma_at(reference)
    tiny = (largest > 0) & (sigma.abs() < _SIGMA_RATIO * largest)  # a NaN σ stays: NaN out
    reference = torch.where(tiny, float("inf"), reference)
    sigma = torch.where(tiny, 1.0, sigma)
    flags = (far | tiny).to(torch.int8)
    rerun(reference.contiguous(), flags)
    nonzero = (sigma != 0).unsqueeze(1)
    scaled = torch.where(nonzero, values / torch.where(nonzero, sigma.unsqueeze(1), 1.0), 0.0)
    if ids.shape[1]:  # one value per position: deterministic, and no host sync
        _set_at_(g, ids.clamp(max=vocab - 1).long(), valid, scaled)

    g_op = g if head.tensor_cores else g.to(head.acc)
    dh = torch.empty((c, head.weight.shape[1]), dtype=acc, device=g.device)
    head.grad_hidden(g_op, dh)
    torch.mul(dh, sigma.unsqueeze(1), out=grads.hidden[rows])
    del dh
    if grads.weight is not None:  # σ ⊙ h rounded once to G's dtype (computed in float32)
        h_scaled = torch.empty(hidden.shape, dtype=g.dtype, device=g.device)
        torch.mul(hidden.detach(), sigma.unsqueeze(1), out=h_scaled)
        if not head.tensor_cores:
            h_scaled = h_scaled.to(head.acc)
        head.add_grad_weight(grads.weight, g_op, h_scaled, first=grads.first)
        grads.first = False
    if grads.bias is not None:
        if head.tensor_cores:
            grads.bias += torch.mm(sigma.to(g.dtype).unsqueeze(0), g_op, out_dtype=acc).squeeze(0)
        else:
            grads.bias += (sigma.to(g_op.dtype).unsqueeze(0) @ g_op).squeeze(0).to(acc)
    return flags.sum()


# ------------------------------------------------------------------------------------------------
# argument checks (before any kernel runs)
# ------------------------------------------------------------------------------------------------

def _check_2d(name, x, shape, dtypes, device) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {dtypes}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device}, got {x.device}")
    if x.dim() == 2 and x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must have unit column stride, got strides {tuple(x.stride())}")


def _check_operands(hidden, weight, bias) -> None:
    ok = (torch.float16, torch.bfloat16, torch.float32)
    if not isinstance(hidden, Tensor) or hidden.dim() != 2:
        raise ValueError("hidden must be a 2-D tensor (rows, D)")
    if hidden.dtype not in ok:
        raise TypeError(f"hidden must be float16, bfloat16 or float32, got {hidden.dtype}")
    _check_2d("weight", weight, (weight.shape[0], hidden.shape[1]), (hidden.dtype,), hidden.device)
    if hidden.shape[1] > 1 and hidden.stride(1) != 1:
        raise ValueError(f"hidden must have unit column stride, got strides {tuple(hidden.stride())}")
    if bias is not None:
        _check_2d("bias", bias, (weight.shape[0],), (torch.float32,), hidden.device)


# ------------------------------------------------------------------------------------------------
# what the offline compile lane compiles
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def recording(cc: int = 90):
    """Within the block the launchers record ``(kernel, args, meta)`` for target ``cc`` instead of
    launching (argument checks still run)."""
    global _RECORDED, _RECORD_CC
    previous = (_RECORDED, _RECORD_CC)
    _RECORDED, _RECORD_CC = [], cc
    try:
        yield _RECORDED
    finally:
        _RECORDED, _RECORD_CC = previous


def compile_specs(cc: int = 90, vocab: int = 128256, dim: int = 4096, k: int = 64,
                  dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """The launches of a chunk with every option on (bias, softcap, tail, CE at τ ≠ 1, stats; dz
    written as ``dtype`` when 16-bit; the gradient GEMMs that make dz themselves; the dense pair's
    divergence and gradient modes for JSD), the
    recomputing backward's statistics pass, the forward without CE and the online teacher's head
    (the last two: the wide tile on sm_90),
    configured for ``cc``, as the dicts
    ``triton_epilogue.compile_specs`` gives. Recorded on CPU tensors: nothing runs."""
    from .triton_epilogue import _compile_spec
    rows = 2
    hidden = torch.zeros((rows, dim), dtype=dtype)
    weight = torch.zeros((vocab, dim), dtype=dtype)
    bias = torch.zeros(vocab, dtype=torch.float32)
    ids = torch.arange(k, dtype=torch.int32).repeat(rows, 1)
    labels = torch.zeros(rows, dtype=torch.int64)
    vec = torch.zeros(rows, dtype=torch.float32)
    with recording(cc) as launches:
        chunk = head_stats(hidden, weight, bias, ids, labels, 0.5, 30.0, True, True, True, True)
        # the recomputing backward's pass (values at S only) and the offline forward without CE:
        # on sm_90 the second is the wide tile (``wide_flags``), the first never is
        head_stats(hidden, weight, bias, ids, None, 0.5, 30.0, False, False, False, False)
        head_stats(hidden, weight, bias, ids, None, 0.5, 30.0, True, False, False, True)
        head_stats(hidden, weight, None, None, None, 0.5, 30.0, False, False, False, False)  # a teacher
        if dtype != torch.float16:  # the scaled tile (bfloat16 G; float32 operands: float32 G)
            g = chunk.tile if dtype == torch.float32 else chunk.tile.view(torch.bfloat16)
            # summing forward (wide on sm_90), with CE at τ = 1, the chunk's rerun against its
            # rows' max, the recomputing backward with CE
            head_stats(hidden, weight, bias, ids, None, 0.5, 30.0, True, False, False, True, tile=g,
                       reference=vec)
            head_stats(hidden, weight, bias, ids, labels, 1.0, 30.0, True, True, False, True, tile=g,
                       reference=vec)
            head_stats(hidden, weight, bias, None, None, 1.0, 30.0, False, False, False, False,
                       tile=g, reference=vec, flags=torch.zeros(rows, dtype=torch.int8))
            head_stats(hidden, weight, bias, ids, labels, 1.0, 30.0, False, True, False, False,
                       tile=g, reference=vec)
        out = chunk.tile if dtype != torch.bfloat16 else chunk.tile.view(torch.bfloat16)
        head_grad(chunk, ids, torch.zeros((rows, k)), vec, vec, vec, vec, labels, 2.0, 30.0,
                  True, True, out)
        head_grad_gemms(chunk, ids, torch.zeros((rows, k)), vec, vec, vec, vec, labels, 2.0, 30.0,
                        True, True, weight, hidden, torch.zeros((rows, dim), dtype=dtype),
                        torch.zeros((vocab, dim)), bias, accumulate=True)
        state = torch.zeros((6, rows), dtype=torch.float32)
        dense_pair(chunk, chunk, state, labels, 2, 0.5, 2.0, 30.0, True)  # JSD: every term
        dense_pair(chunk, chunk, state, labels, 2, 0.5, 2.0, 30.0, True, out=out)
    return [_compile_spec(*launch) for launch in launches]


def wide_specs(cc: int = 90, vocab: int = 128256, dim: int = 4096, k: int = 64,
               dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Every ``head_stats_kernel`` flag set that ``wide_flags`` sends to the wide sm_90 tile (bias,
    softcap and statistics on or off; with the set and its tail, or without a set), recorded for
    ``cc`` as ``compile_specs`` records them (``scripts/compile_fused_head.py --wide-flags``)."""
    from .triton_epilogue import _compile_spec
    rows = 2
    hidden = torch.zeros((rows, dim), dtype=dtype)
    weight = torch.zeros((vocab, dim), dtype=dtype)
    ids = torch.arange(k, dtype=torch.int32).repeat(rows, 1)
    scaled = dict(tile=torch.zeros((rows, vocab), dtype=torch.bfloat16),
                  reference=torch.zeros(rows, dtype=torch.float32))
    rerun = dict(scaled, flags=torch.zeros(rows, dtype=torch.int8))
    with recording(cc) as launches:
        for with_bias in (False, True):
            bias = torch.zeros(vocab, dtype=torch.float32) if with_bias else None
            for cap in (0.0, 30.0):
                for stats in (False, True):
                    head_stats(hidden, weight, bias, ids, None, 0.5, cap, True, False, False, stats)
                    head_stats(hidden, weight, bias, None, None, 0.5, cap, False, False, False, stats)
                    if dtype == torch.bfloat16:  # the scaled tile: forward, and the chunk's rerun
                        head_stats(hidden, weight, bias, ids, None, 0.5, cap, True, False, False,
                                   stats, **scaled)
                        if not stats:  # the rerun of flagged rows' program tiles
                            head_stats(hidden, weight, bias, None, None, 0.5, cap, False, False,
                                       False, False, **rerun)
    return [_compile_spec(*launch) for launch in launches]


# ------------------------------------------------------------------------------------------------
# the plan with the fused head: offline top-k (chunked.topk_forward / topk_backward dispatch here)
# ------------------------------------------------------------------------------------------------

class _FusedPass:
    """Set-up shared by the forward and the recomputing backward: the student's head, counted rows,
    the chunk height (a 16-bit tile per element, plus a float32 dz block where dz cannot go in
    place: the CPU, float32 operands keep dz in the tile itself) and the reused buffers."""

    def __init__(self, hidden, weight, bias, labels, ignore_index, chunk_bytes, operand, heads=1,
                 grad_flags=None):
        from . import chunked
        from .torch_backend import counted_rows
        if operand not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"epilogue='fused' takes float16, bfloat16 or float32 operands, got {operand}")
        self.n_rows, self.vocab = hidden.shape[0], weight.shape[0]
        self.head = chunked._Head(weight, bias, operand)
        self.operand = operand
        # the kernel's operands in the operand dtype (on CUDA the head's own copy)
        weight_k = self.head.weight if self.head.tensor_cores else weight.detach().to(operand)
        self.weight_k = weight_k.contiguous()
        self.bias_k = None if bias is None else self.head.bias.to(torch.float32)
        self.counted = counted_rows(labels, self.n_rows, ignore_index, hidden.device)
        self.safe_labels = None if labels is None else torch.where(self.counted, labels, 0).long().contiguous()
        tdtype = tile_dtype(operand)
        self.in_place = self.head.tensor_cores or tdtype == torch.float32
        per_element = torch.finfo(tdtype).bits // 8 + (0 if self.in_place else 4)
        # the scaled tile for this call's gradient (``grad_flags``: with_tail, use_ce, temperature)
        self.use_scaled = grad_flags is not None and self.scaled(*grad_flags)
        # per row and head: the tile (and a float32 dz where not in place), and per 128-column tile
        # the float32 partials and the two int32 bounds of S; with the scaled tile the float32 dh
        # and the 16-bit σ ⊙ h per row (scaled_grad): all of it within the budget
        row_bytes = heads * (self.vocab * per_element + triton.cdiv(self.vocab, 128) * (N_PARTIALS + 2) * 4)
        if self.use_scaled:
            row_bytes += hidden.shape[1] * (4 + 2)
        self.step = chunked.chunk_rows(self.n_rows, row_bytes, 1, chunk_bytes, device=hidden.device)
        shape = (min(self.step, self.n_rows), self.vocab)
        self.tile = torch.empty(shape, dtype=tdtype, device=hidden.device)
        self.out = None if self.in_place else torch.empty(shape, dtype=torch.float32, device=hidden.device)

    def chunks(self):
        for start in range(0, self.n_rows, self.step):
            yield slice(start, min(self.n_rows, start + self.step))

    def labels(self, rows):
        return None if self.safe_labels is None else self.safe_labels[rows]

    def stats(self, hidden, rows, sorted_ids, temperature, softcap, with_tail, use_ce, with_stats,
              reference=None, flags=None):
        h_k = hidden[rows].detach().to(self.operand).contiguous()
        return head_stats(h_k, self.weight_k, self.bias_k, sorted_ids, self.labels(rows),
                          1.0 / temperature, softcap or 0.0, with_tail, use_ce,
                          use_ce and temperature != 1.0, with_stats, tile=self.scaled_tile(reference),
                          reference=reference, flags=flags)

    def scaled_tile(self, reference):
        """The tile buffer as the stats kernel writes it: ``y`` (float16 or float32), or the scaled
        tile ``G`` (bfloat16 through a view of the 16-bit buffer, float32 as is)."""
        if reference is None or self.tile.dtype == torch.float32:
            return self.tile
        return self.tile.view(torch.bfloat16)

    def scaled(self, with_tail, use_ce, temperature) -> bool:
        """Whether this chunk's gradient takes the scaled tile (``SCALED_TILE``, ``scaled_grad``):
        the dense part of dz off S must be a per-row multiple of ``e^z`` (the bucket tail, CE at
        τ = 1, or both; not CE at τ ≠ 1, whose softmax is of ``τ·z``)."""
        if GRAD_IN_GEMMS or not (with_tail or use_ce) or (use_ce and temperature != 1.0):
            return False
        if self.head.tensor_cores and self.operand != torch.bfloat16:
            return False  # G is bfloat16, and cuBLAS takes one operand dtype
        if SCALED_TILE == "auto":
            return self.head.tensor_cores and self.operand == torch.bfloat16
        return bool(SCALED_TILE)

    def probe(self, hidden, rows, ids, temperature, softcap):
        """The reference ``R`` per row for the scaled tile before GEMM 1 has run: the largest of
        the student's logits ``z`` at the teacher's first ``PROBE_IDS`` ids (−inf where none is
        valid), ``C·PROBE_IDS`` gathered rows of W. ``scaled_grad`` checks it against the row's
        true max."""
        ids = ids[:, :PROBE_IDS]
        valid = (ids >= 0) & (ids < self.vocab)
        safe = torch.where(valid, ids, 0)
        h_k = hidden[rows].detach().to(self.operand).unsqueeze(2)
        if not self.head.tensor_cores:
            h_k = h_k.to(torch.float32)
        x = torch.empty(safe.shape, dtype=torch.float32, device=safe.device)
        for j in range(safe.shape[1]):  # one (C, D) gather at a time
            w_j = self.weight_k[safe[:, j]].unsqueeze(1).to(h_k.dtype)
            x[:, j] = torch.bmm(w_j, h_k).view(-1)
        if self.bias_k is not None:
            x = x + self.bias_k[safe]
        if softcap:
            x = softcap * torch.tanh(x / softcap)
        return torch.where(valid, x / temperature, float("-inf")).amax(dim=1)

    def dz_buffer(self, chunk, rows):
        """Where a chunk's dz goes: over its tile (bfloat16 through a view) or a float32 block."""
        if self.out is not None:
            return self.out[: rows.stop - rows.start]
        return chunk.tile.view(torch.bfloat16) if self.operand == torch.bfloat16 else chunk.tile

    def grad(self, grads, hidden, chunk, rows, sorted_ids, perm, topk_logits, topk_weights, valid,
             kd_lse, dense, topk_coef, kd_scale, lse_ce, ce_scale, temperature, softcap, with_tail,
             use_ce, tail_mass, reference=None):
        """A chunk's dz into ``grads`` (``chunked._Grads``): with a ``reference`` (the chunk's tile
        is the scaled tile) ``scaled_grad``; else the gradient pass then the plan's GEMMs, or,
        with ``GRAD_IN_GEMMS`` and a weight gradient, dz made inside the two Triton gradient
        GEMMs (``head_grad_gemms``)."""
        from . import chunked
        p_topk = torch.exp(topk_logits - kd_lse.unsqueeze(1))
        on_topk = kd_scale.unsqueeze(1) * (topk_weights - p_topk * topk_coef.unsqueeze(1))
        on_topk = torch.where(valid, on_topk, 0.0).gather(1, perm).to(torch.float32)
        dense_scale = (kd_scale * dense).to(torch.float32)
        if with_tail:  # the residual along p (chunked.projected)
            on_topk, dense_scale = chunked.projected(on_topk, dense_scale, tail_mass, sorted_ids,
                                                     p_topk.gather(1, perm).to(torch.float32),
                                                     self.vocab)
        args = (sorted_ids, on_topk, kd_lse.to(torch.float32),
                dense_scale if with_tail else None,
                lse_ce.to(torch.float32) if use_ce else None,
                ce_scale.to(torch.float32) if use_ce else None,
                self.labels(rows) if use_ce else None, temperature, softcap or 0.0, with_tail, use_ce)
        if reference is not None:
            g = self.scaled_tile(reference)[: rows.stop - rows.start]

            def rerun(ref, flags):
                self.stats(hidden, rows, None, temperature, softcap, False, False, False,
                           reference=ref, flags=flags)

            scaled_grad(g, chunk, *args, reference, self.head, hidden[rows], grads, rows, rerun)
            return
        if GRAD_IN_GEMMS and grads.weight is not None:
            h_k = hidden[rows].detach().to(self.operand).contiguous()
            head_grad_gemms(chunk, *args, self.weight_k, h_k, grads.hidden[rows], grads.weight,
                            grads.bias, accumulate=not grads.first)
            grads.first = False
            return
        dz = head_grad(chunk, *args, self.dz_buffer(chunk, rows))
        grads.add(rows, dz, self.head.cast(hidden[rows]))


def _unsort(sorted_values: Tensor, perm: Tensor) -> Tensor:
    """Values in the order of the teacher's ids from their sorted order (``sorted = x.gather(1, perm)``)."""
    return torch.empty_like(sorted_values).scatter_(1, perm, sorted_values)


def topk_forward(hidden, weight, bias, teacher_ids, teacher_logprobs, labels, divergence, beta,
                 tail, temperature, softcap, ignore_index, ce_weight, kd_weight, chunk_bytes,
                 with_stats, grads_in_forward, weight_grad, operand_dtype):
    """``chunked.topk_forward`` for an offline teacher with the fused head: same outputs."""
    from . import chunked
    from .. import divergences as dv
    from .torch_backend import _topk_epilogue, sorted_topk_ids
    use_ce, with_tail = ce_weight != 0.0, tail == "bucket"
    ps = _FusedPass(hidden, weight, bias, labels, ignore_index, chunk_bytes, operand_dtype,
                    grad_flags=(with_tail, use_ce, temperature) if grads_in_forward else None)
    n_rows, vocab, counted = ps.n_rows, ps.vocab, ps.counted
    acc = torch.float32
    k = teacher_ids.shape[1]
    f = dict(dtype=acc, device=hidden.device)
    lse, lse_ce, target, kd_rows = (torch.zeros(n_rows, **f) for _ in range(4))
    state = torch.zeros((n_rows, 5), **f)
    topk_weights = torch.zeros((n_rows, k), **f)
    stats = torch.zeros((n_rows if with_stats else 0, 3), **f)
    kd_scale = counted.to(acc) * (kd_weight * temperature)
    ce_scale = counted.to(acc) * ce_weight
    grads = chunked._Grads(hidden, weight, bias, ps.head, weight_grad) if grads_in_forward else None
    scaled = grads is not None and ps.use_scaled
    reference = None
    for rows in ps.chunks():
        ids_c, logprobs_c = teacher_ids[rows], teacher_logprobs[rows].to(acc)
        valid_c = ids_c >= 0
        sorted_ids, perm = sorted_topk_ids(ids_c, vocab)
        if scaled:
            reference = ps.probe(hidden, rows, ids_c, temperature, softcap)
        chunk = ps.stats(hidden, rows, sorted_ids, temperature, softcap, with_tail, use_ce,
                         with_stats, reference=reference)
        lse_c, tail_c, lse_ce_c, mean_z_c = combine(chunk, with_tail, use_ce,
                                                    use_ce and temperature != 1.0, with_stats)
        topk_logits = torch.where(valid_c, _unsort(chunk.zs, perm), 0.0)
        lse[rows] = lse_c
        if use_ce:
            target[rows], lse_ce[rows] = chunk.target, lse_ce_c
        kd, w, kd_lse, dense, topk_coef = _topk_epilogue(
            topk_logits, lse_c, tail_c, logprobs_c, None, valid_c, tail, divergence, beta)
        kd_rows[rows] = kd
        topk_weights[rows] = w
        state[rows, chunked._KD_LSE], state[rows, chunked._DENSE_COEF] = kd_lse, dense
        state[rows, chunked._TOPK_COEF] = topk_coef
        if with_tail:
            state[rows, chunked._TAIL_MASS] = torch.exp(tail_c - kd_lse)
        if with_stats:
            topk_mass = dv.masked_logsumexp(topk_logits, valid_c).sub(lse_c).exp()
            stats[rows] = torch.stack([lse_c - mean_z_c, lse_c, topk_mass], dim=1)
        if grads is not None:
            ps.grad(grads, hidden, chunk, rows, sorted_ids, perm, topk_logits, w, valid_c, kd_lse,
                    dense, topk_coef, kd_scale[rows], lse_ce_c, ce_scale[rows], temperature,
                    softcap, with_tail, use_ce, state[rows, chunked._TAIL_MASS], reference=reference)
    state[:, chunked._LSE_CE] = lse_ce
    zero = torch.zeros((), **f)
    kd_rows = torch.where(counted, kd_rows, zero)
    loss_rows = kd_weight * temperature**2 * kd_rows
    if use_ce:
        loss_rows = loss_rows + torch.where(counted, ce_weight * (lse_ce - target), zero)
    topk_weights = torch.where(counted.unsqueeze(1), topk_weights, zero)
    ids_out = torch.empty((0, k), dtype=torch.int64, device=hidden.device)
    grad_outputs = grads.result() if grads is not None else chunked._no_grads(hidden)
    return (loss_rows, kd_rows, state, topk_weights, stats, ids_out) + grad_outputs


def topk_backward(grad_rows, hidden, weight, bias, teacher_ids, labels, state, topk_weights, tail,
                  temperature, softcap, ignore_index, ce_weight, kd_weight, chunk_bytes,
                  weight_grad, operand_dtype):
    """``chunked.topk_backward`` with the fused head: each chunk's GEMM 1 recomputed once (its
    tile and the values at S; no statistics), then the gradient pass and GEMMs 2–3."""
    from . import chunked
    from .torch_backend import sorted_topk_ids
    use_ce, with_tail = ce_weight != 0.0, tail == "bucket"
    ps = _FusedPass(hidden, weight, bias, labels, ignore_index, chunk_bytes, operand_dtype,
                    grad_flags=(with_tail, use_ce, temperature))
    acc = torch.float32
    g = torch.where(ps.counted, grad_rows.to(acc), 0.0)
    kd_scale, ce_scale = kd_weight * temperature * g, ce_weight * g
    grads = chunked._Grads(hidden, weight, bias, ps.head, weight_grad)
    state = state.to(acc)
    scaled = ps.use_scaled
    reference = None
    for rows in ps.chunks():
        ids_c = teacher_ids[rows]
        valid_c = ids_c >= 0
        sorted_ids, perm = sorted_topk_ids(ids_c, ps.vocab)
        if scaled:  # the forward's log-sum-exp is the reference: G = p·softcap' ≤ 1
            reference = state[rows, chunked._KD_LSE if with_tail else chunked._LSE_CE].contiguous()
            chunk = ps.stats(hidden, rows, sorted_ids, temperature, softcap, False, use_ce, False,
                             reference=reference)
        else:
            chunk = ps.stats(hidden, rows, sorted_ids, temperature, softcap, False, False, False)
        topk_logits = torch.where(valid_c, _unsort(chunk.zs, perm), 0.0)
        ps.grad(grads, hidden, chunk, rows, sorted_ids, perm, topk_logits,
                topk_weights[rows].to(acc), valid_c, state[rows, chunked._KD_LSE],
                state[rows, chunked._DENSE_COEF], state[rows, chunked._TOPK_COEF], kd_scale[rows],
                state[rows, chunked._LSE_CE], ce_scale[rows], temperature, softcap, with_tail,
                use_ce, state[rows, chunked._TAIL_MASS], reference=reference)
    return grads.result()


# ------------------------------------------------------------------------------------------------
# the online dense teacher: both heads' GEMMs with their partials, then two passes over 16-bit tiles
# ------------------------------------------------------------------------------------------------

def dense_pair(student: HeadChunk, teacher: HeadChunk, rows_state: Tensor, labels: Optional[Tensor],
               kind: int, beta: float, temperature: float, cap: float, with_ce: bool,
               out: Optional[Tensor] = None) -> Tensor:
    """``out=None``: per row ``(kd, W)`` (2, C) summed from per-tile partials; else ``dz`` into
    ``out (C, V)`` (the student's tile, a bfloat16 view of it, or a float32 block).
    ``rows_state (6, C)`` float32: lse, teacher lse, W, kd scale, CE lse, CE scale."""
    from .triton_epilogue import _kind
    kind, beta, log_beta, log_1m_beta = _kind(kind, beta)
    c, vocab = student.tile.shape
    device = student.tile.device
    n_tiles = student.partials.shape[2]
    grad = out is not None
    partial = None if grad else torch.empty((2, c, n_tiles), dtype=torch.float32, device=device)
    target = out if grad else partial
    if c == 0:
        return target if grad else partial.sum(dim=2)
    cfg = grad_config(student.block_n, _interpreted(device) and _RECORDED is None)
    args = (student.tile, student.partials, teacher.tile, teacher.partials, rows_state,
            labels if with_ce else rows_state, target,
            c, vocab, n_tiles,
            student.tile.stride(0), teacher.tile.stride(0), n_tiles,
            target.stride(0) if grad else n_tiles,
            float(temperature), 1.0 / float(temperature), float(cap) if cap else 1.0, float(beta),
            float(log_beta), float(log_1m_beta))
    meta = dict(HAS_CAP=bool(cap), KIND=kind, WITH_CE=bool(with_ce), GRAD=grad, **cfg)
    grid = (triton.cdiv(c, cfg["BLOCK_M"]), n_tiles)
    _launch(dense_pair_kernel, grid, device, args, meta)
    return out if grad else partial.sum(dim=2)


def _dense_chunk(ps, teacher_head, teacher_hidden, hidden, rows, temperature, softcap,
                 teacher_softcap, use_ce, with_stats, teacher_tile):
    """Both heads' GEMMs for one chunk: the student's and the teacher's tiles and partials."""
    student = ps.stats(hidden, rows, None, temperature, softcap, False, use_ce, with_stats)
    t_k = teacher_hidden[rows].detach().to(ps.operand).contiguous()
    teacher = head_stats(t_k, teacher_head[0], teacher_head[1], None, None, 1.0 / temperature,
                         teacher_softcap or 0.0, False, False, False, False, tile=teacher_tile)
    return student, teacher


def _teacher_operands(teacher_weight, teacher_bias, operand):
    w = teacher_weight.detach().to(operand).contiguous()
    b = None if teacher_bias is None else teacher_bias.detach().to(torch.float32)
    return w, b


def dense_forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels,
                  divergence, beta, temperature, softcap, teacher_softcap, ignore_index, ce_weight,
                  kd_weight, chunk_bytes, with_stats, grads_in_forward, weight_grad, operand_dtype):
    """``chunked.dense_forward`` with both heads fused: same outputs."""
    from . import chunked
    ps = _FusedPass(hidden, weight, bias, labels, ignore_index, chunk_bytes, operand_dtype, heads=2)
    n_rows, counted, acc = ps.n_rows, ps.counted, torch.float32
    teacher_head = _teacher_operands(teacher_weight, teacher_bias, operand_dtype)
    teacher_tile = torch.empty_like(ps.tile)
    use_ce = ce_weight != 0.0
    separate = use_ce and temperature != 1.0
    kind = chunked._kind(divergence, beta)
    f = dict(dtype=acc, device=hidden.device)
    state = torch.zeros((4, n_rows), **f)
    mean_z, target, kd_rows = (torch.zeros(n_rows, **f) for _ in range(3))
    kd_scale = counted.to(acc) * (kd_weight * temperature)
    ce_scale = counted.to(acc) * ce_weight
    grads = chunked._Grads(hidden, weight, bias, ps.head, weight_grad) if grads_in_forward else None
    for rows in ps.chunks():
        student, teacher = _dense_chunk(ps, teacher_head, teacher_hidden, hidden, rows, temperature,
                                        softcap, teacher_softcap, use_ce, with_stats, teacher_tile)
        lse, _tail, lse_ce, mz = combine(student, False, use_ce, separate, with_stats)
        teacher_lse = combine(teacher, False, False, False, False)[0]
        zero = torch.zeros_like(lse)
        rows_state = torch.stack([lse, teacher_lse, zero, kd_scale[rows], lse_ce if use_ce else zero,
                                  ce_scale[rows]]).contiguous()
        kd, wsum = dense_pair(student, teacher, rows_state, ps.labels(rows), kind, beta,
                              temperature, softcap, use_ce)
        kd_rows[rows] = kd
        state[0, rows], state[1, rows], state[2, rows] = lse, teacher_lse, wsum
        if use_ce:
            state[3, rows], target[rows] = lse_ce, student.target
        if with_stats:
            mean_z[rows] = mz
        if grads is not None:
            rows_state[2] = wsum
            dz = dense_pair(student, teacher, rows_state, ps.labels(rows), kind, beta, temperature,
                            softcap, use_ce, out=ps.dz_buffer(student, rows))
            grads.add(rows, dz, ps.head.cast(hidden[rows]))
    state = state.t().contiguous()
    zero = torch.zeros((), **f)
    kd_rows = torch.where(counted, kd_rows, zero)
    loss_rows = kd_weight * temperature**2 * kd_rows
    if use_ce:
        loss_rows = loss_rows + torch.where(counted, ce_weight * (state[:, 3] - target), zero)
    if with_stats:
        stats = torch.stack([state[:, 0] - mean_z, state[:, 0]], dim=1)
    else:
        stats = torch.zeros((0, 2), **f)
    grad_outputs = grads.result() if grads is not None else chunked._no_grads(hidden)
    return (loss_rows, kd_rows, state, stats) + grad_outputs


def dense_backward(grad_rows, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                   labels, state, divergence, beta, temperature, softcap, teacher_softcap,
                   ignore_index, ce_weight, kd_weight, chunk_bytes, weight_grad, operand_dtype):
    """``chunked.dense_backward`` with both heads fused: each chunk's two GEMMs recomputed once."""
    from . import chunked
    ps = _FusedPass(hidden, weight, bias, labels, ignore_index, chunk_bytes, operand_dtype, heads=2)
    acc = torch.float32
    teacher_head = _teacher_operands(teacher_weight, teacher_bias, operand_dtype)
    teacher_tile = torch.empty_like(ps.tile)
    g = torch.where(ps.counted, grad_rows.to(acc), 0.0)
    kd_scale, ce_scale = kd_weight * temperature * g, ce_weight * g
    use_ce = ce_weight != 0.0
    kind = chunked._kind(divergence, beta)
    grads = chunked._Grads(hidden, weight, bias, ps.head, weight_grad)
    state = state.to(acc)
    for rows in ps.chunks():
        student, teacher = _dense_chunk(ps, teacher_head, teacher_hidden, hidden, rows, temperature,
                                        softcap, teacher_softcap, False, False, teacher_tile)
        rows_state = torch.stack([state[rows, 0], state[rows, 1], state[rows, 2], kd_scale[rows],
                                  state[rows, 3], ce_scale[rows]]).contiguous()
        dz = dense_pair(student, teacher, rows_state, ps.labels(rows), kind, beta, temperature,
                        softcap, use_ce, out=ps.dz_buffer(student, rows))
        grads.add(rows, dz, ps.head.cast(hidden[rows]))
    return grads.result()
