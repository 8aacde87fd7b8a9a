"""Epilogues of the chunked plan in plain PyTorch ops: the CPU path, and a reference on any device.

The chunked plan (``fastkd.backends.chunked``) hands every provider the same calls, with the
argument order of the csrc extension (``csrc/bindings.cpp``) minus the dtype code and the stream:
``topk_stats``, ``topk_grad``, ``dense_stats``, ``dense_divergence``, ``dense_grad``. The formulas
are DESIGN.md §1 through ``fastkd.divergences``; per row, on the logits buffer ``x (rows, V)``
(float32 or float64, unrounded GEMM outputs), ``s = softcap(x)``, ``z = s/τ``:

- ``topk_stats``: ``lse = logsumexp(z)``, the exact ``tail_lse`` over ``V∖S`` (summed with S
  zeroed, no ``1 − Σ_S`` cancellation), ``lse_ce = logsumexp(s)``, ``mean_z = E_p[z]``;
- ``topk_grad``: ``dz = dense_scale · exp(z − kd_lse)`` off S (zero without a tail), the given
  values set on S, plus ``ce_scale · (softmax(s) − onehot(label))``, times ``softcap'(x)``;
- ``dense_stats`` / ``dense_divergence`` / ``dense_grad``: both heads' log-sum-exps, the per-row
  divergence and ``W = Σ_v w_v / Σ_v p_v`` (= Σ w in exact arithmetic; divided by the Σp actually
  computed so that Σ_v dz_v is 0 in floating point too), then ``dz = kd_scale · (w − p·W) + CE``,
  times ``softcap'``.

Unlike the GPU providers, this one is allowed to **reuse the buffer between the calls of one
chunk** (``keeps_logits = False``): the plan gathers what it needs from the raw logits first and
always calls the stats epilogue before the gradient epilogue of the same chunk. Without softcap
(and without CE, or at τ = 1) that lets the work run as a few fused passes over the chunk in
place: one exp pass, one sum for the tail, one scaling for ``dz`` (top-k), or two
``log_softmax`` and a handful of passes (dense). With a softcap, or CE at τ ≠ 1, a general path
keeps the logits and recomputes what it needs (clearer, a few passes more).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import divergences as dv

_KINDS = ("forward_kl", "reverse_kl", "jsd")


def _row(x: Tensor) -> Tensor:
    return x.unsqueeze(1)


# Columns per partial dot product of _rowdot. One batched GEMV over the whole row sums V terms
# one after another (CPU BLAS): at V = 32768 its error was ~1e-4 of a reverse KL of 20 nats, which
# the gradient p·(log p − log q − KL) of a confident row then carries whole (dh off by 1 % on such
# rows, 100x plain float32 PyTorch). Dots over 64 columns, then torch's cascaded sum over the
# partials: as accurate as ``(a * b).sum(1)`` to a small factor, without its product block.
_DOT_COLUMNS = 64


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_v a[n, v] · b[n, v]`` per row, in one read of both (batched dot products over
    ``_DOT_COLUMNS`` columns, then a cascaded sum of the partial sums)."""
    rows, vocab = a.shape
    whole = vocab - vocab % _DOT_COLUMNS
    out = torch.zeros(rows, dtype=a.dtype, device=a.device)
    if whole:
        parts = a[:, :whole].reshape(rows, -1, 1, _DOT_COLUMNS) @ b[:, :whole].reshape(rows, -1, _DOT_COLUMNS, 1)
        out += parts.reshape(rows, -1).sum(dim=1)
    if whole < vocab:
        out += (a[:, whole:].unsqueeze(1) @ b[:, whole:].unsqueeze(2)).reshape(rows)
    return out


class TorchEpilogue:
    """The five epilogues in torch ops; one instance per op call (it carries state per chunk)."""

    name = "torch"
    keeps_logits = False  # the stats calls may reuse the buffer; see the module docstring
    takes_out = True

    @staticmethod
    def scratch_blocks(divergence: Optional[str], general: bool, stats: bool = True) -> int:
        """``chunk x V`` blocks this provider allocates next to the plan's buffers (the plan
        sizes its chunks with them). Fast path: none for top-k (in place); for reverse KL ``p``
        only with the statistics (``E_p[z]`` needs ``p`` and ``log p`` at once), else none (``p``
        replaces ``log p`` in place); ``p, q`` for forward KL, ``p, q, M`` for JSD. The general
        path (softcap, or CE at τ ≠ 1) keeps the raw logits and makes two more (the tempered
        logits, or ``log p`` and ``log q``)."""
        fast = {None: 0, "reverse_kl": 1 if stats and not general else 0, "forward_kl": 2, "jsd": 3}[divergence]
        return fast + (2 if general else 0)

    def __init__(self):
        self._fast = False
        self._scratch: dict[str, Tensor] = {}
        self._p_topk: Optional[Tensor] = None  # p at S, saved by topk_stats (CE term, tail)
        self._inv_total: Optional[Tensor] = None  # 1/Σe per row (fast top-k path, topk_stats)
        self._tail_sum: Optional[Tensor] = None  # Σe over V∖S per row (fast path with a tail)
        self._mean_z: Optional[Tensor] = None  # E_p[z], filled by the divergence pass (fast path)

    # -------------------------------------------------------------------------------------------
    # top-k
    # -------------------------------------------------------------------------------------------

    def topk_stats(self, logits: Tensor, rows: int, vocab: int, sorted_ids: Optional[Tensor], k: int,
                   inv_temp: float, cap: float, with_tail: bool, with_ce: bool, with_stats: bool,
                   lse: Tensor, tail_lse: Optional[Tensor], lse_ce: Optional[Tensor],
                   mean_z: Optional[Tensor]) -> None:
        ids, valid = _ids(sorted_ids, vocab, k)
        self._fast = cap == 0.0 and (not with_ce or inv_temp == 1.0)
        if not self._fast:
            self._topk_stats_general(logits, ids, valid, inv_temp, cap, with_tail, with_ce,
                                     with_stats, lse, tail_lse, lse_ce, mean_z)
            return
        # Fast path: the buffer becomes e = exp(z − max z) (with S zeroed when there is a tail),
        # p = e / Σe. torch.exp, not aten softmax: on the CPU the softmax kernels use a faster,
        # less exact exp (their lse was off by up to 3e-5 where this one is off by 1e-6), and e
        # needs no division pass: 1/Σe goes into the gradient's row scale.
        if inv_temp != 1.0:
            logits.mul_(inv_temp)
        raw_max = logits.amax(dim=1)
        exps = logits.sub_(_row(raw_max)).exp_()
        total = exps.sum(dim=1)
        row_lse = total.log().add_(raw_max)
        lse.copy_(row_lse)
        if with_ce:
            lse_ce.copy_(row_lse)  # τ = 1 here: the CE logits are z
        if with_stats:  # E_p[z] = lse + Σ p log p, Σ p log p = Σ e log e / Σe − log Σe
            mean_z.copy_(row_lse + torch.special.xlogy(exps, exps).sum(dim=1).div_(total) - total.log())
        self._inv_total = total.reciprocal_()
        self._p_topk = exps.gather(1, ids).mul_(_row(self._inv_total)) if with_ce or with_tail else None
        if with_tail:
            _set_at_(exps, ids, valid, 0.0)
            self._tail_sum = exps.sum(dim=1)
            tail_lse.copy_(self._tail_sum.log().add_(raw_max))

    def topk_grad(self, logits: Tensor, rows: int, vocab: int, sorted_ids: Optional[Tensor],
                  sorted_values: Optional[Tensor], k: int, kd_lse: Tensor,
                  dense_scale: Optional[Tensor], lse_ce: Optional[Tensor],
                  ce_scale: Optional[Tensor], labels: Optional[Tensor], inv_temp: float, cap: float,
                  with_tail: bool, with_ce: bool, out: Optional[Tensor] = None) -> Tensor:
        ids, valid = _ids(sorted_ids, vocab, k)
        if not self._fast:
            return self._topk_grad_general(logits, ids, valid, sorted_values, kd_lse, dense_scale,
                                           lse_ce, ce_scale, labels, inv_temp, cap, with_tail,
                                           with_ce, out)
        # The buffer holds e = p·Σe (topk_stats); kd_lse is lse with a tail (the only fast case
        # with a dense part: without a tail the KD part lives on S alone).
        probs = logits
        scale = dense_scale if with_tail else None
        if with_ce:
            scale = ce_scale if scale is None else scale + ce_scale
        values = sorted_values if sorted_values is not None else None
        if with_ce and k > 0:
            values = values + _row(ce_scale) * self._p_topk
        off_s = None if scale is None else scale * self._inv_total
        if with_tail and k > 0:
            # Σ_v dz_v is 0 in exact arithmetic; in float32 the residual r (from the row sums
            # behind the coefficients) is a shift along p that dh carries whole: a flat student
            # had 10x the dh error of plain float32 PyTorch. dz − r·p removes it (to r·(1 − Σp)).
            # Only where r is rounding next to the row's own |dz| (_small_residual).
            on_s = torch.where(valid, values, 0.0)
            off_total = off_s * self._tail_sum
            residual = off_total + on_s.sum(dim=1)
            size = off_total.abs() + on_s.abs().sum(dim=1)
            if with_ce:
                residual = residual - ce_scale
                size = size + ce_scale.abs()
            residual = _small_residual(residual, size, ids, valid)
            off_s = off_s - residual * self._inv_total
            values = values - _row(residual) * self._p_topk
        if off_s is None:
            probs.zero_()
        else:
            probs.mul_(_row(off_s))
        if k > 0:
            _set_at_(probs, ids, valid, values)
        if with_ce:
            probs.scatter_add_(1, _row(labels), -_row(ce_scale))
        return _into(probs, out)

    def _topk_stats_general(self, logits, ids, valid, inv_temp, cap, with_tail, with_ce,
                            with_stats, lse, tail_lse, lse_ce, mean_z):
        capped = _softcap(logits, cap)
        if with_ce:
            lse_ce.copy_(torch.logsumexp(capped, dim=1))
        z = capped.mul(inv_temp) if capped is logits else capped.mul_(inv_temp)
        row_lse = torch.logsumexp(z, dim=1)
        lse.copy_(row_lse)
        if with_stats:
            mean_z.copy_(row_lse - dv.entropy_from_logits(z, row_lse))
        if with_tail:
            exps = z.sub_(_row(row_lse)).exp_()
            _set_at_(exps, ids, valid, 0.0)
            tail_lse.copy_(exps.sum(dim=1).log_().add_(row_lse))

    def _topk_grad_general(self, logits, ids, valid, sorted_values, kd_lse, dense_scale, lse_ce,
                           ce_scale, labels, inv_temp, cap, with_tail, with_ce, out):
        capped = _softcap(logits, cap)
        values = sorted_values
        if with_tail:
            grad = capped.mul(inv_temp).sub_(_row(kd_lse)).exp_()  # p
            off_s = dense_scale
            if ids.shape[1] > 0:  # dz − r·p, as the fast path (topk_grad)
                p_s = grad.gather(1, ids)
                _set_at_(grad, ids, valid, 0.0)
                on_s = torch.where(valid, values, 0.0)
                off_total = dense_scale * grad.sum(dim=1)
                residual = _small_residual(off_total + on_s.sum(dim=1),
                                           off_total.abs() + on_s.abs().sum(dim=1), ids, valid)
                off_s = dense_scale - residual
                values = values - _row(residual) * p_s
            grad.mul_(_row(off_s))
        else:
            grad = torch.zeros_like(logits)
        if ids.shape[1] > 0:
            _set_at_(grad, ids, valid, values)
        if with_ce:
            grad.add_(capped.sub(_row(lse_ce)).exp_().mul_(_row(ce_scale)))
            grad.scatter_add_(1, _row(labels), -_row(ce_scale))
        _softcap_derivative_(grad, capped, cap)
        return _into(grad, out)

    # -------------------------------------------------------------------------------------------
    # dense online teacher
    # -------------------------------------------------------------------------------------------

    def dense_stats(self, student: Tensor, teacher: Tensor, rows: int, vocab: int, inv_temp: float,
                    cap: float, teacher_cap: float, with_ce: bool, with_stats: bool, lse: Tensor,
                    teacher_lse: Tensor, lse_ce: Optional[Tensor], mean_z: Optional[Tensor]) -> None:
        self._fast = cap == 0.0 and teacher_cap == 0.0 and (not with_ce or inv_temp == 1.0)
        if self._fast:  # both buffers become log-probabilities
            for buf, out in ((student, lse), (teacher, teacher_lse)):
                if inv_temp != 1.0:
                    buf.mul_(inv_temp)
                raw_max = buf.amax(dim=1)
                # In place, in one call. The CPU kernel's faster exp leaves the lse off by up to
                # ~3e-5 (so Σp by as much): harmless to the loss, a uniform shift of log p; the
                # gradient divides W by the Σp actually computed (dense_divergence).
                _log_softmax_(buf)
                out.copy_(raw_max - buf.amax(dim=1))
            if with_ce:
                lse_ce.copy_(lse)
            # E_p[z] = lse + Σ p log p needs p: the divergence pass makes it in its scratch block
            self._mean_z = (mean_z, lse) if with_stats else None
            return
        capped = _softcap(student, cap)
        z = capped.mul(inv_temp)
        lse.copy_(torch.logsumexp(z, dim=1))
        if with_ce:
            lse_ce.copy_(torch.logsumexp(capped, dim=1))
        if with_stats:
            mean_z.copy_(lse - dv.entropy_from_logits(z, lse))
        teacher_z = _softcap(teacher, teacher_cap).mul(inv_temp)
        teacher_lse.copy_(torch.logsumexp(teacher_z, dim=1))

    def _buffer(self, slot: str, like: Tensor) -> Tensor:
        """A ``like``-shaped scratch block reused across the chunks of one call (no re-allocation,
        no fresh pages per chunk)."""
        held = self._scratch.get(slot)
        if held is None or held.shape[0] < like.shape[0] or held.shape[1:] != like.shape[1:]:
            held = self._scratch[slot] = torch.empty_like(like)
        return held[: like.shape[0]]

    def _log_probs(self, student, teacher, inv_temp, cap, teacher_cap, lse, teacher_lse):
        if self._fast:
            return student, teacher
        log_p = _softcap(student, cap).mul(inv_temp).sub_(_row(lse))
        log_q = _softcap(teacher, teacher_cap).mul(inv_temp).sub_(_row(teacher_lse))
        return log_p, log_q

    def dense_divergence(self, student: Tensor, teacher: Tensor, rows: int, vocab: int,
                         inv_temp: float, cap: float, teacher_cap: float, kind: int, beta: float,
                         lse: Tensor, teacher_lse: Tensor, kd: Tensor, wsum: Tensor) -> None:
        log_p, log_q = self._log_probs(student, teacher, inv_temp, cap, teacher_cap, lse, teacher_lse)
        divergence = _KINDS[kind]
        if divergence == "reverse_kl" and not (self._fast and self._mean_z is not None):
            # no E_p[z] to make: log p - log q over log q, then p over log p, no scratch block
            ratio = torch.sub(log_p, log_q, out=log_q)
            probs = log_p.exp_()
            kd.copy_(_rowdot(probs, ratio))
            wsum.copy_(kd).div_(probs.sum(dim=1))  # W / Σp: see the end of this method
            self._carry = (probs, ratio)
            self._mean_z = None
            return
        probs = torch.exp(log_p, out=self._buffer("p", log_p))
        if self._fast and self._mean_z is not None:
            mean_z, row_lse = self._mean_z
            mean_z.copy_(row_lse + _rowdot(probs, log_p))
        self._mean_z = None
        if divergence == "reverse_kl":  # w = p·(log p − log q), W = Σ w = KD
            ratio = torch.sub(log_p, log_q, out=log_q) if self._fast else log_p - log_q
            kd.copy_(_rowdot(probs, ratio))
            wsum.copy_(kd)
            self._carry = (probs, ratio)
        elif divergence == "forward_kl":  # w = −q, W = −1
            teacher_probs = torch.exp(log_q, out=self._buffer("q", log_q))
            kd.copy_(_rowdot(teacher_probs, torch.sub(log_q, log_p, out=log_q)))  # one sum: no cancellation
            wsum.fill_(-1.0)
            self._carry = (probs, teacher_probs)
        else:  # jsd: M = βq + (1−β)p, w = (1−β)·p·(log p − log M)
            teacher_probs = torch.exp(log_q, out=self._buffer("q", log_q))
            mixture = torch.lerp(probs, teacher_probs, beta, out=self._buffer("m", log_q))
            # log M floored at the smallest normal float: where M underflows p and q do too, and
            # p·(log p − log M) is then 0, never 0·∞.
            log_m = mixture.clamp_(min=torch.finfo(mixture.dtype).tiny).log_()
            # Each divergence summed term by term (p·(log p − log M), q·(log q − log M)): the
            # entropies alone are ~log V and would cancel to a small JSD.
            teacher_part = _rowdot(teacher_probs, torch.sub(log_q, log_m, out=log_q))
            ratio = torch.sub(log_p, log_m, out=log_m)
            student_part = _rowdot(probs, ratio)
            kd.copy_(teacher_part.mul_(beta).add_(student_part, alpha=1 - beta))
            wsum.copy_(student_part.mul_(1 - beta))
            self._carry = (probs, ratio)
        # W / Σp instead of W: equal in exact arithmetic, and then Σ_v dz_v = Σw − Σp·W/Σp is 0
        # with the p that was actually computed. With W alone, Σ dz = W·(1 − Σp), a shift along p
        # that dh = dz·W_head carries whole: a confident student far from its teacher (reverse KL
        # of 20 nats, Σp off by up to 3e-5 after the CPU's log_softmax) had 100x the dh error of
        # plain float32 PyTorch.
        wsum.div_(probs.sum(dim=1))
        self._kind = divergence

    def dense_grad(self, student: Tensor, teacher: Tensor, rows: int, vocab: int, inv_temp: float,
                   cap: float, teacher_cap: float, kind: int, beta: float, lse: Tensor,
                   teacher_lse: Tensor, wsum: Tensor, kd_scale: Tensor, lse_ce: Optional[Tensor],
                   ce_scale: Optional[Tensor], labels: Optional[Tensor], with_ce: bool,
                   out: Optional[Tensor] = None) -> Tensor:
        probs, other = self._carry
        self._carry = None
        divergence = _KINDS[kind]
        if divergence == "reverse_kl":  # kd_scale · p · (log p − log q − W)
            grad = other.sub_(_row(wsum)).mul_(probs).mul_(_row(kd_scale))
        elif divergence == "forward_kl":  # kd_scale · (p − q)
            grad = torch.sub(probs, other, out=other).mul_(_row(kd_scale))
        else:  # kd_scale · ((1−β)·p·(log p − log M) − p·W)
            grad = other.mul_(1 - beta).sub_(_row(wsum)).mul_(probs).mul_(_row(kd_scale))
        if with_ce:
            if self._fast:  # τ = 1: softmax(s) = p
                grad.add_(probs.mul_(_row(ce_scale)))
            else:
                capped = _softcap(student, cap)
                grad.add_(capped.sub(_row(lse_ce)).exp_().mul_(_row(ce_scale)))
            grad.scatter_add_(1, _row(labels), -_row(ce_scale))
        if not self._fast:
            _softcap_derivative_(grad, _softcap(student, cap), cap)
        return _into(grad, out)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _ids(sorted_ids: Optional[Tensor], vocab: int, k: int) -> tuple[Tensor, Tensor]:
    """int64 ids clamped into range, and the mask of the used slots (``vocab`` marks unused)."""
    if sorted_ids is None or k == 0:
        device = None if sorted_ids is None else sorted_ids.device
        empty = torch.zeros((0, 0), dtype=torch.int64, device=device)
        return empty, empty.bool()
    ids = sorted_ids.long()
    valid = ids < vocab
    return torch.where(valid, ids, 0), valid


# The largest residual Σ_v dz_v, as a fraction of Σ_v |dz_v|, that the top-k gradient treats as
# rounding and projects out along p (torch_epilogue.topk_grad). Rounding leaves ~1e-7 of it; a
# row whose true gradient is itself at rounding level (logits of ±1000: every dz ~1e-22) has a
# residual of the order of its |dz|, and projecting that would only move its error around.
_RESIDUAL_FRACTION = 1e-3


def _small_residual(residual: Tensor, size: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
    """``residual`` where it is rounding next to ``size`` (Σ|dz|) and the row has no repeated id
    (sorted ids: adjacent; possible with value checks off, and then the set values' sum is not 0
    by construction), else 0."""
    repeats = (valid[:, 1:] & valid[:, :-1] & (ids[:, 1:] == ids[:, :-1])).any(dim=1)
    keep = (residual.abs() <= _RESIDUAL_FRACTION * size) & ~repeats
    return torch.where(keep, residual, 0.0)


def _set_at_(block: Tensor, ids: Tensor, valid: Tensor, values) -> None:
    """``block[n, ids[n, j]] = values[n, j]`` for the valid slots (unused slots write the value the
    block already holds at their clamped id, after the valid ones: scatter order does not matter
    because a duplicate position always receives one value)."""
    if ids.numel() == 0:
        return
    if not torch.is_tensor(values):
        values = torch.full(ids.shape, float(values), dtype=block.dtype, device=block.device)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)
    index = torch.where(valid, ids, ids.gather(1, first))
    values = torch.where(valid, values.to(block.dtype), values.to(block.dtype).gather(1, first))
    values = torch.where(valid.any(dim=1, keepdim=True), values, block.gather(1, index))
    block.scatter_(1, index, values)


def _log_softmax_(x: Tensor) -> Tensor:
    return torch.ops.aten._log_softmax.out(x, 1, False, out=x)


def _softcap(x: Tensor, cap: float) -> Tensor:
    """``cap · tanh(x / cap)`` as a new tensor, or ``x`` itself when ``cap`` is 0 (none)."""
    return x if cap == 0.0 else torch.tanh(x / cap).mul_(cap)


def _softcap_derivative_(grad: Tensor, capped: Tensor, cap: float) -> None:
    if cap != 0.0:
        grad.mul_(capped.div(cap).square_().neg_().add_(1.0))


def _into(grad: Tensor, out: Optional[Tensor]) -> Tensor:
    if out is None or out is grad:
        return grad
    return out.copy_(grad)


