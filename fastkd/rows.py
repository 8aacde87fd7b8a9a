"""Rows of a loss call: flattening ``(..., D)`` inputs to rows, and the reduction over counted rows.

Shared by the functional API (``fastkd.api``) and the vocabulary-parallel losses
(``fastkd.parallel``), so both count rows and reduce them the same way: ``reduction="mean"``
divides by the number of counted rows on the device (no host sync).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def flatten_rows(hidden: Tensor, labels: Optional[Tensor], ignore_index: int):
    """``(N, D)`` hidden, ``(N,)`` int64 labels or None, and the ``(N,)`` bool mask of counted rows."""
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    if labels is None:
        return hidden2, None, torch.ones(hidden2.shape[0], dtype=torch.bool, device=hidden.device)
    labels1 = labels.reshape(-1).long()
    return hidden2, labels1, labels1 != ignore_index


def reduce_rows(loss_rows: Tensor, counted: Tensor, reduction: str) -> Tensor:
    """``loss_rows`` as they are (``"none"``), summed (``"sum"``) or averaged over counted rows."""
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    return total / counted.sum().clamp(min=1)
