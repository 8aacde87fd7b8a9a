"""Token selection (DESIGN.md, "Token selection"): the rows of a micro-batch that are trained on,
and the distillation loss on those rows alone.

With ``token_fraction = f < 1`` the trainer keeps ``ceil(f · counted)`` counted rows, the ones
with the highest score, and gathers them (hidden states, labels, the teacher's top-k or hidden
states) *before* the loss, so the loss's LM-head GEMMs see the kept rows only. What the score
costs depends on the criterion (``token_select``), counted in LM-head GEMMs of ``N·D·V`` each
(the summing loss is three for the student: logits, ``dh``, ``dW``):

- ``teacher_entropy`` (default): the teacher's entropy of its next-token distribution (at the
  distillation temperature τ). From a top-k cache or a teacher server it is computed from the
  K log-probs: ``O(N·K)``, no GEMM, so a step at ``f = 0.5`` costs ``0.5 · 3`` GEMMs, half of the
  loss. With an online teacher it needs the teacher head's forward on every row (one teacher
  GEMM, no gradient) before the kept rows' loss: ``1 + f · (3 + 1)`` against ``3 + 1``.
- ``entropy``: the student's entropy; scored by the loss's forward on every row without gradients
  (one student GEMM, and the online teacher's), then the loss on the kept rows: ``1 + 3f``
  against 3, about 83 % of the loss at ``f = 0.5`` (offline), 100 % with an online teacher.
- ``divergence``: the row's divergence from the teacher, from the same scoring pass as ``entropy``
  (the same cost).

(Mode sft, CE only, selects by ``entropy``: the trainer passes an empty top-k set and
``kd_weight=0``.)

The entropy from K log-probs ``q_S`` (``V`` the vocabulary, ``r = 1 − Σ_S q`` the exact tail mass;
masses rounded above 1 are rescaled to 1, no tail) treats the tail as *spread* evenly over the
``V − |S|`` ids outside S::

    H ≈ −Σ_S q_j log q_j − r · log(r / (V − |S|))

This is the largest entropy the known masses allow (exact when the tail is uniform), an upper
bound on the true entropy. Treating the tail as one bucket (``−r log r``) would be a lower bound
that scores a flat teacher, whose top-k holds little mass (``r`` near 1), as nearly certain: it
would rank the most uncertain rows last. Computed in float64 (the tail is a cancellation).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..api import kd_loss, topk_kd_loss
from ..divergences import log1mexp, masked_logsumexp

CRITERIA = ("teacher_entropy", "entropy", "divergence")


def topk_teacher_entropy(teacher_ids: Tensor, teacher_logprobs: Tensor, vocab: int) -> Tensor:
    """The teacher's entropy per row from its top-k, the tail spread over the ids outside S.

    Args:
        teacher_ids: ``(..., K)`` int, ``-1`` for an unused slot.
        teacher_logprobs: ``(..., K)`` float, full-softmax log-probabilities of those ids.
        vocab: V, the size of the vocabulary the ids index.

    Returns:
        ``(...)`` float32, in nats (see the module docstring for the formula).
    """
    valid = teacher_ids >= 0
    log_q = teacher_logprobs.double()
    log_mass = masked_logsumexp(log_q, valid)  # log Σ_S q; above 0 only by rounding: rescaled to 1
    log_q = log_q - log_mass.clamp(min=0.0).unsqueeze(-1)
    q = torch.exp(log_q)
    inside = torch.where(valid & (q > 0), -q * log_q, 0.0).sum(-1)
    log_tail = log1mexp(log_mass.clamp(max=0.0))  # exact in float64 (no floor: -inf for no tail)
    tail = torch.exp(log_tail)
    outside = (vocab - valid.sum(-1)).clamp(min=1).double()
    spread = torch.where(tail > 0, -tail * (log_tail - torch.log(outside)), 0.0)
    return (inside + spread).float()


def head_entropy(hidden: Tensor, head: dict, temperature: float, impl: str) -> Tensor:
    """The entropy of ``softmax(softcap(hidden · weightᵀ + bias) / τ)`` per row: the online
    teacher's, from one forward GEMM over its head (no logits tensor, no gradient).

    Args:
        hidden: ``(..., D)`` the teacher's final hidden states.
        head: ``weight`` ``(V, D)``, ``bias`` and ``softcap`` as :func:`hidden_and_head` gives them.

    Returns:
        ``(N,)`` float32, N the number of rows of ``hidden``.
    """
    empty = torch.full((*hidden.shape[:-1], 1), -1, dtype=torch.int64, device=hidden.device)
    with torch.no_grad():
        _, stats = topk_kd_loss(hidden, head["weight"], empty, torch.zeros(empty.shape, device=hidden.device),
                                bias=head["bias"], softcap=head["softcap"], temperature=temperature,
                                kd_weight=0.0, reduction="none", impl=impl, return_stats=True)
    return stats.entropy


def top_rows(score: Tensor, counted: Tensor, fraction: float) -> Tensor:
    """Flat indices of the ``ceil(fraction · counted)`` counted rows with the highest ``score``
    (ties broken arbitrarily); ``score`` and ``counted`` are ``(N,)``."""
    score = score.reshape(-1).float().masked_fill(~counted, float("-inf"))
    k = math.ceil(fraction * int(counted.sum()))
    return score.topk(k, sorted=False).indices


def selected_kd_loss(student: dict, labels: Tensor, teacher: dict, *, options: dict, token_fraction: float,
                     token_select: str, topk: Optional[int] = None, topk_from: str = "teacher"):
    """The summed distillation loss of the kept rows, and their statistics.

    Args:
        student: ``hidden`` ``(B, R, D)`` (shifted: row r predicts token r+1), ``weight``,
            ``bias``, ``softcap`` (:func:`fastkd.integrations.hidden_and_head`).
        labels: ``(B, R)`` next-token ids, -100 for rows not counted.
        teacher: a top-k teacher, ``ids`` and ``logprobs`` ``(B, R, K)``; or an online one,
            ``hidden`` ``(B, R, D_t)``, ``weight``, ``bias``, ``softcap``.
        options: the loss options (``divergence``, ``beta``, ``tail``, ``temperature``,
            ``ce_weight``, ``kd_weight``, ``impl``).
        token_fraction: f in (0, 1]; at 1 every counted row is kept and nothing is scored.
        token_select: one of :data:`CRITERIA`.
        topk, topk_from: an online teacher's top-k set (None: full vocabulary).

    Returns:
        ``(loss, stats)``: float32 scalar ``Σ`` over the kept rows (``reduction="sum"``), and the
        :class:`fastkd.KDStats` of the kept rows (None when no row is counted).
    """
    if token_select not in CRITERIA:
        raise ValueError(f"token_select must be one of {', '.join(CRITERIA)}; got {token_select!r}")
    batch, width = labels.shape
    n_rows = batch * width
    counted = labels.reshape(-1) != -100
    online = "ids" not in teacher
    rows = [student["hidden"], labels] + ([teacher["hidden"]] if online else [teacher["ids"], teacher["logprobs"]])
    if online:
        loss_fn = lambda h, w, th, **kw: kd_loss(h, w, th, teacher["weight"], **kw)  # noqa: E731
        extra = dict(topk=topk, topk_from=topk_from, teacher_bias=teacher["bias"], teacher_softcap=teacher["softcap"])
    else:
        loss_fn, extra = topk_kd_loss, {}

    def call(index: Optional[Tensor], reduction: str):
        if index is None:
            picked = [x.reshape(n_rows, *x.shape[2:]) for x in rows]
        else:  # gathered from the (B, R, ...) views: only the kept rows are copied
            b, r = index // width, index % width
            picked = [x[b, r] for x in rows]
        h, lab, *rest = picked
        return loss_fn(h, student["weight"], *rest, labels=lab, bias=student["bias"], softcap=student["softcap"],
                       reduction=reduction, return_stats=True, **options, **extra)

    if token_fraction >= 1:
        return call(None, "sum")
    with torch.no_grad():
        if token_select == "teacher_entropy" and online:
            score = head_entropy(teacher["hidden"], teacher, options["temperature"], options["impl"])
        elif token_select == "teacher_entropy":
            score = topk_teacher_entropy(teacher["ids"], teacher["logprobs"], student["weight"].shape[0])
        else:
            _loss, stats = call(None, "none")
            score = stats.entropy if token_select == "entropy" else stats.kd
    index = top_rows(score, counted, token_fraction)
    if index.numel() == 0:  # nothing counted: a zero loss that still has a graph
        loss, _stats = call(torch.zeros(1, dtype=torch.long, device=labels.device), "sum")
        return loss * 0.0, None
    return call(index, "sum")
