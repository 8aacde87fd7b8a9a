"""``transformers.Trainer`` with fastkd's fused distillation loss, and the same loss for TRL's GKD.

- :class:`DistillationTrainer`: a ``Trainer`` whose loss is :func:`compute_kd_loss` against an
  online ``teacher_model`` or against the teacher top-k fields ``teacher_ids`` /
  ``teacher_logprobs`` of each batch (an offline cache).
- :class:`GKDLossMixin`: put it before ``trl.experimental.gkd.GKDTrainer`` (or any trainer with
  ``teacher_model`` and ``beta`` attributes) to replace its full-logits generalised JSD by the
  fused one; on-policy generation (``lmbda``) and everything else of the trainer stay as they are.

Importing this module imports ``transformers`` (and needs ``accelerate``, as ``Trainer`` does);
TRL is never imported here.
"""
from __future__ import annotations

import numbers
from typing import Any, Optional

import torch
from torch import nn
from transformers import Trainer

from ..modules import KDLoss
from .loss import TEACHER_FIELDS, compute_kd_loss

__all__ = ["DistillationTrainer", "GKDLossMixin", "compute_kd_loss"]


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` that trains the student on ``ce_weight·CE + kd_weight·τ²·KD``.

    Every ``transformers.Trainer`` argument is accepted as it is (``args``, ``train_dataset``,
    ``data_collator``, ...); the distillation options are keyword-only:

    Args:
        teacher_model: None (default: each batch carries ``teacher_ids`` and
            ``teacher_logprobs``, ``(B, T, K)``, see :func:`compute_kd_loss`) or the teacher
            causal LM. It is frozen (``requires_grad_(False)``), put in ``eval()`` mode and placed
            by ``accelerator.prepare_model(..., evaluation_mode=True)`` (the device; DDP/FSDP2 as
            configured). A teacher smaller than the student is fine.
        divergence: ``"reverse_kl"`` (default), ``"forward_kl"`` or ``"jsd"``.
        beta: JSD weight in ``[0, 1]``, default 0.5 (β=0 forward KL, β=1 reverse KL).
        topk: None (default: full vocabulary) or K, the per-row set of an online teacher.
        topk_from: ``"teacher"`` (default), ``"student"`` or ``"union"``.
        tail: ``"bucket"`` (default) or ``"renormalize"``.
        temperature: τ > 0, default 1.0.
        ce_weight: weight of the CE on the labels, default 0.0.
        kd_weight: weight of the KD term, default 1.0.
        vocab_size: None (default) or the vocabulary V the student and teacher share (their heads
            are sliced to V rows; needed when their heads are padded differently).
        impl: fastkd backend, default ``"auto"``.

    Its logs carry the two terms of the loss apart: ``kd`` (the divergence, without ``kd_weight``
    and τ²) and, with ``ce_weight > 0``, ``ce`` (the cross-entropy), each the mean over the counted
    rows of the micro-batches since the last log (``eval_kd``/``eval_ce`` in evaluations).

    The loss is averaged over counted next-token positions (``labels[:, 1:] != -100``; without
    ``labels``, the non-padding ``input_ids``). When the Trainer counts them over the whole
    gradient-accumulated batch (``num_items_in_batch``) the loss is ``sum / num_items_in_batch``,
    the same rule the Trainer applies to its own causal-LM loss. Evaluation reports the same loss.
    With ``remove_unused_columns`` the teacher fields are kept.
    """

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        args: Any = None,
        *trainer_args: Any,
        teacher_model: Optional[nn.Module] = None,
        divergence: str = "reverse_kl",
        beta: float = 0.5,
        topk: Optional[int] = None,
        topk_from: str = "teacher",
        tail: str = "bucket",
        temperature: float = 1.0,
        ce_weight: float = 0.0,
        kd_weight: float = 1.0,
        vocab_size: Optional[int] = None,
        impl: str = "auto",
        **trainer_kwargs: Any,
    ):
        # the loss module checks every option now, not at the first training step
        KDLoss(divergence=divergence, beta=beta, topk=topk, topk_from=topk_from, tail=tail,
               temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight, impl=impl)
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral)
                                       or vocab_size < 1):
            raise ValueError(f"vocab_size must be None or a positive int, got {vocab_size!r}")
        if teacher_model is not None and not isinstance(teacher_model, nn.Module):
            raise TypeError(
                f"teacher_model must be None or a torch.nn.Module (a causal LM), got {type(teacher_model).__name__}")
        if trainer_kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func cannot be combined with DistillationTrainer, which computes its own loss")
        if teacher_model is None and topk is not None:
            raise ValueError(
                "topk applies to an online teacher (teacher_model=); with teacher_ids/teacher_logprobs "
                "in the batch the set is the K ids given there")
        self.kd_options = dict(
            divergence=divergence, beta=beta, topk=topk, topk_from=topk_from, tail=tail,
            temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight, vocab_size=vocab_size,
            impl=impl)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if teacher_model is not None:
            teacher_model.requires_grad_(False)
            teacher_model.eval()
            teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        self.teacher_model = teacher_model
        self._kd_terms: dict = {"train": [], "eval": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The fused KD loss of ``inputs``; ``(loss, None)`` with ``return_outputs``."""
        # num_items_in_batch is given exactly when the Trainer counts the rows of the accumulated
        # batch itself (causal LMs that accept loss kwargs); it then takes the loss as normalised.
        if self.teacher_model is not None:
            self.teacher_model.eval()
        loss, stats = compute_kd_loss(model, inputs, self.teacher_model, num_items_in_batch=num_items_in_batch,
                                      return_stats=True, **self.kd_options)
        self._record_terms(model, inputs, loss, stats, num_items_in_batch)
        if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False):
            # num_items_in_batch counts every process's rows; DDP averages the gradients
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def _record_terms(self, model, inputs, loss, stats, num_items_in_batch) -> None:
        """Keeps this micro-batch's KD and CE means (device tensors: no sync until the log)."""
        from .loss import _next_token_labels

        counted = (_next_token_labels(inputs, -100) != -100).sum().clamp(min=1).to(loss.device)
        kd = stats.kd.detach().float().sum() / counted
        terms = [kd]
        if self.kd_options["ce_weight"] > 0:
            total = loss.detach() * (counted if num_items_in_batch is None else num_items_in_batch)
            kd_part = self.kd_options["kd_weight"] * self.kd_options["temperature"] ** 2 * stats.kd.detach().sum()
            terms.append((total - kd_part) / (self.kd_options["ce_weight"] * counted))
        self._kd_terms["train" if model.training else "eval"].append(torch.stack(terms))

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Adds the mean KD (and CE) terms since the last log: ``kd``/``ce`` to training logs,
        ``eval_kd``/``eval_ce`` to evaluation logs."""
        group, prefix = ("eval", "eval_") if any(k.startswith("eval_") for k in logs) else ("train", "")
        kept = self._kd_terms[group]
        if kept and (group == "eval" or "loss" in logs):
            means = torch.stack(kept).mean(0).tolist()
            logs[f"{prefix}kd"] = means[0]  # in place: evaluate() returns this dict
            if len(means) > 1:
                logs[f"{prefix}ce"] = means[1]
            kept.clear()
        super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation reports the distillation loss (no logits are ever built)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for name in TEACHER_FIELDS:
            if name not in self._signature_columns:
                self._signature_columns.append(name)


class GKDLossMixin:
    """Fused generalised JSD for TRL's ``GKDTrainer`` (and trainers shaped like it).

    ``class FastGKDTrainer(GKDLossMixin, GKDTrainer): pass`` replaces ``compute_loss``: the
    student and ``self.teacher_model`` run on ``input_ids``/``attention_mask``; the loss is
    :func:`compute_kd_loss` with ``divergence="jsd"``, ``beta=self.beta`` (TRL's convention:
    β=0 forward KL, β=1 reverse KL, the same as fastkd's) over the rows where ``labels[:, 1:]``
    is not -100, normalised by ``num_items_in_batch`` when the trainer passes it — what
    ``GKDTrainer.compute_loss`` computes from full logits, without them. ``fastkd_options``
    (a dict on the subclass or instance) adds options of :func:`compute_kd_loss`, e.g.
    ``{"topk": 64, "ce_weight": 0.1, "vocab_size": len(tokenizer)}``. Like ``GKDTrainer``'s own
    loss, the temperature of the loss is 1 (``GKDConfig.temperature`` is the sampling
    temperature); set ``fastkd_options["temperature"]`` to change it.
    """

    fastkd_options: dict = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask"),
                 "labels": inputs.get("labels")}
        batch = {k: v for k, v in batch.items() if v is not None}
        self.teacher_model.eval()
        options = dict(divergence="jsd", beta=self.beta)
        options.update(self.fastkd_options)
        loss = compute_kd_loss(model, batch, self.teacher_model,
                               num_items_in_batch=num_items_in_batch, **options)
        return (loss, None) if return_outputs else loss
