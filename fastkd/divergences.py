"""The math of fastkd (DESIGN.md §1): the single source of truth for every backend.

Every loss in fastkd is a divergence between *bucketed* distributions. A row's buckets are given
as log-masses ``log_p`` (student) and ``log_q`` (teacher) of shape ``(..., C)`` with a boolean
``valid`` mask of the same shape (``None``: every bucket is valid). Invalid buckets (the ``-1``
slots of a ragged top-k) hold no mass on either side and contribute nothing.

For each divergence this module gives the per-row value ``L`` and the *bucket weights*
``w_c = P_c · G_c`` with ``G_c = ∂L/∂P_c`` (up to a constant, DESIGN.md §1 table). With
``W = Σ_c w_c = Ḡ`` the gradient with respect to the (tempered, capped) logits is

    ∂L/∂z_j = p_j · (G_{c(j)} − Ḡ) = (p_j / P_{c(j)}) · w_{c(j)} − p_j · W

which is finite even where ``G_c = −Q_c/P_c`` (forward KL) would overflow: a singleton bucket has
``p_j / P_c = 1``, and the tail bucket's ``p_j / P_T ≤ 1`` with ``P_T`` floored far below any
real mass (``STUDENT_TAIL_FLOOR``).

Nothing here is chunked or fused; the float64 reference (``fastkd.reference``) and the ``torch``
backend both call these functions, and the Triton/CUDA epilogues implement the same formulas.
"""
from __future__ import annotations

import math

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TAIL_MODES = ("bucket", "renormalize")
TOPK_FROM = ("teacher", "student", "union")

# The teacher's tail is 1 − Σ Q_S of the top-k masses it reported. Where that leaves less than
# TEACHER_TAIL_FLOOR (rounded log-probs may even sum above 1) the tail is not known: it is taken as
# the floor and S rescaled so the K+1 buckets sum to one.
TEACHER_TAIL_FLOOR = 1e-6
MAX_TEACHER_TOPK_LOGMASS = math.log1p(-TEACHER_TAIL_FLOOR)
# The student's tail is computed exactly; this floor only keeps G_T = w_T / P_T finite in float32
# (|w_T| · 1e30 < 3e38). Rows below it are treated as P_T constant (with the matching gradient).
STUDENT_TAIL_FLOOR = 1e-30
LOG_STUDENT_TAIL_FLOOR = math.log(STUDENT_TAIL_FLOOR)
# A teacher's top-k masses may sum above 1 by rounding (fp16/bf16 log-probs, a server's own
# softmax). Up to this slack fastkd rescales them to 1 − TEACHER_TAIL_FLOOR; above it they are rejected.
TOPK_MASS_SLACK = 0.02


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap · tanh(logits / cap)`` (Gemma-2 final-logit softcapping), identity when ``cap`` is None."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0``, accurate on both sides of ``−log 2`` (Mächler 2012)."""
    return torch.where(
        x > -math.log(2.0),
        torch.log(-torch.expm1(x)),
        torch.log1p(-torch.exp(x)),
    )


def tail_logmass(
    lse_topk: torch.Tensor, lse_all: torch.Tensor, tail_lse: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log P_T`` of the tail bucket ``V∖S``, and the rows where it sits at ``STUDENT_TAIL_FLOOR``.

    From ``log1mexp(lse_S − lse_all)`` (DESIGN.md §1) when only the log-sum-exps over S and over
    the vocabulary are known. A backend that can sum over ``V∖S`` directly passes ``tail_lse``:
    ``tail_lse − lse_all`` is then exact for a small tail, and the log1mexp form is still used
    where the tail holds more than half the mass (there it is the more accurate of the two).
    """
    via_topk = log1mexp(torch.clamp(lse_topk - lse_all, max=-STUDENT_TAIL_FLOOR))
    log_tail = via_topk if tail_lse is None else torch.where(
        via_topk > -math.log(2.0), via_topk, tail_lse - lse_all)
    at_floor = log_tail <= LOG_STUDENT_TAIL_FLOOR
    return torch.clamp(log_tail, min=LOG_STUDENT_TAIL_FLOOR), at_floor


def teacher_topk_logmasses(
    teacher_logprobs: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher bucket log-masses for top-k with a tail: ``(log Q_S (..., K), log Q_T (...))``.

    Computed in float64 and returned in the dtype of ``teacher_logprobs``.

    ``log Q_T = log1mexp(logsumexp(teacher_logprobs))``. When the given masses leave less than
    ``TEACHER_TAIL_FLOOR`` (they may sum to ≥ 1 by rounding, within ``TOPK_MASS_SLACK`` — larger
    sums are rejected by validation), the top-k masses are scaled down so the K+1 buckets still
    sum to one and the tail sits at the floor.
    """
    # In float64: the tail is 1 − Σ Q_S, a cancellation that float32 would resolve only to ~1e-7
    # absolute (a 3e-6 tail would be 2% off). It is (..., K) work, negligible next to the logits.
    lse = masked_logsumexp(teacher_logprobs.double(), valid)
    excess = torch.clamp(lse - MAX_TEACHER_TOPK_LOGMASS, min=0.0).to(teacher_logprobs.dtype)
    log_tail = log1mexp(torch.clamp(lse, max=MAX_TEACHER_TOPK_LOGMASS)).to(teacher_logprobs.dtype)
    return teacher_logprobs - excess.unsqueeze(-1), log_tail


def renormalized_logmasses(logits_or_logprobs: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``log_softmax`` over the valid slots only (``tail="renormalize"``); invalid slots get 0."""
    lse = masked_logsumexp(logits_or_logprobs, valid)
    out = logits_or_logprobs - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1)
    return _masked(out, valid, 0.0)


def masked_logsumexp(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``logsumexp`` over the valid entries of the last dimension; ``-inf`` for a row with none.

    Rows without a valid entry are computed on zeros and then replaced, so neither the value nor
    the gradient of any row is NaN.
    """
    if valid is None:
        return torch.logsumexp(x, dim=-1)
    any_valid = valid.any(dim=-1)
    x = torch.where(valid, x, -math.inf)
    x = torch.where(any_valid.unsqueeze(-1), x, 0.0)
    return torch.where(any_valid, torch.logsumexp(x, dim=-1), -math.inf)


def topk_bucket_logmasses(
    student_topk_logits: torch.Tensor,
    student_lse: torch.Tensor | None,
    teacher_logprobs: torch.Tensor,
    valid: torch.Tensor,
    tail: str,
    student_tail_lse: torch.Tensor | None = None,
    teacher_log_tail: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bucket log-masses of a top-k set S for student and teacher (DESIGN.md §1, "Top-k modes").

    Args:
        student_topk_logits: ``(..., K)`` tempered student logits ``z_S`` gathered at S.
        student_lse: ``(...)`` student log-sum-exp over the whole vocabulary; unused (may be
            None) with ``tail="renormalize"``.
        teacher_logprobs: ``(..., K)`` teacher log-probabilities at S (full-softmax log-probs).
        valid: ``(..., K)`` bool, False on unused (``-1``) slots.
        tail: ``"bucket"`` (K+1 buckets, the last one the tail ``V∖S``) or ``"renormalize"``.
        student_tail_lse: ``(...)`` log-sum-exp of the student logits over ``V∖S`` where a backend
            sums it directly (see :func:`tail_logmass`).
        teacher_log_tail: ``(...)`` the teacher's exact ``log Q_T`` where it is known (an online
            teacher); else it comes from the top-k log-probs (:func:`teacher_topk_logmasses`).

    Returns ``(log_p, log_q, valid_buckets, kd_lse, at_floor)``: bucket log-masses ``(..., C)``
    with C = K+1 or K, their validity mask, the normaliser of the student's bucketed
    distribution such that ``log P_j = z_j − kd_lse`` for every j in S (``lse_all`` with a tail,
    ``lse_S`` when renormalising), and the rows whose student tail sits at its floor.
    """
    lse_topk = masked_logsumexp(student_topk_logits, valid)
    if tail == "bucket":
        log_tail, at_floor = tail_logmass(lse_topk, student_lse, student_tail_lse)
        log_p = torch.cat([student_topk_logits - student_lse.unsqueeze(-1), log_tail.unsqueeze(-1)], dim=-1)
        if teacher_log_tail is None:
            log_q_topk, teacher_log_tail = teacher_topk_logmasses(teacher_logprobs, valid)
        else:  # exact, like the student's: only floored against log(0)
            log_q_topk = teacher_logprobs
            teacher_log_tail = torch.clamp(teacher_log_tail, min=LOG_STUDENT_TAIL_FLOOR)
        log_q = torch.cat([log_q_topk, teacher_log_tail.unsqueeze(-1)], dim=-1)
        valid_buckets = torch.cat([valid, torch.ones_like(valid[..., :1])], dim=-1)
        return log_p, log_q, valid_buckets, student_lse, at_floor
    if tail == "renormalize":
        kd_lse = torch.where(torch.isfinite(lse_topk), lse_topk, 0.0)
        log_p = _masked(student_topk_logits - kd_lse.unsqueeze(-1), valid, 0.0)
        log_q = renormalized_logmasses(teacher_logprobs, valid)
        return log_p, log_q, valid, kd_lse, torch.zeros_like(kd_lse, dtype=torch.bool)
    raise ValueError(f"tail must be one of {TAIL_MODES}, got {tail!r}")


def topk_mask(ids: torch.Tensor, valid: torch.Tensor, vocab: int) -> torch.Tensor:
    """``(..., V)`` bool, True at the valid ids of each row (the set S as a mask)."""
    mask = torch.zeros(*ids.shape[:-1], vocab + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(-1, torch.where(valid, ids, vocab), True)  # unused slots land in a spare column
    return mask[..., :vocab]


def select_topk(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, topk_from: str
) -> torch.Tensor:
    """The set S for an online teacher: ``(..., K')`` int64 ids, ``-1`` on unused slots.

    ``"teacher"`` / ``"student"``: that model's top-k (K' = k). ``"union"``: the teacher's top-k
    followed by the student's top-k ids the teacher's set lacks (K' = 2k, duplicates become -1).
    Ties and the order within S do not matter: every id in S is its own bucket.
    """
    if topk_from == "teacher":
        return teacher_logits.topk(k, dim=-1).indices
    if topk_from == "student":
        return student_logits.topk(k, dim=-1).indices
    if topk_from == "union":
        from_teacher = teacher_logits.topk(k, dim=-1).indices
        from_student = student_logits.topk(k, dim=-1).indices
        seen = (from_student.unsqueeze(-1) == from_teacher.unsqueeze(-2)).any(dim=-1)
        return torch.cat([from_teacher, torch.where(seen, -1, from_student)], dim=-1)
    raise ValueError(f"topk_from must be one of {TOPK_FROM}, got {topk_from!r}")


def divergence(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    valid: torch.Tensor | None,
    kind: str,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-row divergence between bucketed distributions, summed over the last dimension.

    ``forward_kl``: Σ Q (log Q − log P); ``reverse_kl``: Σ P (log P − log Q); ``jsd``:
    β·KL(Q‖M) + (1−β)·KL(P‖M) with M = βQ + (1−β)P, and the GKD/TRL limits β=0 → forward KL,
    β=1 → reverse KL.
    """
    kind, beta = _resolve(kind, beta)
    log_p = _masked(log_p, valid, 0.0)
    log_q = _masked(log_q, valid, 0.0)
    if kind == "forward_kl":
        terms = log_q.exp() * (log_q - log_p)
    elif kind == "reverse_kl":
        terms = log_p.exp() * (log_p - log_q)
    else:
        log_m = _log_mixture(log_p, log_q, beta)
        terms = beta * log_q.exp() * (log_q - log_m) + (1.0 - beta) * log_p.exp() * (log_p - log_m)
    return _masked(terms, valid, 0.0).sum(dim=-1)


def bucket_weights(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    valid: torch.Tensor | None,
    kind: str,
    beta: float = 0.5,
) -> torch.Tensor:
    """``w_c = P_c · G_c`` per bucket (zero on invalid buckets), the DESIGN.md §1 table times P_c.

    ``forward_kl``: −Q_c; ``reverse_kl``: P_c (log P_c − log Q_c); ``jsd``: (1−β) P_c (log P_c − log M_c).
    """
    kind, beta = _resolve(kind, beta)
    log_p = _masked(log_p, valid, 0.0)
    log_q = _masked(log_q, valid, 0.0)
    if kind == "forward_kl":
        w = -log_q.exp()
    elif kind == "reverse_kl":
        w = log_p.exp() * (log_p - log_q)
    else:
        w = (1.0 - beta) * log_p.exp() * (log_p - _log_mixture(log_p, log_q, beta))
    return _masked(w, valid, 0.0)


def entropy_from_logits(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Student entropy ``H = lse − E_p[z]`` per row, from logits ``(..., V)`` and their ``lse (...)``."""
    p = torch.exp(logits - lse.unsqueeze(-1))
    return lse - (p.unsqueeze(-2) @ logits.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def _resolve(kind: str, beta: float) -> tuple[str, float]:
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")
    if kind == "jsd" and beta == 0.0:
        return "forward_kl", beta
    if kind == "jsd" and beta == 1.0:
        return "reverse_kl", beta
    return kind, beta


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))


def _masked(x: torch.Tensor, valid: torch.Tensor | None, fill: float) -> torch.Tensor:
    # torch.where, not multiplication: a masked-out inf/NaN must not leak into values or gradients.
    return x if valid is None else torch.where(valid, x, torch.full_like(x, fill))
