"""Vocabulary-parallel distillation losses: an LM head sharded over its rows (DESIGN.md §3).

Tensor parallelism shards an LM head ``W (V, D)`` over the vocabulary (torch's ``ColwiseParallel``
on ``lm_head``: a DTensor with placement ``Shard(0)``); rank r of the group holds the rows
``[start_r, start_r + V_r)`` (``torch.chunk`` split: ``ceil(V / P)`` rows per rank, the last ranks
shorter or empty), and every rank holds the same ``hidden (N, D)``. Every loss of fastkd is a
function of a few per-row statistics that are sums over the vocabulary (DESIGN.md §1), so each
rank computes them over its own rows and the statistics are combined; no rank ever holds a logit
of another rank's rows, nor another rank's weight.

Per row, in the tempered, capped logits ``z = softcap(h·Wᵀ + b)/τ``:

- a log-sum-exp over the vocabulary (or over ``V∖S``, or a bucket) is combined from the shards'
  ``L_r`` as ``M + log Σ_r exp(L_r − M)`` with ``M = max_r L_r``: one MAX and one SUM all-reduce;
- a logit at an id of S (or at the label) is owned by exactly one rank; the others contribute an
  exact 0 to a SUM all-reduce;
- the student's entropy ``lse − E_p[z]`` combines ``E_p[z] = Σ_r exp(L_r − lse)·E_{p_r}[z]``.

The (N, K) epilogue (bucket log-masses, divergence, bucket weights ``w``) then runs once on the
combined statistics, identically on every rank, and each rank forms ``dz`` for its own rows with
the §1 formula ``dz_j = p_j · (G_c(j) − Ḡ)``; ``dW`` and ``db`` stay local, ``dh`` is the sum of the
ranks' ``dz_r · W_r`` (a SUM all-reduce in the backward). Online teacher, full vocabulary: the
divergence is a sum over the vocabulary of terms that need the global normalisers, so per chunk
of rows the normalisers are combined first and the partial divergences (and ``Ḡ = Σ_v w_v``)
second. Top-k selection from an online head: each rank's K largest logits are the only candidates
the global top-k can come from; the ``(N, K)`` candidates of every rank are gathered and the
global top-k chosen among them. Byte buckets: each rank's 257 bucket log-sum-exps per row are
combined like any log-sum-exp.

Communication per call is ``O(N·(K + c))`` plus the ``N × D`` all-reduce of ``dh``; the bytes are
listed in docs/parallel.md and asserted in tests/test_vocab_parallel.py. The shard-local work is
row-chunked PyTorch (the ``torch`` backend's plan; cuBLAS GEMMs on a GPU); the math goes through
``fastkd.divergences`` only.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _validate as check
from .. import divergences as dv
from ..backends.chunked import budget_bytes
from ..rows import flatten_rows, reduce_rows
from ..config import config

N_BYTE_BUCKETS = 257
# Blocks of chunk x V_r alive at once per path (the chunk budget is divided by these).
_TOPK_BLOCKS = 4
_DENSE_BLOCKS = 7


# ------------------------------------------------------------------------------------------------
# the shard
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VocabShard:
    """Where one rank's rows of a vocabulary-sharded head sit.

    Attributes:
        group: the process group of the sharded mesh dimension.
        rank, world: this rank's index in ``group`` and the group's size.
        start, size: this rank holds the global rows ``[start, start + size)`` (size may be 0).
        vocab: the global V.
        max_size: the largest shard, ``ceil(V / world)``: row chunks are sized from it so that
            every rank runs the same collectives in the same order.
    """

    group: object
    rank: int
    world: int
    start: int
    size: int
    vocab: int
    max_size: int

    def owned(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(local ids, owned)``: global ids (``-1`` unused) as indices into this shard, clamped
        into range where not owned, and the bool mask of the ids this rank holds."""
        owned = (ids >= self.start) & (ids < self.start + self.size)
        local = torch.where(owned, ids - self.start, 0)
        return local, owned

    def same_split(self, other: "VocabShard") -> bool:
        return (self.group == other.group and self.start == other.start and self.size == other.size
                and self.vocab == other.vocab)


def is_vocab_sharded(x) -> bool:
    """Whether ``x`` is a DTensor; checked without importing torch.distributed.tensor."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def vocab_shard(name: str, weight) -> VocabShard:
    """The :class:`VocabShard` of a DTensor ``weight (V, ...)`` sharded on dim 0 over one mesh
    dimension and replicated over any other (what ``ColwiseParallel`` produces); TypeError for any
    other layout, naming ``name``."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(weight.placements)
    sharded = [i for i, p in enumerate(placements) if type(p) is Shard and p.dim == 0]
    others_replicated = all(type(p) is Replicate for i, p in enumerate(placements) if i not in sharded)
    if len(sharded) != 1 or not others_replicated:
        raise TypeError(
            f"{name} is a DTensor with placements {placements}; fastkd's vocabulary-parallel path "
            f"takes Shard(0) over one mesh dimension (Replicate over the others), as ColwiseParallel "
            f"produces. For another layout (e.g. an FSDP2 shard), pass {name}.full_tensor(), which "
            "gathers it differentiably")
    mesh_dim = sharded[0]
    mesh = weight.device_mesh
    world = mesh.size(mesh_dim)
    rank = mesh.get_local_rank(mesh_dim)
    vocab = weight.shape[0]
    max_size = -(-vocab // world)
    start = min(rank * max_size, vocab)
    size = max(0, min(vocab - start, max_size))
    local = weight.to_local()
    if local.shape[0] != size:
        raise TypeError(f"{name}: rank {rank} holds {local.shape[0]} of V={vocab} rows; the "
                        f"vocabulary-parallel path expects torch.chunk's split ({size} rows here)")
    return VocabShard(mesh.get_group(mesh_dim), rank, world, start, size, vocab, max_size)


def _local(x):
    """The local tensor of a DTensor (differentiably), anything else as it is."""
    return x.to_local() if is_vocab_sharded(x) else x


def _replicated_local(name: str, x, shard: VocabShard):
    """``hidden``-like input: a plain tensor, or a DTensor replicated over the mesh, as a plain
    tensor (the same on every rank of ``shard.group``: checked under ``config.check_values``)."""
    if x is None or not is_vocab_sharded(x):
        return x
    from torch.distributed.tensor import Replicate

    if not all(type(p) is Replicate for p in x.placements):
        raise TypeError(f"{name} must be replicated over the vocabulary-parallel group (a plain "
                        f"tensor or a DTensor with Replicate placements), got placements "
                        f"{tuple(x.placements)}")
    return x.to_local()


def check_head(prefix: str, hidden, weight, bias):
    """Checks a (hidden, weight, bias) triple whose weight is vocabulary-sharded.

    Returns ``(hidden, weight_local, bias_local, shard, rows, D, V)`` with plain local tensors
    (``weight_local`` and ``bias_local`` differentiable views of the DTensors' shards)."""
    shard = vocab_shard(f"{prefix}weight", weight)
    if bias is not None:
        if not is_vocab_sharded(bias):
            raise TypeError(f"{prefix}bias must be sharded like {prefix}weight (a DTensor with "
                            f"Shard(0)) when {prefix}weight is, got a {type(bias).__name__}")
        if not shard.same_split(vocab_shard(f"{prefix}bias", bias)):
            raise ValueError(f"{prefix}bias must be split over the vocabulary like {prefix}weight")
    hidden = _replicated_local(f"{prefix}hidden", hidden, shard)
    weight_local, bias_local = weight.to_local(), _local(bias)
    check.tensor(f"{prefix}hidden", hidden, dtypes=check.FLOAT_DTYPES, min_ndim=2)
    check.tensor(f"{prefix}weight", weight_local, dtypes=check.FLOAT_DTYPES, ndim=2)
    dim = hidden.shape[-1]
    if weight.shape[1] != dim:
        raise ValueError(f"{prefix}weight must have shape (V, {dim}) to match {prefix}hidden's last "
                         f"dimension D={dim}, got {tuple(weight.shape)}")
    if bias is not None:
        check.tensor(f"{prefix}bias", bias_local, dtypes=check.FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != shard.vocab:
            raise ValueError(f"{prefix}bias must have shape ({shard.vocab},), got {tuple(bias.shape)}")
    check.same_device(f"{prefix}hidden", hidden, **{f"{prefix}weight": weight_local,
                                                     f"{prefix}bias": bias_local})
    return hidden, weight_local, bias_local, shard, hidden.numel() // dim, dim, shard.vocab


def check_replicated(shard: VocabShard, **tensors) -> None:
    """Fails unless every tensor is the same on all ranks of the group (an FSDP2 shard of a head
    comes with different rows per rank: the vocabulary-parallel loss would be wrong there).

    A float64 fingerprint per tensor (two weighted sums) is all-reduced with MAX of ``(f, −f)``;
    one collective of ``16·len(tensors)`` bytes and one host sync, only under
    ``config.check_values``."""
    if not config.check_values or torch.compiler.is_compiling() or shard.world == 1:
        return
    names, prints = [], []
    for name, x in tensors.items():
        if x is None:
            continue
        flat = x.detach().reshape(-1).double()
        ramp = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
        prints.append(torch.stack([flat.sum(), (flat * ramp.reciprocal()).sum()]))
        names.append(name)
    local = torch.stack(prints)
    both = torch.cat([local, -local])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=shard.group)
    largest, smallest = both[:len(names)], -both[len(names):]
    differs = ((largest != smallest) & ~(torch.isnan(largest) & torch.isnan(smallest))).any(dim=1).tolist()
    for name, bad in zip(names, differs):
        if bad:
            raise ValueError(
                f"{name} differs across the ranks that share the vocabulary-sharded head: the "
                "vocabulary-parallel loss needs the same rows on every rank of the tensor-parallel "
                "group. A head sharded by FSDP2 (data parallel, different rows per rank) must be "
                "gathered instead: pass weight.full_tensor()")


# ------------------------------------------------------------------------------------------------
# collectives (the only communication of this module)
# ------------------------------------------------------------------------------------------------

def _all_reduce_(x: Tensor, shard: VocabShard, op=dist.ReduceOp.SUM) -> Tensor:
    if shard.world > 1:
        dist.all_reduce(x, op=op, group=shard.group)
    return x


def _all_gather(x: Tensor, shard: VocabShard) -> Tensor:
    """``(world, *x.shape)``: every rank's ``x``."""
    if shard.world == 1:
        return x.unsqueeze(0)
    out = x.new_empty((shard.world * x.shape[0],) + tuple(x.shape[1:]))  # ranks along dim 0
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # older torch
    gather(out, x.contiguous(), group=shard.group)
    return out.view((shard.world,) + tuple(x.shape))


def _combine(shard: VocabShard, lses: list[Tensor], sums: list[Tensor], weighted=()) -> tuple:
    """Combines per-rank row statistics with one MAX and one SUM all-reduce.

    ``lses``: ``(n,)`` local log-sum-exps, combined into global ones. ``sums``: ``(n,)`` or
    ``(n, k)`` values summed over ranks as they are. ``weighted``: ``(i, x)`` pairs, ``x (n,)``
    summed with the weight ``exp(L_r − M)`` of ``lses[i]`` (so that dividing by the combined
    ``Σ_r exp(L_r − M)`` gives the ``exp(L_r − L)``-weighted mean). Returns
    ``(global lses, summed, weighted means)``.
    """
    n = len(lses)
    local = torch.stack(lses, dim=1) if n else None
    if n:
        shift = _all_reduce_(local.clone(), shard, dist.ReduceOp.MAX)
        shift = torch.where(torch.isfinite(shift), shift, 0.0)  # all -inf: a sum of zeros
        scaled = (local - shift).exp()
    parts = [scaled] if n else []
    parts += [s.unsqueeze(1) if s.dim() == 1 else s for s in sums]
    parts += [(scaled[:, i] * torch.nan_to_num(x, nan=0.0)).unsqueeze(1) for i, x in weighted]
    total = _all_reduce_(torch.cat(parts, dim=1), shard)
    out_lses = [total[:, i].log() + shift[:, i] for i in range(n)]
    summed, col = [], n
    for s in sums:
        width = 1 if s.dim() == 1 else s.shape[1]
        block = total[:, col:col + width]
        summed.append(block.squeeze(1) if s.dim() == 1 else block)
        col += width
    means = [total[:, col + j] / total[:, i] for j, (i, _) in enumerate(weighted)]
    return out_lses, summed, means


class _ReplicatedInput(torch.autograd.Function):
    """Identity forward; the backward sums the ranks' partial gradients (every rank's shard
    contributes to the gradient of the replicated input)."""

    @staticmethod
    def forward(ctx, x, shard):
        ctx.shard = shard
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce_(grad.contiguous().clone(), ctx.shard), None


class _ShardLogSumExp(torch.autograd.Function):
    """``(n, c)`` per-shard log-sum-exps → the global ones; backward ``g · exp(L_r − L)`` (local)."""

    @staticmethod
    def forward(ctx, local, shard):
        shift = _all_reduce_(local.detach().clone(), shard, dist.ReduceOp.MAX)
        shift = torch.where(torch.isfinite(shift), shift, 0.0)
        total = _all_reduce_((local - shift).exp(), shard).log() + shift
        ctx.save_for_backward(local, total)
        return total

    @staticmethod
    def backward(ctx, grad):
        local, total = ctx.saved_tensors
        share = torch.where(torch.isfinite(local), (local - total).exp(), 0.0)
        return torch.where(torch.isfinite(total), grad * share, 0.0), None


# ------------------------------------------------------------------------------------------------
# shard-local logits
# ------------------------------------------------------------------------------------------------

class _LocalHead:
    """This rank's rows of an LM head, ``softcap(h · W_rᵀ + b_r)``, evaluated chunk by chunk."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], cap: Optional[float], dtype):
        self.weight = weight.detach().to(dtype)
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.cap = cap
        self.dtype = dtype

    def logits(self, hidden_chunk: Tensor) -> Tensor:
        out = hidden_chunk.to(self.dtype) @ self.weight.T
        if self.bias is not None:
            out += self.bias
        return dv.softcap(out, self.cap)

    def gathered(self, hidden_chunk: Tensor, local_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Capped logits at ``local_ids (c, K)`` (any value where the id is not owned) and the
        gathered rows ``(c, K, D)``."""
        if self.weight.shape[0] == 0:
            c, k = local_ids.shape
            return hidden_chunk.new_zeros((c, k), dtype=self.dtype), None
        rows = self.weight[local_ids]
        out = (rows @ hidden_chunk.to(self.dtype).unsqueeze(-1)).squeeze(-1)
        if self.bias is not None:
            out += self.bias[local_ids]
        return dv.softcap(out, self.cap), rows

    def softcap_derivative_(self, grad: Tensor, capped: Tensor) -> Tensor:
        if self.cap is not None:
            grad.mul_(1.0 - (capped / self.cap).square())
        return grad


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == weight.dtype == torch.float64 else torch.float32


def _row_chunks(n_rows: int, shard: VocabShard, blocks: int, dtype, budget: Optional[int], device):
    """Row slices sized from the largest shard: every rank cuts the rows the same way (``budget``
    None: the default for ``device``, as the chunked plan's)."""
    row_bytes = max(1, blocks * max(shard.max_size, 1) * (torch.finfo(dtype).bits // 8))
    budget = budget_bytes(budget, row_bytes, device)
    step = max(1, min(max(n_rows, 1), budget // row_bytes))
    return [slice(s, min(n_rows, s + step)) for s in range(0, n_rows, step)]


def _at(block: Tensor, local_ids: Tensor, owned: Tensor) -> Tensor:
    """``block[n, local_ids[n, j]]`` where owned, exactly 0 elsewhere."""
    if block.shape[1] == 0:
        return torch.zeros(local_ids.shape, dtype=block.dtype, device=block.device)
    return torch.where(owned, block.gather(1, local_ids), 0.0)


def _without(block: Tensor, local_ids: Tensor, owned: Tensor) -> Tensor:
    """``block`` with the owned ids of each row set to -inf (the part of V∖S on this shard)."""
    return block.masked_fill(dv.topk_mask(local_ids, owned, block.shape[1]), -math.inf)


def _expectation(logits: Tensor, lse: Tensor) -> Tensor:
    """``E_p[z]`` under this shard's own softmax (0 for an empty shard)."""
    if logits.shape[1] == 0:
        return logits.new_zeros(logits.shape[0])
    return (torch.exp(logits - lse.unsqueeze(1)) * logits).sum(dim=1)


# ------------------------------------------------------------------------------------------------
# top-k (offline teacher top-k, or an online teacher's top-k set)
# ------------------------------------------------------------------------------------------------

@dataclass
class TopKPlan:
    """Everything of a sharded top-k loss but the differentiable inputs (set up by the API)."""

    shard: VocabShard
    ids: Tensor                         # (N, K) int64 global ids, -1 unused / ignored rows
    teacher_logprobs: Optional[Tensor]  # (N, K), or None with an online teacher
    teacher: Optional[tuple]            # (hidden (N, D_t), weight_local, bias_local, softcap) online
    labels: Optional[Tensor]            # (N,) int64 or None
    counted: Tensor                     # (N,) bool
    opts: dict
    with_stats: bool
    teacher_stats: Optional[dict] = None  # the online teacher's shard-local statistics at S, if known


def _topk_statistics(hidden, head: _LocalHead, plan: TopKPlan, dtype):
    """Per-row statistics of the whole vocabulary from this rank's shard, combined over ranks.

    Returns a dict of ``(N,)`` / ``(N, K)`` tensors: ``zS`` (tempered logits at S), ``lse``,
    ``tail_lse`` (bucket), ``lse_ce``/``target`` (CE), ``mean_z`` (stats), and for an online
    teacher ``tS``, ``teacher_lse``, ``teacher_tail_lse``."""
    shard, opts = plan.shard, plan.opts
    tau, tail = opts["temperature"], opts["tail"]
    use_ce, stats = opts["ce_weight"] != 0.0, plan.with_stats
    full = tail == "bucket" or use_ce or stats
    n_rows = hidden.shape[0]
    local_ids, owned = shard.owned(plan.ids)
    if plan.labels is not None:
        label_local, label_owned = shard.owned(plan.labels.unsqueeze(1))
    teacher_head = None
    if plan.teacher is not None:
        t_hidden, t_weight, t_bias, t_cap = plan.teacher
        teacher_head = _LocalHead(t_weight, t_bias, t_cap, dtype)

    cols = {}

    def put(name, rows, value):
        if name not in cols:
            shape = (n_rows,) + tuple(value.shape[1:])
            cols[name] = torch.zeros(shape, dtype=dtype, device=hidden.device)
        cols[name][rows] = value

    for rows in _row_chunks(n_rows, shard, _TOPK_BLOCKS, dtype, config.chunk_bytes, hidden.device):
        h, ids_c, own_c = hidden[rows], local_ids[rows], owned[rows]
        if full:
            capped = head.logits(h)
            if use_ce:
                put("lse_ce", rows, torch.logsumexp(capped, dim=1))
                put("target", rows, _at(capped, label_local[rows], label_owned[rows]).squeeze(1))
            logits = capped / tau
            del capped
            put("zS", rows, _at(logits, ids_c, own_c))
            lse = torch.logsumexp(logits, dim=1)
            put("lse", rows, lse)
            if stats:
                put("mean_z", rows, _expectation(logits, lse))
            if tail == "bucket":
                put("tail_lse", rows, torch.logsumexp(_without(logits, ids_c, own_c), dim=1))
            del logits
        else:
            put("zS", rows, torch.where(own_c, head.gathered(h, ids_c)[0] / tau, 0.0))
        if teacher_head is not None and plan.teacher_stats is None:
            th = t_hidden[rows]
            if tail == "bucket":
                t_logits = teacher_head.logits(th) / tau
                put("tS", rows, _at(t_logits, ids_c, own_c))
                put("teacher_lse", rows, torch.logsumexp(t_logits, dim=1))
                put("teacher_tail_lse", rows, torch.logsumexp(_without(t_logits, ids_c, own_c), dim=1))
                del t_logits
            else:
                put("tS", rows, torch.where(own_c, teacher_head.gathered(th, ids_c)[0] / tau, 0.0))

    if plan.teacher_stats is not None:  # from the selection pass: no second pass over the teacher
        cols["tS"] = plan.teacher_stats["tS"].to(dtype)
        if tail == "bucket":
            cols["teacher_lse"] = plan.teacher_stats["teacher_lse"].to(dtype)
            cols["teacher_tail_lse"] = plan.teacher_stats["teacher_tail_lse"].to(dtype)
    names_lse = [k for k in ("lse", "tail_lse", "lse_ce", "teacher_lse", "teacher_tail_lse") if k in cols]
    names_sum = [k for k in ("zS", "tS", "target") if k in cols]
    weighted = [(names_lse.index("lse"), cols["mean_z"])] if "mean_z" in cols else []
    lses, sums, means = _combine(shard, [cols[k] for k in names_lse], [cols[k] for k in names_sum],
                                 weighted)
    out = dict(zip(names_lse, lses))
    out.update(zip(names_sum, sums))
    if means:
        out["mean_z"] = means[0]
    return out


def _topk_epilogue(zS, lse, tail_lse, teacher_logprobs, teacher_log_tail, valid, tail, divergence,
                   beta):
    """The (N, K) epilogue on combined statistics: ``(kd, w_S, kd_lse, dense, topk_coef)``.

    ``dz_j = p_j · dense`` off S and ``w_j − p_j · topk_coef`` on S, ``p = exp(z − kd_lse)``
    (DESIGN.md §1, the bucket weights of ``fastkd.divergences``). Where the student's tail sits at
    its floor ``P_T`` is a constant and only the masses on S move."""
    log_p, log_q, valid_buckets, kd_lse, at_floor = dv.topk_bucket_logmasses(
        zS, lse, teacher_logprobs, valid, tail, tail_lse, teacher_log_tail)
    kd = dv.divergence(log_p, log_q, valid_buckets, divergence, beta)
    w = dv.bucket_weights(log_p, log_q, valid_buckets, divergence, beta)
    total = w.sum(dim=-1)
    if tail == "renormalize":
        return kd, w, kd_lse, torch.zeros_like(total), total
    k = zS.shape[-1]
    w_topk = w[:, :k]
    w_topk_total = w_topk.sum(dim=-1)
    g_tail = w[:, k] * torch.exp(-log_p[:, k])
    dense = torch.where(at_floor, -w_topk_total, g_tail - total)
    return kd, w_topk, kd_lse, dense, torch.where(at_floor, w_topk_total, total)


class _TopK(torch.autograd.Function):
    """Sharded top-k loss rows; gradients to ``hidden`` (all-reduced) and this rank's shard."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: TopKPlan):
        opts = plan.opts
        dtype = _compute_dtype(hidden, weight)
        head = _LocalHead(weight, bias, opts["softcap"], dtype)
        st = _topk_statistics(hidden.detach(), head, plan, dtype)
        valid = plan.ids >= 0
        tail = opts["tail"]
        if plan.teacher is not None:
            teacher_lse = st.get("teacher_lse")
            if tail == "bucket":
                teacher_logprobs = torch.where(valid, st["tS"] - teacher_lse.unsqueeze(1), 0.0)
                teacher_log_tail = dv.tail_logmass(dv.masked_logsumexp(st["tS"], valid), teacher_lse,
                                                   st["teacher_tail_lse"])[0]
            else:  # renormalised over S: the teacher's normaliser cancels
                teacher_logprobs, teacher_log_tail = torch.where(valid, st["tS"], 0.0), None
        else:
            teacher_logprobs, teacher_log_tail = plan.teacher_logprobs.to(dtype), None
        kd, w, kd_lse, dense, coef = _topk_epilogue(
            st["zS"], st.get("lse"), st.get("tail_lse"), teacher_logprobs, teacher_log_tail, valid,
            tail, opts["divergence"], opts["beta"])
        loss_rows = opts["kd_weight"] * opts["temperature"] ** 2 * kd
        if opts["ce_weight"] != 0.0:
            loss_rows = loss_rows + opts["ce_weight"] * (st["lse_ce"] - st["target"])
        zero = loss_rows.new_zeros(())
        loss_rows = torch.where(plan.counted, loss_rows, zero)
        kd = torch.where(plan.counted, kd, zero)
        if plan.with_stats:
            lse = st["lse"]
            stats = torch.stack([lse - st["mean_z"], lse,
                                 (dv.masked_logsumexp(st["zS"], valid) - lse).exp()], dim=1)
        else:
            stats = loss_rows.new_zeros((0, 3))
        ctx.save_for_backward(hidden, weight, bias, w, kd_lse, dense, coef, st.get("lse_ce"))
        ctx.plan = plan
        ctx.mark_non_differentiable(kd, stats)
        return loss_rows, kd, stats

    @staticmethod
    def backward(ctx, grad_rows, _grad_kd, _grad_stats):
        hidden, weight, bias, w, kd_lse, dense, coef, lse_ce = ctx.saved_tensors
        plan = ctx.plan
        shard, opts = plan.shard, plan.opts
        tau, tail = opts["temperature"], opts["tail"]
        use_ce = opts["ce_weight"] != 0.0
        dtype = _compute_dtype(hidden, weight)
        head = _LocalHead(weight, bias, opts["softcap"], dtype)
        grad_rows = torch.where(plan.counted, grad_rows.to(dtype), 0.0)
        kd_scale = opts["kd_weight"] * tau * grad_rows  # τ² of the loss times 1/τ of z = s/τ
        local_ids, owned = shard.owned(plan.ids)
        if plan.labels is not None:
            label_local, label_owned = shard.owned(plan.labels.unsqueeze(1))
        size = shard.size
        d_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
        d_weight = torch.zeros((size, hidden.shape[1]), dtype=dtype, device=hidden.device)
        d_bias = torch.zeros(size, dtype=dtype, device=hidden.device) if bias is not None else None
        full = tail == "bucket" or use_ce
        for rows in _row_chunks(hidden.shape[0], shard, _TOPK_BLOCKS, dtype, config.chunk_bytes,
                                hidden.device):
            h = hidden[rows].detach().to(dtype)
            ids_c, own_c = local_ids[rows], owned[rows]
            scale = kd_scale[rows].unsqueeze(1)
            if full:
                capped = head.logits(h)
                probs = (capped / tau - kd_lse[rows].unsqueeze(1)).exp()
                # one spare column takes the writes of the ids this rank does not own
                padded = torch.zeros((capped.shape[0], size + 1), dtype=dtype, device=h.device)
                grad = padded[:, :size]
                if tail == "bucket":
                    grad += probs * (scale * dense[rows].unsqueeze(1))
                on_topk = scale * (w[rows] - _at(probs, ids_c, own_c) * coef[rows].unsqueeze(1))
                padded.scatter_(1, torch.where(own_c, ids_c, size), on_topk)
                del probs
                if use_ce:
                    ce_scale = (opts["ce_weight"] * grad_rows[rows]).unsqueeze(1)
                    grad += (capped - lse_ce[rows].unsqueeze(1)).exp() * ce_scale
                    padded.scatter_add_(1, torch.where(label_owned[rows], label_local[rows], size),
                                        -ce_scale)
                grad = head.softcap_derivative_(grad, capped)
                d_hidden[rows] = grad @ head.weight
                d_weight.addmm_(grad.T, h)
                if d_bias is not None:
                    d_bias += grad.sum(dim=0)
            elif size > 0:
                capped, weight_rows = head.gathered(h, ids_c)
                probs = (capped / tau - kd_lse[rows].unsqueeze(1)).exp()
                grad = torch.where(own_c, scale * (w[rows] - probs * coef[rows].unsqueeze(1)), 0.0)
                grad = head.softcap_derivative_(grad, capped)
                d_hidden[rows] = (grad.unsqueeze(-2) @ weight_rows).squeeze(-2)
                outer = (grad.unsqueeze(-1) * h.unsqueeze(-2)).reshape(-1, h.shape[1])
                d_weight.index_add_(0, ids_c.reshape(-1), outer)
                if d_bias is not None:
                    d_bias.index_add_(0, ids_c.reshape(-1), grad.reshape(-1))
        _all_reduce_(d_hidden, shard)
        return (d_hidden.to(hidden.dtype), d_weight.to(weight.dtype),
                None if d_bias is None else d_bias.to(bias.dtype), None)


# ------------------------------------------------------------------------------------------------
# online teacher, full vocabulary
# ------------------------------------------------------------------------------------------------

@dataclass
class DensePlan:
    shard: VocabShard
    teacher: tuple          # (hidden (N, D_t), weight_local, bias_local, softcap)
    labels: Optional[Tensor]
    counted: Tensor
    opts: dict
    with_stats: bool


def _dense_logprobs(head, teacher_head, h, th, tau, lse, teacher_lse):
    capped = head.logits(h)
    log_p = capped / tau - lse.unsqueeze(1)
    log_q = teacher_head.logits(th) / tau - teacher_lse.unsqueeze(1)
    return capped, log_p, log_q


class _Dense(torch.autograd.Function):
    """Sharded full-vocabulary loss rows against an online teacher."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: DensePlan):
        shard, opts = plan.shard, plan.opts
        tau, use_ce = opts["temperature"], opts["ce_weight"] != 0.0
        dtype = _compute_dtype(hidden, weight)
        head = _LocalHead(weight, bias, opts["softcap"], dtype)
        t_hidden, t_weight, t_bias, t_cap = plan.teacher
        teacher_head = _LocalHead(t_weight, t_bias, t_cap, dtype)
        n_rows = hidden.shape[0]
        new = lambda: torch.zeros(n_rows, dtype=dtype, device=hidden.device)  # noqa: E731
        kd, lse, teacher_lse, total_w, lse_ce, target, entropy = (new() for _ in range(7))
        if plan.labels is not None:
            label_local, label_owned = shard.owned(plan.labels.unsqueeze(1))
        for rows in _row_chunks(n_rows, shard, _DENSE_BLOCKS, dtype, config.chunk_bytes, hidden.device):
            h = hidden[rows].detach()
            capped = head.logits(h)
            t_logits = teacher_head.logits(t_hidden[rows]) / tau
            # 1. normalisers (and the CE target) over the whole vocabulary
            lses = [torch.logsumexp(capped / tau, dim=1), torch.logsumexp(t_logits, dim=1)]
            sums = []
            if use_ce:
                lses.append(torch.logsumexp(capped, dim=1))
                sums.append(_at(capped, label_local[rows], label_owned[rows]).squeeze(1))
            lses, sums, _ = _combine(shard, lses, sums)
            lse[rows], teacher_lse[rows] = lses[0], lses[1]
            if use_ce:
                lse_ce[rows], target[rows] = lses[2], sums[0]
            # 2. the divergence and Ḡ = Σ_v w_v are sums over the vocabulary of per-token terms
            log_p = capped / tau - lses[0].unsqueeze(1)
            log_q = t_logits - lses[1].unsqueeze(1)
            del capped, t_logits
            parts = [dv.divergence(log_p, log_q, None, opts["divergence"], opts["beta"]),
                     dv.bucket_weights(log_p, log_q, None, opts["divergence"], opts["beta"]).sum(dim=1)]
            if plan.with_stats:
                parts.append(-(log_p.exp() * log_p).sum(dim=1))
            del log_p, log_q
            total = _all_reduce_(torch.stack(parts, dim=1), shard)
            kd[rows], total_w[rows] = total[:, 0], total[:, 1]
            if plan.with_stats:
                entropy[rows] = total[:, 2]
        loss_rows = opts["kd_weight"] * tau ** 2 * kd
        if use_ce:
            loss_rows = loss_rows + opts["ce_weight"] * (lse_ce - target)
        zero = loss_rows.new_zeros(())
        loss_rows = torch.where(plan.counted, loss_rows, zero)
        kd = torch.where(plan.counted, kd, zero)
        stats = torch.stack([entropy, lse], dim=1) if plan.with_stats else loss_rows.new_zeros((0, 2))
        ctx.save_for_backward(hidden, weight, bias, lse, teacher_lse, total_w, lse_ce)
        ctx.plan = plan
        ctx.mark_non_differentiable(kd, stats)
        return loss_rows, kd, stats

    @staticmethod
    def backward(ctx, grad_rows, _grad_kd, _grad_stats):
        hidden, weight, bias, lse, teacher_lse, total_w, lse_ce = ctx.saved_tensors
        plan = ctx.plan
        shard, opts = plan.shard, plan.opts
        tau, use_ce = opts["temperature"], opts["ce_weight"] != 0.0
        dtype = _compute_dtype(hidden, weight)
        head = _LocalHead(weight, bias, opts["softcap"], dtype)
        t_hidden, t_weight, t_bias, t_cap = plan.teacher
        teacher_head = _LocalHead(t_weight, t_bias, t_cap, dtype)
        grad_rows = torch.where(plan.counted, grad_rows.to(dtype), 0.0)
        kd_scale = opts["kd_weight"] * tau * grad_rows
        if plan.labels is not None:
            label_local, label_owned = shard.owned(plan.labels.unsqueeze(1))
        size = shard.size
        d_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
        d_weight = torch.zeros((size, hidden.shape[1]), dtype=dtype, device=hidden.device)
        d_bias = torch.zeros(size, dtype=dtype, device=hidden.device) if bias is not None else None
        for rows in _row_chunks(hidden.shape[0], shard, _DENSE_BLOCKS, dtype, config.chunk_bytes,
                                hidden.device):
            h = hidden[rows].detach().to(dtype)
            capped, log_p, log_q = _dense_logprobs(head, teacher_head, h, t_hidden[rows], tau,
                                                   lse[rows], teacher_lse[rows])
            w = dv.bucket_weights(log_p, log_q, None, opts["divergence"], opts["beta"])
            padded = torch.zeros((capped.shape[0], size + 1), dtype=dtype, device=h.device)
            grad = padded[:, :size]
            grad += (w - log_p.exp() * total_w[rows].unsqueeze(1)) * kd_scale[rows].unsqueeze(1)
            del w, log_p, log_q
            if use_ce:
                ce_scale = (opts["ce_weight"] * grad_rows[rows]).unsqueeze(1)
                grad += (capped - lse_ce[rows].unsqueeze(1)).exp() * ce_scale
                padded.scatter_add_(1, torch.where(label_owned[rows], label_local[rows], size), -ce_scale)
            grad = head.softcap_derivative_(grad, capped)
            d_hidden[rows] = grad @ head.weight
            d_weight.addmm_(grad.T, h)
            if d_bias is not None:
                d_bias += grad.sum(dim=0)
        _all_reduce_(d_hidden, shard)
        return (d_hidden.to(hidden.dtype), d_weight.to(weight.dtype),
                None if d_bias is None else d_bias.to(bias.dtype), None)


# ------------------------------------------------------------------------------------------------
# top-k selection from online heads
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def select_topk(hidden, head: _LocalHead, teacher_hidden, teacher_head: _LocalHead, k: int,
                topk_from: str, temperature: float, shard: VocabShard, dtype):
    """The set S per row, ``(N, K')`` int64 global ids (``-1`` unused), as ``dv.select_topk``
    chooses it from full rows: each rank's ``K`` largest logits are gathered (``(N, K)`` values and
    ids per rank) and the global top-k taken among the ``world · K`` candidates.

    Returns ``(ids, teacher)``. Where the teacher's logits are computed here (``topk_from`` teacher
    or union), ``teacher`` holds its shard-local statistics at S from this same pass (its ids of S
    are among this rank's candidates): ``tS (N, K')`` (exact 0 where not owned), ``teacher_lse``
    and ``teacher_tail_lse`` (over this shard's part of ``V∖S``); else None."""
    n_rows = hidden.shape[0]
    local_k = min(k, shard.size)

    def candidates(logits):
        top = logits.topk(local_k, dim=1)
        values = torch.full((logits.shape[0], k), -math.inf, dtype=dtype, device=logits.device)
        ids = torch.full((logits.shape[0], k), -1, dtype=torch.int64, device=logits.device)
        values[:, :local_k] = top.values
        ids[:, :local_k] = top.indices + shard.start
        return values, ids

    def global_topk(values, ids):
        both = _all_gather(torch.stack([values, ids.to(dtype)], dim=0), shard)  # (P, 2, c, K)
        values = both[:, 0].permute(1, 0, 2).reshape(values.shape[0], -1)
        ids = both[:, 1].permute(1, 0, 2).reshape(values.shape[0], -1).long()
        return ids.gather(1, values.topk(k, dim=1).indices)

    out, teacher_stats = [], []
    for rows in _row_chunks(n_rows, shard, 2, dtype, config.chunk_bytes, hidden.device):
        teacher = student = teacher_logits = None
        local_sets = []
        if topk_from in ("teacher", "union"):
            teacher_logits = teacher_head.logits(teacher_hidden[rows]) / temperature
            values, local_set = candidates(teacher_logits)
            teacher = global_topk(values, local_set)
            local_sets.append(local_set)
        if topk_from in ("student", "union"):
            values, local_set = candidates(head.logits(hidden[rows]))
            student = global_topk(values, local_set)
            local_sets.append(local_set)
        if topk_from == "teacher":
            out.append(teacher)
        elif topk_from == "student":
            out.append(student)
        else:
            seen = (student.unsqueeze(-1) == teacher.unsqueeze(-2)).any(dim=-1)
            out.append(torch.cat([teacher, torch.where(seen, -1, student)], dim=1))
        if teacher_logits is not None:
            teacher_stats.append(_teacher_at(teacher_logits, torch.cat(local_sets, dim=1), out[-1], shard))
    width = 2 * k if topk_from == "union" else k
    if not out:
        return torch.empty((0, width), dtype=torch.int64, device=hidden.device), None
    if not teacher_stats:
        return torch.cat(out, dim=0), None
    return torch.cat(out, dim=0), {name: torch.cat([t[name] for t in teacher_stats], dim=0)
                                   for name in teacher_stats[0]}


def _teacher_at(logits: Tensor, local_set: Tensor, ids: Tensor, shard: VocabShard) -> dict:
    """The teacher's shard-local statistics at S from its logits ``(c, V_r)`` and this rank's
    candidate ids ``local_set (c, M)`` (global ids, ``-1`` none, possibly repeated), which hold
    every id of S this rank owns: the tail over ``V_r∖S`` is the sum over ``V_r∖C_r`` and over
    ``C_r∖S`` (both exact sums of positive terms)."""
    local, owned = shard.owned(local_set)
    m = local_set.shape[1]
    earlier = torch.ones(m, m, dtype=torch.bool, device=local_set.device).tril(-1)
    repeated = ((local_set.unsqueeze(-1) == local_set.unsqueeze(-2)) & earlier).any(dim=-1)
    first = owned & ~repeated  # each candidate once
    if logits.shape[1] == 0:
        candidate_logits = torch.zeros(local.shape, dtype=logits.dtype, device=logits.device)
    else:
        candidate_logits = logits.gather(1, local)
    in_s = (local_set.unsqueeze(-1) == ids.unsqueeze(-2)).any(dim=-1) & first
    beyond = torch.logsumexp(_without(logits, local, first), dim=1)            # V_r ∖ C_r
    between = dv.masked_logsumexp(candidate_logits, first & ~in_s)             # C_r ∖ S
    match = (ids.unsqueeze(-1) == local_set.unsqueeze(-2)) & first.unsqueeze(-2)  # (c, K', M)
    return {"tS": torch.where(match, candidate_logits.unsqueeze(-2), 0.0).sum(dim=-1),
            "teacher_lse": torch.logsumexp(logits, dim=1),
            "teacher_tail_lse": torch.logaddexp(beyond, between)}


# ------------------------------------------------------------------------------------------------
# entry points (called by fastkd.api / fastkd.bytes when a head is a vocabulary-sharded DTensor)
# ------------------------------------------------------------------------------------------------

def _check_impl(impl: str) -> None:
    if impl not in ("auto", "torch"):
        raise ValueError(f"impl={impl!r}: a vocabulary-sharded head runs its shard-local work on "
                         "impl='torch' (chunked PyTorch, cuBLAS on a GPU); pass impl='auto' or 'torch'")






def _online_teacher(shard, teacher_hidden, teacher_weight, teacher_bias, teacher_softcap, n_rows,
                    dim_hidden_shape):
    """The teacher's ``(hidden (N, D_t), weight rows of this shard, bias rows, softcap)``, frozen.

    A sharded teacher head must be split like the student's; a plain one is sliced to this
    rank's rows (no communication)."""
    if is_vocab_sharded(teacher_weight):
        t_hidden, t_weight, t_bias, t_shard, _, t_dim, t_vocab = check_head(
            "teacher_", teacher_hidden, teacher_weight, teacher_bias)
        if not t_shard.same_split(shard):
            raise ValueError("teacher_weight must be sharded over the same group and rows as weight "
                             f"(rows [{shard.start}, {shard.start + shard.size}) of V={shard.vocab} "
                             f"here, got [{t_shard.start}, {t_shard.start + t_shard.size}) of "
                             f"V={t_shard.vocab})")
    else:
        if is_vocab_sharded(teacher_bias):
            raise TypeError("teacher_bias is a DTensor but teacher_weight is not: shard both or neither")
        _, t_dim, t_vocab = check.head("teacher_", teacher_hidden, teacher_weight, teacher_bias)
        if t_vocab != shard.vocab:
            raise ValueError(f"teacher_weight must cover the student's vocabulary V={shard.vocab}, "
                             f"got V={t_vocab} (pad or slice one LM head so both share a vocabulary)")
        rows = slice(shard.start, shard.start + shard.size)
        t_hidden = teacher_hidden
        t_weight = teacher_weight[rows]
        t_bias = None if teacher_bias is None else teacher_bias[rows]
    if t_hidden.shape[:-1] != dim_hidden_shape:
        raise ValueError(f"teacher_hidden must have hidden's leading dimensions {tuple(dim_hidden_shape)}"
                         f" + (D_t,), got {tuple(t_hidden.shape)}")
    detach = lambda x: None if x is None else x.detach()  # noqa: E731
    return (t_hidden.reshape(n_rows, t_dim).detach(), detach(t_weight), detach(t_bias),
            teacher_softcap)


def topk_kd_loss(hidden, weight, teacher_ids, teacher_logprobs, *, divergence, beta, tail,
                 temperature, labels, ignore_index, ce_weight, kd_weight, softcap, bias, reduction,
                 impl, return_stats):
    """:func:`fastkd.topk_kd_loss` with a vocabulary-sharded ``weight`` (and ``bias``)."""
    from ..stats import KDStats

    opts = check.options(divergence=divergence, beta=beta, tail=tail, temperature=temperature,
                         ignore_index=ignore_index, ce_weight=ce_weight, kd_weight=kd_weight,
                         softcap=softcap, reduction=reduction, impl=impl, return_stats=return_stats)
    _check_impl(opts["impl"])
    hidden, weight_local, bias_local, shard, n_rows, _, vocab = check_head("", hidden, weight, bias)
    check.teacher_topk(teacher_ids, teacher_logprobs, hidden)
    check.labels_tensor(labels, hidden, opts["ce_weight"])
    hidden2, labels1, counted = flatten_rows(hidden, labels, opts["ignore_index"])
    topk = teacher_ids.shape[-1]
    ids = teacher_ids.reshape(n_rows, topk).long()
    logprobs = teacher_logprobs.reshape(n_rows, topk).detach()
    check.values(vocab, counted, labels1, ids, logprobs)
    check_replicated(shard, hidden=hidden2, teacher_ids=ids, teacher_logprobs=logprobs, labels=labels1)
    ids = torch.where(counted.unsqueeze(1), ids, -1)
    plan = TopKPlan(shard, ids, logprobs, None, labels1, counted, opts, return_stats)
    loss_rows, kd_rows, stats = _TopK.apply(hidden2, weight_local, bias_local, plan)
    loss = reduce_rows(loss_rows, counted, opts["reduction"])
    if not return_stats:
        return loss
    return loss, KDStats(kd=kd_rows, entropy=stats[:, 0], lse=stats[:, 1], topk_mass=stats[:, 2])


def kd_loss(hidden, weight, teacher_hidden, teacher_weight, *, divergence, beta, topk, topk_from,
            tail, temperature, labels, ignore_index, ce_weight, kd_weight, softcap, teacher_softcap,
            bias, teacher_bias, reduction, impl, return_stats):
    """:func:`fastkd.kd_loss` with a vocabulary-sharded student ``weight`` (and ``bias``); the
    teacher's head is sharded the same way, or a plain tensor sliced to each rank's rows."""
    import numbers

    from ..stats import KDStats

    opts = check.options(divergence=divergence, beta=beta, tail=tail, temperature=temperature,
                         ignore_index=ignore_index, ce_weight=ce_weight, kd_weight=kd_weight,
                         softcap=softcap, reduction=reduction, impl=impl, return_stats=return_stats)
    _check_impl(opts["impl"])
    teacher_softcap = check.real("teacher_softcap", teacher_softcap, low=0.0, low_open=True,
                                 allow_none=True)
    check.choice("topk_from", topk_from, dv.TOPK_FROM)
    if not is_vocab_sharded(weight):
        raise TypeError("teacher_weight is a vocabulary-sharded DTensor but weight is not: shard the "
                        "student's head the same way (ColwiseParallel), or pass "
                        "teacher_weight.full_tensor()")
    hidden, weight_local, bias_local, shard, n_rows, _, vocab = check_head("", hidden, weight, bias)
    teacher_hidden = _replicated_local("teacher_hidden", teacher_hidden, shard)
    teacher = _online_teacher(shard, teacher_hidden, teacher_weight, teacher_bias, teacher_softcap,
                              n_rows, hidden.shape[:-1])
    check.same_device("hidden", hidden, teacher_hidden=teacher[0])
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, numbers.Integral) or not 1 <= topk <= vocab:
            raise ValueError(f"topk must be None or an int in [1, {vocab}], got {topk!r}")
        topk = int(topk)
    check.labels_tensor(labels, hidden, opts["ce_weight"])
    hidden2, labels1, counted = flatten_rows(hidden, labels, opts["ignore_index"])
    check.values(vocab, counted, labels1)
    check_replicated(shard, hidden=hidden2, teacher_hidden=teacher[0], labels=labels1)
    if topk is None:
        plan = DensePlan(shard, teacher, labels1, counted, opts, return_stats)
        loss_rows, kd_rows, stats = _Dense.apply(hidden2, weight_local, bias_local, plan)
        topk_mass = None
    else:
        dtype = _compute_dtype(hidden2, weight_local)
        ids, teacher_stats = select_topk(
            hidden2.detach(), _LocalHead(weight_local, bias_local, opts["softcap"], dtype), teacher[0],
            _LocalHead(teacher[1], teacher[2], teacher_softcap, dtype), topk, topk_from,
            opts["temperature"], shard, dtype)
        ids = torch.where(counted.unsqueeze(1), ids, -1)
        plan = TopKPlan(shard, ids, None, teacher, labels1, counted, opts, return_stats, teacher_stats)
        loss_rows, kd_rows, stats = _TopK.apply(hidden2, weight_local, bias_local, plan)
        topk_mass = stats[:, 2] if return_stats else None
    loss = reduce_rows(loss_rows, counted, opts["reduction"])
    if not return_stats:
        return loss
    return loss, KDStats(kd=kd_rows, entropy=stats[:, 0], lse=stats[:, 1], topk_mass=topk_mass)


# ------------------------------------------------------------------------------------------------
# byte buckets
# ------------------------------------------------------------------------------------------------

def bucket_lse(hidden: Tensor, weight, bias, first_byte: Tensor, temperature: float,
               softcap: Optional[float]) -> Tensor:
    """``(N, 257)`` bucket log-sum-exps of a vocabulary-sharded head, differentiable.

    Each rank computes its rows' 257 partial log-sum-exps per row (the ``torch`` byte backend on
    its shard and its slice of ``first_byte``); they are combined with one MAX and one SUM
    all-reduce of ``(N, 257)``. Gradients: ``g · exp(L_r − L)`` to the shard (no communication),
    and the ranks' partial ``dh`` summed by an all-reduce."""
    from ..backends import torch_bytes

    shard = vocab_shard("weight", weight)
    check_replicated(shard, hidden=hidden)
    weight_local, bias_local = weight.to_local(), _local(bias)
    hidden = _ReplicatedInput.apply(hidden, shard)
    local_first_byte = first_byte[shard.start:shard.start + shard.size]
    local = torch_bytes.byte_lse(hidden, weight_local, bias_local, local_first_byte, temperature,
                                 softcap, config.chunk_bytes or 0)
    return _ShardLogSumExp.apply(local, shard)


def label_logits(hidden2: Tensor, weight, bias, labels: Tensor, counted: Tensor,
                 softcap: Optional[float], dtype) -> Tensor:
    """Capped logits at each row's label, ``(N,)``, from the rank that owns it (a SUM all-reduce
    of ``N`` values, exact: the other ranks add 0); differentiable."""
    shard = vocab_shard("weight", weight)
    weight_local, bias_local = weight.to_local(), _local(bias)
    hidden2 = _ReplicatedInput.apply(hidden2, shard)
    local, owned = shard.owned(torch.where(counted, labels, -1))
    if shard.size == 0:
        raw = hidden2.to(dtype).sum(dim=-1) * 0.0  # keeps the graph: the backward all-reduces
    else:
        raw = (hidden2.to(dtype) * weight_local[local].to(dtype)).sum(dim=-1)
        if bias_local is not None:
            raw = raw + bias_local[local].to(dtype)
    capped = torch.where(owned, dv.softcap(raw, softcap), 0.0)
    return _SumOverShards.apply(capped, shard)


class _SumOverShards(torch.autograd.Function):
    """SUM all-reduce of per-shard values; each rank's value receives the full gradient."""

    @staticmethod
    def forward(ctx, x, shard):
        return _all_reduce_(x.detach().clone(), shard)

    @staticmethod
    def backward(ctx, grad):
        return grad, None
