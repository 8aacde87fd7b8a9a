"""Argument checks of the public API: every bad input is a ValueError/TypeError naming the argument.

Shapes, dtypes, devices and options are checked on the host at no cost. The *values* of teacher
ids, teacher log-probs and labels are checked with one host-device synchronisation per call
(``fastkd.config.check_values``), and only on counted rows: padded rows may hold anything.

``fastkd.config.check_finite`` (opt-in) also flags NaN/±inf in the heads' inputs (every
``hidden``, ``weight``, ``bias`` that :func:`head` sees, student and teacher, all rows: a NaN in an
ignored row still poisons ``dW``): :func:`head` queues one device-side flag per tensor and
:func:`values` reads them in the same synchronisation as the value checks (one sync of its own
when ``check_values`` is off).
"""
from __future__ import annotations

import math
import numbers
import sys
import threading

import torch

from . import divergences as dv
from .config import config

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "torch", "triton", "cuda")
# Triton's CPU interpreter (3.x) computes tl.dot on bfloat16 operands wrongly (DESIGN.md §6): the
# resolvers refuse impl="triton" for bf16 under TRITON_INTERPRET=1 with this message.
BF16_INTERPRETER_HINT = (
    "impl='triton' with bfloat16 inputs under TRITON_INTERPRET=1: Triton's CPU interpreter computes "
    "tl.dot on bfloat16 wrongly (the results would be garbage); use float16 or float32 inputs there, "
    "impl='torch', or run on a GPU without TRITON_INTERPRET")
# A single teacher log-prob may exceed 0 by rounding only as much as the top-k sum may exceed 1.
MAX_LOGPROB = math.log1p(dv.TOPK_MASS_SLACK)


def tensor(name, x, *, dtypes=None, integer=False, ndim=None, min_ndim=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if _is_dtensor(x):
        raise TypeError(f"{name} is a DTensor (a sharded parameter, e.g. an LM head in its own FSDP2 "
                        f"unit); pass {name}.full_tensor(), which gathers it differentiably")
    if integer and x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have an integer dtype (int32 or int64), got {x.dtype}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def _is_dtensor(x) -> bool:
    # a DTensor can only exist once its module is imported: no import (and no cost) otherwise
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


is_dtensor = _is_dtensor  # the API routes a DTensor head to fastkd.parallel (vocabulary parallel)


def same_device(reference_name, reference, **others):
    for name, x in others.items():
        if x is not None and x.device != reference.device:
            raise ValueError(
                f"{name} is on {x.device} but {reference_name} is on {reference.device}; "
                "all tensors must be on one device")


def choice(name, value, allowed):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def real(name, value, *, low=None, high=None, low_open=False, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    value = float(value)
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def options(*, divergence, beta, tail, temperature, ignore_index, ce_weight, kd_weight, softcap,
            reduction, impl, return_stats):
    """Checks the scalar options shared by every loss; returns them normalised."""
    choice("divergence", divergence, dv.DIVERGENCES)
    choice("tail", tail, dv.TAIL_MODES)
    choice("reduction", reduction, REDUCTIONS)
    choice("impl", impl, IMPLS)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
    return dict(
        divergence=divergence,
        beta=real("beta", beta, low=0.0, high=1.0),
        tail=tail,
        temperature=real("temperature", temperature, low=0.0, low_open=True),
        ignore_index=int(ignore_index),
        ce_weight=real("ce_weight", ce_weight, low=0.0),
        kd_weight=real("kd_weight", kd_weight, low=0.0),
        softcap=real("softcap", softcap, low=0.0, low_open=True, allow_none=True),
        reduction=reduction,
        impl=impl,
        return_stats=return_stats,
    )


# tensors queued by head() for the finiteness check of the next values() call (per thread)
_finite = threading.local()


def _queue_finite(prefix, hidden, weight, bias):
    if not config.check_finite or torch.compiler.is_compiling():
        return
    if prefix == "" or not hasattr(_finite, "queue"):  # a new call of a loss starts with the student head
        _finite.queue = []
    for name, x in ((f"{prefix}hidden", hidden), (f"{prefix}weight", weight), (f"{prefix}bias", bias)):
        if x is not None:
            _finite.queue.append((name, x))


def _finite_checks() -> list:
    """``(flag, message)`` pairs for the queued tensors; empties the queue."""
    queue, _finite.queue = getattr(_finite, "queue", []), []
    checks = []
    for name, x in queue:
        x = x.detach()

        def message(_row, name=name, x=x):
            flat = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
            row = int((~torch.isfinite(flat)).any(dim=1).nonzero()[0, 0])
            what = "row" if x.dim() > 1 else "element of"
            return (f"{name} holds non-finite values (NaN or ±inf): {what} {row} "
                    f"(fastkd.config.check_finite; NaN/inf in the model's activations or weights)")
        checks.append((~torch.isfinite(x).all(), message))
    return checks


def head(prefix, hidden, weight, bias):
    """Checks a (hidden, weight, bias) triple; returns (rows, D, V). With
    ``config.check_finite`` their finiteness is checked at the next :func:`values` call."""
    tensor(f"{prefix}hidden", hidden, dtypes=FLOAT_DTYPES, min_ndim=2)
    tensor(f"{prefix}weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    d = hidden.shape[-1]
    if weight.shape[1] != d:
        raise ValueError(
            f"{prefix}weight must have shape (V, {d}) to match {prefix}hidden's last dimension "
            f"D={d}, got {tuple(weight.shape)}")
    vocab = weight.shape[0]
    if vocab < 1 or d < 1:
        raise ValueError(f"{prefix}weight must be non-empty (V >= 1, D >= 1), got {tuple(weight.shape)}")
    if bias is not None:
        tensor(f"{prefix}bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != vocab:
            raise ValueError(f"{prefix}bias must have shape ({vocab},), got {tuple(bias.shape)}")
    same_device(f"{prefix}hidden", hidden, **{f"{prefix}weight": weight, f"{prefix}bias": bias})
    _queue_finite(prefix, hidden, weight, bias)
    return hidden.numel() // d, d, vocab


def labels_tensor(labels, hidden, ce_weight):
    if labels is None:
        if ce_weight:
            raise ValueError("ce_weight > 0 needs labels: pass labels (the next-token ids per row)")
        return
    tensor("labels", labels, integer=True)
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels must have shape {tuple(hidden.shape[:-1])} (hidden's leading dimensions), "
            f"got {tuple(labels.shape)}")
    same_device("hidden", hidden, labels=labels)


def teacher_topk(teacher_ids, teacher_logprobs, hidden):
    tensor("teacher_ids", teacher_ids, integer=True, min_ndim=2)
    tensor("teacher_logprobs", teacher_logprobs, dtypes=FLOAT_DTYPES)
    if teacher_ids.shape[:-1] != hidden.shape[:-1] or teacher_ids.shape[-1] < 1:
        raise ValueError(
            f"teacher_ids must have shape {tuple(hidden.shape[:-1])} + (K,) with K >= 1 "
            f"(hidden's leading dimensions), got {tuple(teacher_ids.shape)}")
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(
            f"teacher_logprobs must have the shape of teacher_ids {tuple(teacher_ids.shape)}, "
            f"got {tuple(teacher_logprobs.shape)}")
    same_device("hidden", hidden, teacher_ids=teacher_ids, teacher_logprobs=teacher_logprobs)


def values(vocab, counted, labels=None, teacher_ids=None, teacher_logprobs=None):
    """Value checks on counted rows, with one host sync. Inputs are flattened to rows. The
    finiteness flags queued by :func:`head` (``config.check_finite``) ride on the same sync."""
    if torch.compiler.is_compiling():
        return
    checks = _finite_checks() if config.check_finite else []  # (flag tensor, message builder)
    if not config.check_values:
        labels = teacher_ids = None
    if labels is not None:
        bad = counted & ((labels < 0) | (labels >= vocab))
        checks.append((bad, lambda r: f"labels must be in [0, {vocab}) or ignore_index; "
                                      f"row {r} has {labels[r].item()}"))
    if teacher_ids is not None:
        rows = counted.unsqueeze(1)
        valid = rows & (teacher_ids >= 0)
        out_of_range = rows & ((teacher_ids < -1) | (teacher_ids >= vocab))
        checks.append((out_of_range, lambda r: f"teacher_ids must be in [0, {vocab}) or -1 for an "
                                               f"unused slot; row {r} has {teacher_ids[r].tolist()}"))
        ordered = teacher_ids.sort(dim=1).values
        dup = rows & torch.nn.functional.pad((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0), (1, 0))
        checks.append((dup, lambda r: f"teacher_ids must not repeat an id within a row; row {r} "
                                      f"has {teacher_ids[r].tolist()}"))
        lp = teacher_logprobs
        nonfinite = valid & ~torch.isfinite(lp)
        checks.append((nonfinite, lambda r: "teacher_logprobs must be finite where teacher_ids >= 0 "
                                            f"(use id -1 for a slot without one); row {r} has {lp[r].tolist()}"))
        positive = valid & (lp > MAX_LOGPROB)
        checks.append((positive, lambda r: f"teacher_logprobs must be log-probabilities (<= 0); row {r} "
                                           f"has {lp[r].max().item()}"))
        lse = dv.masked_logsumexp(torch.where(valid & torch.isfinite(lp), lp.float(), 0.0), valid)
        too_much = counted & (lse > math.log1p(dv.TOPK_MASS_SLACK))
        checks.append((too_much, lambda r: "teacher top-k masses must sum to at most "
                                           f"1 + {dv.TOPK_MASS_SLACK}; row {r} sums to {lse[r].exp().item():.6f}"))
    if not checks:
        return
    flags = torch.stack([bad.any() for bad, _ in checks]).tolist()  # the one host sync
    for (bad, message), failed in zip(checks, flags):
        if failed:
            row = int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0, 0]) if bad.dim() else 0
            raise ValueError(message(row))
