"""``nn.Module`` wrappers of the functional losses: options at construction, tensors at call."""
from __future__ import annotations

import numbers
from typing import Optional

from torch import Tensor, nn

from . import _validate as check
from .api import kd_loss, topk_kd_loss


class TopKKDLoss(nn.Module):
    """Module form of :func:`fastkd.topk_kd_loss`; keyword options as there, checked here.

    ``forward(hidden, weight, teacher_ids, teacher_logprobs, labels=None, bias=None)``.
    """

    def __init__(self, *, divergence="reverse_kl", beta=0.5, tail="bucket", temperature=1.0,
                 ignore_index=-100, ce_weight=0.0, kd_weight=1.0, softcap=None, reduction="mean",
                 impl="auto", return_stats=False):
        super().__init__()
        self.options = check.options(
            divergence=divergence, beta=beta, tail=tail, temperature=temperature,
            ignore_index=ignore_index, ce_weight=ce_weight, kd_weight=kd_weight, softcap=softcap,
            reduction=reduction, impl=impl, return_stats=return_stats)

    def forward(self, hidden: Tensor, weight: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                labels: Optional[Tensor] = None, bias: Optional[Tensor] = None):
        return topk_kd_loss(hidden, weight, teacher_ids, teacher_logprobs, labels=labels, bias=bias,
                            **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class KDLoss(nn.Module):
    """Module form of :func:`fastkd.kd_loss`; keyword options as there, checked here.

    ``forward(hidden, weight, teacher_hidden, teacher_weight, labels=None, bias=None,
    teacher_bias=None)``.
    """

    def __init__(self, *, divergence="reverse_kl", beta=0.5, topk=None, topk_from="teacher",
                 tail="bucket", temperature=1.0, ignore_index=-100, ce_weight=0.0, kd_weight=1.0,
                 softcap=None, teacher_softcap=None, reduction="mean", impl="auto",
                 return_stats=False):
        super().__init__()
        self.options = check.options(
            divergence=divergence, beta=beta, tail=tail, temperature=temperature,
            ignore_index=ignore_index, ce_weight=ce_weight, kd_weight=kd_weight, softcap=softcap,
            reduction=reduction, impl=impl, return_stats=return_stats)
        check.choice("topk_from", topk_from, ("teacher", "student", "union"))
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, numbers.Integral) or topk < 1):
            raise ValueError(f"topk must be None or a positive int, got {topk!r}")
        topk = None if topk is None else int(topk)
        self.options.update(
            topk=topk, topk_from=topk_from,
            teacher_softcap=check.real("teacher_softcap", teacher_softcap, low=0.0, low_open=True,
                                       allow_none=True))

    def forward(self, hidden: Tensor, weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                labels: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None):
        return kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels=labels, bias=bias,
                       teacher_bias=teacher_bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
