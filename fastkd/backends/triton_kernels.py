"""Triton kernels of the ``triton`` backend: they stream ``h·Wᵀ`` tiles, never more than a tile.

Shapes (all contiguous): ``hidden (N, D)``, ``weight (V, D)``, ``bias (V,)``; an online teacher's
``teacher_hidden (N, D_t)``, ``teacher_weight (V, D_t)``. A top-k set S arrives *sorted per row*
as int32 ``ids (N, K)`` with the unused slots set to ``V`` (so they sort last and never match a
column). Per tile the forward finds the ids that fall inside it from the row's count of ids below
the tile (a compare over K) and then matches those few ids to columns, so the set S costs
``O(BM·K)`` plus ``O(BM·BN)`` per id actually present, never ``O(BM·BN·K)``; the columns of S
are kept as a bit mask per row (``BN / 32`` words), not a ``(BM, BN)`` tile.

The top-k backward does not look S up in its tiles at all: they write the tail formula where the
logit is at most a per-row threshold ``theta`` (every column off S is) and 0 above it, and
``topk_correction_kernel`` then adds, at the K ids of each row, the exact value minus what the
tile wrote there (``O(N·K·D)``, float32 products). The threshold keeps the ids of S whose
probability is not tiny out of the tiles, so their values are still *set*, never a large tail
term plus its large negative (see ``triton_backend._tail_threshold``).

The math is DESIGN.md §1 (``fastkd.divergences``). The per-element parts live here: online
log-sum-exps over the vocabulary and over ``V∖S`` (the exact tail, S excluded by membership),
the entropy accumulator, the logits at S, and the gradient tile ``dz``:

    top-k:  dz_j = s·(w_j − p_j·topk_coef) on S (set, not added), s·p_j·dense off S
            (p = exp(z − kd_lse); one value per id: a repeated id gets its last slot's)
    dense:  dz_j = s·(w_j − p_j·W),  w_j = p_j·G_j (forward KL −q_j, reverse KL p_j·(log p_j − log q_j),
            JSD (1−β)·p_j·(log p_j − log m_j))
    CE:     + s_ce·(softmax(capped)_j − 1[j = label])

then ``× (1 − (capped/cap)²)`` under a softcap, and ``dh += dz·W``, ``dW += dzᵀ·h``, ``db += Σ dz``.
The per-row coefficients (``kd_lse``, ``dense``, ``topk_coef``, ``W``, ``w_S``) come from the
PyTorch epilogue on ``(N, K)`` tensors, which calls the math module.

Forward passes run on a ``(row blocks, splits)`` grid: each program streams one range of the
vocabulary (split-V) and stores partial statistics that the launcher merges, so few rows still
fill the GPU. Backward modes (``MODE``): 0 = one program per (row block, vocabulary tile) on a 1-D
grid in grouped order (L2 reuse), relaxed atomics into float32 ``dh``/``dW`` (fast, order not
fixed; ``sem="relaxed"``: a sum needs no ordering, and the default ``acq_rel`` adds a GPU-wide
fence per atomic); 1 = one program per row block walking the vocabulary, owning its ``dh`` rows;
2 = one program per vocabulary tile walking the rows, owning its ``dW`` rows. Modes 1 and 2
together are the deterministic backward (bit-identical run to run); its top-k correction adds
``dh`` per owned row block and ``dW`` by one pass over the slots sorted by id
(``topk_correction_dw_kernel``), no atomics. Tile sizes, warps and stages come from
``launch_configs`` per target architecture.
"""
from __future__ import annotations

import triton
import triton.language as tl

FORWARD_KL: tl.constexpr = tl.constexpr(0)
REVERSE_KL: tl.constexpr = tl.constexpr(1)
JSD: tl.constexpr = tl.constexpr(2)


@triton.jit
def _tanh(x):
    # sign(x)·(1 − e^{−2|x|})/(1 + e^{−2|x|}): no overflow, accurate near 0.
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, D, cap,
                 HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    """``softcap(h[rows]·W[cols]ᵀ + b[cols])`` as a float32 ``(BM, BN)`` tile."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        d_mask = d < D
        h = tl.load(h_ptr + rows[:, None] * D + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * D + d[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_CAP:
        acc = cap * _tanh(acc / cap)
    return acc


@triton.jit
def _online_lse(m, s, tile):
    """One tile of an online log-sum-exp: the new running max and sum ``Σ exp(x − m)``, the factor
    ``alpha`` that rescales any other sum kept against the old max, and the tile's ``exp(x − m)``."""
    m_new = tl.maximum(m, tl.max(tile, axis=1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(tile - m_new[:, None])
    return m_new, s * alpha + tl.sum(e, axis=1), alpha, e


@triton.jit
def _cross_entropy_step(m_ce, s_ce, target, capped, cols, labels):
    """One tile of the CE statistics of the untempered logits: online lse and the label's logit."""
    m_ce, s_ce, _alpha, _e = _online_lse(m_ce, s_ce, capped)
    target += tl.sum(tl.where(cols[None, :] == labels[:, None], capped, 0.0), axis=1)
    return m_ce, s_ce, target


@triton.jit
def _ids_in_tile(ids_ptr, rows, row_mask, K, v0, BN: tl.constexpr, KP: tl.constexpr):
    """For sorted ids: the first slot at or above column ``v0`` and how many ids lie in the tile.

    Read in chunks of at most 64 slots, so registers do not grow with K."""
    KC: tl.constexpr = 16 if KP > 16 else KP
    start = tl.zeros_like(rows).to(tl.int32)
    count = tl.zeros_like(rows).to(tl.int32)
    for k0 in range(0, K, KC):
        k = k0 + tl.arange(0, KC)
        ids = tl.load(ids_ptr + rows[:, None] * K + k[None, :], mask=row_mask[:, None] & (k[None, :] < K),
                      other=2147483647)
        start += tl.sum((ids < v0).to(tl.int32), axis=1)
        count += tl.sum(((ids >= v0) & (ids < v0 + BN)).to(tl.int32), axis=1)
    return start, count


@triton.jit
def _expand_bits(words, BM: tl.constexpr, BN: tl.constexpr):
    """``(BM, BN)`` booleans from ``(BM, BN / 32)`` int32 words: bit ``c % 32`` of word ``c / 32``."""
    lane = tl.arange(0, BN)
    bits = tl.zeros((BM, BN), dtype=tl.int32)
    for q in tl.static_range(BN // 32):
        word = tl.sum(tl.where(tl.arange(0, BN // 32)[None, :] == q, words, 0), axis=1)
        bits = tl.where((lane >> 5)[None, :] == q, word[:, None], bits)
    return ((bits >> (lane & 31)[None, :]) & 1) != 0


@triton.jit
def _row_block(labels_ptr, N, ignore_index, HAS_LABELS: tl.constexpr, BM: tl.constexpr):
    """This program's rows (int64), which exist, their labels (-1 without) and which are counted."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    row_mask = rows < N
    if HAS_LABELS:
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
        counted = labels != ignore_index
    else:
        labels = tl.zeros((BM,), dtype=tl.int64) - 1
        counted = row_mask
    return rows, row_mask, labels, counted


# ------------------------------------------------------------------------------------------------
# top-k forward: one pass over the vocabulary per row block
# ------------------------------------------------------------------------------------------------

@triton.jit
def topk_forward_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, ids_ptr, labels_ptr, part_ptr, zs_ptr, t_zs_ptr,
    # shapes
    N, V, D, DT, K, span,
    # meta
    inv_temp, cap, t_cap, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_TEACHER: tl.constexpr,
    T_HAS_BIAS: tl.constexpr, T_HAS_CAP: tl.constexpr, HAS_LABELS: tl.constexpr,
    WITH_CE: tl.constexpr, WITH_STATS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (row block, split) streams the columns ``[split·span, (split+1)·span)``. Per row:
    ``z`` (and an online teacher's) at the sorted ids of S in that range, stored to ``zs``/``t_zs``;
    and the partial statistics of the range, ``part (N, splits, 10)``: running max and sums of
    ``exp(z − max)`` over the range and over its part of ``V∖S``, ``Σ e·z`` (for ``E_p[z]``), the
    CE max and sum of the untempered logits and the label's logit, the teacher's max, sum and tail
    sum. The launcher merges the splits (``_merge_lse``)."""
    rows, row_mask, labels, counted = _row_block(labels_ptr, N, ignore_index, HAS_LABELS, BM)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    v_first = split.to(tl.int64) * span
    v_end = tl.minimum(v_first + span, V)
    neg_inf = float("-inf")
    masked = -1e30  # masked columns: exp underflows to 0 and no inf − inf appears
    m = tl.full((BM,), neg_inf, tl.float32)
    s = tl.zeros((BM,), tl.float32)
    s_tail = tl.zeros((BM,), tl.float32)
    s_z = tl.zeros((BM,), tl.float32)
    m_ce = tl.full((BM,), neg_inf, tl.float32)
    s_ce = tl.zeros((BM,), tl.float32)
    target = tl.zeros((BM,), tl.float32)
    mt = tl.full((BM,), neg_inf, tl.float32)
    st = tl.zeros((BM,), tl.float32)
    st_tail = tl.zeros((BM,), tl.float32)
    if WITH_STATS:  # statistics are defined on every row, ignored or not
        counted = row_mask
    # int32 offsets from the block's first row inside the loop (no int64 per element)
    row0 = tl.program_id(0).to(tl.int64) * BM
    local = tl.arange(0, BM)
    h_blk, ids_blk, zs_blk, t_zs_blk = h_ptr + row0 * D, ids_ptr + row0 * K, zs_ptr + row0 * K, t_zs_ptr + row0 * K
    if tl.max(counted.to(tl.int32)) > 0:  # a block of ignored rows reads nothing
        for v0 in range(v_first, v_end, BN):
            cols = v0 + tl.arange(0, BN).to(tl.int64)
            col_mask = cols < V
            capped = _logits_tile(h_blk, w_ptr, b_ptr, local, row_mask, cols, col_mask, D, cap,
                                  HAS_BIAS, HAS_CAP, BM, BN, BD, PRECISION)
            capped = tl.where(col_mask[None, :], capped, masked)
            lane = tl.arange(0, BN)
            if WITH_CE:  # first: the untempered tile is not kept alive through the loop over S
                m_ce, s_ce, _alpha_ce, _e_ce = _online_lse(m_ce, s_ce, capped)
                at = tl.where((labels >= v0) & (labels < v0 + BN), labels - v0, -1).to(tl.int32)
                target += tl.sum(tl.where(lane[None, :] == at[:, None], capped, 0.0), axis=1)
            z = capped * inv_temp
            if HAS_TEACHER:
                tz = _logits_tile(th_ptr + row0 * DT, tw_ptr, tb_ptr, local, row_mask, cols, col_mask, DT, t_cap,
                                  T_HAS_BIAS, T_HAS_CAP, BM, BN, BD, PRECISION)
                tz = tl.where(col_mask[None, :], tz * inv_temp, masked)
            # S ∩ tile: record z (and the teacher's) at each slot, and mark the columns in a
            # bit mask per row (BN / 32 words, not a (BM, BN) tile carried through the loop).
            start, count = _ids_in_tile(ids_blk, local, row_mask, K, v0, BN, KP)
            words = tl.zeros((BM, BN // 32), dtype=tl.int32)
            for j in range(0, tl.max(count)):
                hit = row_mask & (j < count)
                slot = start + j
                at = tl.where(hit, tl.load(ids_blk + local * K + slot, mask=hit, other=0) - v0, -1).to(tl.int32)
                eq = lane[None, :] == at[:, None]
                tl.store(zs_blk + local * K + slot, tl.sum(tl.where(eq, z, 0.0), axis=1), mask=hit)
                if HAS_TEACHER:
                    tl.store(t_zs_blk + local * K + slot, tl.sum(tl.where(eq, tz, 0.0), axis=1), mask=hit)
                word = tl.arange(0, BN // 32)[None, :] == (at >> 5)[:, None]
                words = words | tl.where(word & hit[:, None], (1 << (at & 31))[:, None], 0)
            in_s = _expand_bits(words, BM, BN)
            m, s, alpha, e = _online_lse(m, s, z)
            s_tail = s_tail * alpha + tl.sum(tl.where(in_s, 0.0, e), axis=1)
            if WITH_STATS:
                s_z = s_z * alpha + tl.sum(e * z, axis=1)
            if HAS_TEACHER:
                mt, st, alpha_t, et = _online_lse(mt, st, tz)
                st_tail = st_tail * alpha_t + tl.sum(tl.where(in_s, 0.0, et), axis=1)
    part = part_ptr + (rows * splits + split) * 10
    tl.store(part, m, mask=row_mask)
    tl.store(part + 1, s, mask=row_mask)
    tl.store(part + 2, s_tail, mask=row_mask)
    tl.store(part + 3, s_z, mask=row_mask)
    tl.store(part + 4, m_ce, mask=row_mask)
    tl.store(part + 5, s_ce, mask=row_mask)
    tl.store(part + 6, target, mask=row_mask)
    tl.store(part + 7, mt, mask=row_mask)
    tl.store(part + 8, st, mask=row_mask)
    tl.store(part + 9, st_tail, mask=row_mask)


# ------------------------------------------------------------------------------------------------
# full-vocabulary online teacher: pass 1 (log-sum-exps), pass 2 (divergence and Σ w)
# ------------------------------------------------------------------------------------------------

@triton.jit
def _dense_terms(z, tz, lse, t_lse, beta, KIND: tl.constexpr):
    """Per-element divergence terms and bucket weights ``w_j = p_j·G_j`` (DESIGN.md §1 table)."""
    log_p = z - lse[:, None]
    log_q = tz - t_lse[:, None]
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    if KIND == 0:  # forward KL
        term = q * (log_q - log_p)
        w = -q
    elif KIND == 1:  # reverse KL
        term = p * (log_p - log_q)
        w = term
    else:  # JSD(β), M = βQ + (1−β)P in log space
        a = log_q + tl.log(beta)
        b = log_p + tl.log(1.0 - beta)
        hi = tl.maximum(a, b)
        log_m = hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))
        w = (1.0 - beta) * p * (log_p - log_m)
        term = beta * q * (log_q - log_m) + w
    return term, w, p


@triton.jit
def dense_forward_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, labels_ptr, lse_ptr, t_lse_ptr, part_ptr,
    # shapes
    N, V, D, DT, span,
    # meta
    inv_temp, cap, t_cap, ignore_index, beta,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, T_HAS_BIAS: tl.constexpr, T_HAS_CAP: tl.constexpr,
    HAS_LABELS: tl.constexpr, WITH_CE: tl.constexpr, WITH_STATS: tl.constexpr, KIND: tl.constexpr,
    PASS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (row block, split) streams the columns ``[split·span, (split+1)·span)`` and writes
    partials to ``part (N, splits, 8)``. PASS 1: student and teacher running max and sum (+ CE
    max, sum and label logit, ``Σ e·z`` for ``E_p[z]``). PASS 2, given the merged ``lse`` and
    ``t_lse``: the divergence and ``W = Σ_j w_j`` of the range (JSD's log M needs both
    normalisers, hence two passes). The launcher merges the splits."""
    rows, row_mask, labels, counted = _row_block(labels_ptr, N, ignore_index, HAS_LABELS, BM)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    v_first = split.to(tl.int64) * span
    v_end = tl.minimum(v_first + span, V)
    neg_inf = float("-inf")
    masked = -1e30  # masked columns: exp underflows to 0 and no inf − inf appears
    m = tl.full((BM,), neg_inf, tl.float32)
    s = tl.zeros((BM,), tl.float32)
    s_z = tl.zeros((BM,), tl.float32)
    mt = tl.full((BM,), neg_inf, tl.float32)
    st = tl.zeros((BM,), tl.float32)
    m_ce = tl.full((BM,), neg_inf, tl.float32)
    s_ce = tl.zeros((BM,), tl.float32)
    target = tl.zeros((BM,), tl.float32)
    kd = tl.zeros((BM,), tl.float32)
    wsum = tl.zeros((BM,), tl.float32)
    if PASS == 2:
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        t_lse = tl.load(t_lse_ptr + rows, mask=row_mask, other=0.0)
    if WITH_STATS:
        counted = row_mask
    if tl.max(counted.to(tl.int32)) > 0:
        for v0 in range(v_first, v_end, BN):
            cols = v0 + tl.arange(0, BN).to(tl.int64)
            col_mask = cols < V
            capped = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, D, cap,
                                  HAS_BIAS, HAS_CAP, BM, BN, BD, PRECISION)
            capped = tl.where(col_mask[None, :], capped, masked)
            z = capped * inv_temp
            tz = _logits_tile(th_ptr, tw_ptr, tb_ptr, rows, row_mask, cols, col_mask, DT, t_cap,
                              T_HAS_BIAS, T_HAS_CAP, BM, BN, BD, PRECISION)
            tz = tl.where(col_mask[None, :], tz * inv_temp, masked)
            if PASS == 1:
                m, s, alpha, e = _online_lse(m, s, z)
                if WITH_STATS:
                    s_z = s_z * alpha + tl.sum(e * z, axis=1)
                mt, st, _alpha_t, _et = _online_lse(mt, st, tz)
                if WITH_CE:
                    m_ce, s_ce, target = _cross_entropy_step(m_ce, s_ce, target, capped, cols, labels)
            else:
                term, w, _p = _dense_terms(z, tz, lse, t_lse, beta, KIND)
                kd += tl.sum(tl.where(col_mask[None, :], term, 0.0), axis=1)
                wsum += tl.sum(tl.where(col_mask[None, :], w, 0.0), axis=1)
    part = part_ptr + (rows * splits + split) * 8
    if PASS == 1:
        tl.store(part, m, mask=row_mask)
        tl.store(part + 1, s, mask=row_mask)
        tl.store(part + 2, s_z, mask=row_mask)
        tl.store(part + 3, mt, mask=row_mask)
        tl.store(part + 4, st, mask=row_mask)
        tl.store(part + 5, m_ce, mask=row_mask)
        tl.store(part + 6, s_ce, mask=row_mask)
        tl.store(part + 7, target, mask=row_mask)
    else:
        tl.store(part, kd, mask=row_mask)
        tl.store(part + 1, wsum, mask=row_mask)


# ------------------------------------------------------------------------------------------------
# backward: gradient tiles, then dh += dz·W, dW += dzᵀ·h, db += Σ dz
# ------------------------------------------------------------------------------------------------

@triton.jit
def _grouped(pid, row_blocks, col_blocks, GROUP: tl.constexpr):
    """(row block, column tile) of program ``pid`` in grouped order (GROUP row blocks at a time)."""
    per_group = GROUP * col_blocks
    first = (pid // per_group) * GROUP
    rows_here = tl.minimum(row_blocks - first, GROUP)
    return first + (pid % per_group) % rows_here, (pid % per_group) // rows_here


@triton.jit
def _grad_tile(
    h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, labels_ptr, state_ptr,
    kd_scale_ptr, ce_scale_ptr, rows, row_mask, v0, cols, col_mask, D, DT,
    inv_temp, cap, t_cap, beta,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, T_HAS_BIAS: tl.constexpr, T_HAS_CAP: tl.constexpr,
    DENSE_TEACHER: tl.constexpr, WITH_TAIL: tl.constexpr, WITH_CE: tl.constexpr, KIND: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dz`` of one tile w.r.t. the uncapped logits, float32 ``(BM, BN)``, zero on masked entries.

    ``state (N, 4)``: top-k: kd_lse, dense, theta, lse_ce; dense teacher: lse, t_lse, W, lse_ce.
    Top-k: the tile does not look S up. It writes the tail formula ``p·dense`` where the logit is
    at most the row's ``theta`` (every column off S is, see ``topk_correction_kernel``) and 0
    above it; the correction kernel then adds, at each id of S, the exact value minus what the
    tile wrote there, in float32.
    """
    capped = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, D, cap,
                          HAS_BIAS, HAS_CAP, BM, BN, BD, PRECISION)
    kd_scale = tl.load(kd_scale_ptr + rows, mask=row_mask, other=0.0)
    z = capped * inv_temp
    c0 = tl.load(state_ptr + rows * 4, mask=row_mask, other=0.0)
    c1 = tl.load(state_ptr + rows * 4 + 1, mask=row_mask, other=0.0)
    c2 = tl.load(state_ptr + rows * 4 + 2, mask=row_mask, other=0.0)
    if DENSE_TEACHER:
        tz = _logits_tile(th_ptr, tw_ptr, tb_ptr, rows, row_mask, cols, col_mask, DT, t_cap,
                          T_HAS_BIAS, T_HAS_CAP, BM, BN, BD, PRECISION) * inv_temp
        _term, w, p = _dense_terms(z, tz, c0, c1, beta, KIND)
        dz = kd_scale[:, None] * (w - p * c2[:, None])
    else:
        if WITH_TAIL:  # c2 = theta: above it (only ids of S are) 0, the correction sets them
            dz = tl.where(z <= c2[:, None], tl.exp(z - c0[:, None]) * (c1 * kd_scale)[:, None], 0.0)
        else:
            dz = tl.zeros((BM, BN), tl.float32)
    if WITH_CE:
        lse_ce = tl.load(state_ptr + rows * 4 + 3, mask=row_mask, other=0.0)
        ce_scale = tl.load(ce_scale_ptr + rows, mask=row_mask, other=0.0)
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
        # the label's column as an int32 offset in the tile (-1 off it): no int64 per element
        at = tl.where((labels >= v0) & (labels < v0 + BN), labels - v0, -1).to(tl.int32)
        onehot = (tl.arange(0, BN)[None, :] == at[:, None]).to(tl.float32)
        dz += ce_scale[:, None] * (tl.exp(capped - lse_ce[:, None]) - onehot)
    if HAS_CAP:
        r = capped * (1.0 / cap)
        dz = dz * (1.0 - r * r)
    return tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)


@triton.jit
def backward_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, labels_ptr, state_ptr,
    kd_scale_ptr, ce_scale_ptr, dh_ptr, dw_ptr, db_ptr,
    # shapes
    N, V, D, DT,
    # meta
    inv_temp, cap, t_cap, beta,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, T_HAS_BIAS: tl.constexpr, T_HAS_CAP: tl.constexpr,
    DENSE_TEACHER: tl.constexpr, WITH_TAIL: tl.constexpr, WITH_CE: tl.constexpr, KIND: tl.constexpr,
    MODE: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulates the gradients of every (row block, vocabulary tile) this program owns (MODE).

    MODE 0 runs on a 1-D grid in grouped order: consecutive programs walk the vocabulary tiles of
    a group of ``GROUP`` row blocks, column by column, so a wave of programs shares a few ``h``
    blocks and ``W`` tiles in L2 instead of streaming all of ``h`` once per vocabulary tile.

    ``SPLIT`` (1 or 2): the ``BN`` columns of a tile are recomputed and turned into 16-bit ``dz``
    in that many parts of ``BN / SPLIT``, so a 128 x 256 tile holds one 128 x 128 fp32 part at a
    time; the dh and dW loops then run over the whole tile (``dh`` and ``dW`` traffic of BN)."""
    PART: tl.constexpr = BN // SPLIT
    if MODE == 0:
        m_first, n_first = _grouped(tl.program_id(0), tl.cdiv(N, BM), tl.cdiv(V, BN), GROUP)
        m_last = m_first + 1
        n_last = n_first + 1
    elif MODE == 1:
        m_first = tl.program_id(0)
        m_last = m_first + 1
        n_first = 0
        n_last = tl.cdiv(V, BN)
    else:
        m_first = 0
        m_last = tl.cdiv(N, BM)
        n_first = tl.program_id(0)
        n_last = n_first + 1
    # Addresses: a 64-bit base per row block and column part (pointer + int64 scalar), int32
    # offsets inside the tile (BN·D < 2³¹): no 64-bit address per element held in registers.
    for pm in range(m_first, m_last):
        row0 = tl.cast(pm, tl.int64) * BM
        rows = tl.arange(0, BM)
        row_mask = rows < tl.minimum(N - row0, BM).to(tl.int32)
        kd_scale = tl.load(kd_scale_ptr + row0 + rows, mask=row_mask, other=0.0)
        live = tl.max(tl.abs(kd_scale))
        if WITH_CE:
            live = tl.maximum(live, tl.max(tl.abs(tl.load(ce_scale_ptr + row0 + rows, mask=row_mask,
                                                          other=0.0))))
        if live > 0:  # a block of ignored rows has no gradient at all
            h_blk = h_ptr + row0 * D
            dh_blk = dh_ptr + row0 * D
            for pn in range(n_first, n_last):
                v0 = tl.cast(pn, tl.int64) * BN
                # the tile's columns in SPLIT parts: each part's logits, dz and 16-bit dz_in in
                # turn (one fp32 part alive at a time), then the dh and dW loops take them all
                cols = tl.arange(0, PART)
                col_mask = cols < tl.minimum(V - v0, PART).to(tl.int32)
                dz_in = _dz_part(h_blk, w_ptr + v0 * D, b_ptr + v0, th_ptr + row0 * DT,
                                 tw_ptr + v0 * DT, tb_ptr + v0, labels_ptr + row0, state_ptr + row0 * 4,
                                 kd_scale_ptr + row0, ce_scale_ptr + row0, db_ptr + v0, rows,
                                 row_mask, v0, cols, col_mask, D, DT, inv_temp, cap, t_cap, beta,
                                 live, HAS_BIAS, HAS_CAP, T_HAS_BIAS, T_HAS_CAP, DENSE_TEACHER,
                                 WITH_TAIL, WITH_CE, KIND, MODE, BM, PART, BD, PRECISION)
                if SPLIT == 2:
                    v1 = v0 + PART
                    col_mask2 = cols < tl.minimum(tl.maximum(V - v1, 0), PART).to(tl.int32)
                    dz_in2 = _dz_part(h_blk, w_ptr + v1 * D, b_ptr + v1, th_ptr + row0 * DT,
                                      tw_ptr + v1 * DT, tb_ptr + v1, labels_ptr + row0,
                                      state_ptr + row0 * 4, kd_scale_ptr + row0, ce_scale_ptr + row0,
                                      db_ptr + v1, rows, row_mask, v1, cols, col_mask2, D, DT,
                                      inv_temp, cap, t_cap, beta, live, HAS_BIAS, HAS_CAP,
                                      T_HAS_BIAS, T_HAS_CAP, DENSE_TEACHER, WITH_TAIL, WITH_CE, KIND,
                                      MODE, BM, PART, BD, PRECISION)
                # dh, then dW, in two loops over D: one dot's operands and accumulator alive at a
                # time (fused, 128 x 256 tiles spill on sm_90); the same loads and products.
                if MODE != 2:
                    for d0 in range(0, D, BD):
                        d = d0 + tl.arange(0, BD)
                        d_mask = d < D
                        w = tl.load(w_ptr + v0 * D + cols[:, None] * D + d[None, :],
                                    mask=col_mask[:, None] & d_mask[None, :], other=0.0)
                        dh = tl.dot(dz_in, w.to(dz_in.dtype), input_precision=PRECISION)
                        if SPLIT == 2:
                            w = tl.load(w_ptr + v1 * D + cols[:, None] * D + d[None, :],
                                        mask=col_mask2[:, None] & d_mask[None, :], other=0.0)
                            dh = tl.dot(dz_in2, w.to(dz_in.dtype), dh, input_precision=PRECISION)
                        dh = dh * live
                        dh_at = dh_blk + rows[:, None] * D + d[None, :]
                        dh_mask = row_mask[:, None] & d_mask[None, :]
                        if MODE == 0:  # relaxed: a sum needs no ordering, and no GPU-wide fence
                            tl.atomic_add(dh_at, dh, mask=dh_mask, sem="relaxed")
                        else:
                            tl.store(dh_at, tl.load(dh_at, mask=dh_mask) + dh, mask=dh_mask)
                if MODE != 1:
                    for d0 in range(0, D, BD):
                        d = d0 + tl.arange(0, BD)
                        d_mask = d < D
                        h = tl.load(h_blk + rows[:, None] * D + d[None, :],
                                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                        _add_dw(dw_ptr + v0 * D, dz_in, h, cols, col_mask, d, d_mask, D, live, MODE,
                                PRECISION)
                        if SPLIT == 2:
                            _add_dw(dw_ptr + v1 * D, dz_in2, h, cols, col_mask2, d, d_mask, D, live,
                                    MODE, PRECISION)


@triton.jit
def _dz_part(h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, labels_ptr, state_ptr, kd_scale_ptr,
             ce_scale_ptr, db_ptr, rows, row_mask, v0, cols, col_mask, D, DT, inv_temp, cap, t_cap,
             beta, live,
             HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, T_HAS_BIAS: tl.constexpr,
             T_HAS_CAP: tl.constexpr, DENSE_TEACHER: tl.constexpr, WITH_TAIL: tl.constexpr,
             WITH_CE: tl.constexpr, KIND: tl.constexpr, MODE: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    """``dz`` of ``BM`` rows x ``BN`` columns (``_grad_tile``), its column sums into ``db``, and
    the 16-bit ``dz / live`` the GEMMs take. Pointers at the block's first row and column
    (``v0``), ``rows``/``cols`` int32 offsets from there."""
    dz = _grad_tile(h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, labels_ptr, state_ptr,
                    kd_scale_ptr, ce_scale_ptr, rows, row_mask, v0, cols, col_mask, D, DT, inv_temp,
                    cap, t_cap, beta, HAS_BIAS, HAS_CAP, T_HAS_BIAS, T_HAS_CAP, DENSE_TEACHER,
                    WITH_TAIL, WITH_CE, KIND, BM, BN, BD, PRECISION)
    if HAS_BIAS and MODE != 1:
        db = tl.sum(dz, axis=0)
        if MODE == 0:
            tl.atomic_add(db_ptr + cols, db, mask=col_mask, sem="relaxed")
        else:
            tl.store(db_ptr + cols, tl.load(db_ptr + cols, mask=col_mask) + db, mask=col_mask)
    # Scaled to O(1) before the cast, so 16-bit dz cannot underflow (a mean over many rows makes
    # every entry tiny); the products are scaled back in float32.
    return (dz * (1.0 / live)).to(h_ptr.dtype.element_ty)


@triton.jit
def _add_dw(dw_ptr, dz_in, h, cols, col_mask, d, d_mask, D, live, MODE: tl.constexpr,
            PRECISION: tl.constexpr):
    """``dW[cols, d] += dz_inᵀ·h · live``: relaxed atomics (MODE 0) or the owner's store."""
    dw = tl.dot(tl.trans(dz_in), h, input_precision=PRECISION) * live
    dw_at = dw_ptr + cols[:, None] * D + d[None, :]
    dw_mask = col_mask[:, None] & d_mask[None, :]
    if MODE == 0:
        tl.atomic_add(dw_at, dw, mask=dw_mask, sem="relaxed")
    else:
        tl.store(dw_at, tl.load(dw_at, mask=dw_mask) + dw, mask=dw_mask)


# ------------------------------------------------------------------------------------------------
# top-k: the entries of S, after the backward's tail-formula tiles (N·K·D work, never N·V·D)
# ------------------------------------------------------------------------------------------------

@triton.jit
def topk_correction_kernel(
    h_ptr, w_ptr, ids_ptr, coef_ptr, kd_scale_ptr, dh_ptr, dw_ptr, db_ptr,
    N, V, D, K, V0, V1,
    HAS_BIAS: tl.constexpr, WITH_DH: tl.constexpr, WITH_DW: tl.constexpr, BM: tl.constexpr,
    BD: tl.constexpr,
):
    """Program (row block, D chunk): with ``δ[r, k] = kd_scale[r]·coef[r, k]`` (zero on unused
    and repeated slots), ``dh[r] += Σ_k δ[r, k]·W[ids[r, k]]`` into the program's own ``dh``
    entries (a plain read-add-write: it runs after the tiles, and no other program has these
    rows), and with ``WITH_DW`` ``dW[ids[r, k]] += δ[r, k]·h[r]`` and ``db[ids[r, k]] += δ``
    with relaxed atomics. Products in float32 (``δ`` is never rounded to 16 bits). ``WITH_DH``
    off: the dW part alone. The dW part takes the ids in ``[V0, V1)`` only, into ``dw`` (and
    ``db``) holding rows ``V0..V1`` (one vocabulary slab of the float32 dW at a time, see
    ``triton_backend._slabs``); ``V0 = 0, V1 = V`` for the whole vocabulary. It reads ``h`` only
    for the rows with an id in the slab.

    ``coef`` is what the backward tile (``_grad_tile``) left out at ``ids``: the exact
    ``s·(w_k − p_k·topk_coef)`` minus the tile formula there, times the softcap's derivative,
    per unit of ``kd_scale`` (``triton_backend._slot_coefficients``)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    row_mask = rows < N
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    d_mask = d < D
    d_first = tl.zeros_like(rows) + tl.program_id(1)  # db from the first D chunk only
    kd_scale = tl.load(kd_scale_ptr + rows, mask=row_mask, other=0.0)
    if tl.max(tl.abs(kd_scale)) > 0:  # a block of ignored rows has nothing to add
        dh = tl.zeros((BM, BD), tl.float32)
        if WITH_DW:  # h only for the rows with an id in the slab (a slab holds few of a row's K)
            in_slab_count = tl.zeros((BM,), tl.int32)
            for k in range(0, K):
                ids = tl.load(ids_ptr + rows * K + k, mask=row_mask, other=-1)
                in_slab_count += ((ids >= V0) & (ids < V1)).to(tl.int32)
            h = tl.load(h_ptr + rows[:, None] * D + d[None, :],
                        mask=(row_mask & (in_slab_count > 0))[:, None] & d_mask[None, :],
                        other=0.0).to(tl.float32)
        for k in range(0, K):
            ids = tl.load(ids_ptr + rows * K + k, mask=row_mask, other=-1).to(tl.int64)
            delta = kd_scale * tl.load(coef_ptr + rows * K + k, mask=row_mask, other=0.0)
            hit = row_mask & (ids >= 0) & (ids < V) & (delta != 0.0)
            if WITH_DH:
                mask = hit[:, None] & d_mask[None, :]
                w = tl.load(w_ptr + ids[:, None] * D + d[None, :], mask=mask, other=0.0)
                dh += delta[:, None] * w.to(tl.float32)
            if WITH_DW:
                in_slab = hit & (ids >= V0) & (ids < V1)
                tl.atomic_add(dw_ptr + (ids - V0)[:, None] * D + d[None, :], delta[:, None] * h,
                              mask=in_slab[:, None] & d_mask[None, :], sem="relaxed")
                if HAS_BIAS:
                    tl.atomic_add(db_ptr + ids, delta, mask=in_slab & (d_first == 0), sem="relaxed")
        if WITH_DH:
            at = dh_ptr + rows[:, None] * D + d[None, :]
            dh_mask = row_mask[:, None] & d_mask[None, :]
            tl.store(at, tl.load(at, mask=dh_mask, other=0.0) + dh, mask=dh_mask)


@triton.jit
def topk_correction_dw_kernel(
    h_ptr, ids_ptr, rows_ptr, delta_ptr, bounds_ptr, dw_ptr, db_ptr,
    D,
    HAS_BIAS: tl.constexpr, BD: tl.constexpr,
):
    """The deterministic ``dW`` (and ``db``) part of ``topk_correction_kernel``, without atomics.

    The ``N·K`` slots arrive sorted by id (stable: ties in (row, slot) order), ``ids``/``rows``/
    ``delta`` flat, and ``bounds`` the first sorted slot of each block of ids. Program
    (id block, D chunk) walks its slots in that order, sums ``δ·h[row]`` over each run of one id
    and adds the sum to that id's ``dW`` row (which no other program writes): the same order on
    every run."""
    first = tl.load(bounds_ptr + tl.program_id(0))
    end = tl.load(bounds_ptr + tl.program_id(0) + 1)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    d_mask = d < D
    acc = tl.zeros((BD,), tl.float32)
    bias = tl.sum(tl.zeros((BD,), tl.float32), axis=0)
    for e in range(first, end):
        col = tl.load(ids_ptr + e).to(tl.int64)
        delta = tl.load(delta_ptr + e)
        row = tl.load(rows_ptr + e).to(tl.int64)
        acc += delta * tl.load(h_ptr + row * D + d, mask=d_mask, other=0.0).to(tl.float32)
        bias += delta
        following = tl.load(ids_ptr + tl.minimum(e + 1, end - 1))
        if (e + 1 == end) | (following != col):  # the run of this id ends here: add it
            at = dw_ptr + col * D + d
            tl.store(at, tl.load(at, mask=d_mask, other=0.0) + acc, mask=d_mask)
            if HAS_BIAS:
                if tl.program_id(1) == 0:
                    tl.store(db_ptr + col, tl.load(db_ptr + col) + bias)
            acc = tl.zeros((BD,), tl.float32)
            bias = tl.sum(acc, axis=0)


# ------------------------------------------------------------------------------------------------
# tail="renormalize" without CE or statistics: the forward's K gathered logits only, O(N·K·D)
# ------------------------------------------------------------------------------------------------

@triton.jit
def gather_forward_kernel(
    h_ptr, w_ptr, b_ptr, ids_ptr, zs_ptr,
    N, D, K,
    cap,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, KP: tl.constexpr, BD: tl.constexpr,
):
    """``zs[n, k] = softcap(h[n]·W[ids[n, k]] + b[ids[n, k]])`` for the valid slots (ids < V)."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, KP)
    ids = tl.load(ids_ptr + row * K + k, mask=k < K, other=-1).to(tl.int64)
    valid = (ids >= 0) & (k < K)
    acc = tl.zeros((KP,), tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        d_mask = d < D
        h = tl.load(h_ptr + row * D + d, mask=d_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ids[:, None] * D + d[None, :], mask=valid[:, None] & d_mask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * h[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ids, mask=valid, other=0.0).to(tl.float32)
    if HAS_CAP:
        acc = cap * _tanh(acc / cap)
    tl.store(zs_ptr + row * K + k, acc, mask=k < K)


# ------------------------------------------------------------------------------------------------
# online top-k selection: a running top-k per row over streamed logit tiles, no sort
# ------------------------------------------------------------------------------------------------

@triton.jit
def _insert_topk(best_v, best_i, tile, cols, K, BN: tl.constexpr, KP: tl.constexpr):
    """Merges a ``(BM, BN)`` tile into each row's running top-K (exact, no sort network).

    ``best_v``/``best_i (BM, KP)``: the best values and their columns so far, in no order; slots
    ``≥ K`` hold +inf and are never replaced. Each round moves every row's largest remaining tile
    entry into its smallest slot when it beats it. Only entries above the row's K-th best at entry
    can enter, at most K of them, in decreasing order, so ``min(max_row #above, K)`` rounds are
    exact; after the first tiles that is a handful (the K-th best only rises)."""
    lane = tl.arange(0, BN)
    slots = tl.arange(0, KP)
    above = tl.sum((tile > tl.min(best_v, axis=1)[:, None]).to(tl.int32), axis=1)
    for _round in range(0, tl.minimum(tl.max(above), K)):
        top = tl.max(tile, axis=1)
        at = tl.argmax(tile, axis=1)
        low = tl.min(best_v, axis=1)
        slot = tl.argmin(best_v, axis=1)
        put = (top > low)[:, None] & (slots[None, :] == slot[:, None])
        picked = lane[None, :] == at[:, None]
        best_v = tl.where(put, top[:, None], best_v)
        column = tl.sum(tl.where(picked, cols[None, :], 0), axis=1).to(tl.int32)
        best_i = tl.where(put, column[:, None], best_i)
        tile = tl.where(picked, float("-inf"), tile)
    return best_v, best_i


@triton.jit
def select_topk_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, vals_ptr, ids_ptr,
    # shapes
    N, V, D, K, span,
    # meta
    cap,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (row block, split) streams the columns ``[split·span, (split+1)·span)`` of one
    head's logits ``softcap(h·Wᵀ + b)`` and writes each row's top-K values there and their
    columns, unordered, to ``vals``/``ids (N, splits, KP)`` (unfilled slots: -inf). The launcher
    merges the splits. Temperature does not change a top-k."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    row_mask = rows < N
    slots = tl.arange(0, KP)
    best = tl.where(slots[None, :] < K, float("-inf"), float("inf")) + tl.zeros((BM, KP), tl.float32)
    best_ids = tl.zeros((BM, KP), tl.int32)  # columns < V < 2³¹
    v_first = split.to(tl.int64) * span
    for v0 in range(v_first, tl.minimum(v_first + span, V), BN):
        cols = v0 + tl.arange(0, BN).to(tl.int64)
        col_mask = cols < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, D, cap,
                         HAS_BIAS, HAS_CAP, BM, BN, BD, PRECISION)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        best, best_ids = _insert_topk(best, best_ids, z, cols, K, BN, KP)
    at = (rows[:, None] * splits + split) * KP + slots[None, :]
    out_mask = row_mask[:, None] & (slots[None, :] < K)
    tl.store(vals_ptr + at, best, mask=out_mask)
    tl.store(ids_ptr + at, best_ids.to(tl.int64), mask=out_mask)
