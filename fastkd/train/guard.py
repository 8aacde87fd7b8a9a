"""Non-finite values in training: stop with an error naming the step and the batch, or skip the step.

NaN or inf in the hidden states or weights gives NaN losses and gradients, as in plain PyTorch.
The trainer must not carry on silently, and must never checkpoint poisoned weights over good ones:

- :meth:`NonFiniteGuard.check` looks at the step's loss and gradient norm (both already on the
  host: no extra synchronisation) before the optimizer step. ``on_nonfinite: error`` (default)
  raises :class:`NonFiniteError` naming the step, the data items of the step (epoch, position in
  the seeded order, item indices) and what was non-finite; ``on_nonfinite: skip`` drops the
  update (the step still counts, its data is consumed, the schedule advances, the metrics record
  ``skipped_nonfinite``, the running count) and stops after ``MAX_CONSECUTIVE_SKIPS`` skipped
  steps in a row, which no longer look like one bad batch.
- :func:`check_finite_weights` runs before every checkpoint: non-finite trainable weights raise
  :class:`NonFiniteError` and the checkpoint is not written, so the last good one stays.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

POLICIES = ("error", "skip")
MAX_CONSECUTIVE_SKIPS = 10


class NonFiniteError(FloatingPointError):
    """Training met a non-finite loss, gradient norm or weight (the message names the step)."""


class NonFiniteGuard:
    """Decides what a step with a non-finite loss or gradient norm does.

    Args:
        policy: ``"error"`` or ``"skip"`` (the config's ``on_nonfinite``).
        sampler: the trainer's :class:`fastkd.train.data.OrderSampler` (to name the batch).
        items_per_step: items one optimizer step draws (batch_size × processes × grad_accum).
        skipped: steps skipped so far (a resumed run's count).
    """

    def __init__(self, policy: str, sampler, items_per_step: int, skipped: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(POLICIES)}; got {policy!r}")
        self.policy, self.sampler, self.items_per_step = policy, sampler, items_per_step
        self.skipped, self.in_a_row = skipped, 0
        self._before: Optional[dict] = None

    def begin_step(self) -> None:
        """Notes the data position before the step draws its batches."""
        self._before = dict(self.sampler.state_dict())

    def check(self, step: int, loss: float, grad_norm: Optional[float]) -> bool:
        """True when the update of ``step`` must be skipped; raises under ``"error"``."""
        bad = [f"{name} {value}" for name, value in (("loss", loss), ("gradient norm", grad_norm))
               if value is not None and not math.isfinite(value)]
        if not bad:
            self.in_a_row = 0
            return False
        where = f"step {step}: {' and '.join(bad)} on {self.describe_batch()}"
        if self.policy == "error":
            raise NonFiniteError(
                f"{where}; NaN/inf in the data, the teacher or the weights, or a learning rate too "
                "large. Nothing was updated and no checkpoint was written after the last good one; "
                "set on_nonfinite: skip to drop such steps instead (fastkd.config.check_finite=True "
                "names the tensor)")
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteError(f"{where}; {self.in_a_row} steps in a row were skipped "
                                 "(on_nonfinite: skip): the weights or the data are broken, stopping")
        return True

    def describe_batch(self) -> str:
        """The data items the current step drew: epoch, positions in the seeded order, indices."""
        if self._before is None:
            return "an unknown batch"
        replay = type(self.sampler)(self.sampler.n, self.sampler.seed)
        replay.load_state_dict(self._before)
        indices = list(replay.take(self.items_per_step))
        shown = ", ".join(str(int(i)) for i in indices[:16]) + (", ..." if len(indices) > 16 else "")
        return (f"the batch of data epoch {self._before['epoch']}, positions {self._before['position']}.."
                f"{self._before['position'] + self.items_per_step - 1} of the seeded order (items {shown})")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)  # a DTensor: this process's shard
    return to_local() if to_local is not None else tensor


def check_finite_weights(model: torch.nn.Module, step: int,
                         all_processes_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Raises :class:`NonFiniteError` when a trainable parameter holds NaN/inf on any process.

    One reduction per parameter and one host sync (after ``all_processes_sum``, a collective: call
    it on every process). Names the first bad parameters of this process.
    """
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        return
    # DTensors (FSDP2 and tensor-parallel shards) are checked through their local shards: every
    # element lives on some process, and the flags are summed over all of them below
    flags = torch.stack([~torch.isfinite(_local(p.detach())).all() for _, p in params])
    total = all_processes_sum(flags.sum().to(torch.float64).reshape(1))
    if float(total.sum()) == 0:
        return
    local = [name for (name, _), bad in zip(params, flags.tolist()) if bad]
    named = ", ".join(local[:5]) + (", ..." if len(local) > 5 else "") if local else "on another process"
    raise NonFiniteError(f"step {step}: non-finite weights ({named}); the checkpoint of step {step} was "
                         "not written, the earlier ones are intact (resume from the last one)")
