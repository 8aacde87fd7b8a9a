"""Byte-level distillation across tokenizers: byte log-probs and the byte KD loss (DESIGN.md §1).

A model's next-byte distribution at a token boundary is the first-byte marginal of its next-token
distribution: ``P(b) = Σ_{v: first_byte(v) = b} softmax(z)_v``, with bucket 256 for tokens without
bytes. The backends (``fastkd.backends.torch_bytes``, ``fastkd.backends.triton_bytes``) compute the
per-bucket log-sum-exps ``L (N, 257)`` of the tempered, capped logits without materialising
``N x V``; everything after that is ``(rows, 257)`` PyTorch here, differentiated by autograd, and
the divergences are those of ``fastkd.divergences`` (one module owns the formulas).

Which buckets count. A bucket that is empty on both sides (no token of either vocabulary starts
with that byte) holds no mass and contributes nothing. A bucket that only one side can produce
(e.g. a SentencePiece vocabulary without byte fallback has no token starting with byte 0xFF) would
make forward or reverse KL infinite; both distributions are then renormalised over the buckets both
sides can produce, as ``tail="renormalize"`` does for top-k. With two byte-complete vocabularies
(byte-level BPE, SentencePiece with byte fallback) nothing is renormalised.

Chunk likelihood (ALM). Between consecutive aligned pairs both models spell the same bytes (a
chunk); the log-likelihood of a chunk is the sum of the model's token log-probs there. The chunk
term compares the two models' Bernoulli distributions "this chunk comes next" (mass ``p`` and
``1 − p``) with the same divergence as the byte term: a 2-bucket instance of §1. The "other" mass
is floored at ``CHUNK_FLOOR`` so that a chunk of probability 1 stays finite.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import _validate as check
from .. import divergences as dv
from ..api import _rounded, _streaming_operands, operand_dtype
from ..backends.chunked import no_autocast
from ..backends import torch_bytes
from ..backends.torch_backend import counted_rows
from ..config import config
from .align import ByteAlignment
from .vocab import N_BUCKETS, ByteVocab

CHUNK_FLOOR = 1e-6
_LOG_CHUNK_CEILING = math.log1p(-CHUNK_FLOOR)
_FLOAT_LOGPROB_SLACK = math.log1p(dv.TOPK_MASS_SLACK)


# ------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------

def resolve_byte_impl(impl: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend that computes byte log-probs for ``impl`` on ``device``.

    ``"auto"``: ``"triton"`` for CUDA tensors when triton is installed (and the dtype is not
    float64), else ``"torch"``. ``"triton"`` on CPU tensors runs only in the Triton interpreter
    (``TRITON_INTERPRET=1``); otherwise it raises ValueError. bfloat16 under
    ``TRITON_INTERPRET=1`` is a TypeError (the interpreter's bf16 ``tl.dot`` is wrong); ``"auto"``
    then picks ``"torch"``.
    """
    check.choice("impl", impl, check.IMPLS)
    if impl == "torch":
        return "torch"
    if impl == "cuda":
        raise NotImplementedError(
            "impl='cuda' has no byte-level kernel in this version of fastkd; use impl='triton' "
            "(fused), 'torch' or 'auto'")
    has_triton = importlib.util.find_spec("triton") is not None
    interpreted_bf16 = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    if impl == "auto":
        use = device.type == "cuda" and has_triton and dtype != torch.float64 and not interpreted_bf16
        return "triton" if use else "torch"
    if not has_triton:
        raise ValueError("impl='triton' needs the triton package (pip install triton); use impl='torch'")
    if dtype == torch.float64:
        raise ValueError("impl='triton' computes in float32 and takes float16/bfloat16/float32 "
                         "inputs, got float64; use impl='torch' for float64 (references, gradcheck)")
    if interpreted_bf16:
        raise TypeError(check.BF16_INTERPRETER_HINT)
    from ..backends import triton_bytes

    triton_bytes.check_runnable(device)
    return "triton"


def _bucket_lse(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], byte_vocab: ByteVocab,
                temperature: float, softcap: Optional[float], backend: str) -> Tensor:
    """``(R, 257)`` per-bucket log-sum-exps of ``softcap(hidden · Wᵀ + b) / τ`` (see module doc)."""
    tensors = byte_vocab.device_tensors(hidden.device)
    if check.is_dtensor(weight):  # vocabulary-sharded head: docs/parallel.md
        from ..parallel import vocab_parallel
        return vocab_parallel.bucket_lse(hidden, weight, bias, tensors["first_byte"], temperature,
                                         softcap)
    # Under autocast (or with 16-bit activations and float32 weights) the GEMM operands are 16-bit
    # and the statistics float32, as in fastkd.api; the ops run with autocast off.
    op_dtype = operand_dtype(hidden.device, hidden, weight, bias)
    with no_autocast(hidden.device):
        if backend == "torch":
            hidden, weight, bias = _rounded(op_dtype, hidden, weight, bias)
            return torch_bytes.byte_lse(hidden, weight, bias, tensors["first_byte"], temperature,
                                        softcap, config.chunk_bytes or 0)
        from ..backends import triton_bytes

        hidden, weight, bias = _streaming_operands(op_dtype, hidden, weight, bias)
        block_v = triton_bytes.block_sizes(hidden.device)["BLOCK_V"]
        ranges = triton_bytes.n_ranges(hidden.shape[0], weight.shape[0], hidden.device)
        range_start, part_bucket = byte_vocab.range_plan(block_v, ranges, hidden.device)
        return triton_bytes.byte_lse(hidden.contiguous(), weight.contiguous(),
                                     None if bias is None else bias.contiguous(),
                                     tensors["sorted_ids"], tensors["bucket_of_sorted"],
                                     range_start, part_bucket, temperature, softcap)


def _check_head(prefix: str, hidden, weight, bias, byte_vocab, vocab_name: str):
    if check.is_dtensor(weight):  # vocabulary-sharded head: docs/parallel.md
        from ..parallel import vocab_parallel
        rows, dim, vocab = vocab_parallel.check_head(prefix, hidden, weight, bias)[4:]
    else:
        rows, dim, vocab = check.head(prefix, hidden, weight, bias)
    if not isinstance(byte_vocab, ByteVocab):
        raise TypeError(f"{vocab_name} must be a fastkd.ByteVocab (ByteVocab.from_tokenizer(tok)), "
                        f"got {type(byte_vocab).__name__}")
    if len(byte_vocab) != vocab:
        raise ValueError(
            f"{vocab_name} has {len(byte_vocab)} ids but {prefix}weight has V={vocab} rows; build it "
            f"with ByteVocab.from_tokenizer(tok, vocab_size={vocab}) for a padded LM head")
    return rows, dim, vocab


# ------------------------------------------------------------------------------------------------
# byte log-probs
# ------------------------------------------------------------------------------------------------

def byte_logprobs(
    hidden: Tensor,
    weight: Tensor,
    byte_vocab: ByteVocab,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    bias: Optional[Tensor] = None,
    impl: str = "auto",
) -> Tensor:
    """Next-byte log-probabilities ``log P(first byte = b)`` of each row, differentiable.

    ``P_b = Σ_{v: first_byte[v] = b} softmax(z)_v`` with ``z = softcap(hidden · weightᵀ + bias) /
    temperature``; bucket 256 is the mass of the tokens without bytes (specials). Never builds the
    ``N x V`` logits: the ``torch`` backend works in row chunks, ``triton`` streams tiles.

    Args:
        hidden: ``(N, D)`` or ``(..., D)`` float16/bfloat16/float32/float64 final hidden states.
        weight: ``(V, D)`` LM-head weight, ``V == len(byte_vocab)``.
        byte_vocab: the model's :class:`fastkd.ByteVocab`.
        temperature: τ > 0, default 1.0.
        softcap: final-logit softcap c (``c·tanh(x/c)``), default None.
        bias: ``(V,)`` LM-head bias, default None.
        impl: ``"auto"`` (default: ``triton`` on CUDA when installed, else ``torch``), ``"torch"``
            or ``"triton"`` (CPU tensors only under ``TRITON_INTERPRET=1``).

    Returns:
        ``(N, 257)`` float32 (float64 for float64 inputs with ``impl="torch"``) log-probabilities,
        ``-inf`` for a bucket without tokens; rows flattened over the leading dimensions.
        Gradients flow to ``hidden``, ``weight`` and ``bias``.
    """
    _check_head("", hidden, weight, bias, byte_vocab, "byte_vocab")
    temperature = check.real("temperature", temperature, low=0.0, low_open=True)
    softcap = check.real("softcap", softcap, low=0.0, low_open=True, allow_none=True)
    backend = resolve_byte_impl(impl, hidden.device, hidden.dtype)
    check.values(len(byte_vocab), None)  # only the finiteness flags of config.check_finite, if on
    bucket_lse = _bucket_lse(hidden.reshape(-1, hidden.shape[-1]), weight, bias, byte_vocab,
                             temperature, softcap, backend)
    return bucket_lse - torch.logsumexp(bucket_lse, dim=-1, keepdim=True)


@torch.no_grad()
def byte_targets(
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    teacher_byte_vocab: ByteVocab,
    teacher_labels: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    impl: str = "auto",
) -> tuple[Tensor, Optional[Tensor]]:
    """What an offline cache stores for :func:`byte_kd_loss`: a teacher's byte log-probs and token
    log-probs, without gradients.

    Returns ``(byte_logprobs (N, 257) float32, token_logprobs (N,) float32 or None)``: the second
    is ``log p(teacher_labels[n])`` at temperature τ (0 where the label is ``ignore_index``), or
    None without ``teacher_labels``. Both are independent of the student's tokenizer.
    """
    _check_head("teacher_", teacher_hidden, teacher_weight, bias, teacher_byte_vocab, "teacher_byte_vocab")
    temperature = check.real("temperature", temperature, low=0.0, low_open=True)
    softcap = check.real("softcap", softcap, low=0.0, low_open=True, allow_none=True)
    if teacher_labels is not None:
        check.tensor("teacher_labels", teacher_labels, integer=True)
        if teacher_labels.shape != teacher_hidden.shape[:-1]:
            raise ValueError(f"teacher_labels must have shape {tuple(teacher_hidden.shape[:-1])}, got "
                             f"{tuple(teacher_labels.shape)}")
    backend = resolve_byte_impl(impl, teacher_hidden.device, teacher_hidden.dtype)
    hidden2 = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    bucket_lse = _bucket_lse(hidden2, teacher_weight, bias, teacher_byte_vocab, temperature, softcap, backend)
    lse = torch.logsumexp(bucket_lse, dim=-1)
    if teacher_labels is None:
        check.values(teacher_weight.shape[0], None)  # only config.check_finite's flags, if on
        return (bucket_lse - lse.unsqueeze(-1)).float(), None
    labels = teacher_labels.reshape(-1).long()
    counted = labels != ignore_index
    check.values(teacher_weight.shape[0], counted, labels)
    token = _label_logits(hidden2, teacher_weight, bias, labels, counted, softcap, bucket_lse.dtype)
    token_logprobs = torch.where(counted, token / temperature - lse, 0.0)
    return (bucket_lse - lse.unsqueeze(-1)).float(), token_logprobs.float()


def _label_logits(hidden2, weight, bias, labels, counted, softcap, dtype) -> Tensor:
    """Capped logits ``softcap(h_n · W[label_n] + b[label_n])`` per row (O(N·D), differentiable)."""
    if check.is_dtensor(weight):  # vocabulary-sharded head: docs/parallel.md
        from ..parallel import vocab_parallel
        return vocab_parallel.label_logits(hidden2, weight, bias, labels, counted, softcap, dtype)
    safe = torch.where(counted, labels, 0)
    hidden2, weight, bias = _rounded(operand_dtype(hidden2.device, hidden2, weight, bias), hidden2, weight, bias)
    logits = (hidden2.to(dtype) * weight[safe].to(dtype)).sum(dim=-1)
    if bias is not None:
        logits = logits + bias[safe].to(dtype)
    return dv.softcap(logits, softcap)


# ------------------------------------------------------------------------------------------------
# the byte KD loss
# ------------------------------------------------------------------------------------------------

def byte_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    byte_vocab: ByteVocab,
    alignment: Union[ByteAlignment, Tensor],
    *,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    teacher_byte_vocab: Optional[ByteVocab] = None,
    teacher_byte_logprobs: Optional[Tensor] = None,
    teacher_token_logprobs: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    teacher_labels: Optional[Tensor] = None,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_weight: float = 0.0,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    reduction: str = "mean",
    impl: str = "auto",
) -> Tensor:
    """Cross-tokenizer distillation: divergence between next-byte distributions at aligned rows.

    For each aligned pair (student row i, teacher row j) the byte term is the bucketed divergence
    (DESIGN.md §1 table) between the student's and the teacher's first-byte distributions (257
    buckets; see the module docstring for empty buckets). The optional chunk term compares the
    two models' likelihoods of the bytes between consecutive aligned pairs (ALM). Per student row:

        loss_i = ce_weight · CE_i + kd_weight · τ² · KD_(i,j) + chunk_weight · CHUNK_(i,j)

    (KD and CHUNK are 0 on rows not aligned) and ``"mean"`` divides the sum by the number of
    counted student rows, as the other fastkd losses do.

    Teacher: either online (``teacher_hidden``, ``teacher_weight``, ``teacher_byte_vocab``; τ
    applies to it too) or precomputed (``teacher_byte_logprobs``, e.g. from
    :func:`fastkd.bytes.byte_targets` in an offline cache; used as given).

    Args:
        hidden: ``(N_s, D)`` or ``(..., D)`` student hidden states; row i predicts token i+1.
        weight: ``(V_s, D)`` student LM-head weight; ``V_s == len(byte_vocab)``.
        byte_vocab: the student's :class:`fastkd.ByteVocab`.
        alignment: a :class:`fastkd.bytes.ByteAlignment` (from :func:`fastkd.align_batch`) or an
            ``(M, 2)`` int tensor of (student row, teacher row) pairs of *one* sequence (from
            :func:`fastkd.align_tokenizations`), rows into the flattened hidden states.
        teacher_hidden: ``(N_t, D_t)`` or ``(..., D_t)`` teacher hidden states; frozen.
        teacher_weight: ``(V_t, D_t)`` teacher LM-head weight; frozen.
        teacher_byte_vocab: the teacher's :class:`fastkd.ByteVocab`.
        teacher_byte_logprobs: ``(N_t, 257)`` or ``(..., 257)`` float teacher byte log-probs,
            instead of the three above (``-inf`` for a bucket the teacher cannot produce).
        teacher_token_logprobs: float, one per teacher row (any shape with ``N_t`` elements), the
            teacher's log-prob of its next token; needed by the chunk term with a precomputed
            teacher.
        labels: ``(...)`` int student next-token ids per row, default None (every row counts).
            Rows equal to ``ignore_index`` count for nothing: their pairs and the chunks that
            contain them contribute 0, with exactly zero gradient. Needed by the CE and chunk terms.
        teacher_labels: int teacher next-token ids, one per teacher row (any shape with ``N_t``
            elements; needed by the online chunk term); rows equal to ``ignore_index`` drop their
            pairs and chunks too.
        divergence: ``"reverse_kl"`` (default), ``"forward_kl"`` or ``"jsd"``.
        beta: JSD mixture weight in ``[0, 1]``, default 0.5 (β=0 forward KL, β=1 reverse KL).
        temperature: τ > 0, default 1.0; the KD term is scaled by τ².
        chunk_weight: weight of the chunk-likelihood term, default 0.0.
        ce_weight: weight of the student's cross-entropy (τ = 1), default 0.0 (needs labels).
        kd_weight: weight of the byte term, default 1.0.
        ignore_index: default -100.
        softcap, teacher_softcap: final-logit softcaps, default None.
        bias, teacher_bias: ``(V,)`` LM-head biases, default None.
        reduction: ``"mean"`` (default; over counted student rows), ``"sum"`` or ``"none"``
            (``(N_s,)`` per student row).
        impl: ``"auto"`` (default), ``"torch"`` or ``"triton"``, as in :func:`byte_logprobs`.

    Returns:
        float32 loss (float64 for float64 student inputs), scalar or ``(N_s,)``. Gradients flow to
        ``hidden``, ``weight`` and ``bias`` only.

    Raises:
        ValueError/TypeError: bad arguments, before any kernel runs; and, with
            ``fastkd.config.check_values`` (default on, one host sync), a teacher that is no
            distribution at a counted aligned pair, as :func:`fastkd.topk_kd_loss` rejects its
            teacher: NaN/inf in the online teacher's hidden rows or head; a precomputed row with
            NaN, a value above 0, every bucket ``-inf`` or a mass other than ``1 ± 0.02``; token
            log-probs that are not finite or above 0. With the checks off such a row is not
            detected (a NaN bucket of an online teacher then counts as empty).
    """
    opts = check.options(divergence=divergence, beta=beta, tail="bucket", temperature=temperature,
                         ignore_index=ignore_index, ce_weight=ce_weight, kd_weight=kd_weight,
                         softcap=softcap, reduction=reduction, impl=impl, return_stats=False)
    chunk_weight = check.real("chunk_weight", chunk_weight, low=0.0)
    teacher_softcap = check.real("teacher_softcap", teacher_softcap, low=0.0, low_open=True, allow_none=True)
    n_student, _, vocab = _check_head("", hidden, weight, bias, byte_vocab, "byte_vocab")
    check.labels_tensor(labels, hidden, opts["ce_weight"])
    if chunk_weight and labels is None:
        raise ValueError("chunk_weight > 0 needs labels: the student's next-token ids per row")

    n_teacher = _check_teacher(hidden, teacher_hidden, teacher_weight, teacher_byte_vocab, teacher_bias,
                               teacher_byte_logprobs, teacher_token_logprobs, teacher_labels, chunk_weight)
    pairs, chunk_mask = _pairs(alignment, hidden.device)
    backend = resolve_byte_impl(opts["impl"], hidden.device, hidden.dtype)
    teacher_backend = None if teacher_byte_logprobs is not None else resolve_byte_impl(
        opts["impl"], teacher_hidden.device, teacher_hidden.dtype)

    dtype = torch.float64 if hidden.dtype == weight.dtype == torch.float64 else torch.float32
    temperature, ignore = opts["temperature"], opts["ignore_index"]
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    labels1 = None if labels is None else labels.reshape(-1).long()
    teacher_labels1 = None if teacher_labels is None else teacher_labels.reshape(-1).long()
    counted = counted_rows(labels1, n_student, ignore, hidden.device)
    teacher_counted = counted_rows(teacher_labels1, n_teacher, ignore, hidden.device)
    check.values(vocab, counted, labels1)
    if teacher_byte_logprobs is None and teacher_labels1 is not None:
        check.values(teacher_weight.shape[0], teacher_counted, teacher_labels1)
    _check_pair_values(pairs, chunk_mask, n_student, n_teacher, chunk_weight > 0)
    student_rows, teacher_rows = pairs[:, 0], pairs[:, 1]
    pair_ok = counted[student_rows] & teacher_counted[teacher_rows]
    all_rows = chunk_weight > 0 or opts["ce_weight"] > 0

    # Student: bucket log-sum-exps of every row (chunk/CE terms) or of the aligned rows only.
    if all_rows:
        student_lse = _bucket_lse(hidden2, weight, bias, byte_vocab, temperature, opts["softcap"], backend)
        pair_student_lse = student_lse[student_rows]
    else:
        pair_student_lse = _bucket_lse(hidden2[student_rows], weight, bias, byte_vocab, temperature,
                                       opts["softcap"], backend)
    pair_student_lse = pair_student_lse.to(dtype)

    # Teacher: byte log-probs at the aligned rows (and token log-probs for the chunk term).
    if teacher_byte_logprobs is not None:
        teacher_values = teacher_byte_logprobs.reshape(-1, N_BUCKETS).detach()[teacher_rows].to(dtype)
        teacher_tokens = None if not chunk_weight else teacher_token_logprobs.reshape(-1).detach().to(dtype)
    else:
        teacher_values, teacher_tokens = _online_teacher(
            teacher_hidden, teacher_weight, teacher_bias, teacher_byte_vocab, teacher_labels1,
            teacher_counted, teacher_rows, temperature, teacher_softcap, teacher_backend, dtype,
            with_tokens=chunk_weight > 0)
    _check_teacher_values(teacher_values, teacher_tokens, pair_ok, teacher_counted,
                          online=None if teacher_byte_logprobs is not None else (
                              teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[teacher_rows],
                              teacher_weight, teacher_bias))
    teacher_values = torch.where(pair_ok.unsqueeze(-1), teacher_values, 0.0)

    # Byte term: both distributions over the buckets both sides can produce (module docstring).
    valid = torch.isfinite(pair_student_lse) & torch.isfinite(teacher_values)
    log_p = pair_student_lse - dv.masked_logsumexp(pair_student_lse, valid).unsqueeze(-1)
    log_q = teacher_values - dv.masked_logsumexp(teacher_values, valid).unsqueeze(-1)
    kd = dv.divergence(log_p, log_q, valid, opts["divergence"], opts["beta"])
    pair_loss = torch.where(pair_ok, opts["kd_weight"] * temperature**2 * kd, 0.0)

    if all_rows:
        label_logits = _label_logits(hidden2, weight, bias, labels1, counted, opts["softcap"], dtype)
    if chunk_weight:
        student_tokens = label_logits / temperature - torch.logsumexp(student_lse.to(dtype), dim=-1)
        chunk = _chunk_divergence(student_tokens, teacher_tokens, counted, teacher_counted, pairs,
                                  chunk_mask & pair_ok, opts["divergence"], opts["beta"])
        pair_loss = pair_loss + chunk_weight * chunk.to(dtype)

    loss_rows = torch.zeros(n_student, dtype=dtype, device=hidden.device).index_add(0, student_rows, pair_loss)
    if opts["ce_weight"]:
        if temperature == 1.0:
            lse_ce = torch.logsumexp(student_lse.to(dtype), dim=-1)
        else:
            lse_ce = torch.logsumexp(_bucket_lse(hidden2, weight, bias, byte_vocab, 1.0, opts["softcap"],
                                                 backend).to(dtype), dim=-1)
        loss_rows = loss_rows + torch.where(counted, opts["ce_weight"] * (lse_ce - label_logits), 0.0)
    if opts["reduction"] == "none":
        return loss_rows
    total = loss_rows.sum()
    return total if opts["reduction"] == "sum" else total / counted.sum().clamp(min=1)


def _check_teacher(hidden, teacher_hidden, teacher_weight, teacher_byte_vocab, teacher_bias,
                   teacher_byte_logprobs, teacher_token_logprobs, teacher_labels, chunk_weight) -> int:
    """Checks the teacher side of :func:`byte_kd_loss`; returns its number of rows."""
    online = (teacher_hidden, teacher_weight, teacher_byte_vocab)
    if teacher_byte_logprobs is not None:
        if any(x is not None for x in online + (teacher_bias,)):
            raise ValueError("pass either teacher_byte_logprobs (precomputed) or teacher_hidden/"
                             "teacher_weight/teacher_byte_vocab (online), not both")
        check.tensor("teacher_byte_logprobs", teacher_byte_logprobs, dtypes=check.FLOAT_DTYPES, min_ndim=2)
        if teacher_byte_logprobs.shape[-1] != N_BUCKETS:
            raise ValueError(f"teacher_byte_logprobs must have shape (..., {N_BUCKETS}), got "
                             f"{tuple(teacher_byte_logprobs.shape)}")
        check.same_device("hidden", hidden, teacher_byte_logprobs=teacher_byte_logprobs)
        teacher_lead = teacher_byte_logprobs.shape[:-1]
    else:
        missing = [name for name, x in zip(("teacher_hidden", "teacher_weight", "teacher_byte_vocab"), online)
                   if x is None]
        if missing:
            raise ValueError(f"the teacher is missing: pass teacher_byte_logprobs, or all of "
                             f"teacher_hidden, teacher_weight and teacher_byte_vocab (missing {missing})")
        _check_head("teacher_", teacher_hidden, teacher_weight, teacher_bias, teacher_byte_vocab,
                    "teacher_byte_vocab")
        check.same_device("hidden", hidden, teacher_hidden=teacher_hidden)
        teacher_lead = teacher_hidden.shape[:-1]
    n_teacher = math.prod(teacher_lead)
    if teacher_labels is not None:
        check.tensor("teacher_labels", teacher_labels, integer=True)
        if teacher_labels.numel() != n_teacher:
            raise ValueError(f"teacher_labels must hold one id per teacher row ({n_teacher} rows, "
                             f"{tuple(teacher_lead)}), got shape {tuple(teacher_labels.shape)}")
        check.same_device("hidden", hidden, teacher_labels=teacher_labels)
    if chunk_weight:
        if teacher_byte_logprobs is not None and teacher_token_logprobs is None:
            raise ValueError("chunk_weight > 0 with a precomputed teacher needs teacher_token_logprobs "
                             "(fastkd.bytes.byte_targets returns them)")
        if teacher_byte_logprobs is None and teacher_labels is None:
            raise ValueError("chunk_weight > 0 with an online teacher needs teacher_labels: the "
                             "teacher's next-token ids per row")
    if teacher_token_logprobs is not None:
        check.tensor("teacher_token_logprobs", teacher_token_logprobs, dtypes=check.FLOAT_DTYPES)
        if teacher_token_logprobs.numel() != n_teacher:
            raise ValueError(f"teacher_token_logprobs must hold one value per teacher row ({n_teacher} "
                             f"rows, {tuple(teacher_lead)}), got shape {tuple(teacher_token_logprobs.shape)}")
        check.same_device("hidden", hidden, teacher_token_logprobs=teacher_token_logprobs)
    return n_teacher


@torch.no_grad()
def _online_teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_byte_vocab, teacher_labels,
                    teacher_counted, teacher_rows, temperature, teacher_softcap, backend, dtype,
                    with_tokens: bool):
    """Teacher bucket log-sum-exps at its aligned rows, and (``with_tokens``) its token log-probs
    at every row; frozen."""
    hidden2 = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    weight = teacher_weight.detach()
    bias = None if teacher_bias is None else teacher_bias.detach()
    if not with_tokens:
        values = _bucket_lse(hidden2[teacher_rows], weight, bias, teacher_byte_vocab, temperature,
                             teacher_softcap, backend)
        return values.to(dtype), None
    bucket_lse = _bucket_lse(hidden2, weight, bias, teacher_byte_vocab, temperature, teacher_softcap,
                             backend).to(dtype)
    token = _label_logits(hidden2, weight, bias, teacher_labels, teacher_counted, teacher_softcap, dtype)
    return bucket_lse[teacher_rows], token / temperature - torch.logsumexp(bucket_lse, dim=-1)


def _pairs(alignment, device) -> tuple[Tensor, Tensor]:
    """``(M, 2)`` int64 pairs and ``(M,)`` bool chunk mask on ``device``."""
    if isinstance(alignment, ByteAlignment):
        return (alignment.pairs.to(device, non_blocking=True).long(),
                alignment.chunk_mask.to(device, non_blocking=True))
    check.tensor("alignment", alignment, integer=True, ndim=2)
    if alignment.shape[1] != 2:
        raise ValueError(f"alignment must be a ByteAlignment or an (M, 2) tensor of (student row, "
                         f"teacher row) pairs, got shape {tuple(alignment.shape)}")
    pairs = alignment.to(device, non_blocking=True).long()
    chunk_mask = torch.ones(pairs.shape[0], dtype=torch.bool, device=device)
    chunk_mask[:1] = False  # one sequence: every pair but the first closes a chunk
    return pairs, chunk_mask


def _check_pair_values(pairs: Tensor, chunk_mask: Tensor, n_student: int, n_teacher: int,
                       ordered: bool) -> None:
    """Pairs index existing rows; with the chunk term, chunks must move forward on both sides."""
    if not config.check_values or torch.compiler.is_compiling() or pairs.shape[0] == 0:
        return
    student, teacher = pairs[:, 0], pairs[:, 1]
    bad_rows = (student < 0) | (student >= n_student) | (teacher < 0) | (teacher >= n_teacher)
    backwards = torch.zeros_like(bad_rows)
    if ordered and pairs.shape[0] > 1:
        backwards[1:] = chunk_mask[1:] & ((student[1:] <= student[:-1]) | (teacher[1:] <= teacher[:-1]))
    flags = torch.stack([bad_rows.any(), backwards.any()]).tolist()  # one host sync
    if flags[0]:
        m = int(bad_rows.nonzero()[0, 0])
        raise ValueError(f"alignment pair {m} is {pairs[m].tolist()}, outside the student's "
                         f"{n_student} rows or the teacher's {n_teacher} rows")
    if flags[1]:
        m = int(backwards.nonzero()[0, 0])
        raise ValueError(f"alignment pairs {m - 1} and {m} ({pairs[m - 1].tolist()}, {pairs[m].tolist()}) "
                         "do not move forward on both sides; the chunk term needs pairs sorted along "
                         "each sequence (pass the ByteAlignment of a batch, not its pairs)")


def _all_finite_flag(x: Tensor) -> Tensor:
    """A 0-dim bool tensor, True where ``x`` holds a NaN or inf; a vocabulary-sharded (DTensor)
    head is reduced over its shards, so every rank sees the same flag."""
    bad = ~torch.isfinite(x).all()
    return bad.full_tensor() if check.is_dtensor(bad) else bad


def _check_teacher_values(values: Tensor, tokens: Optional[Tensor], pair_ok: Tensor,
                          teacher_counted: Tensor, online: Optional[tuple]) -> None:
    """The teacher's rows at counted aligned pairs (and its token log-probs at counted rows, for
    the chunk term) must be distributions, as :func:`fastkd.topk_kd_loss` demands of its teacher;
    one host sync.

    Precomputed (``teacher_byte_logprobs``): no NaN, no value above 0 (beyond the rounding slack
    ``log(1 + TOPK_MASS_SLACK)``), at least one finite bucket (a row of all ``-inf`` is no
    distribution) and a total mass within ``1 ± TOPK_MASS_SLACK`` (a row of zeros has mass 257).
    Online (``online = (teacher hidden rows at the pairs, teacher_weight, teacher_bias)``): those
    inputs must be finite (a NaN logit would otherwise empty its bucket without a word), and the
    bucket log-sum-exps must hold a finite bucket. Token log-probs: finite and ≤ 0 (beyond the
    slack).
    """
    if not config.check_values or torch.compiler.is_compiling():
        return
    rows = pair_ok.unsqueeze(-1)
    empty = pair_ok & ~torch.isfinite(values).any(dim=-1)
    checks = []  # (flag, argument, what)
    if online is not None:
        hidden, weight, bias = online
        checks += [(pair_ok & ~torch.isfinite(hidden).all(dim=-1), "teacher_hidden", "NaN or inf at aligned pair {m}"),
                   (_all_finite_flag(weight), "teacher_weight", "NaN or inf")]
        if bias is not None:
            checks.append((_all_finite_flag(bias), "teacher_bias", "NaN or inf"))
        checks.append((empty, "teacher_hidden", "no finite bucket at aligned pair {m}"))
    else:
        nan = (rows & (torch.isnan(values) | (values == math.inf))).any(dim=-1)
        positive = (rows & (values > _FLOAT_LOGPROB_SLACK)).any(dim=-1)
        finite = torch.where(torch.isfinite(values), values, -math.inf)
        mass = torch.logsumexp(finite, dim=-1).exp()
        off = pair_ok & ~empty & ((mass - 1.0).abs() > dv.TOPK_MASS_SLACK)
        what = ("must be log-probabilities of a distribution over the 257 buckets (<= 0, -inf for an "
                "empty bucket, no NaN, summing to 1); aligned pair {m} has ")
        checks += [(nan, "teacher_byte_logprobs", what + "NaN or +inf"),
                   (empty, "teacher_byte_logprobs", what + "no finite bucket (every byte -inf)"),
                   (positive, "teacher_byte_logprobs", what + "a log-prob above 0"),
                   (off, "teacher_byte_logprobs", what + "a mass of {mass} instead of 1 (± "
                                                        f"{dv.TOPK_MASS_SLACK})")]
    if tokens is not None:
        name = "teacher_token_logprobs" if online is None else "teacher_hidden"
        checks.append((teacher_counted & (~torch.isfinite(tokens) | (tokens > _FLOAT_LOGPROB_SLACK)), name,
                       "the teacher's token log-prob at teacher row {m} is {token}, not a finite "
                       "log-probability (<= 0)"))
    flags = torch.stack([bad.any() for bad, _, _ in checks]).tolist()  # one host sync
    for (bad, name, what), failed in zip(checks, flags):
        if not failed:
            continue
        m = int(bad.nonzero()[0, 0]) if bad.dim() else 0
        fields = {"m": m}
        if "{mass}" in what:
            fields["mass"] = f"{mass[m].item():.6g}"
        if "{token}" in what:
            fields["token"] = tokens[m].item()
        raise ValueError(f"{name}{' ' if what.startswith('must') else ': '}" + what.format(**fields))


def _chunk_divergence(student_tokens: Tensor, teacher_tokens: Tensor, counted: Tensor,
                      teacher_counted: Tensor, pairs: Tensor, chunk_ok: Tensor, kind: str,
                      beta: float) -> Tensor:
    """Per pair m, the divergence of the two models' "chunk m comes next" Bernoullis (0 if none).

    Chunk m covers student rows ``[i_{m-1}, i_m)`` and teacher rows ``[j_{m-1}, j_m)``; its
    log-likelihoods are differences of float64 prefix sums of the token log-probs.
    """
    def chunk_sums(tokens, rows, row_counted):
        prefix = torch.cat([tokens.new_zeros(1, dtype=torch.float64),
                            torch.where(row_counted, tokens.double(), 0.0).cumsum(0)])
        skipped = torch.cat([rows.new_zeros(1), (~row_counted).long().cumsum(0)])
        previous = torch.cat([rows[:1], rows[:-1]])
        return prefix[rows] - prefix[previous], skipped[rows] - skipped[previous]

    student_ll, student_skipped = chunk_sums(student_tokens, pairs[:, 0], counted)
    teacher_ll, teacher_skipped = chunk_sums(teacher_tokens, pairs[:, 1], teacher_counted)
    ok = chunk_ok & (student_skipped == 0) & (teacher_skipped == 0)
    student_ll = torch.where(ok, student_ll, -1.0).clamp(max=_LOG_CHUNK_CEILING)
    teacher_ll = torch.where(ok, teacher_ll, -1.0).clamp(max=_LOG_CHUNK_CEILING)
    log_p = torch.stack([student_ll, dv.log1mexp(student_ll)], dim=-1)
    log_q = torch.stack([teacher_ll, dv.log1mexp(teacher_ll)], dim=-1)
    return torch.where(ok, dv.divergence(log_p, log_q, None, kind, beta), 0.0)


class ByteKDLoss(nn.Module):
    """Module form of :func:`byte_kd_loss`: vocabularies and options at construction.

    ``forward(hidden, weight, alignment, teacher_hidden=None, teacher_weight=None,
    teacher_byte_logprobs=None, teacher_token_logprobs=None, labels=None, teacher_labels=None,
    bias=None, teacher_bias=None)``.
    """

    def __init__(self, byte_vocab: ByteVocab, teacher_byte_vocab: Optional[ByteVocab] = None, *,
                 divergence="reverse_kl", beta=0.5, temperature=1.0, chunk_weight=0.0,
                 ce_weight=0.0, kd_weight=1.0, ignore_index=-100, softcap=None,
                 teacher_softcap=None, reduction="mean", impl="auto"):
        super().__init__()
        for name, value in (("byte_vocab", byte_vocab), ("teacher_byte_vocab", teacher_byte_vocab)):
            if value is not None and not isinstance(value, ByteVocab):
                raise TypeError(f"{name} must be a fastkd.ByteVocab, got {type(value).__name__}")
        if byte_vocab is None:
            raise TypeError("byte_vocab must be a fastkd.ByteVocab, got None")
        self.byte_vocab = byte_vocab
        self.teacher_byte_vocab = teacher_byte_vocab
        self.options = check.options(
            divergence=divergence, beta=beta, tail="bucket", temperature=temperature,
            ignore_index=ignore_index, ce_weight=ce_weight, kd_weight=kd_weight, softcap=softcap,
            reduction=reduction, impl=impl, return_stats=False)
        del self.options["tail"], self.options["return_stats"]
        self.options.update(
            chunk_weight=check.real("chunk_weight", chunk_weight, low=0.0),
            teacher_softcap=check.real("teacher_softcap", teacher_softcap, low=0.0, low_open=True,
                                       allow_none=True))

    def forward(self, hidden: Tensor, weight: Tensor, alignment, teacher_hidden: Optional[Tensor] = None,
                teacher_weight: Optional[Tensor] = None, teacher_byte_logprobs: Optional[Tensor] = None,
                teacher_token_logprobs: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                teacher_labels: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None) -> Tensor:
        online = teacher_byte_logprobs is None
        return byte_kd_loss(
            hidden, weight, self.byte_vocab, alignment, teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight, teacher_byte_vocab=self.teacher_byte_vocab if online else None,
            teacher_byte_logprobs=teacher_byte_logprobs, teacher_token_logprobs=teacher_token_logprobs,
            labels=labels, teacher_labels=teacher_labels, bias=bias, teacher_bias=teacher_bias,
            **self.options)

    def extra_repr(self) -> str:
        return f"byte_vocab={self.byte_vocab!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())

