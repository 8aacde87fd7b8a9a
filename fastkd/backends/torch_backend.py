"""Row-chunked PyTorch ops: the gathered top-k path and the helpers the chunked plan shares.

What ``fastkd.api`` runs from here: ``topk_kd_forward`` for a top-k loss that needs no pass over
the vocabulary (``tail="renormalize"`` without CE and stats: O(N·K·D) from the K gathered logits),
``select_topk`` before it for an online teacher, and the shared helpers (``_topk_epilogue``,
``counted_rows``, ``sorted_topk_ids``, ``_logsumexps_``). The full-vocabulary losses of
``impl="torch"`` run in ``fastkd.backends.chunked`` with the torch epilogues; the ops below also
still compute them (a second, independent PyTorch implementation of the same §1 formulas).

Per chunk of rows it materialises at most a few ``chunk x V`` blocks in the compute dtype
(float32, or float64 for float64 inputs), never ``N x V``. The chunk height comes from a byte
budget (``fastkd.config.chunk_bytes``) divided by the number of blocks a path keeps alive.

Forward and backward are separate ops; the backward recomputes the logit block of each chunk and
forms the gradient with the §1 formula of DESIGN.md (``fastkd.divergences``):

    dz_j = (p_j / P_c(j)) · w_c(j) − p_j · W

For top-k with a tail this is ``p · (G_T − W)`` off S and ``w_j − p_j · W`` on S, the student's
tail mass summed exactly over ``V∖S``; with ``tail="renormalize"`` only the K entries on S exist,
and without a CE term the whole loss is computed from the K gathered logits, with no pass over the
vocabulary at all.

Every entry point is a ``torch.library.custom_op`` with a fake implementation, and the autograd
formula is registered with ``torch.library.register_autograd``, so ``torch.compile`` traces through.
The ops expect validated, flattened inputs (``fastkd.api`` does that): ``hidden (N, D)``,
``weight (V, D)``, ids ``(N, K)`` int64 with ``-1`` on unused slots and on ignored rows.

16-bit weights are upcast once per call to the compute dtype (a ``V x D`` float32 copy): CPU
matmuls of 16-bit operands would round the logits to 16 bits.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import divergences as dv

# Per-row state the top-k forward saves for its backward, packed in one (N, 4) tensor.
_KD_LSE, _DENSE_COEF, _TOPK_COEF, _LSE_CE = range(4)
# Blocks of chunk x V alive at once, per path (the budget is divided by these).
_TOPK_BLOCKS = 3
_DENSE_BLOCKS = 7
_GATHER_BLOCKS = 3


def compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """float64 when both operands are float64 (references, gradcheck), else float32."""
    both64 = hidden.dtype == torch.float64 and weight.dtype == torch.float64
    return torch.float64 if both64 else torch.float32


class _Head:
    """An LM head ``softcap(h · Wᵀ + b)`` evaluated chunk by chunk in the compute dtype."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], cap: Optional[float], dtype):
        self.weight = weight.to(dtype)
        self.bias = None if bias is None else bias.to(dtype)
        self.cap = cap
        self.dtype = dtype

    def capped_logits(self, hidden_chunk: Tensor) -> Tensor:
        logits = hidden_chunk.to(self.dtype) @ self.weight.T
        if self.bias is not None:
            logits += self.bias
        if self.cap is not None:
            logits.div_(self.cap).tanh_().mul_(self.cap)
        return logits

    def gathered_capped_logits(self, hidden_chunk: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Logits at ``ids (c, K)`` only, and the gathered weight rows ``(c, K, D)``."""
        rows = self.weight[ids]
        logits = (rows @ hidden_chunk.to(self.dtype).unsqueeze(-1)).squeeze(-1)
        if self.bias is not None:
            logits += self.bias[ids]
        return dv.softcap(logits, self.cap), rows

    def apply_softcap_derivative(self, grad: Tensor, capped: Tensor) -> None:
        """``grad *= 1 − (capped/cap)²`` in place, using ``capped`` as scratch."""
        if self.cap is not None:
            grad.mul_(capped.div_(self.cap).square_().neg_().add_(1.0))


class _Grads:
    """Accumulators for the gradients of hidden, weight and bias."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], dtype):
        self.hidden = torch.empty_like(hidden)
        self.weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        self.bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if bias is not None else None
        self.weight_dtype = weight.dtype
        self.bias_dtype = None if bias is None else bias.dtype

    def add_dense(self, rows: slice, grad_logits: Tensor, hidden_chunk: Tensor, head: _Head) -> None:
        self.hidden[rows] = grad_logits @ head.weight
        self.weight.addmm_(grad_logits.T, hidden_chunk.to(head.dtype))
        if self.bias is not None:
            self.bias += grad_logits.sum(dim=0)

    def add_gathered(self, rows: slice, grad_topk: Tensor, ids: Tensor, weight_rows: Tensor,
                     hidden_chunk: Tensor, head: _Head) -> None:
        self.hidden[rows] = (grad_topk.unsqueeze(-2) @ weight_rows).squeeze(-2)
        outer = grad_topk.unsqueeze(-1) * hidden_chunk.to(head.dtype).unsqueeze(-2)
        self.weight.index_add_(0, ids.reshape(-1), outer.reshape(-1, outer.shape[-1]))
        if self.bias is not None:
            self.bias.index_add_(0, ids.reshape(-1), grad_topk.reshape(-1))

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        bias = self.weight.new_empty(0) if self.bias is None else self.bias.to(self.bias_dtype)
        return self.hidden, self.weight.to(self.weight_dtype), bias


def _chunks(n_rows: int, row_bytes: int, budget: int, device=None):
    """Row slices whose ``row_bytes`` each fit ``budget`` (0: the default of ``device``, see
    :func:`fastkd.backends.chunked.budget_bytes`)."""
    from .chunked import budget_bytes
    budget = budget_bytes(budget, row_bytes, device if device is not None else torch.device("cpu"))
    step = max(1, min(n_rows, budget // max(row_bytes, 1)))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def counted_rows(labels: Optional[Tensor], n_rows: int, ignore_index: int, device) -> Tensor:
    """``(N,)`` bool: the rows that count (every row when ``labels`` is None). Shared by the backends."""
    if labels is None:
        return torch.ones(n_rows, dtype=torch.bool, device=device)
    return labels != ignore_index


def sorted_topk_ids(ids: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """Ids sorted per row as int32 with unused slots (``-1``) set to ``vocab`` so they sort last,
    and the permutation (``sorted = ids.gather(1, perm)``): how the Triton and CUDA kernels find S."""
    key = torch.where(ids >= 0, ids, vocab)
    sorted_ids, perm = torch.sort(key, dim=1, stable=True)
    return sorted_ids.to(torch.int32).contiguous(), perm


def _cross_entropy(capped: Tensor, labels: Tensor, counted: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row CE on untempered (capped) logits and its log-sum-exp."""
    lse = torch.logsumexp(capped, dim=-1)
    target = capped.gather(1, torch.where(counted, labels, 0).unsqueeze(1)).squeeze(1)
    return lse - target, lse


def _add_cross_entropy_grad(grad: Tensor, capped: Tensor, lse_ce: Tensor, labels: Tensor,
                            counted: Tensor, scale: Tensor) -> None:
    """``grad += scale · (softmax(capped) − onehot(label))`` in place."""
    probs = capped.sub(lse_ce.unsqueeze(1)).exp_().mul_(scale.unsqueeze(1))
    grad.add_(probs)
    del probs
    grad.scatter_add_(1, torch.where(counted, labels, 0).unsqueeze(1), -scale.unsqueeze(1))


def _topk_epilogue(topk_logits, lse, tail_lse, teacher_logprobs, teacher_log_tail, valid, tail,
                   divergence, beta):
    """Loss and the saved gradient coefficients of one chunk, from its K gathered logits.

    Returns ``(kd, w_S, kd_lse, dense, topk_coef)``: the gradient with respect to the tempered
    logits is ``dz_j = p_j · dense`` off S and ``dz_j = w_j − p_j · topk_coef`` on S, with
    ``p = exp(z − kd_lse)`` (DESIGN.md §1). The values on S are *set*, not added to the dense
    part, so a huge ``G_T`` (a tiny student tail) cannot cancel catastrophically there.
    """
    log_p, log_q, valid_buckets, kd_lse, at_floor = dv.topk_bucket_logmasses(
        topk_logits, lse, teacher_logprobs, valid, tail, tail_lse, teacher_log_tail)
    kd = dv.divergence(log_p, log_q, valid_buckets, divergence, beta)
    w = dv.bucket_weights(log_p, log_q, valid_buckets, divergence, beta)
    total = w.sum(dim=-1)
    k = topk_logits.shape[-1]
    if tail == "renormalize":
        return kd, w, kd_lse, torch.zeros_like(total), total
    # Off S: dz = p·(G_T − W), G_T = w_T / P_T. Where the student tail sits at its floor P_T is a
    # constant, and only P_S = p_S moves: dz = −p·W_S off S, w_j − p_j·W_S on S.
    w_topk = w[:, :k]
    w_topk_total = w_topk.sum(dim=-1)
    g_tail = w[:, k] * torch.exp(-log_p[:, k])
    dense = torch.where(at_floor, -w_topk_total, g_tail - total)
    topk_coef = torch.where(at_floor, w_topk_total, total)
    return kd, w_topk, kd_lse, dense, topk_coef


def _set_at_topk_(block: Tensor, ids: Tensor, valid: Tensor, values: Tensor) -> None:
    """``block[n, ids[n, j]] = values[n, j]`` for the valid slots, in place; others untouched.

    Unused slots write the value of their row's first valid slot to its id (or, in a row without
    one, write ``block[n, 0]`` back), so every write to one position writes the same value.
    """
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)
    index = torch.where(valid, ids, ids.gather(1, first))
    values = torch.where(valid, values, values.gather(1, first))
    values = torch.where(valid.any(dim=1, keepdim=True), values, block.gather(1, index))
    block.scatter_(1, index, values)


def _logsumexps_(logits: Tensor, ids: Tensor, valid: Tensor, with_tail: bool):
    """Row log-sum-exps over V and (``with_tail``) over ``V∖S``, from one exp pass, in place.

    The tail is summed directly with S zeroed out, so it is exact: no ``1 − Σ_S`` cancellation.
    ``logits`` is overwritten with ``exp(logits − rowmax)``.
    """
    row_max = logits.amax(dim=1, keepdim=True)
    exps = logits.sub_(row_max).exp_()
    lse = exps.sum(dim=1).log_().add_(row_max.squeeze(1))
    if not with_tail:
        return lse, None
    _set_at_topk_(exps, ids, valid, torch.zeros_like(ids, dtype=exps.dtype))
    tail_lse = exps.sum(dim=1).log_().add_(row_max.squeeze(1))
    return lse, tail_lse


# ------------------------------------------------------------------------------------------------
# top-k (offline teacher ids and log-probs)
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastkd::topk_kd_forward", mutates_args=())
def topk_kd_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_ids: Tensor,
    teacher_logprobs: Tensor, teacher_log_tail: Optional[Tensor], labels: Optional[Tensor],
    divergence: str, beta: float, tail: str, temperature: float, softcap: Optional[float],
    ignore_index: int, ce_weight: float, kd_weight: float, chunk_bytes: int, with_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss_rows (N,), kd_rows (N,), state (N, 4), topk_weights (N, K), stats (N|0, 3))``.

    ``teacher_log_tail (N,)`` is the teacher's exact ``log Q_T`` when known (online teacher), else
    None. ``stats`` columns are entropy, lse and top-k mass of the tempered student (empty unless
    ``with_stats``); ``state`` and ``topk_weights`` are what the backward needs.
    """
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden, weight)
    head = _Head(weight, bias, softcap, dtype)
    counted = counted_rows(labels, n_rows, ignore_index, hidden.device)
    use_ce = ce_weight != 0.0
    full_pass = tail == "bucket" or use_ce or with_stats

    loss_rows = hidden.new_zeros(n_rows, dtype=dtype)
    kd_rows = torch.zeros_like(loss_rows)
    state = hidden.new_zeros((n_rows, 4), dtype=dtype)
    topk_weights = hidden.new_zeros(teacher_ids.shape, dtype=dtype)
    stats = hidden.new_zeros((n_rows if with_stats else 0, 3), dtype=dtype)
    ids = teacher_ids.clamp(min=0)
    valid = teacher_ids >= 0

    elem = torch.finfo(dtype).bits // 8
    if full_pass:
        row_bytes = _TOPK_BLOCKS * vocab * elem
    else:
        row_bytes = _GATHER_BLOCKS * teacher_ids.shape[1] * hidden.shape[1] * elem
    for rows in _chunks(n_rows, row_bytes, chunk_bytes):
        h, ids_c, valid_c = hidden[rows], ids[rows], valid[rows]
        if full_pass:
            capped = head.capped_logits(h)
            if use_ce:
                ce, state[rows, _LSE_CE] = _cross_entropy(capped, labels[rows], counted[rows])
                loss_rows[rows] = ce_weight * ce
            logits = capped.div_(temperature)
            topk_logits = logits.gather(1, ids_c)
            if with_stats:
                lse = torch.logsumexp(logits, dim=-1)
                stats[rows, 0] = dv.entropy_from_logits(logits, lse)
                stats[rows, 1] = lse
                stats[rows, 2] = dv.masked_logsumexp(topk_logits, valid_c).sub(lse).exp()
            lse, tail_lse = _logsumexps_(logits, ids_c, valid_c, with_tail=tail == "bucket")
            del logits, capped
        else:
            lse = tail_lse = None
            topk_logits = head.gathered_capped_logits(h, ids_c)[0].div_(temperature)
        teacher_tail = None if teacher_log_tail is None else teacher_log_tail[rows].to(dtype)
        kd, w, kd_lse, dense, topk_coef = _topk_epilogue(
            topk_logits, lse, tail_lse, teacher_logprobs[rows].to(dtype), teacher_tail, valid_c,
            tail, divergence, beta)
        kd_rows[rows] = kd
        topk_weights[rows] = w
        state[rows, _KD_LSE], state[rows, _DENSE_COEF], state[rows, _TOPK_COEF] = kd_lse, dense, topk_coef

    loss_rows += kd_weight * temperature**2 * kd_rows
    zero = loss_rows.new_zeros(())
    loss_rows = torch.where(counted, loss_rows, zero)
    kd_rows = torch.where(counted, kd_rows, zero)
    return loss_rows, kd_rows, state, topk_weights, stats


@topk_kd_forward.register_fake
def _(hidden, weight, bias, teacher_ids, teacher_logprobs, teacher_log_tail, labels, divergence,
      beta, tail, temperature, softcap, ignore_index, ce_weight, kd_weight, chunk_bytes, with_stats):
    dtype = compute_dtype(hidden, weight)
    n_rows = hidden.shape[0]
    rows = hidden.new_empty(n_rows, dtype=dtype)
    return (rows, torch.empty_like(rows), hidden.new_empty((n_rows, 4), dtype=dtype),
            hidden.new_empty(teacher_ids.shape, dtype=dtype),
            hidden.new_empty((n_rows if with_stats else 0, 3), dtype=dtype))


@torch.library.custom_op("fastkd::topk_kd_backward", mutates_args=())
def topk_kd_backward(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_ids: Tensor,
    labels: Optional[Tensor], state: Tensor, topk_weights: Tensor, tail: str, temperature: float,
    softcap: Optional[float], ignore_index: int, ce_weight: float, kd_weight: float, chunk_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(d hidden, d weight, d bias or empty)`` of ``Σ_n grad_rows[n] · loss_rows[n]``."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden, weight)
    head = _Head(weight, bias, softcap, dtype)
    grads = _Grads(hidden, weight, bias, dtype)
    counted = counted_rows(labels, n_rows, ignore_index, hidden.device)
    use_ce = ce_weight != 0.0
    full_pass = tail == "bucket" or use_ce
    grad_rows = torch.where(counted, grad_rows.to(dtype), 0.0)
    kd_scale = kd_weight * temperature * grad_rows  # τ² of the loss times 1/τ of z = s/τ
    ids = teacher_ids.clamp(min=0)
    valid = teacher_ids >= 0

    elem = torch.finfo(dtype).bits // 8
    if full_pass:
        row_bytes = _TOPK_BLOCKS * vocab * elem
    else:
        row_bytes = _GATHER_BLOCKS * teacher_ids.shape[1] * hidden.shape[1] * elem
    for rows in _chunks(n_rows, row_bytes, chunk_bytes):
        h, ids_c, scale = hidden[rows], ids[rows], kd_scale[rows]
        kd_lse = state[rows, _KD_LSE].unsqueeze(1)
        topk_coef = state[rows, _TOPK_COEF].unsqueeze(1)
        if full_pass:
            capped = head.capped_logits(h)
            topk_probs = capped.gather(1, ids_c).div_(temperature).sub_(kd_lse).exp_()
            on_topk = scale.unsqueeze(1) * (topk_weights[rows] - topk_probs * topk_coef)
            if tail == "bucket":
                grad = capped.div(temperature).sub_(kd_lse).exp_()
                grad.mul_((scale * state[rows, _DENSE_COEF]).unsqueeze(1))
            else:
                grad = torch.zeros_like(capped)
            _set_at_topk_(grad, ids_c, valid[rows], on_topk)
            del topk_probs, on_topk
            if use_ce:
                _add_cross_entropy_grad(grad, capped, state[rows, _LSE_CE], labels[rows],
                                        counted[rows], ce_weight * grad_rows[rows])
            head.apply_softcap_derivative(grad, capped)
            del capped
            grads.add_dense(rows, grad, h, head)
            del grad  # before the next chunk allocates its blocks
        else:
            capped, weight_rows = head.gathered_capped_logits(h, ids_c)
            topk_probs = capped.div(temperature).sub_(kd_lse).exp_()
            grad = scale.unsqueeze(1) * (topk_weights[rows] - topk_probs * topk_coef)
            grad = torch.where(valid[rows], grad, 0.0)
            head.apply_softcap_derivative(grad, capped)
            grads.add_gathered(rows, grad, ids_c, weight_rows, h, head)
    return grads.result()


@topk_kd_backward.register_fake
def _(grad_rows, hidden, weight, bias, teacher_ids, labels, state, topk_weights, tail, temperature,
      softcap, ignore_index, ce_weight, kd_weight, chunk_bytes):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            weight.new_empty(weight.shape[0] if bias is not None else 0))


def _topk_setup_context(ctx, inputs, output):
    (hidden, weight, bias, teacher_ids, _teacher_logprobs, _teacher_log_tail, labels, _divergence,
     _beta, tail, temperature, softcap, ignore_index, ce_weight, kd_weight, chunk_bytes,
     _with_stats) = inputs
    _loss_rows, _kd_rows, state, topk_weights, _stats = output
    ctx.save_for_backward(hidden, weight, bias, teacher_ids, labels, state, topk_weights)
    ctx.options = (tail, temperature, softcap, ignore_index, ce_weight, kd_weight, chunk_bytes)


def _topk_backward(ctx, grad_loss_rows, _grad_kd, _grad_state, _grad_weights, _grad_stats):
    hidden, weight, bias, teacher_ids, labels, state, topk_weights = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = topk_kd_backward(
        grad_loss_rows, hidden, weight, bias, teacher_ids, labels, state, topk_weights, *ctx.options)
    return (grad_hidden, grad_weight, grad_bias if bias is not None else None) + (None,) * 14


torch.library.register_autograd(
    "fastkd::topk_kd_forward", _topk_backward, setup_context=_topk_setup_context)


# ------------------------------------------------------------------------------------------------
# online teacher, full vocabulary (every token its own bucket)
# ------------------------------------------------------------------------------------------------

def _dense_logprobs(head: _Head, teacher_head: _Head, h: Tensor, teacher_h: Tensor,
                    temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Capped student logits, and tempered student/teacher log-probs of one chunk, with the lse."""
    capped = head.capped_logits(h)
    log_p = capped.div(temperature)
    lse = torch.logsumexp(log_p, dim=-1)
    log_p.sub_(lse.unsqueeze(1))
    log_q = teacher_head.capped_logits(teacher_h).div_(temperature)
    log_q.sub_(torch.logsumexp(log_q, dim=-1, keepdim=True))
    return capped, log_p, log_q, lse


@torch.library.custom_op("fastkd::dense_kd_forward", mutates_args=())
def dense_kd_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_hidden: Tensor,
    teacher_weight: Tensor, teacher_bias: Optional[Tensor], labels: Optional[Tensor],
    divergence: str, beta: float, temperature: float, softcap: Optional[float],
    teacher_softcap: Optional[float], ignore_index: int, ce_weight: float, kd_weight: float,
    chunk_bytes: int, with_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss_rows (N,), kd_rows (N,), lse_ce (N,), stats (N|0, 2))``; stats: entropy, lse."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden, weight)
    head = _Head(weight, bias, softcap, dtype)
    teacher_head = _Head(teacher_weight, teacher_bias, teacher_softcap, dtype)
    counted = counted_rows(labels, n_rows, ignore_index, hidden.device)
    use_ce = ce_weight != 0.0

    loss_rows = hidden.new_zeros(n_rows, dtype=dtype)
    kd_rows = torch.zeros_like(loss_rows)
    lse_ce = torch.zeros_like(loss_rows)
    stats = hidden.new_zeros((n_rows if with_stats else 0, 2), dtype=dtype)
    row_bytes = _DENSE_BLOCKS * vocab * (torch.finfo(dtype).bits // 8)
    for rows in _chunks(n_rows, row_bytes, chunk_bytes):
        capped, log_p, log_q, lse = _dense_logprobs(
            head, teacher_head, hidden[rows], teacher_hidden[rows], temperature)
        if use_ce:
            ce, lse_ce[rows] = _cross_entropy(capped, labels[rows], counted[rows])
            loss_rows[rows] = ce_weight * ce
        del capped
        kd_rows[rows] = dv.divergence(log_p, log_q, None, divergence, beta)
        if with_stats:
            stats[rows, 0] = -(log_p.exp() * log_p).sum(dim=-1)
            stats[rows, 1] = lse
    loss_rows += kd_weight * temperature**2 * kd_rows
    zero = loss_rows.new_zeros(())
    return (torch.where(counted, loss_rows, zero), torch.where(counted, kd_rows, zero), lse_ce, stats)


@dense_kd_forward.register_fake
def _(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, divergence, beta,
      temperature, softcap, teacher_softcap, ignore_index, ce_weight, kd_weight, chunk_bytes,
      with_stats):
    dtype = compute_dtype(hidden, weight)
    rows = hidden.new_empty(hidden.shape[0], dtype=dtype)
    return (rows, torch.empty_like(rows), torch.empty_like(rows),
            hidden.new_empty((hidden.shape[0] if with_stats else 0, 2), dtype=dtype))


@torch.library.custom_op("fastkd::dense_kd_backward", mutates_args=())
def dense_kd_backward(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
    labels: Optional[Tensor], lse_ce: Tensor, divergence: str, beta: float, temperature: float,
    softcap: Optional[float], teacher_softcap: Optional[float], ignore_index: int,
    ce_weight: float, kd_weight: float, chunk_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(d hidden, d weight, d bias or empty)``; teacher logits are recomputed, frozen."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden, weight)
    head = _Head(weight, bias, softcap, dtype)
    teacher_head = _Head(teacher_weight, teacher_bias, teacher_softcap, dtype)
    grads = _Grads(hidden, weight, bias, dtype)
    counted = counted_rows(labels, n_rows, ignore_index, hidden.device)
    grad_rows = torch.where(counted, grad_rows.to(dtype), 0.0)
    kd_scale = kd_weight * temperature * grad_rows
    row_bytes = _DENSE_BLOCKS * vocab * (torch.finfo(dtype).bits // 8)
    for rows in _chunks(n_rows, row_bytes, chunk_bytes):
        h = hidden[rows]
        capped, log_p, log_q, _ = _dense_logprobs(head, teacher_head, h, teacher_hidden[rows], temperature)
        grad = dv.bucket_weights(log_p, log_q, None, divergence, beta)
        total = grad.sum(dim=-1, keepdim=True)
        grad.sub_(log_p.exp_().mul_(total)).mul_(kd_scale[rows].unsqueeze(1))
        del log_p, log_q
        if ce_weight != 0.0:
            _add_cross_entropy_grad(grad, capped, lse_ce[rows], labels[rows], counted[rows],
                                    ce_weight * grad_rows[rows])
        head.apply_softcap_derivative(grad, capped)
        del capped
        grads.add_dense(rows, grad, h, head)
        del grad  # before the next chunk allocates its blocks
    return grads.result()


@dense_kd_backward.register_fake
def _(grad_rows, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, lse_ce,
      divergence, beta, temperature, softcap, teacher_softcap, ignore_index, ce_weight, kd_weight,
      chunk_bytes):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            weight.new_empty(weight.shape[0] if bias is not None else 0))


def _dense_setup_context(ctx, inputs, output):
    (hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, divergence, beta,
     temperature, softcap, teacher_softcap, ignore_index, ce_weight, kd_weight, chunk_bytes,
     _with_stats) = inputs
    ctx.save_for_backward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                          labels, output[2])
    ctx.options = (divergence, beta, temperature, softcap, teacher_softcap, ignore_index,
                   ce_weight, kd_weight, chunk_bytes)


def _dense_backward(ctx, grad_loss_rows, _grad_kd, _grad_lse_ce, _grad_stats):
    hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, lse_ce = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = dense_kd_backward(
        grad_loss_rows, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels,
        lse_ce, *ctx.options)
    return (grad_hidden, grad_weight, grad_bias if bias is not None else None,
            None, None, None, None, None, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd(
    "fastkd::dense_kd_forward", _dense_backward, setup_context=_dense_setup_context)


# ------------------------------------------------------------------------------------------------
# online teacher, top-k: choose S and the teacher's log-probs there, then the top-k ops above
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastkd::select_topk", mutates_args=())
def select_topk(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_hidden: Tensor,
    teacher_weight: Tensor, teacher_bias: Optional[Tensor], k: int, topk_from: str,
    temperature: float, softcap: Optional[float], teacher_softcap: Optional[float],
    chunk_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The set S per row (``(N, K')`` int64, ``-1`` unused), the teacher's tempered log-probs there,
    and the teacher's exact tail log-mass ``log Q_T (N,)`` (summed over ``V∖S``)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden, weight)
    head = _Head(weight, bias, softcap, dtype)
    teacher_head = _Head(teacher_weight, teacher_bias, teacher_softcap, dtype)
    width = 2 * k if topk_from == "union" else k
    ids = torch.empty((n_rows, width), dtype=torch.int64, device=hidden.device)
    logprobs = hidden.new_zeros((n_rows, width), dtype=dtype)
    log_tail = hidden.new_zeros(n_rows, dtype=dtype)
    row_bytes = _TOPK_BLOCKS * vocab * (torch.finfo(dtype).bits // 8)
    for rows in _chunks(n_rows, row_bytes, chunk_bytes):
        teacher_logits = teacher_head.capped_logits(teacher_hidden[rows]).div_(temperature)
        student_logits = head.capped_logits(hidden[rows]) if topk_from != "teacher" else teacher_logits
        ids_c = dv.select_topk(student_logits, teacher_logits, k, topk_from)
        del student_logits
        valid_c = ids_c >= 0
        topk_logits = teacher_logits.gather(1, ids_c.clamp(min=0))
        lse, tail_lse = _logsumexps_(teacher_logits, ids_c.clamp(min=0), valid_c, with_tail=True)
        ids[rows] = ids_c
        logprobs[rows] = torch.where(valid_c, topk_logits - lse.unsqueeze(1), 0.0)
        log_tail[rows] = dv.tail_logmass(dv.masked_logsumexp(topk_logits, valid_c), lse, tail_lse)[0]
    return ids, logprobs, log_tail


@select_topk.register_fake
def _(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, k, topk_from, temperature,
      softcap, teacher_softcap, chunk_bytes):
    width = 2 * k if topk_from == "union" else k
    dtype = compute_dtype(hidden, weight)
    return (hidden.new_empty((hidden.shape[0], width), dtype=torch.int64),
            hidden.new_empty((hidden.shape[0], width), dtype=dtype),
            hidden.new_empty(hidden.shape[0], dtype=dtype))
