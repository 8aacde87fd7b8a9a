"""Exact, unchunked float64 references of every fastkd loss (DESIGN.md §6).

They materialise the full ``[N x V]`` logits in float64 and build every loss from the math module
(``fastkd.divergences``) with differentiable PyTorch ops, so their gradients come from autograd —
an independent check of the hand-written §1 gradient of the backends. Use them in tests, on small
shapes; they take the same keyword arguments as the public functions (minus ``impl``) and return
``loss`` or ``(loss, KDStats)`` in float64.

With ``compute_dtype=torch.float32`` the same code is the *naive* implementation the benchmarks
compare against: full fp32 logits, ``log_softmax`` of everything, autograd.
"""
from __future__ import annotations

import torch

from . import divergences as dv
from .stats import KDStats


def topk_kd_loss_reference(
    hidden, weight, teacher_ids, teacher_logprobs, *, divergence="reverse_kl", beta=0.5,
    tail="bucket", temperature=1.0, labels=None, ignore_index=-100, ce_weight=0.0, kd_weight=1.0,
    softcap=None, bias=None, reduction="mean", return_stats=False, compute_dtype=torch.float64,
    teacher_log_tail=None,
):
    """float64 reference of :func:`fastkd.topk_kd_loss` (same arguments and semantics).

    The student's tail mass is summed over ``V∖S`` directly. ``teacher_log_tail (N,)``: the
    teacher's exact ``log Q_T`` where known (online teacher), else it comes from the log-probs.
    """
    h, counted, labels = _flatten(hidden, labels, ignore_index, compute_dtype)
    capped = _capped_logits(h, weight, bias, softcap)
    logits = capped / temperature
    lse = torch.logsumexp(logits, dim=-1)
    ids = teacher_ids.reshape(h.shape[0], -1).long()
    valid = (ids >= 0) & counted.unsqueeze(-1)
    safe_ids = torch.where(valid, ids, 0)
    teacher_lp = teacher_logprobs.reshape(ids.shape).to(compute_dtype)
    tail_lse = dv.masked_logsumexp(logits, ~dv.topk_mask(safe_ids, valid, logits.shape[-1]))
    log_p, log_q, valid_buckets, _, _ = dv.topk_bucket_logmasses(
        logits.gather(1, safe_ids), lse, teacher_lp, valid, tail, tail_lse,
        None if teacher_log_tail is None else teacher_log_tail.reshape(-1).to(compute_dtype))
    kd = dv.divergence(log_p, log_q, valid_buckets, divergence, beta)
    loss = _combine(kd, capped, labels, counted, temperature, ce_weight, kd_weight, reduction)
    if not return_stats:
        return loss
    topk_mass = dv.masked_logsumexp(logits.gather(1, safe_ids), valid).sub(lse).exp()
    return loss, _stats(kd, logits, lse, counted, topk_mass)


def kd_loss_reference(
    hidden, weight, teacher_hidden, teacher_weight, *, divergence="reverse_kl", beta=0.5,
    topk=None, topk_from="teacher", tail="bucket", temperature=1.0, labels=None, ignore_index=-100,
    ce_weight=0.0, kd_weight=1.0, softcap=None, teacher_softcap=None, bias=None, teacher_bias=None,
    reduction="mean", return_stats=False, compute_dtype=torch.float64,
):
    """float64 reference of :func:`fastkd.kd_loss` (same arguments and semantics)."""
    h, counted, labels = _flatten(hidden, labels, ignore_index, compute_dtype)
    teacher_h = teacher_hidden.reshape(h.shape[0], -1).to(compute_dtype)
    with torch.no_grad():
        teacher_logits = _capped_logits(teacher_h, teacher_weight, teacher_bias, teacher_softcap)
        teacher_logprobs = torch.log_softmax(teacher_logits / temperature, dim=-1)
    if topk is not None:
        with torch.no_grad():
            student_logits = _capped_logits(h, weight, bias, softcap)
            ids = dv.select_topk(student_logits, teacher_logits, topk, topk_from)
            safe_ids, valid = ids.clamp(min=0), ids >= 0
            teacher_topk = torch.where(valid, teacher_logprobs.gather(1, safe_ids), 0.0)
            teacher_tail = dv.masked_logsumexp(
                teacher_logprobs, ~dv.topk_mask(safe_ids, valid, teacher_logprobs.shape[-1]))
            teacher_log_tail, _ = dv.tail_logmass(
                dv.masked_logsumexp(teacher_topk, valid), torch.zeros_like(teacher_tail), teacher_tail)
        return topk_kd_loss_reference(
            h, weight, ids, teacher_topk, divergence=divergence, beta=beta, tail=tail,
            temperature=temperature, labels=labels, ignore_index=ignore_index,
            ce_weight=ce_weight, kd_weight=kd_weight, softcap=softcap, bias=bias,
            reduction=reduction, return_stats=return_stats, compute_dtype=compute_dtype,
            teacher_log_tail=teacher_log_tail)
    capped = _capped_logits(h, weight, bias, softcap)
    logits = capped / temperature
    lse = torch.logsumexp(logits, dim=-1)
    kd = dv.divergence(logits - lse.unsqueeze(-1), teacher_logprobs, None, divergence, beta)
    kd = torch.where(counted, kd, 0.0)
    loss = _combine(kd, capped, labels, counted, temperature, ce_weight, kd_weight, reduction)
    if not return_stats:
        return loss
    return loss, _stats(kd, logits, lse, counted, None)


def _flatten(hidden, labels, ignore_index, dtype):
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    if labels is None:
        return h, torch.ones(h.shape[0], dtype=torch.bool, device=h.device), None
    labels = labels.reshape(-1).long()
    return h, labels != ignore_index, labels


def _capped_logits(h, weight, bias, cap):
    logits = h @ weight.to(h.dtype).T
    if bias is not None:
        logits = logits + bias.to(h.dtype)
    return dv.softcap(logits, cap)


def _combine(kd, capped, labels, counted, temperature, ce_weight, kd_weight, reduction):
    rows = kd_weight * temperature**2 * kd
    if ce_weight:
        safe = torch.where(counted, labels, 0)
        ce = torch.logsumexp(capped, dim=-1) - capped.gather(1, safe.unsqueeze(1)).squeeze(1)
        rows = rows + ce_weight * ce
    rows = torch.where(counted, rows, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / counted.sum().clamp(min=1)


def _stats(kd, logits, lse, counted, topk_mass):
    with torch.no_grad():
        return KDStats(
            kd=torch.where(counted, kd, 0.0).detach(),
            entropy=dv.entropy_from_logits(logits, lse).detach(),
            lse=lse.detach(),
            topk_mass=None if topk_mass is None else topk_mass.detach(),
        )
