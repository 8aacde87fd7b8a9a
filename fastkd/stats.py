"""Per-token statistics returned with ``return_stats=True`` (DESIGN.md §1, "Per-token statistics")."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class KDStats(NamedTuple):
    """Per-row statistics of the student, each ``(N,)`` float32 and detached (no gradient).

    Attributes:
        kd: the divergence of the row (without ``kd_weight`` and the τ² factor); 0 on ignored rows.
        entropy: entropy of the tempered student distribution ``softmax(z)``, ``lse − E_p[z]``.
        lse: log-sum-exp of the tempered student logits ``z`` over the vocabulary.
        topk_mass: the student's probability mass on the top-k set S (0 on ignored rows, whose
            ids are not read); None for a full-vocabulary loss (``kd_loss(topk=None)``).
    """

    kd: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor
    topk_mass: Optional[torch.Tensor]
