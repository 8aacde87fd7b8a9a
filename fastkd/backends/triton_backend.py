"""Fused Triton backend (``impl="triton"``): streams over the vocabulary, never more than a tile.

The kernels (``triton_kernels``) do every pass over ``h·Wᵀ``: the forward keeps, per row, online
log-sum-exps over V and over ``V∖S`` (exact tail: S is excluded by membership, not subtracted),
the logits at S, the CE statistics, and, for an online teacher, the teacher's in the same pass;
the backward recomputes logit tiles, forms ``dz`` (DESIGN.md §1) and accumulates ``dh``, ``dW``,
``db`` with ``tl.dot``. For a top-k teacher the tiles carry only what is dense over V (the tail
formula below a per-row threshold, CE); the K ids of S per row follow in a correction kernel
(``_topk_correction``), so no tile looks S up and the tiles can be 128 x 256. Everything of size ``(N, K)`` or ``(N,)`` between the passes — bucket
masses, divergence, bucket weights, the per-row gradient coefficients — is the same PyTorch code
as the ``torch`` backend (``torch_backend._topk_epilogue`` on top of ``fastkd.divergences``).

No host synchronisation anywhere: loop bounds are shapes, and blocks of ignored rows are skipped
inside the kernels. Inputs: float16/bfloat16/float32 (float64 is the ``torch`` backend's), on a
CUDA device, or on the CPU under ``TRITON_INTERPRET=1`` (the test lane).

Options (``fastkd.config``): ``deterministic`` (the backward without atomics: one kernel owns each
row block of ``dh``, another each vocabulary tile of ``dW``; bit-identical run to run, one more
logits recomputation). Every gradient tile is computed and accumulated: there is no filter that
skips "small" tiles (an earlier one dropped real gradient, see docs/gpu_checks.md).

Launch configurations (tile sizes, warps, pipeline stages) come from ``launch_configs`` per target
architecture, and every launch goes through ``launch_configs.launch`` (the compile lane records
them there).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from .. import divergences as dv
from ..config import config
from . import launch_configs as lc
from . import triton_kernels as kern
from .torch_backend import _topk_epilogue, counted_rows, sorted_topk_ids

_KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


class _Launch:
    """Tile sizes, warps, stages (``launch_configs``, per target) and dot precision for one call."""

    def __init__(self, hidden: Tensor, k: int = 1, family: str = "stream"):
        self.KP = triton.next_power_of_2(max(k, 1))
        tiles = lc.tiles(family, hidden.device, hidden.dtype, self.KP)
        self.BM, self.BN, self.BD = tiles.BM, tiles.BN, tiles.BD
        self.split = tiles.split
        self.options = tiles.options()
        gather = lc.tiles("gather", hidden.device, hidden.dtype)
        self.gather = dict(KP=self.KP, BD=gather.BD, **gather.options())
        self.correction = lc.tiles("correction", hidden.device, hidden.dtype)
        self.group = 8 if lc.target(hidden.device) != lc.INTERPRETER else 2  # row blocks per group
        # float32 inputs get IEEE float32 dots (tf32 would cost 3 decimal digits of the logits).
        self.PRECISION = "ieee" if hidden.dtype == torch.float32 else "tf32"

    def meta(self, **extra):
        return dict(BM=self.BM, BN=self.BN, BD=self.BD, PRECISION=self.PRECISION, **self.options,
                    **extra)


def _common(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Both operands of a head in one dtype (``tl.dot`` needs that): the wider of the two, so a
    float32 weight with bfloat16 activations is not rounded; contiguous."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dtype).contiguous(), weight.to(dtype).contiguous()


def _head_flags(bias: Optional[Tensor], cap: Optional[float], prefix: str = "") -> dict:
    return {f"{prefix}HAS_BIAS": bias is not None, f"{prefix}HAS_CAP": cap is not None}


def _dummy(device) -> Tensor:
    return torch.empty(1, dtype=torch.float32, device=device)


def _or_dummy(x: Optional[Tensor], device) -> Tensor:
    return _dummy(device) if x is None else x.contiguous()


def _cap(cap: Optional[float]) -> float:
    return 1.0 if cap is None else float(cap)


def _split_plan(n_rows: int, vocab: int, launch: _Launch, device) -> tuple[int, int]:
    """Split-V: ``(splits, span)``, the vocabulary cut into ``splits`` ranges of ``span`` columns
    (whole tiles), so that a forward pass over few rows still fills the GPU: about two programs
    per SM in all (``launch_configs.sm_count``), never more splits than vocabulary tiles."""
    row_blocks = triton.cdiv(max(n_rows, 1), launch.BM)
    tiles = triton.cdiv(max(vocab, 1), launch.BN)
    wanted = max(1, min(tiles, triton.cdiv(2 * lc.sm_count(device), row_blocks)))
    span = triton.cdiv(tiles, wanted) * launch.BN
    return triton.cdiv(max(vocab, 1), span), span


def _merge_lse(m: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Merges per-split running maxima ``m`` and sums ``s = Σ exp(x − m)`` (both ``(N, splits)``):
    returns the log-sum-exp per row and the factors ``exp(m − max)`` that rescale any other sum
    kept against the same maxima. Rows with no entry (max −inf) give −inf, as one pass would."""
    top = m.amax(dim=1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    weights = torch.exp(m - top)
    return top.squeeze(1) + (s * weights).sum(dim=1).log(), weights


def _gathered_capped_logits(hidden, weight, bias, ids, softcap, launch) -> Tensor:
    """``softcap(h·W_Sᵀ + b_S)`` at ``ids (N, K)`` (``-1``: unused, left 0), float32."""
    n_rows, k = ids.shape
    out = torch.zeros((n_rows, k), dtype=torch.float32, device=hidden.device)
    if n_rows:
        lc.launch(kern.gather_forward_kernel, (n_rows,),
            hidden, weight, _or_dummy(bias, hidden.device), ids.to(torch.int32).contiguous(), out,
            n_rows, hidden.shape[1], k, _cap(softcap), **_head_flags(bias, softcap), **launch.gather)
    return out

# The backward tile and the correction kernel each decide "tail formula or not" at an id of S from
# their own computation of its logit (the tile's recompute, the forward's): the threshold keeps
# every logit of S at least THRESHOLD_GAP (tempered units) from it, thousands of times the
# difference of two float32-accumulated dot products of the same operands (~1e-5 at D = 4096).
THRESHOLD_GAP = 1.0 / 32


def _tail_threshold(topk_logits: Tensor, tail_lse: Tensor, valid: Tensor) -> Tensor:
    """Per row the threshold ``theta`` of the backward tiles (``triton_kernels._grad_tile``):
    the tail formula ``p·dense`` below it, 0 above.

    Every logit off S is at most ``tail_lse`` (the log-sum-exp of V∖S), so ``theta ≥ tail_lse +
    2·GAP`` keeps all of them below it. Of the candidates ``tail_lse + (2c + 1)·GAP``,
    ``c = 0..K``, the first with no logit of S within GAP: each logit rules out at most one
    (the intervals ``[tail_lse + 2c·GAP, tail_lse + 2(c+1)·GAP)`` are disjoint), so one is free.
    The ids of S below ``theta`` then have ``p ≤ P_T·e^{(2K+2)·GAP}`` and their tail-formula
    entries stay of the size of the tail's own (a huge ``dense``, a tiny student tail, never meets
    a large ``p``): the values on S are still set, not added. ``-inf`` where V∖S is empty."""
    n_rows, k = topk_logits.shape
    base = tail_lse + THRESHOLD_GAP
    finite = torch.isfinite(base)
    base = torch.where(finite, base, 0.0)
    slot = torch.floor((topk_logits - base.unsqueeze(1)) / (2 * THRESHOLD_GAP))
    inside = valid & finite.unsqueeze(1) & (slot >= 0) & (slot <= k)
    slot = torch.where(inside, slot, k + 1).long()
    blocked = torch.zeros((n_rows, k + 2), dtype=torch.bool, device=topk_logits.device)
    blocked.scatter_(1, slot, torch.ones_like(slot, dtype=torch.bool))
    free = (~blocked[:, : k + 1]).to(torch.uint8).argmax(dim=1)
    theta = base + (2 * free + 1) * THRESHOLD_GAP
    return torch.where(finite, theta, float("-inf"))


def _slot_coefficients(topk_logits: Tensor, w: Tensor, kd_lse: Tensor, dense: Tensor,
                       topk_coef: Tensor, theta: Tensor, sorted_ids: Tensor, valid: Tensor,
                       tail: str, temperature: float, softcap: Optional[float]) -> Tensor:
    """Per slot of the sorted S, what the correction kernel adds at its id per unit of
    ``kd_scale``: the exact ``w − p·topk_coef`` minus the tile's ``p·dense`` where the tile wrote
    it (logit ≤ theta, bucket tail only), times the softcap's derivative; ``p = exp(z − kd_lse)``.

    Zero on unused slots and ``valid`` False, and on every slot of a repeated id but its last
    (sorted order), so the id gets one value, set, as the tile kernels always did."""
    probs = torch.exp(topk_logits - kd_lse.unsqueeze(1))
    coef = w - probs * topk_coef.unsqueeze(1)
    if tail == "bucket":
        coef = coef - torch.where(topk_logits <= theta.unsqueeze(1), probs * dense.unsqueeze(1), 0.0)
    if softcap is not None:
        coef = coef * (1.0 - (topk_logits * (temperature / softcap)) ** 2)
    last = torch.ones_like(valid)
    last[:, :-1] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    return torch.where(valid & last, coef, 0.0)


def _topk_correction(hidden: Tensor, weight: Tensor, teacher_ids: Tensor, slot_coef: Tensor,
                     kd_scale: Tensor, grads, has_bias: bool, launch: _Launch,
                     slab: tuple[int, int] = (0, -1)) -> None:
    """Adds the slots of S to ``dh``, ``dW``, ``db`` (``triton_kernels.topk_correction_kernel``):
    relaxed atomics into ``dW``/``db``, or, ``config.deterministic``, ``dW``/``db`` by a pass over
    the slots sorted by id (``topk_correction_dw_kernel``), bit-identical run to run.

    ``slab = (v0, v1)``: ``dw`` holds vocabulary rows ``v0..v1`` only (``_by_slab``), and only the
    ids there are added to it; ``dh`` is added with the first slab. Default: the whole vocabulary."""
    n_rows, dim = hidden.shape
    vocab, k = weight.shape[0], teacher_ids.shape[1]
    v0, v1 = slab[0], vocab if slab[1] < 0 else slab[1]
    if n_rows == 0 or k == 0:
        return
    dh, dw, db = grads
    tiles = launch.correction
    ids = teacher_ids.to(torch.int32).contiguous()
    deterministic = config.deterministic
    lc.launch(kern.topk_correction_kernel, (triton.cdiv(n_rows, tiles.BM), triton.cdiv(dim, tiles.BD)),
              hidden, weight, ids, slot_coef, kd_scale, dh, dw, db, n_rows, vocab, dim, k, v0, v1,
              HAS_BIAS=has_bias, WITH_DH=v0 == 0, WITH_DW=not deterministic, BM=tiles.BM,
              BD=tiles.BD, **tiles.options())
    if deterministic:  # never slabbed (_slabs)
        flat = torch.where((teacher_ids >= 0) & (teacher_ids < vocab), teacher_ids, vocab).reshape(-1)
        sorted_flat, order = torch.sort(flat, stable=True)
        delta = (kd_scale.unsqueeze(1) * slot_coef).reshape(-1)[order].contiguous()
        rows = torch.div(order, k, rounding_mode="floor").to(torch.int32).contiguous()
        blocks = triton.cdiv(vocab, tiles.BN)
        edges = torch.arange(blocks + 1, device=hidden.device).mul_(tiles.BN).clamp_(max=vocab)
        bounds = torch.searchsorted(sorted_flat, edges).contiguous()
        lc.launch(kern.topk_correction_dw_kernel, (blocks, triton.cdiv(dim, tiles.BD)),
                  hidden, sorted_flat.to(torch.int32).contiguous(), rows, delta, bounds, dw, db, dim,
                  HAS_BIAS=has_bias, BD=tiles.BD, **tiles.options())


# The backward's float32 dW, a slab of the vocabulary at a time. A 16-bit weight's gradient comes
# back in 16 bits, but the atomics add into float32: a whole float32 dW would be V·D·4 B beside
# the V·D·2 B result (1.1 GB more at Llama-3-8B's head, 6.6 % of the naive loss's memory at
# N 8192). So the vocabulary is walked in slabs of float32 rows: each slab's tiles and correction
# add into one float32 slab buffer, which is then rounded into the result. The extra memory is then
# that buffer, the float32 dh (N·D·4: a single pass needs some full-size float32 accumulator, and
# dh is the smaller one) and the (N, K) and (N,) state. The slab is at most 1/SLAB_SHARE of the
# float32 dh, between SLAB_MIN_BYTES and SLAB_BYTES (_slab_bytes), so the extra memory stays about
# 1.1 × the float32 dh: 0.9 % / 0.3 % / 0.3 % of the naive loss at the model's shapes (N 8192).
# Cost: h is read again per slab (N·D·2 B each) and each slab is two more launches, both counted by
# the cost model. float32 weights (the result is the accumulator) and config.deterministic (its
# dW pass walks the whole vocabulary) take one slab.
SLAB_BYTES = 64 * 2**20
SLAB_MIN_BYTES = 16 * 2**20
SLAB_SHARE = 8


def _slab_bytes(n_rows: int, dim: int) -> int:
    """The float32 bytes of one dW slab for ``n_rows`` rows of width ``dim`` (see above)."""
    return min(SLAB_BYTES, max(SLAB_MIN_BYTES, n_rows * dim * 4 // SLAB_SHARE))


def _slabs(vocab: int, dim: int, weight_dtype: torch.dtype, block_n: int,
           n_rows: int = 0) -> list[tuple[int, int]]:
    """The vocabulary slabs ``[(v0, v1), ...]`` of the streaming backward (``_slab_bytes``)."""
    if weight_dtype == torch.float32 or config.deterministic or vocab == 0:
        return [(0, vocab)]
    rows = max(block_n, _slab_bytes(n_rows, dim) // (4 * max(dim, 1)) // block_n * block_n)
    return [(v0, min(vocab, v0 + rows)) for v0 in range(0, vocab, rows)]


def _by_slab(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], weight_dtype: torch.dtype,
             block_n: int, run) -> tuple[Tensor, Tensor, Tensor]:
    """``(dh, dW, db)``: float32 ``dh``/``db``, and ``dW`` in ``weight_dtype`` built slab by slab
    (``_slabs``): ``run(v0, v1, (dh, dw_slab, db))`` adds the slab's part, ``dw_slab`` holding
    rows ``v0..v1``. One slab: ``dW`` is the float32 accumulator itself."""
    vocab, dim = weight.shape
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dh = torch.zeros(hidden.shape, **f32)
    db = torch.zeros(vocab if bias is not None else 1, **f32)
    slabs = _slabs(vocab, dim, weight_dtype, block_n, hidden.shape[0])
    if len(slabs) == 1:
        dw = torch.zeros(weight.shape, **f32)
        run(0, vocab, (dh, dw, db))
        return dh, dw, db
    result = torch.empty(weight.shape, dtype=weight_dtype, device=hidden.device)
    buffer = torch.empty((slabs[0][1] - slabs[0][0], dim), **f32)
    for v0, v1 in slabs:
        part = buffer[: v1 - v0].zero_()
        run(v0, v1, (dh, part, db))
        result[v0:v1].copy_(part)
    return dh, result, db


def _slab_args(v0: int, v1: int, weight: Tensor, bias: Optional[Tensor], labels: Optional[Tensor],
               db: Tensor, device) -> tuple:
    """The head's weight, bias, labels and db as the backward tiles of slab ``v0..v1`` see them
    (its rows; labels shifted so that the slab's first column is 0)."""
    slab_bias = _or_dummy(None if bias is None else bias[v0:v1], device)
    slab_labels = _or_dummy(None if labels is None else (labels - v0 if v0 else labels), device)
    return weight[v0:v1], slab_bias, slab_labels, (db[v0:v1] if bias is not None else db)


# ------------------------------------------------------------------------------------------------
# top-k (offline teacher log-probs, or an online teacher streamed in the same pass)
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastkd::triton_topk_kd_forward", mutates_args=())
def topk_kd_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_ids: Tensor,
    teacher_logprobs: Optional[Tensor], teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor], labels: Optional[Tensor],
    divergence: str, beta: float, tail: str, temperature: float, softcap: Optional[float],
    teacher_softcap: Optional[float], ignore_index: int, ce_weight: float, kd_weight: float,
    with_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """As ``fastkd::topk_kd_forward`` of the torch backend, float32, with what this backward
    needs in the last two of ``(loss_rows, kd_rows, state (N, 4), slot_coef (N, K), stats (N|0,
    3))``: ``state`` = kd_lse, dense, theta (``_tail_threshold``), lse_ce, and ``slot_coef`` the
    gradient at each slot of S that the backward tiles leave to the correction kernel
    (``_slot_coefficients``). The teacher is either ``teacher_logprobs`` (offline) or
    ``teacher_hidden``/``teacher_weight``/``teacher_bias`` (online, exact tail)."""
    n_rows, dim = hidden.shape
    vocab, k = weight.shape[0], teacher_ids.shape[1]
    device = hidden.device
    hidden, weight = _common(hidden, weight)
    online = teacher_hidden is not None
    if online:
        teacher_hidden, teacher_weight = _common(teacher_hidden, teacher_weight)
    launch = _Launch(hidden, k, "stream_teacher" if online else "stream_stats" if with_stats else "stream")
    counted = counted_rows(labels, n_rows, ignore_index, device)
    use_ce = ce_weight != 0.0
    full_pass = tail == "bucket" or use_ce or with_stats or online
    sorted_ids, perm = sorted_topk_ids(teacher_ids, vocab)
    valid = sorted_ids < vocab
    f32 = dict(dtype=torch.float32, device=device)

    lse = tail_lse = lse_ce = target = mean_z = None
    if full_pass:
        splits, span = _split_plan(n_rows, vocab, launch, device)
        part = torch.zeros((n_rows, splits, 10), **f32)
        topk_logits = torch.zeros((n_rows, k), **f32)
        teacher_topk_logits = torch.zeros((n_rows, k), **f32)
        if n_rows:
            lc.launch(kern.topk_forward_kernel, (triton.cdiv(n_rows, launch.BM), splits),
                hidden, weight, _or_dummy(bias, device), _or_dummy(teacher_hidden, device),
                _or_dummy(teacher_weight, device), _or_dummy(teacher_bias, device), sorted_ids,
                _or_dummy(labels, device), part, topk_logits, teacher_topk_logits,
                n_rows, vocab, dim, teacher_hidden.shape[1] if online else 1, k, span,
                1.0 / temperature, _cap(softcap), _cap(teacher_softcap), ignore_index,
                **_head_flags(bias, softcap), HAS_TEACHER=online,
                **_head_flags(teacher_bias, teacher_softcap, "T_"), HAS_LABELS=labels is not None,
                WITH_CE=use_ce, WITH_STATS=with_stats, **launch.meta(KP=launch.KP))
        m, s_all, s_tail, s_z, m_ce, s_ce, target_part, mt, st, st_tail = part.unbind(dim=2)
        lse, weights = _merge_lse(m, s_all)
        tail_lse = _merge_lse(m, s_tail)[0]
        mean_z = (s_z * weights).sum(dim=1) / (s_all * weights).sum(dim=1)
        lse_ce = _merge_lse(m_ce, s_ce)[0]
        target = target_part.sum(dim=1)
        t_lse = _merge_lse(mt, st)[0]
        t_tail_lse = _merge_lse(mt, st_tail)[0]
    else:
        ids = teacher_ids.gather(1, perm)
        topk_logits = _gathered_capped_logits(hidden, weight, bias, ids, softcap, launch) / temperature

    if online:
        teacher_lp = torch.where(valid, teacher_topk_logits - t_lse.unsqueeze(1), 0.0)
        teacher_log_tail = dv.tail_logmass(
            dv.masked_logsumexp(teacher_topk_logits, valid), t_lse, t_tail_lse)[0]
    else:
        teacher_lp = teacher_logprobs.float().gather(1, perm)
        teacher_log_tail = None
    kd, w, kd_lse, dense, topk_coef = _topk_epilogue(
        topk_logits, lse, tail_lse, teacher_lp, teacher_log_tail, valid, tail, divergence, beta)

    zero = torch.zeros((), **f32)
    kd_rows = torch.where(counted, kd, zero)
    loss_rows = kd_weight * temperature**2 * kd_rows
    if use_ce:
        loss_rows = loss_rows + torch.where(counted, ce_weight * (lse_ce - target), zero)
    else:
        lse_ce = torch.zeros(n_rows, **f32)
    if tail == "bucket":
        theta = _tail_threshold(topk_logits, tail_lse, valid)
    else:
        theta = torch.zeros_like(kd_lse)  # no tail formula in the backward's tiles
    state = torch.stack([kd_lse, dense, theta, lse_ce], dim=1)
    state = torch.where(counted.unsqueeze(1), state, zero)  # fully ignored blocks were never read
    slot_coef = _slot_coefficients(topk_logits, w, kd_lse, dense, topk_coef, theta, sorted_ids,
                                   valid & counted.unsqueeze(1), tail, temperature, softcap)
    slot_coef = torch.zeros_like(slot_coef).scatter_(1, perm, slot_coef)
    if with_stats:
        topk_mass = dv.masked_logsumexp(topk_logits, valid).sub(lse).exp()
        stats = torch.stack([lse - mean_z, lse, topk_mass], dim=1)
    else:
        stats = torch.zeros((0, 3), **f32)
    return loss_rows, kd_rows, state.contiguous(), slot_coef, stats


@topk_kd_forward.register_fake
def _(hidden, weight, bias, teacher_ids, teacher_logprobs, teacher_hidden, teacher_weight,
      teacher_bias, labels, divergence, beta, tail, temperature, softcap, teacher_softcap,
      ignore_index, ce_weight, kd_weight, with_stats):
    n_rows = hidden.shape[0]
    rows = hidden.new_empty(n_rows, dtype=torch.float32)
    return (rows, torch.empty_like(rows), hidden.new_empty((n_rows, 4), dtype=torch.float32),
            hidden.new_empty(teacher_ids.shape, dtype=torch.float32),
            hidden.new_empty((n_rows if with_stats else 0, 3), dtype=torch.float32))


def _backward_launch(kernel_args: tuple, n_rows: int, vocab: int, launch: _Launch, **flags) -> None:
    """Runs the backward kernel: atomics (MODE 0, grouped program order), or the deterministic
    row/column pair (1 + 2)."""
    if n_rows == 0:
        return
    flags = dict(flags, GROUP=launch.group, SPLIT=launch.split)
    row_blocks, col_blocks = triton.cdiv(n_rows, launch.BM), triton.cdiv(vocab, launch.BN)
    if config.deterministic:
        lc.launch(kern.backward_kernel, (row_blocks,), *kernel_args, MODE=1, **flags, **launch.meta())
        lc.launch(kern.backward_kernel, (col_blocks,), *kernel_args, MODE=2, **flags, **launch.meta())
    else:
        lc.launch(kern.backward_kernel, (row_blocks * col_blocks,), *kernel_args, MODE=0, **flags,
                  **launch.meta())


def _grad_results(grads, hidden, weight, bias):
    dh, dw, db = grads
    return (dh.to(hidden.dtype), dw.to(weight.dtype),
            db.to(bias.dtype) if bias is not None else weight.new_empty(0))


@torch.library.custom_op("fastkd::triton_topk_kd_backward", mutates_args=())
def topk_kd_backward(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_ids: Tensor,
    labels: Optional[Tensor], state: Tensor, slot_coef: Tensor, tail: str, temperature: float,
    softcap: Optional[float], ignore_index: int, ce_weight: float, kd_weight: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(d hidden, d weight, d bias or empty)`` of ``Σ_n grad_rows[n] · loss_rows[n]``.

    The tiles (``backward_kernel``) carry what is dense over V: the tail formula and CE; without
    either (tail="renormalize", no CE) there are none and the gradient is O(N·K·D). Then the
    slots of S (``_topk_correction``)."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    results_like = (hidden, weight, bias)
    hidden, weight = _common(hidden, weight)
    use_ce = ce_weight != 0.0
    if config.deterministic:
        family = "backward_deterministic"
    else:  # CE or a bias: more alive per tile entry, narrower tiles
        family = "backward_ce" if use_ce or bias is not None else "backward"
    launch = _Launch(hidden, teacher_ids.shape[1], family)
    counted = counted_rows(labels, n_rows, ignore_index, hidden.device)
    grad_rows = torch.where(counted, grad_rows.float(), 0.0)
    kd_scale = (kd_weight * temperature * grad_rows).contiguous()  # τ² of the loss, 1/τ of z = s/τ
    ce_scale = (ce_weight * grad_rows).contiguous()
    slot_coef = slot_coef.contiguous()
    device = hidden.device

    def run(v0, v1, grads):
        if tail == "bucket" or use_ce:
            w_slab, b_slab, labels_slab, db_slab = _slab_args(v0, v1, weight, bias, labels, grads[2], device)
            args = (hidden, w_slab, b_slab, _dummy(device), _dummy(device), _dummy(device),
                    labels_slab, state, kd_scale, ce_scale, grads[0], grads[1], db_slab, n_rows,
                    v1 - v0, dim, 1, 1.0 / temperature, _cap(softcap), 1.0, 0.5)
            _backward_launch(args, n_rows, v1 - v0, launch, **_head_flags(bias, softcap),
                             T_HAS_BIAS=False, T_HAS_CAP=False, DENSE_TEACHER=False,
                             WITH_TAIL=tail == "bucket", WITH_CE=use_ce, KIND=0)
        _topk_correction(hidden, weight, teacher_ids, slot_coef, kd_scale, grads, bias is not None,
                         launch, (v0, v1))

    grads = _by_slab(hidden, weight, bias, results_like[1].dtype, launch.BN, run)
    return _grad_results(grads, *results_like)


@topk_kd_backward.register_fake
def _(grad_rows, hidden, weight, bias, teacher_ids, labels, state, slot_coef, tail, temperature,
      softcap, ignore_index, ce_weight, kd_weight):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            weight.new_empty(weight.shape[0] if bias is not None else 0))


def _topk_setup_context(ctx, inputs, output):
    (hidden, weight, bias, teacher_ids, _lp, _th, _tw, _tb, labels, _divergence, _beta, tail,
     temperature, softcap, _teacher_softcap, ignore_index, ce_weight, kd_weight, _with_stats) = inputs
    ctx.save_for_backward(hidden, weight, bias, teacher_ids, labels, output[2], output[3])
    ctx.options = (tail, temperature, softcap, ignore_index, ce_weight, kd_weight)


def _topk_backward(ctx, grad_loss_rows, _grad_kd, _grad_state, _grad_weights, _grad_stats):
    hidden, weight, bias, teacher_ids, labels, state, slot_coef = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = topk_kd_backward(
        grad_loss_rows, hidden, weight, bias, teacher_ids, labels, state, slot_coef, *ctx.options)
    return (grad_hidden, grad_weight, grad_bias if bias is not None else None) + (None,) * 16


torch.library.register_autograd(
    "fastkd::triton_topk_kd_forward", _topk_backward, setup_context=_topk_setup_context)


# ------------------------------------------------------------------------------------------------
# online teacher, full vocabulary
# ------------------------------------------------------------------------------------------------

def _kind(divergence: str, beta: float) -> int:
    return _KINDS[dv._resolve(divergence, beta)[0]]


@torch.library.custom_op("fastkd::triton_dense_kd_forward", mutates_args=())
def dense_kd_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_hidden: Tensor,
    teacher_weight: Tensor, teacher_bias: Optional[Tensor], labels: Optional[Tensor],
    divergence: str, beta: float, temperature: float, softcap: Optional[float],
    teacher_softcap: Optional[float], ignore_index: int, ce_weight: float, kd_weight: float,
    with_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss_rows, kd_rows, state (N, 4): lse, teacher lse, W = Σ w, lse_ce, stats (N|0, 2))``."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    hidden, weight = _common(hidden, weight)
    teacher_hidden, teacher_weight = _common(teacher_hidden, teacher_weight)
    launch = _Launch(hidden, 1, "dense")
    counted = counted_rows(labels, n_rows, ignore_index, device)
    use_ce = ce_weight != 0.0
    f32 = dict(dtype=torch.float32, device=device)
    splits, span = _split_plan(n_rows, vocab, launch, device)
    part = torch.zeros((n_rows, splits, 8), **f32)
    lse = t_lse = torch.zeros(n_rows, **f32)
    for pass_ in (1, 2):
        if n_rows:
            lc.launch(kern.dense_forward_kernel, (triton.cdiv(n_rows, launch.BM), splits),
                hidden, weight, _or_dummy(bias, device), teacher_hidden, teacher_weight,
                _or_dummy(teacher_bias, device), _or_dummy(labels, device), lse, t_lse, part,
                n_rows, vocab, dim, teacher_hidden.shape[1], span,
                1.0 / temperature, _cap(softcap), _cap(teacher_softcap), ignore_index, float(beta),
                **_head_flags(bias, softcap), **_head_flags(teacher_bias, teacher_softcap, "T_"),
                HAS_LABELS=labels is not None, WITH_CE=use_ce, WITH_STATS=with_stats,
                KIND=_kind(divergence, beta), PASS=pass_, **launch.meta())
        if pass_ == 1:
            m, s_all, s_z, mt, st, m_ce, s_ce, target_part = part.unbind(dim=2)
            lse, weights = _merge_lse(m, s_all)
            mean_z = (s_z * weights).sum(dim=1) / (s_all * weights).sum(dim=1)
            t_lse = _merge_lse(mt, st)[0].contiguous()
            lse = lse.contiguous()
            lse_ce = _merge_lse(m_ce, s_ce)[0]
            target = target_part.sum(dim=1)
            part = torch.zeros((n_rows, splits, 8), **f32)
    kd, wsum = part[:, :, 0].sum(dim=1), part[:, :, 1].sum(dim=1)
    zero = torch.zeros((), **f32)
    kd_rows = torch.where(counted, kd, zero)
    loss_rows = kd_weight * temperature**2 * kd_rows
    if use_ce:
        loss_rows = loss_rows + torch.where(counted, ce_weight * (lse_ce - target), zero)
    state = torch.where(counted.unsqueeze(1), torch.stack([lse, t_lse, wsum, lse_ce], dim=1), zero)
    if with_stats:
        stats = torch.stack([lse - mean_z, lse], dim=1)
    else:
        stats = torch.zeros((0, 2), **f32)
    return loss_rows, kd_rows, state.contiguous(), stats


@dense_kd_forward.register_fake
def _(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, divergence, beta,
      temperature, softcap, teacher_softcap, ignore_index, ce_weight, kd_weight, with_stats):
    n_rows = hidden.shape[0]
    rows = hidden.new_empty(n_rows, dtype=torch.float32)
    return (rows, torch.empty_like(rows), hidden.new_empty((n_rows, 4), dtype=torch.float32),
            hidden.new_empty((n_rows if with_stats else 0, 2), dtype=torch.float32))


@torch.library.custom_op("fastkd::triton_dense_kd_backward", mutates_args=())
def dense_kd_backward(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
    labels: Optional[Tensor], state: Tensor, divergence: str, beta: float, temperature: float,
    softcap: Optional[float], teacher_softcap: Optional[float], ignore_index: int,
    ce_weight: float, kd_weight: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(d hidden, d weight, d bias or empty)``; teacher tiles recomputed, frozen."""
    n_rows, dim = hidden.shape
    device = hidden.device
    results_like = (hidden, weight, bias)
    hidden, weight = _common(hidden, weight)
    teacher_hidden, teacher_weight = _common(teacher_hidden, teacher_weight)
    launch = _Launch(hidden, 1, "backward_dense")
    counted = counted_rows(labels, n_rows, ignore_index, device)
    grad_rows = torch.where(counted, grad_rows.float(), 0.0)
    kd_scale = (kd_weight * temperature * grad_rows).contiguous()
    ce_scale = (ce_weight * grad_rows).contiguous()

    def run(v0, v1, grads):
        w_slab, b_slab, labels_slab, db_slab = _slab_args(v0, v1, weight, bias, labels, grads[2], device)
        args = (hidden, w_slab, b_slab, teacher_hidden, teacher_weight[v0:v1],
                _or_dummy(None if teacher_bias is None else teacher_bias[v0:v1], device),
                labels_slab, state, kd_scale, ce_scale, grads[0], grads[1], db_slab, n_rows,
                v1 - v0, dim, teacher_hidden.shape[1], 1.0 / temperature, _cap(softcap),
                _cap(teacher_softcap), float(beta))
        _backward_launch(args, n_rows, v1 - v0, launch, **_head_flags(bias, softcap),
                         **_head_flags(teacher_bias, teacher_softcap, "T_"), DENSE_TEACHER=True,
                         WITH_TAIL=False, WITH_CE=ce_weight != 0.0, KIND=_kind(divergence, beta))

    grads = _by_slab(hidden, weight, bias, results_like[1].dtype, launch.BN, run)
    return _grad_results(grads, *results_like)


@dense_kd_backward.register_fake
def _(grad_rows, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, state,
      divergence, beta, temperature, softcap, teacher_softcap, ignore_index, ce_weight, kd_weight):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            weight.new_empty(weight.shape[0] if bias is not None else 0))


def _dense_setup_context(ctx, inputs, output):
    (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, divergence, beta,
     temperature, softcap, teacher_softcap, ignore_index, ce_weight, kd_weight, _with_stats) = inputs
    ctx.save_for_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                          labels, output[2])
    ctx.options = (divergence, beta, temperature, softcap, teacher_softcap, ignore_index,
                   ce_weight, kd_weight)


def _dense_backward(ctx, grad_loss_rows, _grad_kd, _grad_state, _grad_stats):
    hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, state = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = dense_kd_backward(
        grad_loss_rows, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels,
        state, *ctx.options)
    return (grad_hidden, grad_weight, grad_bias if bias is not None else None) + (None,) * 13


torch.library.register_autograd(
    "fastkd::triton_dense_kd_forward", _dense_backward, setup_context=_dense_setup_context)


# ------------------------------------------------------------------------------------------------
# online teacher, top-k: the set S by a running top-k over streamed tiles
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastkd::triton_select_topk", mutates_args=())
def select_topk(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_hidden: Tensor,
    teacher_weight: Tensor, teacher_bias: Optional[Tensor], k: int, topk_from: str,
    softcap: Optional[float], teacher_softcap: Optional[float],
) -> Tensor:
    """S per row, ``(N, K')`` int64 with ``-1`` on unused slots (see ``divergences.select_topk``).

    The kernel keeps a running top-K per row and vocabulary split (no sort), one head per launch
    (the union launches twice: the same GEMM work as one fused pass, half the registers); the
    splits' candidates, ``(N, splits·K)``, are merged here with one ``torch.topk``."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    hidden, weight = _common(hidden, weight)
    teacher_hidden, teacher_weight = _common(teacher_hidden, teacher_weight)
    launch = _Launch(hidden, k, "select")
    splits, span = _split_plan(n_rows, vocab, launch, device)

    def top(head: Tensor, head_weight: Tensor, head_bias: Optional[Tensor], cap) -> Tensor:
        shape = (n_rows, splits, launch.KP)
        vals = torch.full(shape, float("-inf"), dtype=torch.float32, device=device)
        ids = torch.zeros(shape, dtype=torch.int64, device=device)
        if n_rows:
            lc.launch(kern.select_topk_kernel, (triton.cdiv(n_rows, launch.BM), splits),
                      head, head_weight, _or_dummy(head_bias, device), vals, ids,
                      n_rows, vocab, head.shape[1], k, span, _cap(cap),
                      **_head_flags(head_bias, cap), **launch.meta(KP=launch.KP))
        best = vals.reshape(n_rows, -1).topk(k, dim=1).indices
        return ids.reshape(n_rows, -1).gather(1, best)

    if topk_from == "student":
        return top(hidden, weight, bias, softcap)
    first = top(teacher_hidden, teacher_weight, teacher_bias, teacher_softcap)
    if topk_from == "teacher":
        return first
    student = top(hidden, weight, bias, softcap)
    seen = (student.unsqueeze(-1) == first.unsqueeze(-2)).any(dim=-1)
    return torch.cat([first, torch.where(seen, -1, student)], dim=-1)


@select_topk.register_fake
def _(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, k, topk_from, softcap,
      teacher_softcap):
    width = 2 * k if topk_from == "union" else k
    return hidden.new_empty((hidden.shape[0], width), dtype=torch.int64)
