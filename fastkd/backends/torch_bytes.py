"""Row-chunked PyTorch backend of the per-bucket log-sum-exp behind byte-level distillation.

For rows of hidden states and an LM head, with tempered, capped logits
``z = softcap(h · Wᵀ + b) / τ`` and a bucket ``c(v)`` per token id (its first byte, or 256 for
no bytes; ``fastkd.ByteVocab``), the op returns the *bucket log-sum-exps*

    L_n,c = log Σ_{v: c(v)=c} exp(z_n,v)        (N, 257), -inf for an empty bucket

from which the byte log-probabilities are ``log P_n,c = L_n,c − logsumexp_c L_n,c`` (plain
PyTorch on ``(N, 257)``, in ``fastkd.bytes.loss``). With ``g = ∂loss/∂L`` the gradient with
respect to the logits is

    ∂loss/∂z_n,v = g_n,c(v) · exp(z_n,v − L_n,c(v)) = g_n,c(v) · p_v / P_c(v)

the bucket term of DESIGN.md §1; autograd through the normalisation adds the ``−p_v · Σ_c g_c``
term, so together they are ``p_v · (G_c(v) − Ḡ)``. Nothing is ``(N, V)`` beyond one chunk of
rows: each chunk recomputes its logit block in the forward and again in the backward.

Both entry points are ``torch.library.custom_op``s with fake implementations; the backward is
registered with ``torch.library.register_autograd``. Inputs are validated and flattened upstream:
``hidden (N, D)``, ``weight (V, D)``, ``bias (V,)`` or None, ``first_byte (V,)`` int64.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .torch_backend import _chunks, _Grads, _Head, compute_dtype

N_BUCKETS = 257
# Blocks of chunk x V alive at once (logits, their exponentials, the gathered per-token bucket
# values): the chunk budget is divided by these.
_BLOCKS = 3


def _bucket_logsumexp(logits: Tensor, first_byte: Tensor) -> Tensor:
    """``(c, 257)`` per-bucket log-sum-exp of a ``(c, V)`` block; overwrites ``logits``."""
    rows = logits.shape[0]
    index = first_byte.unsqueeze(0).expand(rows, -1)
    bucket_max = logits.new_full((rows, N_BUCKETS), float("-inf"))
    bucket_max.scatter_reduce_(1, index, logits, reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(bucket_max), bucket_max, 0.0)  # empty buckets: no -inf - -inf
    exps = logits.sub_(shift.index_select(1, first_byte)).exp_()
    sums = logits.new_zeros((rows, N_BUCKETS)).index_add_(1, first_byte, exps)
    return torch.where(sums > 0, sums.log() + shift, float("-inf"))


@torch.library.custom_op("fastkd::byte_lse_torch", mutates_args=())
def byte_lse(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], first_byte: Tensor,
    temperature: float, softcap: Optional[float], chunk_bytes: int,
) -> Tensor:
    """Bucket log-sum-exps ``(N, 257)`` of the tempered, capped logits, in the compute dtype
    (float32, or float64 when hidden and weight are float64)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden, weight)
    head = _Head(weight, bias, softcap, dtype)
    out = hidden.new_empty((n_rows, N_BUCKETS), dtype=dtype)
    row_bytes = _BLOCKS * vocab * (torch.finfo(dtype).bits // 8)
    for rows in _chunks(n_rows, row_bytes, chunk_bytes, hidden.device):
        logits = head.capped_logits(hidden[rows]).div_(temperature)
        out[rows] = _bucket_logsumexp(logits, first_byte)
        del logits
    return out


@byte_lse.register_fake
def _(hidden, weight, bias, first_byte, temperature, softcap, chunk_bytes):
    return hidden.new_empty((hidden.shape[0], N_BUCKETS), dtype=compute_dtype(hidden, weight))


@torch.library.custom_op("fastkd::byte_lse_torch_backward", mutates_args=())
def byte_lse_backward(
    grad: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], first_byte: Tensor,
    bucket_lse: Tensor, temperature: float, softcap: Optional[float], chunk_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(d hidden, d weight, d bias or empty)`` of ``Σ grad · bucket_lse``."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden, weight)
    head = _Head(weight, bias, softcap, dtype)
    grads = _Grads(hidden, weight, bias, dtype)
    # A bucket's gradient only reaches its own tokens; an empty bucket (-inf) has none.
    grad = torch.where(torch.isfinite(bucket_lse), grad.to(dtype), 0.0)
    row_bytes = _BLOCKS * vocab * (torch.finfo(dtype).bits // 8)
    for rows in _chunks(n_rows, row_bytes, chunk_bytes, hidden.device):
        h = hidden[rows]
        capped = head.capped_logits(h)
        dz = capped.div(temperature).sub_(bucket_lse[rows].to(dtype).index_select(1, first_byte)).exp_()
        dz.mul_(grad[rows].index_select(1, first_byte)).div_(temperature)
        head.apply_softcap_derivative(dz, capped)
        del capped
        grads.add_dense(rows, dz, h, head)
        del dz
    return grads.result()


@byte_lse_backward.register_fake
def _(grad, hidden, weight, bias, first_byte, bucket_lse, temperature, softcap, chunk_bytes):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            weight.new_empty(weight.shape[0] if bias is not None else 0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, first_byte, temperature, softcap, chunk_bytes = inputs
    ctx.save_for_backward(hidden, weight, bias, first_byte, output)
    ctx.options = (temperature, softcap, chunk_bytes)


def _backward(ctx, grad):
    hidden, weight, bias, first_byte, bucket_lse = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = byte_lse_backward(
        grad, hidden, weight, bias, first_byte, bucket_lse, *ctx.options)
    return grad_hidden, grad_weight, grad_bias if bias is not None else None, None, None, None, None


torch.library.register_autograd("fastkd::byte_lse_torch", _backward, setup_context=_setup_context)
