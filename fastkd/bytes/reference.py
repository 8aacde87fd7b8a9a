"""Exact, unchunked float64 references of the byte-level functions (tests only, small shapes).

They build the full ``[N x V]`` logits, take the softmax, and sum probabilities per first byte
(the plain definition of the byte marginal, not the backends' bucket log-sum-exp); chunk
likelihoods are summed by a Python loop over the pairs. Divergences come from the math module.
Gradients come from autograd.
"""
from __future__ import annotations

import math

import torch

from .. import divergences as dv
from .align import ByteAlignment
from .loss import CHUNK_FLOOR
from .vocab import N_BUCKETS


def _logits(hidden, weight, bias, cap, dtype):
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    logits = h @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return dv.softcap(logits, cap)


def byte_marginals(logprobs: torch.Tensor, first_byte: torch.Tensor) -> torch.Tensor:
    """``log Σ_{v in bucket b} exp(logprobs_v)`` by summing probabilities; ``-inf`` if empty."""
    probs = torch.zeros(logprobs.shape[0], N_BUCKETS, dtype=logprobs.dtype, device=logprobs.device)
    probs = probs.index_add(1, first_byte.to(logprobs.device), logprobs.exp())
    positive = probs > 0
    return torch.where(positive, torch.where(positive, probs, 1.0).log(), -math.inf)


def byte_logprobs_reference(hidden, weight, byte_vocab, *, temperature=1.0, softcap=None, bias=None,
                            compute_dtype=torch.float64):
    """float64 reference of :func:`fastkd.byte_logprobs`: ``(N, 257)``."""
    logits = _logits(hidden, weight, bias, softcap, compute_dtype) / temperature
    return byte_marginals(torch.log_softmax(logits, dim=-1), byte_vocab.first_byte)


def byte_kd_loss_reference(
    hidden, weight, byte_vocab, alignment, *, teacher_hidden=None, teacher_weight=None,
    teacher_byte_vocab=None, teacher_byte_logprobs=None, teacher_token_logprobs=None, labels=None,
    teacher_labels=None, divergence="reverse_kl", beta=0.5, temperature=1.0, chunk_weight=0.0,
    ce_weight=0.0, kd_weight=1.0, ignore_index=-100, softcap=None, teacher_softcap=None, bias=None,
    teacher_bias=None, reduction="mean", compute_dtype=torch.float64,
):
    """float64 reference of :func:`fastkd.byte_kd_loss` (same arguments and semantics)."""
    dtype = compute_dtype
    logits = _logits(hidden, weight, bias, softcap, dtype)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    student_bytes = byte_marginals(logprobs, byte_vocab.first_byte)
    n_student = logprobs.shape[0]
    if teacher_byte_logprobs is None:
        with torch.no_grad():
            t_logits = _logits(teacher_hidden, teacher_weight, teacher_bias, teacher_softcap, dtype)
            t_logprobs = torch.log_softmax(t_logits / temperature, dim=-1)
            teacher_bytes = byte_marginals(t_logprobs, teacher_byte_vocab.first_byte)
    else:
        teacher_bytes = teacher_byte_logprobs.reshape(-1, N_BUCKETS).to(dtype)
        t_logprobs = None
    n_teacher = teacher_bytes.shape[0]
    labels1 = None if labels is None else labels.reshape(-1).long()
    t_labels1 = None if teacher_labels is None else teacher_labels.reshape(-1).long()
    counted = [True] * n_student if labels1 is None else (labels1 != ignore_index).tolist()
    t_counted = [True] * n_teacher if t_labels1 is None else (t_labels1 != ignore_index).tolist()

    if isinstance(alignment, ByteAlignment):
        pairs, chunk_mask = alignment.pairs.tolist(), alignment.chunk_mask.tolist()
    else:
        pairs = alignment.tolist()
        chunk_mask = [m > 0 for m in range(len(pairs))]

    rows = [torch.zeros((), dtype=dtype) for _ in range(n_student)]
    for m, (i, j) in enumerate(pairs):
        if not (counted[i] and t_counted[j]):
            continue
        s, t = student_bytes[i], teacher_bytes[j]
        both = torch.isfinite(s) & torch.isfinite(t)
        log_p = s[both] - torch.logsumexp(s[both], dim=0)
        log_q = t[both] - torch.logsumexp(t[both], dim=0)
        rows[i] = rows[i] + kd_weight * temperature**2 * dv.divergence(log_p, log_q, None, divergence, beta)
        if chunk_weight and chunk_mask[m]:
            i0, j0 = pairs[m - 1]
            if not all(counted[r] for r in range(i0, i)) or not all(t_counted[r] for r in range(j0, j)):
                continue
            student_ll = sum(logprobs[r, labels1[r]] for r in range(i0, i))
            if t_logprobs is not None:
                teacher_ll = sum(t_logprobs[r, t_labels1[r]] for r in range(j0, j))
            else:
                teacher_ll = sum(teacher_token_logprobs.reshape(-1)[r].to(dtype) for r in range(j0, j))
            rows[i] = rows[i] + chunk_weight * _bernoulli_divergence(student_ll, teacher_ll, divergence, beta)
    loss = torch.stack(rows)
    if ce_weight:
        plain = torch.log_softmax(logits, dim=-1)
        ce = -plain.gather(1, torch.where(torch.tensor(counted), labels1, 0).unsqueeze(1)).squeeze(1)
        loss = loss + ce_weight * torch.where(torch.tensor(counted), ce, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / max(sum(counted), 1)


def _bernoulli_divergence(student_ll, teacher_ll, divergence, beta):
    ceiling = math.log1p(-CHUNK_FLOOR)
    a = torch.clamp(torch.as_tensor(student_ll, dtype=torch.float64), max=ceiling)
    b = torch.clamp(torch.as_tensor(teacher_ll, dtype=torch.float64), max=ceiling)
    log_p = torch.stack([a, torch.log(-torch.expm1(a))])
    log_q = torch.stack([b, torch.log(-torch.expm1(b))])
    return dv.divergence(log_p, log_q, None, divergence, beta)
