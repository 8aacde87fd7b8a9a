"""Drop-in integrations with Hugging Face models, ``transformers.Trainer`` and TRL (docs/integrations.md).

- :func:`hidden_and_head` (``fastkd.integrations.hf``): any ``transformers`` causal LM's final
  hidden states and LM head (weight, bias, softcap), logit scaling folded in, without its logits.
- :func:`compute_kd_loss` (``fastkd.integrations.loss``): the fused KD loss of a causal-LM batch
  against an online teacher model or teacher top-k fields in the batch, from any training loop.
- ``fastkd.integrations.trainer``: ``DistillationTrainer`` (a ``transformers.Trainer``) and
  ``GKDLossMixin`` (for TRL's ``GKDTrainer``); imported on first use, as it imports ``transformers``.
"""
from .hf import hidden_and_head
from .loss import TEACHER_FIELDS, compute_kd_loss

__all__ = ["DistillationTrainer", "GKDLossMixin", "TEACHER_FIELDS", "compute_kd_loss", "hidden_and_head"]


def __getattr__(name):
    if name in ("DistillationTrainer", "GKDLossMixin"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'fastkd.integrations' has no attribute {name!r}")
