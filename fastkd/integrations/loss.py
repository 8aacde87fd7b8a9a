"""One distillation loss for a batch of a Hugging Face causal LM, from any training loop.

``compute_kd_loss(student, batch, teacher=None, ...)`` runs the student (and an online teacher) up
to the LM head with :func:`fastkd.integrations.hf.hidden_and_head`, aligns positions for
next-token prediction and calls :func:`fastkd.kd_loss` (online teacher) or
:func:`fastkd.topk_kd_loss` (teacher top-k stored in the batch). No ``[tokens x vocab]`` logits
tensor is built for either model.

Alignment (the Hugging Face convention): ``labels`` has the shape of ``input_ids``, unshifted,
``-100`` where nothing is to be predicted; position t of the model predicts ``labels[:, t+1]``.
So ``hidden[:, :-1]`` is scored against ``labels[:, 1:]``. Without ``labels`` the targets are
``input_ids`` with padding (``attention_mask == 0``) ignored. Rows whose target is ignored count
for nothing in the CE *and* the KD term (e.g. prompt tokens masked by an SFT collator).
"""
from __future__ import annotations

import numbers
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from ..api import kd_loss, topk_kd_loss
from .hf import hidden_and_head

#: Batch fields read by the loss and never passed to a model's forward.
TEACHER_FIELDS = ("teacher_ids", "teacher_logprobs")
_TARGET_FIELDS = ("labels",) + TEACHER_FIELDS


def compute_kd_loss(
    student: nn.Module,
    batch: Mapping[str, Any],
    teacher: Optional[nn.Module] = None,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    topk: Optional[int] = None,
    topk_from: str = "teacher",
    tail: str = "bucket",
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    ignore_index: int = -100,
    vocab_size: Optional[int] = None,
    num_items_in_batch: Optional[Any] = None,
    impl: str = "auto",
    return_stats: bool = False,
):
    """``ce_weight·CE + kd_weight·τ²·KD`` of a causal-LM batch, straight from hidden states.

    Online teacher (``teacher`` a model): :func:`fastkd.kd_loss` between the two models'
    next-token distributions, full vocabulary (``topk=None``) or a per-row top-k set
    (``topk=K``, ``topk_from``). The teacher runs under ``torch.no_grad()`` in whatever mode it is
    in (put it in ``eval()``). Offline teacher (``teacher=None``): ``batch["teacher_ids"]`` and
    ``batch["teacher_logprobs"]``, ``(B, T, K)`` aligned like the model's logits (entry t is the
    teacher's distribution of token t+1; the last position is dropped) or ``(B, T-1, K)`` already
    shifted, go to :func:`fastkd.topk_kd_loss`.

    Args:
        student: the student causal LM (any wrapper :func:`hidden_and_head` accepts).
        batch: mapping with ``input_ids`` ``(B, T)`` and the model's other inputs
            (``attention_mask``, ...), optionally ``labels`` ``(B, T)`` (unshifted, HF convention)
            and the teacher fields. Everything but ``labels`` and the teacher fields is passed to
            the models' forward.
        teacher: None (default, offline top-k from the batch) or the teacher causal LM.
        divergence, beta, tail, temperature, ce_weight, kd_weight, ignore_index, impl,
            return_stats: as in :func:`fastkd.topk_kd_loss` (defaults ``"reverse_kl"``, 0.5,
            ``"bucket"``, 1.0, 0.0, 1.0, -100, ``"auto"``, False).
        topk, topk_from: online teacher only, as in :func:`fastkd.kd_loss` (defaults None,
            ``"teacher"``).
        vocab_size: None (default) or the shared vocabulary V: both heads keep their first V rows.
            Needed when the student's and the teacher's heads have different sizes.
        num_items_in_batch: None (default: mean over counted rows) or the number of counted rows
            of the whole (gradient-accumulated) batch, as ``transformers.Trainer`` passes it: the
            loss is then ``sum / num_items_in_batch``.

    Returns:
        float32 scalar loss, or ``(loss, fastkd.KDStats)`` with ``return_stats`` (per row of the
        flattened, shifted ``(B·(T-1),)`` positions).
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of model inputs (a dict), got {type(batch).__name__}")
    offline = any(batch.get(name) is not None for name in TEACHER_FIELDS)
    if teacher is not None and offline:
        raise ValueError(
            "pass either teacher= (online teacher) or batch fields teacher_ids/teacher_logprobs "
            "(offline top-k), not both")
    if teacher is None and not offline:
        raise ValueError(
            "no teacher: pass teacher= (a causal LM) or put teacher_ids and teacher_logprobs "
            "(B, T, K) in the batch")
    if offline and topk is not None:
        raise ValueError(
            f"topk={topk!r} applies to an online teacher; with teacher_ids/teacher_logprobs in the "
            "batch the set is the K ids given there")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")

    inputs = {k: v for k, v in batch.items() if k not in _TARGET_FIELDS}
    labels = _next_token_labels(batch, int(ignore_index))
    reduction = "mean" if num_items_in_batch is None else "sum"
    options = dict(divergence=divergence, beta=beta, tail=tail, temperature=temperature,
                   labels=labels, ignore_index=ignore_index, ce_weight=ce_weight,
                   kd_weight=kd_weight, reduction=reduction, impl=impl, return_stats=return_stats)

    if teacher is None:
        ids, logprobs = _teacher_topk(batch, labels.shape)
        student_out = hidden_and_head(student, vocab_size=vocab_size, **inputs)
        result = topk_kd_loss(student_out["hidden"][:, :-1], student_out["weight"], ids, logprobs,
                              bias=student_out["bias"], softcap=student_out["softcap"], **options)
    else:
        with torch.no_grad():
            teacher_out = hidden_and_head(teacher, vocab_size=vocab_size, **inputs)
        student_out = hidden_and_head(student, vocab_size=vocab_size, **inputs)
        student_vocab, teacher_vocab = student_out["weight"].shape[0], teacher_out["weight"].shape[0]
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"the student's LM head has V={student_vocab} rows and the teacher's V={teacher_vocab}: "
                "pass vocab_size= the vocabulary they share (e.g. len(tokenizer)); heads are sliced, "
                "never padded")
        device = student_out["hidden"].device
        teacher_bias = teacher_out["bias"]
        result = kd_loss(
            student_out["hidden"][:, :-1], student_out["weight"],
            teacher_out["hidden"][:, :-1].to(device), teacher_out["weight"].to(device),
            topk=topk, topk_from=topk_from, bias=student_out["bias"],
            teacher_bias=None if teacher_bias is None else teacher_bias.to(device),
            softcap=student_out["softcap"], teacher_softcap=teacher_out["softcap"], **options)

    if num_items_in_batch is None:
        return result
    loss, stats = (result if return_stats else (result, None))
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    loss = loss / num_items_in_batch
    return (loss, stats) if return_stats else loss


def _next_token_labels(batch: Mapping[str, Any], ignore_index: int) -> Tensor:
    """``(B, T-1)`` targets of positions ``0..T-2``: ``labels[:, 1:]``, or ``input_ids[:, 1:]`` unpadded."""
    labels = batch.get("labels")
    if labels is None:
        input_ids = batch.get("input_ids")
        if not isinstance(input_ids, Tensor):
            raise ValueError("batch needs labels or input_ids (B, T) to know the next-token targets")
        labels = input_ids
        mask = batch.get("attention_mask")
        if isinstance(mask, Tensor):
            if mask.shape != input_ids.shape:
                raise ValueError(
                    f"batch['attention_mask'] must have the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {tuple(mask.shape)}")
            labels = labels.masked_fill(mask == 0, ignore_index)
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int32, torch.int64) or labels.dim() != 2:
        got = f"{labels.dtype} tensor of shape {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"batch['labels'] must be an int32/int64 tensor (B, T), got {got}")
    if labels.shape[1] < 2:
        raise ValueError(
            f"batch['labels'] must have at least 2 positions (B, T >= 2) for next-token prediction, "
            f"got shape {tuple(labels.shape)}")
    return labels[:, 1:]


def _teacher_topk(batch: Mapping[str, Any], shifted_shape) -> tuple[Tensor, Tensor]:
    ids, logprobs = batch.get("teacher_ids"), batch.get("teacher_logprobs")
    for name, value in (("teacher_ids", ids), ("teacher_logprobs", logprobs)):
        if not isinstance(value, Tensor) or value.dim() != 3:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"batch['{name}'] must be a (B, T, K) tensor (both teacher fields are needed), got {got}")
    rows, positions = shifted_shape
    if ids.shape[:2] == (rows, positions + 1):  # aligned with input_ids: drop the last position
        return ids[:, :-1], logprobs[:, :-1]
    if ids.shape[:2] == (rows, positions):  # already shifted
        return ids, logprobs
    raise ValueError(
        f"batch['teacher_ids'] must have shape ({rows}, {positions + 1}, K) (aligned with input_ids) "
        f"or ({rows}, {positions}, K) (already shifted), got {tuple(ids.shape)}")
