"""The chunked plan (fastkd.backends.chunked) end to end on the CPU, per epilogue provider.

``torch`` is the torch epilogue (the CPU path); ``triton`` is the same plan with the Triton epilogue
kernels, run in Triton's CPU interpreter (fp32 buffers; the GEMMs are torch's); ``fused`` is the
fused head (``triton_fused_head``: the logits GEMMs are Triton kernels with the statistics in
their epilogues, here with float32 operands and tiles; the online top-k teacher's forward runs the
Triton epilogues). The csrc provider
runs through the same plan in tests/test_cuda_backend.py (host harness). Every case against the
float64 reference: chunk boundaries that split the rows unevenly (a budget of a few rows), random
``grad_output``, ``reduction="none"`` (the recomputing backward) and the summing reductions
(gradients made in the forward), a frozen head (no dW at all), ignored rows exactly zero.
"""
from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd import api
from fastkd.backends import chunked
from fastkd.reference import kd_loss_reference, topk_kd_loss_reference

from conftest import assert_rel_close, make_problem

# Relative error vs float64 (loss, gradients): both providers compute in float32 buffers.
TOL = {"torch": (2e-6, 2e-5), "triton": (2e-6, 2e-5), "fused": (2e-6, 2e-5)}
V = 203  # odd: rows start at every alignment; not a multiple of any tile


@pytest.fixture(params=["torch", "triton", "fused"])
def epilogue(request, monkeypatch):
    """impl='torch' runs the chunked plan with the chosen provider, in chunks of 7 rows."""
    monkeypatch.setitem(api._EPILOGUE, "torch", request.param)
    blocks = 2 + (chunked.provider(request.param).scratch_blocks("jsd", True) if request.param == "torch" else 0)
    monkeypatch.setattr(fastkd.config, "chunk_bytes", 7 * V * 4 * blocks)
    return request.param


def _grads(loss, tensors, grad_output):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None], grad_output)


def _compare(loss, ref, tensors, exact_tensors, tol, counted):
    gen = torch.Generator().manual_seed(4)
    grad_output = torch.rand(loss.shape, generator=gen) + 0.5  # ≠ 1, per row for "none"
    assert_rel_close(loss, ref, tol[0], "loss")
    got = _grads(loss, tensors, grad_output)
    want = _grads(ref, exact_tensors, grad_output.double())
    for g, w, name in zip(got, want, ("hidden", "weight", "bias")):
        assert_rel_close(g, w, tol[1], f"d{name}")
    assert (got[0][~counted] == 0).all(), "ignored rows must get exactly zero gradient"


@pytest.mark.parametrize("case", [  # divergence, beta, tail, temperature, softcap, ce_weight
    ("reverse_kl", 0.5, "bucket", 1.0, None, 0.0),   # the fast torch path
    ("jsd", 0.3, "bucket", 1.5, None, 0.4),          # CE at τ ≠ 1: the general torch path
    ("forward_kl", 0.5, "renormalize", 0.8, 20.0, 0.2),  # softcap, renormalised with a V pass
], ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_topk_plan_matches_reference(epilogue, case, reduction):
    divergence, beta, tail, temperature, softcap, ce_weight = case
    # N=23: chunks of 7, 7, 7 and 2 rows.
    prob = make_problem(23, 19, V, 5, seed=3, with_bias=True, ragged=True, ignore_frac=0.25, scale=2.0)
    options = dict(divergence=divergence, beta=beta, tail=tail, temperature=temperature,
                   softcap=softcap, labels=prob["labels"], ce_weight=ce_weight, reduction=reduction,
                   bias=prob["bias"])
    args = (prob["teacher_ids"], prob["teacher_logprobs"])
    loss = fastkd.topk_kd_loss(prob["hidden"], prob["weight"], *args, impl="torch", **options)
    exact = [t.detach().double().requires_grad_() for t in (prob["hidden"], prob["weight"], prob["bias"])]
    ref = topk_kd_loss_reference(exact[0], exact[1], *args, **{**options, "bias": exact[2]})
    _compare(loss, ref, (prob["hidden"], prob["weight"], prob["bias"]), exact, TOL[epilogue],
             prob["labels"] != -100)


@pytest.mark.parametrize("divergence,topk,topk_from", [
    ("jsd", None, "teacher"), ("reverse_kl", None, "teacher"), ("forward_kl", None, "teacher"),
    ("reverse_kl", 4, "student"), ("jsd", 3, "union")])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_online_plan_matches_reference(epilogue, divergence, topk, topk_from, reduction):
    prob = make_problem(16, 12, V, 2, seed=5, with_bias=True, ignore_frac=0.2, scale=2.0)
    gen = torch.Generator().manual_seed(6)
    teacher_hidden = torch.randn(16, 9, generator=gen) * 2.0
    teacher_weight = torch.randn(V, 9, generator=gen) / 3.0
    options = dict(divergence=divergence, beta=0.4, topk=topk, topk_from=topk_from, temperature=1.3,
                   labels=prob["labels"], reduction=reduction, teacher_softcap=15.0)
    exact = [t.detach().double().requires_grad_() for t in (prob["hidden"], prob["weight"])]
    loss = fastkd.kd_loss(prob["hidden"], prob["weight"], teacher_hidden, teacher_weight,
                          impl="torch", **options)
    ref = kd_loss_reference(*exact, teacher_hidden.double(), teacher_weight.double(), **options)
    _compare(loss, ref, (prob["hidden"], prob["weight"]), exact, TOL[epilogue], prob["labels"] != -100)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_head_makes_no_weight_gradient(epilogue, reduction, monkeypatch):
    prob = make_problem(15, 8, V, 4, seed=8, ignore_frac=0.2)
    weight = prob["weight"].detach()  # a LoRA student: the head is frozen
    added = []
    original = chunked._Head.add_grad_weight
    monkeypatch.setattr(chunked._Head, "add_grad_weight",
                        lambda self, *a, **k: added.append(1) or original(self, *a, **k))
    loss = fastkd.topk_kd_loss(prob["hidden"], weight, prob["teacher_ids"], prob["teacher_logprobs"],
                               labels=prob["labels"], impl="torch", reduction=reduction)
    (grad_hidden,) = torch.autograd.grad(loss.sum(), [prob["hidden"]])
    assert not added, "a frozen head must cost no dW GEMM"
    exact = prob["hidden"].detach().double().requires_grad_()
    ref = topk_kd_loss_reference(exact, weight.double(), prob["teacher_ids"], prob["teacher_logprobs"],
                                 labels=prob["labels"], reduction=reduction)
    assert_rel_close(grad_hidden, torch.autograd.grad(ref.sum(), [exact])[0], TOL[epilogue][1], "dh")


def test_chunk_ops_pass_opcheck():
    prob = make_problem(9, 6, 37, 3, seed=10, with_bias=True, ignore_frac=0.2)
    topk_args = (prob["hidden"], prob["weight"], prob["bias"], prob["teacher_ids"], prob["teacher_logprobs"],
                 None, None, None, prob["labels"], "jsd", 0.5, "bucket", 1.3, 5.0, None, 0, "teacher",
                 -100, 0.2, 1.0, 4 * 37 * 4 * 3, True)
    for grads_in_forward in (True, False):
        torch.library.opcheck(chunked.topk_forward,
                              topk_args + (grads_in_forward, True, "torch", torch.float32))
    gen = torch.Generator().manual_seed(11)
    dense_args = (prob["hidden"], prob["weight"], None, torch.randn(9, 5, generator=gen),
                  torch.randn(37, 5, generator=gen), None, prob["labels"], "reverse_kl", 0.5, 1.0,
                  None, None, -100, 0.0, 1.0, 4 * 37 * 4 * 5, False)
    torch.library.opcheck(chunked.dense_forward, dense_args + (True, False, "torch", torch.bfloat16))


def test_operand_dtype_is_decided_once_at_the_api():
    cpu = torch.device("cpu")
    f32, bf16, f16 = torch.ones(2, dtype=torch.float32), torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float16)
    assert api.operand_dtype(cpu, f32, f32) == torch.float32
    assert api.operand_dtype(cpu, bf16, f32) == torch.bfloat16  # 16-bit activations, fp32 master weights
    assert api.operand_dtype(cpu, f32.double(), f32.double()) == torch.float64
    with torch.autocast("cpu", dtype=torch.float16):
        assert api.operand_dtype(cpu, f32, f32) == torch.float16
        assert api.operand_dtype(cpu, f16, f32) == torch.float16


def test_auto_on_cuda_needs_mm_out_dtype(monkeypatch):
    # The chunked plan's tensor-core GEMMs need torch.mm(..., out_dtype=); on a torch without it,
    # "auto" on CUDA takes the streaming kernels instead of failing at the first GEMM.
    from fastkd import api

    assert api._mm_has_out_dtype()  # this torch has it (probed on meta tensors)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert api.resolve_impl("auto", torch.device("cuda"), torch.bfloat16) == "chunked"
    monkeypatch.setattr(api, "_mm_has_out_dtype", lambda: False)
    assert api.resolve_impl("auto", torch.device("cuda"), torch.bfloat16) == "triton"
    assert api.resolve_impl("auto", torch.device("cpu"), torch.bfloat16) == "torch"


def test_torch_epilogue_scratch_follows_the_divergence(monkeypatch):
    """The torch provider's chunk x V scratch blocks, which the plan counts against the budget:
    reverse KL needs its p block only for the statistics (E_p[z]), and then allocates it."""
    from fastkd.backends.torch_epilogue import TorchEpilogue

    blocks = TorchEpilogue.scratch_blocks
    assert [blocks(None, False), blocks("reverse_kl", False, False), blocks("reverse_kl", False, True),
            blocks("forward_kl", False), blocks("jsd", False)] == [0, 0, 1, 2, 3]
    assert [blocks(None, True), blocks("reverse_kl", True, True), blocks("jsd", True)] == [2, 2, 5]
    made = []
    real = TorchEpilogue._buffer
    monkeypatch.setattr(TorchEpilogue, "_buffer", lambda self, slot, like: made.append(slot) or real(self, slot, like))
    p = make_problem(12, 6, V, 4, seed=3, dtype=torch.float64)
    teacher_hidden = torch.randn(12, 5, dtype=torch.float64)
    teacher_weight = torch.randn(V, 5, dtype=torch.float64)
    for stats in (False, True):
        made.clear()
        fastkd.kd_loss(p["hidden"], p["weight"], teacher_hidden, teacher_weight, divergence="reverse_kl",
                       impl="torch", return_stats=stats)
        assert made == (["p"] if stats else []), (stats, made)
