"""The functional API (DESIGN.md §2): validation, flattening, dispatch to a backend, reduction.

The backends return per-row losses; the reduction is plain differentiable PyTorch on top of them,
so ``reduction="mean"`` divides by the number of counted rows on the device (no host sync).
"""
from __future__ import annotations

import functools
import importlib.util
import numbers
import os
from typing import Optional

import torch
from torch import Tensor

from . import _validate as check
from . import divergences as dv
from .rows import flatten_rows, reduce_rows
from .backends import chunked, torch_backend
from .config import config
from .stats import KDStats


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The path that runs ``impl`` for inputs on ``device`` of ``dtype``.

    Returns ``"torch"`` (the chunked plan with torch epilogues), ``"chunked"`` (the chunked plan
    with Triton epilogues), ``"triton"`` (the streaming Triton kernels) or ``"cuda"`` (the chunked
    plan with the csrc epilogues); see ``fastkd.backends.chunked``.

    ``"auto"``: ``"chunked"`` for 16/32-bit inputs on a CUDA device when Triton is installed (three
    GEMMs on tensor cores plus memory-bound epilogues: the fastest path on paper, within
    ``fastkd.config.chunk_bytes`` of extra memory), else ``"torch"`` (CPU tensors, float64, no
    Triton). ``"triton"`` asks for the streaming kernels (never more than a tile of logits: the
    smallest memory; ``"auto"`` also falls back to them when the budget cannot hold a 64-row chunk);
    it needs a CUDA device, or the CPU with ``TRITON_INTERPRET=1`` set before fastkd's kernels are
    first imported (the test lane). ``"cuda"`` needs fastkd's CUDA extension, prebuilt or
    buildable on first use, and 16/32-bit CUDA tensors; without the extension it says how to
    build it.
    """
    if impl == "torch":
        return "torch"
    interpreted_bf16 = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    if impl == "auto":
        gpu = device.type == "cuda" and dtype != torch.float64 and not interpreted_bf16
        if not (gpu and _triton_importable()):
            return "torch"
        # the chunked plan's tensor-core GEMMs write float32 through torch.mm(..., out_dtype=),
        # which older torch releases lack: there the streaming kernels are the CUDA path
        return "chunked" if _mm_has_out_dtype() else "triton"
    if impl == "triton":
        if not _triton_importable():
            raise RuntimeError("impl='triton' needs the triton package (pip install triton); "
                               "use impl='torch' or impl='auto'")
        if dtype == torch.float64:
            raise TypeError("impl='triton' takes float16, bfloat16 or float32 inputs, got float64; "
                            "use impl='torch' for float64")
        if interpreted_bf16:
            raise TypeError(check.BF16_INTERPRETER_HINT)
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"impl='triton' needs CUDA tensors, got tensors on {device} (set TRITON_INTERPRET=1 "
                "before importing fastkd to run the kernels in Triton's CPU interpreter, slowly)")
        return "triton"
    if impl == "cuda":
        from .backends import cuda_build
        reason = cuda_build.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"impl='cuda' needs fastkd's CUDA extension, which is unavailable: "
                               f"{reason}; {cuda_build.BUILD_HINT}")
        if dtype == torch.float64:
            raise TypeError("impl='cuda' takes float16, bfloat16 or float32 inputs, got float64; "
                            "use impl='torch' for float64")
        if device.type != "cuda":
            raise ValueError(f"impl='cuda' needs CUDA tensors, got tensors on {device}")
        return "cuda"
    raise ValueError(f"impl must be one of 'auto', 'torch', 'triton', 'cuda', got {impl!r}")


@functools.lru_cache(maxsize=None)
def _mm_has_out_dtype() -> bool:
    """Whether this torch has ``torch.mm(a, b, out_dtype=...)`` (16-bit operands, float32 output),
    probed once on meta tensors (no device, no data)."""
    probe = torch.empty(2, 2, dtype=torch.bfloat16, device="meta")
    try:
        return torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton():
    from .backends import triton_backend  # imported on first use: it compiles nothing at import
    return triton_backend


def _grads_in_forward(reduction: str, *tensors: Optional[Tensor]) -> bool:
    """Whether the chunked plan computes the gradients in its forward (DESIGN.md §3): only for a
    summing reduction (a uniform ``grad_output`` over the rows) and when a gradient is wanted."""
    wanted = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return reduction != "none" and wanted


def _vocab_pass(tail: str, ce_weight: float, return_stats: bool) -> bool:
    """False where a top-k loss needs no pass over the vocabulary (renormalised, no CE, no stats):
    then the torch backend's O(N·K·D) gathered path is all there is to do, for every impl."""
    return tail == "bucket" or ce_weight != 0.0 or return_stats


def operand_dtype(device: torch.device, *tensors: Optional[Tensor]) -> torch.dtype:
    """The dtype the loss's GEMMs take their operands in (issue #19: decided once, here).

    Under ``torch.autocast`` on the inputs' device: the autocast dtype (float16/bfloat16). Else the
    16-bit dtype among the inputs (16-bit activations with float32 master weights run as a
    well-written autocast loss does), float64 when every input is float64, else float32 (IEEE
    float32, as without autocast). Accumulation is float32 (float64) whatever the operands; the
    ops themselves run with autocast off and see plain dtypes.
    """
    dtypes = [t.dtype for t in tensors if t is not None]
    if all(dt == torch.float64 for dt in dtypes):
        return torch.float64
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        autocast_dtype = torch.get_autocast_dtype(device.type)
        if autocast_dtype in (torch.float16, torch.bfloat16):
            return autocast_dtype
    for dt in dtypes:
        if dt in (torch.float16, torch.bfloat16):
            return dt
    return torch.float32


def _budget() -> int:
    """``config.chunk_bytes`` for the ops: a positive int, or 0 for the device default (None)."""
    budget = config.chunk_bytes
    if budget is None:
        return 0
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"fastkd.config.chunk_bytes must be None (the device default) or a positive "
                         f"number of bytes, got {budget!r}")
    return budget


def _path(backend: str, vocab: int, buffers: int, device: torch.device) -> str:
    """``"auto"``'s chunked path gives way to the streaming kernels when the memory budget cannot
    hold a 64-row chunk of its float32 buffers and 16-bit ``dz``."""
    row_bytes = vocab * (4 * buffers + 2)
    budget = chunked.budget_bytes(_budget(), row_bytes, device)
    if backend == "chunked" and budget < chunked.ROW_ALIGN * row_bytes:
        return "triton"
    return backend


_EPILOGUE = {"torch": "torch", "chunked": "triton", "cuda": "cuda"}
_CHUNKED_EPILOGUES = ("auto", "triton", "fused")


def _epilogue(backend: str, op_dtype: torch.dtype) -> str:
    """The chunked plan's epilogue provider for ``backend``; for the default CUDA path
    ``config.chunked_epilogue`` (``"auto"``: the fused head for 16-bit operands, where the cost
    model puts it below the Triton epilogues on every shape; the Triton epilogues otherwise)."""
    if backend != "chunked":
        return _EPILOGUE[backend]
    choice = config.chunked_epilogue
    if choice not in _CHUNKED_EPILOGUES:
        raise ValueError(f"fastkd.config.chunked_epilogue must be one of {_CHUNKED_EPILOGUES}, "
                         f"got {choice!r}")
    if choice in ("auto", "fused") and op_dtype not in (torch.float16, torch.bfloat16):
        return "triton"  # the fused head stores 16-bit tiles: 16-bit operands only
    return "fused" if choice == "auto" else choice


def _streaming_operands(op_dtype: torch.dtype, *tensors: Optional[Tensor]):
    """The streaming kernels take one dtype: the inputs cast to the operand dtype (autograd casts
    the gradients back to each input's dtype)."""
    return tuple(None if t is None else t.to(op_dtype) for t in tensors)


def topk_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    tail: str = "bucket",
    temperature: float = 1.0,
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    softcap: Optional[float] = None,
    bias: Optional[Tensor] = None,
    reduction: str = "mean",
    impl: str = "auto",
    return_stats: bool = False,
):
    """Distillation loss against a teacher's top-k, straight from hidden states and the LM head.

    Student logits ``z = softcap(hidden · weightᵀ + bias) / temperature`` are never materialised
    for all rows at once. Every id in ``teacher_ids`` is its own bucket; ``tail="bucket"`` adds
    the tail bucket ``V∖S`` with its exact mass (a true divergence, a lower bound on the
    full-vocabulary one), ``tail="renormalize"`` compares both distributions renormalised over S
    (cost O(N·K·D), no pass over the vocabulary unless ``ce_weight > 0`` or ``return_stats``).
    The raw truncated sum ``Σ_{j∈S} p_j Δ_j`` is deliberately not offered: its gradient pushes
    student mass out of S (arXiv 2605.11182).

    Args:
        hidden: ``(N, D)`` or ``(..., D)`` float16/bfloat16/float32/float64, the student's final
            hidden states, already shifted so that row n predicts token n+1.
        weight: ``(V, D)``, the student's LM-head weight (as in ``nn.Linear``).
        teacher_ids: ``(..., K)`` int32/int64 in ``[0, V)``, or ``-1`` for an unused slot.
        teacher_logprobs: ``(..., K)`` float, the teacher's log-probabilities of those ids under
            its full softmax (used as given: capture them at the temperature you want). Masses
            summing above 1 by rounding are tolerated up to ``1 + 0.02`` and rescaled.
        divergence: ``"reverse_kl"`` (default), ``"forward_kl"`` or ``"jsd"``.
        beta: JSD mixture weight in ``[0, 1]``, default 0.5; β=0 is forward KL, β=1 reverse KL.
        tail: ``"bucket"`` (default) or ``"renormalize"``.
        temperature: τ > 0, default 1.0; applies to the student, and the KD term is scaled by τ².
        labels: ``(...)`` int next-token ids, default None (every row counts). Rows equal to
            ``ignore_index`` contribute nothing and get exactly zero gradient.
        ignore_index: default -100.
        ce_weight: weight of the cross-entropy on untempered logits, default 0.0 (needs labels).
        kd_weight: weight of the KD term, default 1.0.
        softcap: final-logit softcap c (``c·tanh(x/c)``, Gemma-2), default None.
        bias: ``(V,)`` LM-head bias, default None.
        reduction: ``"mean"`` (default; over counted rows), ``"sum"`` or ``"none"`` (``(N,)``).
        impl: ``"auto"`` (default), ``"torch"``, ``"triton"`` or ``"cuda"``.
        return_stats: also return a :class:`fastkd.KDStats` of per-row statistics.

    Returns:
        loss: float32 (float64 for float64 inputs), scalar or ``(N,)``; with ``return_stats``,
        ``(loss, KDStats)``. Gradients flow to ``hidden``, ``weight`` and ``bias`` only.
    """
    if check.is_dtensor(weight):  # a vocabulary-sharded head (tensor parallel): docs/parallel.md
        from .parallel import vocab_parallel
        return vocab_parallel.topk_kd_loss(
            hidden, weight, teacher_ids, teacher_logprobs, divergence=divergence, beta=beta,
            tail=tail, temperature=temperature, labels=labels, ignore_index=ignore_index,
            ce_weight=ce_weight, kd_weight=kd_weight, softcap=softcap, bias=bias,
            reduction=reduction, impl=impl, return_stats=return_stats)
    opts = check.options(divergence=divergence, beta=beta, tail=tail, temperature=temperature,
                         ignore_index=ignore_index, ce_weight=ce_weight, kd_weight=kd_weight,
                         softcap=softcap, reduction=reduction, impl=impl, return_stats=return_stats)
    n_rows, dim, vocab = check.head("", hidden, weight, bias)
    check.teacher_topk(teacher_ids, teacher_logprobs, hidden)
    check.labels_tensor(labels, hidden, opts["ce_weight"])
    backend = resolve_impl(opts["impl"], hidden.device, hidden.dtype)

    hidden2, labels1, counted = flatten_rows(hidden, labels, opts["ignore_index"])
    topk = teacher_ids.shape[-1]
    ids = teacher_ids.reshape(n_rows, topk).long()
    logprobs = teacher_logprobs.reshape(n_rows, topk).detach()
    check.values(vocab, counted, labels1, ids, logprobs)
    ids = torch.where(counted.unsqueeze(1), ids, -1)  # ignored rows: no teacher data is read

    op_dtype = operand_dtype(hidden.device, hidden, weight, bias)
    backend = _path(backend, vocab, 1, hidden.device) if opts["impl"] == "auto" else backend
    with chunked.no_autocast(hidden.device):
        if backend == "triton":
            h, w, b = _streaming_operands(op_dtype, hidden2, weight, bias)
            loss_rows, kd_rows, _state, _weights, stats = _triton().topk_kd_forward(
                h.contiguous(), w.contiguous(), _contiguous(b), ids, logprobs, None, None, None,
                labels1, opts["divergence"], opts["beta"], opts["tail"], opts["temperature"],
                opts["softcap"], None, opts["ignore_index"], opts["ce_weight"], opts["kd_weight"],
                return_stats)
        elif not _vocab_pass(opts["tail"], opts["ce_weight"], return_stats):
            h, w, b = _rounded(op_dtype, hidden2, weight, bias)
            loss_rows, kd_rows, _state, _weights, stats = torch_backend.topk_kd_forward(
                h, w, b, ids, logprobs, None, labels1, opts["divergence"], opts["beta"], opts["tail"],
                opts["temperature"], opts["softcap"], opts["ignore_index"], opts["ce_weight"],
                opts["kd_weight"], _budget(), return_stats)
        else:
            out = chunked.topk_forward(
                hidden2, weight, bias, ids, logprobs, None, None, None, labels1, opts["divergence"],
                opts["beta"], opts["tail"], opts["temperature"], opts["softcap"], None, 0, "teacher",
                opts["ignore_index"], opts["ce_weight"], opts["kd_weight"], _budget(),
                return_stats, _grads_in_forward(opts["reduction"], hidden, weight, bias),
                weight.requires_grad, _epilogue(backend, op_dtype), op_dtype)
            loss_rows, kd_rows, stats = out[0], out[1], out[4]
    loss = reduce_rows(loss_rows, counted, opts["reduction"])
    if not return_stats:
        return loss
    stats = stats.detach()
    return loss, KDStats(kd=kd_rows.detach(), entropy=stats[:, 0], lse=stats[:, 1], topk_mass=stats[:, 2])


def kd_loss(
    hidden: Tensor,
    weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    topk: Optional[int] = None,
    topk_from: str = "teacher",
    tail: str = "bucket",
    temperature: float = 1.0,
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    reduction: str = "mean",
    impl: str = "auto",
    return_stats: bool = False,
):
    """Distillation loss against an online teacher, from both models' hidden states and LM heads.

    With ``topk=None`` (default) the exact full-vocabulary divergence between
    ``softmax(z_student)`` and ``softmax(z_teacher)``, both tempered by τ. With ``topk=K`` the
    divergence over a per-row top-k set S with a tail bucket or renormalisation, as in
    :func:`topk_kd_loss`, where S is the teacher's top-k (``topk_from="teacher"``, default), the
    student's own (``"student"``, the natural set for reverse KL on student rollouts) or their
    union (``"union"``, up to 2K ids).

    Args:
        hidden: ``(N, D)`` or ``(..., D)`` student final hidden states (shifted, see
            :func:`topk_kd_loss`).
        weight: ``(V, D)`` student LM-head weight.
        teacher_hidden: ``(..., D_t)`` teacher final hidden states for the same rows; frozen.
        teacher_weight: ``(V, D_t)`` teacher LM-head weight over the same vocabulary; frozen.
        divergence, beta, tail, temperature, labels, ignore_index, ce_weight, kd_weight, softcap,
        bias, reduction, impl, return_stats: as in :func:`topk_kd_loss` (τ applies to both
            models here).
        topk: None (default, full vocabulary) or K in ``[1, V]``.
        topk_from: ``"teacher"`` (default), ``"student"`` or ``"union"``.
        teacher_softcap: the teacher's final-logit softcap, default None.
        teacher_bias: ``(V,)`` teacher LM-head bias, default None.

    Returns:
        loss as in :func:`topk_kd_loss`; ``KDStats.topk_mass`` is None when ``topk`` is None.
    """
    if check.is_dtensor(weight) or check.is_dtensor(teacher_weight):  # docs/parallel.md
        from .parallel import vocab_parallel
        return vocab_parallel.kd_loss(
            hidden, weight, teacher_hidden, teacher_weight, divergence=divergence, beta=beta,
            topk=topk, topk_from=topk_from, tail=tail, temperature=temperature, labels=labels,
            ignore_index=ignore_index, ce_weight=ce_weight, kd_weight=kd_weight, softcap=softcap,
            teacher_softcap=teacher_softcap, bias=bias, teacher_bias=teacher_bias,
            reduction=reduction, impl=impl, return_stats=return_stats)
    opts = check.options(divergence=divergence, beta=beta, tail=tail, temperature=temperature,
                         ignore_index=ignore_index, ce_weight=ce_weight, kd_weight=kd_weight,
                         softcap=softcap, reduction=reduction, impl=impl, return_stats=return_stats)
    teacher_softcap = check.real("teacher_softcap", teacher_softcap, low=0.0, low_open=True,
                                 allow_none=True)
    check.choice("topk_from", topk_from, dv.TOPK_FROM)
    n_rows, dim, vocab = check.head("", hidden, weight, bias)
    _, teacher_dim, teacher_vocab = check.head("teacher_", teacher_hidden, teacher_weight, teacher_bias)
    if teacher_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"teacher_hidden must have hidden's leading dimensions {tuple(hidden.shape[:-1])} + "
            f"(D_t,), got {tuple(teacher_hidden.shape)}")
    if teacher_vocab != vocab:
        raise ValueError(
            f"teacher_weight must cover the student's vocabulary V={vocab}, got V={teacher_vocab} "
            "(pad or slice one LM head so both share a vocabulary)")
    check.same_device("hidden", hidden, teacher_hidden=teacher_hidden)
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, numbers.Integral) or not 1 <= topk <= vocab:
            raise ValueError(f"topk must be None or an int in [1, {vocab}], got {topk!r}")
        topk = int(topk)
    check.labels_tensor(labels, hidden, opts["ce_weight"])
    backend = resolve_impl(opts["impl"], hidden.device, hidden.dtype)

    hidden2, labels1, counted = flatten_rows(hidden, labels, opts["ignore_index"])
    check.values(vocab, counted, labels1)
    teacher_hidden2 = teacher_hidden.reshape(n_rows, teacher_dim).detach()
    teacher_weight = teacher_weight.detach()
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()

    op_dtype = operand_dtype(hidden.device, hidden, weight, bias, teacher_hidden2, teacher_weight,
                             teacher_bias)
    backend = _path(backend, vocab, 2, hidden.device) if opts["impl"] == "auto" else backend
    grads_in_forward = _grads_in_forward(opts["reduction"], hidden, weight, bias)
    with chunked.no_autocast(hidden.device):
        if backend == "triton":
            student = _streaming_operands(op_dtype, hidden2, weight, bias)
            teacher = _streaming_operands(op_dtype, teacher_hidden2, teacher_weight, teacher_bias)
            loss_rows, kd_rows, stats, topk_mass = _kd_loss_triton(
                *student, *teacher, labels1, counted, topk, topk_from, teacher_softcap, opts,
                return_stats)
        elif topk is not None and not _vocab_pass(opts["tail"], opts["ce_weight"], return_stats):
            h, w, b = _rounded(op_dtype, hidden2, weight, bias)
            th, tw, tb = _rounded(op_dtype, teacher_hidden2, teacher_weight, teacher_bias)
            ids, logprobs, teacher_log_tail = torch_backend.select_topk(
                h.detach(), w.detach(), None if b is None else b.detach(), th, tw, tb, topk,
                topk_from, opts["temperature"], opts["softcap"], teacher_softcap, _budget())
            ids = torch.where(counted.unsqueeze(1), ids, -1)
            loss_rows, kd_rows, _state, _weights, stats = torch_backend.topk_kd_forward(
                h, w, b, ids, logprobs, teacher_log_tail, labels1, opts["divergence"],
                opts["beta"], opts["tail"], opts["temperature"], opts["softcap"],
                opts["ignore_index"], opts["ce_weight"], opts["kd_weight"], _budget(),
                return_stats)
            topk_mass = stats[:, 2].detach() if return_stats else None
        elif topk is not None:
            out = chunked.topk_forward(
                hidden2, weight, bias, None, None, teacher_hidden2, teacher_weight, teacher_bias,
                labels1, opts["divergence"], opts["beta"], opts["tail"], opts["temperature"],
                opts["softcap"], teacher_softcap, topk, topk_from, opts["ignore_index"],
                opts["ce_weight"], opts["kd_weight"], _budget(), return_stats,
                grads_in_forward, weight.requires_grad, _epilogue(backend, op_dtype), op_dtype)
            loss_rows, kd_rows, stats = out[0], out[1], out[4]
            topk_mass = stats[:, 2].detach() if return_stats else None
        else:
            out = chunked.dense_forward(
                hidden2, weight, bias, teacher_hidden2, teacher_weight, teacher_bias, labels1,
                opts["divergence"], opts["beta"], opts["temperature"], opts["softcap"],
                teacher_softcap, opts["ignore_index"], opts["ce_weight"], opts["kd_weight"],
                _budget(), return_stats, grads_in_forward, weight.requires_grad,
                _epilogue(backend, op_dtype), op_dtype)
            loss_rows, kd_rows, stats = out[0], out[1], out[3]
            topk_mass = None
    loss = reduce_rows(loss_rows, counted, opts["reduction"])
    if not return_stats:
        return loss
    stats = stats.detach()
    return loss, KDStats(kd=kd_rows.detach(), entropy=stats[:, 0], lse=stats[:, 1], topk_mass=topk_mass)


def _kd_loss_triton(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels,
                    counted, topk, topk_from, teacher_softcap, opts, return_stats):
    """``kd_loss`` on the Triton backend: per-row losses, kd values, stats and top-k mass."""
    tb = _triton()
    hidden, weight, bias = hidden.contiguous(), weight.contiguous(), _contiguous(bias)
    teacher_hidden, teacher_weight = teacher_hidden.contiguous(), teacher_weight.contiguous()
    teacher_bias = _contiguous(teacher_bias)
    if topk is None:
        loss_rows, kd_rows, _state, stats = tb.dense_kd_forward(
            hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels,
            opts["divergence"], opts["beta"], opts["temperature"], opts["softcap"], teacher_softcap,
            opts["ignore_index"], opts["ce_weight"], opts["kd_weight"], return_stats)
        return loss_rows, kd_rows, stats, None
    ids = tb.select_topk(hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
                         teacher_hidden, teacher_weight, teacher_bias, topk, topk_from,
                         opts["softcap"], teacher_softcap)
    ids = torch.where(counted.unsqueeze(1), ids, -1)
    loss_rows, kd_rows, _state, _weights, stats = tb.topk_kd_forward(
        hidden, weight, bias, ids, None, teacher_hidden, teacher_weight, teacher_bias, labels,
        opts["divergence"], opts["beta"], opts["tail"], opts["temperature"], opts["softcap"],
        teacher_softcap, opts["ignore_index"], opts["ce_weight"], opts["kd_weight"], return_stats)
    topk_mass = stats[:, 2].detach() if return_stats else None
    return loss_rows, kd_rows, stats, topk_mass


def _rounded(op_dtype: torch.dtype, *tensors: Optional[Tensor]):
    """Each tensor with its values rounded to a 16-bit ``op_dtype`` but its own dtype kept, and the
    gradient passed straight through: how the torch ops (float32 products of rounded operands)
    give the GEMMs of an autocast loss. Unchanged for float32/float64 operands."""
    if op_dtype not in (torch.float16, torch.bfloat16):
        return tensors
    return tuple(t if t is None or t.dtype == op_dtype
                 else t + (t.detach().to(op_dtype).to(t.dtype) - t.detach()) for t in tensors)


def _contiguous(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.contiguous()
