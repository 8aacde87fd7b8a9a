"""Every loss under torch.autocast (issue #19), on the CPU, against float64.

The bar: loss and gradients within 2x of the error of the *naive autocast loss* — the logits from
the head's GEMM under the same autocast (16-bit output), the rest in float32, differentiated by
autograd — and no dtype mismatch in forward or backward. fastkd runs its GEMMs on operands rounded
to the autocast dtype with float32 accumulation and keeps the logits unrounded, so it should sit
well inside that bar. The naive loss is built here with the same float32 reference code as the
benchmarks, fed the autocast logits through an identity head (``eye(V)``), so that the only
difference is the 16-bit GEMM.

Cases: 16-bit and float32 activations, float32 and 16-bit weights, bf16 and fp16 autocast, the
top-k loss, the dense online teacher (JSD, reverse KL), the online top-k, the byte-level
``byte_logprobs`` and ``byte_kd_loss``; and Liger-Kernel's ``test_amp`` JSD cases (uniform random
16-bit hidden states, float32 heads, B·T = 8, D 1024/2048, V 3200): JSD(β=0.5) never above log 2.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd.bytes import byte_targets
from fastkd.bytes.reference import byte_kd_loss_reference, byte_logprobs_reference
from fastkd.reference import kd_loss_reference, topk_kd_loss_reference

from conftest import make_problem, rel_error
from test_bytes_loss import byte_problem

AUTOCAST = [torch.bfloat16, torch.float16]
# (activations 16-bit?, weights 16-bit?): fp32 master weights with 16-bit activations is the
# trainer's case; fp32 activations with fp32 weights is a plain fp32 model under autocast.
OPERANDS = [(True, False), (False, False), (True, True)]
FLOOR = 1e-6  # an absolute floor under the naive error (never hit at these shapes)


def _cast(x, dtype, sixteen):
    return x.detach().to(dtype if sixteen else torch.float32).requires_grad_(x.requires_grad)


def _errors(loss, grads, ref_loss, ref_grads):
    return [rel_error(loss, ref_loss)] + [rel_error(g, r) for g, r in zip(grads, ref_grads)]


def _naive(reference, hidden, weight, *args, teacher=None, dtype, **kwargs):
    """``reference`` on the autocast logits: 16-bit GEMM, float32 everything after it."""
    with torch.autocast("cpu", dtype=dtype):
        logits = hidden @ weight.T
        teacher_logits = None if teacher is None else teacher[0] @ teacher[1].T
    eye = torch.eye(weight.shape[0])
    if teacher_logits is not None:
        args = (teacher_logits.float().detach(), eye) + args
    return reference(logits.float(), eye, *args, compute_dtype=torch.float32, **kwargs)


def _check(fastkd_loss, naive_loss, exact_loss, inputs, exact_inputs, what):
    """fastkd's relative errors (loss, each gradient) within 2x of the naive loss's + FLOOR."""
    grad_out = torch.rand(fastkd_loss.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    got = torch.autograd.grad(fastkd_loss, inputs, grad_out)
    naive = torch.autograd.grad(naive_loss, inputs, grad_out)
    want = torch.autograd.grad(exact_loss, exact_inputs, grad_out.double())
    for g, x in zip(got, inputs):
        assert g.dtype == x.dtype, f"{what}: gradient dtype {g.dtype} != input dtype {x.dtype}"
    ours = _errors(fastkd_loss, got, exact_loss, want)
    theirs = _errors(naive_loss, naive, exact_loss, want)
    for name, e, n in zip(["loss", "d hidden", "d weight"], ours, theirs):
        assert e <= 2 * n + FLOOR, f"{what} {name}: fastkd error {e:.3e} > 2 x naive {n:.3e}"


def _exact(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize("act16,weight16", OPERANDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])  # gradients in the forward / recomputed
def test_topk_under_autocast(dtype, act16, weight16, reduction):
    # V=301 odd; N=24 rows split 10/10/4 by the tiny budget below; a quarter ignored.
    prob = make_problem(24, 40, 301, 8, seed=1, ignore_frac=0.25, scale=2.0)
    hidden, weight = _cast(prob["hidden"], dtype, act16), _cast(prob["weight"], dtype, weight16)
    options = dict(divergence="reverse_kl", labels=prob["labels"], ce_weight=0.3, reduction=reduction)
    args = (prob["teacher_ids"], prob["teacher_logprobs"])
    fastkd.config.chunk_bytes, budget = 10 * 301 * 4 * 3, fastkd.config.chunk_bytes
    try:
        with torch.autocast("cpu", dtype=dtype):
            loss = fastkd.topk_kd_loss(hidden, weight, *args, impl="torch", **options)
    finally:
        fastkd.config.chunk_bytes = budget
    assert loss.dtype == torch.float32
    naive = _naive(topk_kd_loss_reference, hidden, weight, *args, dtype=dtype, **options)
    exact_inputs = _exact(hidden, weight)
    exact = topk_kd_loss_reference(*exact_inputs, *args, **options)
    _check(loss, naive, exact, [hidden, weight], exact_inputs, "top-k")


@pytest.mark.parametrize("dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize("act16,weight16", OPERANDS)
@pytest.mark.parametrize("divergence,topk", [("jsd", None), ("reverse_kl", None), ("forward_kl", 6)])
def test_online_teacher_under_autocast(dtype, act16, weight16, divergence, topk):
    prob = make_problem(20, 32, 257, 4, seed=2, ignore_frac=0.2, scale=2.0)
    gen = torch.Generator().manual_seed(5)
    # A teacher whose values are exact in the 16-bit dtype (served in it): its top-k set S then
    # does not depend on the operand rounding, and the comparison measures the loss, not luck.
    teacher_hidden = (torch.randn(20, 24, generator=gen) * 2.0).to(dtype).float()
    teacher_weight = (torch.randn(257, 24, generator=gen) / 24**0.5).to(dtype).float()
    hidden, weight = _cast(prob["hidden"], dtype, act16), _cast(prob["weight"], dtype, weight16)
    teacher = (_cast(teacher_hidden, dtype, act16), _cast(teacher_weight, dtype, weight16))
    options = dict(divergence=divergence, topk=topk, labels=prob["labels"], reduction="sum")
    with torch.autocast("cpu", dtype=dtype):
        loss = fastkd.kd_loss(hidden, weight, *teacher, impl="torch", **options)
    naive = _naive(kd_loss_reference, hidden, weight, teacher=teacher, dtype=dtype, **options)
    exact_inputs = _exact(hidden, weight)
    exact = kd_loss_reference(*exact_inputs, *_exact(*teacher), **options)
    _check(loss, naive, exact, [hidden, weight], exact_inputs, f"kd_loss {divergence} topk={topk}")


@pytest.mark.parametrize("dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize("act16,weight16", OPERANDS)
def test_byte_losses_under_autocast(dtype, act16, weight16):
    prob = byte_problem(seed=4)
    hidden, weight = _cast(prob["hidden"], dtype, act16), _cast(prob["weight"], dtype, weight16)
    vocab = prob["byte_vocab"]
    with torch.autocast("cpu", dtype=dtype):
        logprobs = fastkd.byte_logprobs(hidden, weight, vocab, impl="torch")
    finite = torch.isfinite(logprobs)
    weights = torch.rand(logprobs.shape, generator=torch.Generator().manual_seed(1))

    def scalar(lp):  # a differentiable summary over the buckets that exist
        return (torch.where(finite, lp, 0.0) * weights).sum()

    naive = _naive(byte_logprobs_reference, hidden, weight, vocab, dtype=dtype)
    exact_inputs = _exact(hidden, weight)
    exact = byte_logprobs_reference(*exact_inputs, vocab)
    _check(scalar(logprobs), scalar(naive.float()), scalar(exact), [hidden, weight], exact_inputs,
           "byte_logprobs")

    byte_lp, token_lp = byte_targets(prob["teacher_hidden"].double(), prob["teacher_weight"].double(),
                                     prob["teacher_byte_vocab"], prob["teacher_labels"], impl="torch")
    options = dict(teacher_byte_logprobs=byte_lp, teacher_token_logprobs=token_lp,
                   teacher_labels=prob["teacher_labels"], labels=prob["labels"], chunk_weight=0.5)
    with torch.autocast("cpu", dtype=dtype):
        loss = fastkd.byte_kd_loss(hidden, weight, vocab, prob["alignment"], impl="torch", **options)
    naive = _naive(byte_kd_loss_reference, hidden, weight, vocab, prob["alignment"], dtype=dtype, **options)
    exact = byte_kd_loss_reference(*exact_inputs, vocab, prob["alignment"], **options)
    _check(loss, naive, exact, [hidden, weight], exact_inputs, "byte_kd_loss")


@pytest.mark.parametrize("dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize("dim", [1024, 2048])
def test_liger_amp_jsd_cases(dtype, dim):
    """Liger-Kernel's test_amp setting: 16-bit uniform hidden states, float32 heads, JSD(0.5)."""
    gen = torch.Generator().manual_seed(42)
    n, vocab = 2 * 4, 3200
    hidden = torch.rand(n, dim, generator=gen).to(dtype).requires_grad_()
    teacher_hidden = torch.rand(n, dim, generator=gen).to(dtype)
    weight = (torch.rand(vocab, dim, generator=gen) / dim).requires_grad_()
    teacher_weight = torch.rand(vocab, dim, generator=gen) / dim
    options = dict(divergence="jsd", beta=0.5)
    with torch.autocast("cpu", dtype=dtype):
        loss = fastkd.kd_loss(hidden, weight, teacher_hidden, teacher_weight, impl="torch", **options)
    assert loss.item() <= math.log(2.0), "JSD(0.5) is at most log 2"
    naive = _naive(kd_loss_reference, hidden, weight, teacher=(teacher_hidden, teacher_weight),
                   dtype=dtype, **options)
    exact_inputs = _exact(hidden, weight)
    exact = kd_loss_reference(*exact_inputs, *_exact(teacher_hidden, teacher_weight), **options)
    _check(loss, naive, exact, [hidden, weight], exact_inputs, f"Liger amp D={dim}")


def test_float32_without_autocast_is_unchanged_by_the_operand_logic():
    # No autocast, float32 everywhere: IEEE float32, the same number as before the operand logic.
    prob = make_problem(9, 16, 101, 4, seed=9)
    args = (prob["hidden"], prob["weight"], prob["teacher_ids"], prob["teacher_logprobs"])
    assert fastkd.api.operand_dtype(torch.device("cpu"), prob["hidden"], prob["weight"]) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        loss = fastkd.topk_kd_loss(*args, impl="torch")
    exact = topk_kd_loss_reference(*args)
    assert rel_error(loss, exact) < 1e-6


# The Triton lane (issue #19: "the Triton interpreter lane for fp16"): the chunked plan with the
# Triton epilogues (what impl="auto" runs on CUDA) and the streaming kernels (impl="triton"), under
# fp16 autocast (the interpreter's bf16 tl.dot is wrong), against the same bar.
@pytest.mark.parametrize("act16,weight16", OPERANDS)
@pytest.mark.parametrize("path", ["chunked-triton", "streaming"])
@pytest.mark.parametrize("online", [False, True], ids=["topk", "online-jsd"])
def test_triton_lane_under_fp16_autocast(monkeypatch, act16, weight16, path, online):
    from fastkd import api

    dtype = torch.float16
    # V=301 odd; N=24 rows split 10/10/4 by the budget below on the chunked path; a quarter ignored.
    prob = make_problem(24, 40, 301, 8, seed=5, ignore_frac=0.25, scale=2.0)
    hidden, weight = _cast(prob["hidden"], dtype, act16), _cast(prob["weight"], dtype, weight16)
    impl = "triton" if path == "streaming" else "torch"
    if path == "chunked-triton":  # the plan's provider for impl="torch" swapped for the Triton one
        monkeypatch.setitem(api._EPILOGUE, "torch", "triton")
        monkeypatch.setattr(fastkd.config, "chunk_bytes", 10 * 301 * 4 * 3)
    if online:
        gen = torch.Generator().manual_seed(6)
        teacher = (torch.randn(24, 48, generator=gen).to(hidden.dtype),
                   (torch.randn(301, 48, generator=gen) * 0.3).to(weight.dtype))
        options = dict(divergence="jsd", beta=0.5, labels=prob["labels"])
        with torch.autocast("cpu", dtype=dtype):
            loss = fastkd.kd_loss(hidden, weight, *teacher, impl=impl, **options)
        naive = _naive(kd_loss_reference, hidden, weight, teacher=teacher, dtype=dtype, **options)
        exact_inputs = _exact(hidden, weight)
        exact = kd_loss_reference(*exact_inputs, *(t.double() for t in teacher), **options)
        assert loss.item() <= math.log(2) + 1e-6  # JSD(0.5) never above log 2
    else:
        options = dict(divergence="reverse_kl", labels=prob["labels"], ce_weight=0.3)
        args = (prob["teacher_ids"], prob["teacher_logprobs"])
        with torch.autocast("cpu", dtype=dtype):
            loss = fastkd.topk_kd_loss(hidden, weight, *args, impl=impl, **options)
        naive = _naive(topk_kd_loss_reference, hidden, weight, *args, dtype=dtype, **options)
        exact_inputs = _exact(hidden, weight)
        exact = topk_kd_loss_reference(*exact_inputs, *args, **options)
    assert loss.dtype == torch.float32
    _check(loss, naive, exact, [hidden, weight], exact_inputs, f"{path} {'online' if online else 'top-k'}")
