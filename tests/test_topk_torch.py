"""``fastkd.topk_kd_loss(impl="torch")`` against the exact float64 reference (DESIGN.md §6)."""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import fastkd
from fastkd.reference import topk_kd_loss_reference
from conftest import assert_rel_close, make_problem, rel_error

# Relative error allowed per input dtype. fastkd computes in float32 whatever the input dtype, so
# the loss is as good as float32; gradients come back in the input dtype and carry its rounding.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

# N=37 rows (not a multiple of any chunk), D=19 (not a power of two), V=203 (prime), K=7.
N, D, V, K = 37, 19, 203, 7
# A budget of 4 rows per chunk for the 3 float32 blocks of V=203: exercises chunk boundaries.
SMALL_CHUNK_BYTES = 4 * 3 * V * 4


@pytest.fixture(params=["one chunk", "many chunks"])
def chunking(request, monkeypatch):
    if request.param == "many chunks":
        monkeypatch.setattr(fastkd.config, "chunk_bytes", SMALL_CHUNK_BYTES)
    return request.param


def _run(problem, impl, **options):
    grad_inputs = [problem["hidden"], problem["weight"]] + ([problem["bias"]] if problem["bias"] is not None else [])
    fn = fastkd.topk_kd_loss if impl == "fastkd" else topk_kd_loss_reference
    loss = fn(problem["hidden"], problem["weight"], problem["teacher_ids"], problem["teacher_logprobs"],
              bias=problem["bias"], **options)
    if loss.dim() == 0:
        grads = torch.autograd.grad(loss, grad_inputs)
    else:
        gen = torch.Generator().manual_seed(1)
        grad_out = torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype)
        grads = torch.autograd.grad(loss, grad_inputs, grad_out)
    return loss, grads


def _check_against_reference(problem, tol, **options):
    loss, grads = _run(problem, "fastkd", **options)
    ref_loss, ref_grads = _run(problem, "reference", **options)
    assert loss.dtype == (torch.float64 if problem["hidden"].dtype == torch.float64 else torch.float32)
    assert_rel_close(loss, ref_loss, tol, "loss")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == problem[name].dtype
        assert_rel_close(g, r, tol, f"grad {name}")
    return loss, grads


MATRIX = list(itertools.product(
    [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1)],
    ["bucket", "renormalize"],
    [1.0, 2.5],          # temperature
    [None, 3.0],         # softcap
    [0.0, 0.3],          # fraction of ignored rows
))


@pytest.mark.parametrize("div_beta,tail,temperature,softcap,ignore_frac", MATRIX)
def test_matches_reference(div_beta, tail, temperature, softcap, ignore_frac, chunking):
    divergence, beta = div_beta
    problem = make_problem(N, D, V, K, with_bias=True, ragged=True, ignore_frac=ignore_frac,
                           seed=zlib.crc32(repr((div_beta, tail, temperature, softcap)).encode()))
    _check_against_reference(
        problem, TOLERANCE[torch.float32], divergence=divergence, beta=beta, tail=tail,
        temperature=temperature, softcap=softcap, labels=problem["labels"])


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ce_mixing_and_reductions(divergence, tail, reduction, chunking):
    # reduction="none" is differentiated with a random grad_output, not ones.
    problem = make_problem(N, D, V, K, with_bias=True, ignore_frac=0.25, seed=3)
    _check_against_reference(
        problem, TOLERANCE[torch.float32], divergence=divergence, tail=tail, temperature=1.7,
        softcap=4.0, labels=problem["labels"], ce_weight=0.6, kd_weight=0.8, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_input_dtypes(dtype, tail):
    problem = make_problem(N, D, V, K, dtype=dtype, with_bias=True, ignore_frac=0.2, seed=5)
    options = dict(divergence="jsd", tail=tail, temperature=1.5, softcap=5.0,
                   labels=problem["labels"], ce_weight=0.3)
    loss, grads = _run(problem, "fastkd", **options)
    # The reference runs on float64 copies of the (already rounded) inputs, so its gradients are
    # not rounded to the input dtype: fastkd may lose at most twice that rounding, plus the table.
    exact = {**problem, **{k: problem[k].detach().double().requires_grad_() for k in ("hidden", "weight", "bias")}}
    ref_loss, ref_grads = _run(exact, "reference", **options)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_rel_close(loss, ref_loss, TOLERANCE[torch.float32] if dtype != torch.float64 else TOLERANCE[dtype], "loss")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == dtype
        rounding = rel_error(r.to(dtype), r)
        assert_rel_close(g, r, 2 * rounding + TOLERANCE[torch.float64 if dtype == torch.float64 else torch.float32],
                         f"grad {name}")


@pytest.mark.parametrize("n,d,v,k", [
    (1, 5, 11, 1),      # a single row, K=1
    (2, 1, 3, 2),       # D=1, K=V-1
    (9, 33, 64, 64),    # K=V: the tail holds nothing but the floor
    (5, 8, 1000, 3),    # wide vocabulary, narrow K
])
def test_odd_shapes(n, d, v, k):
    problem = make_problem(n, d, v, k, with_bias=True, seed=7)
    for tail in ("bucket", "renormalize"):
        _check_against_reference(problem, TOLERANCE[torch.float32], tail=tail, temperature=0.7)


def test_leading_dimensions_are_flattened():
    problem = make_problem(2 * 3 * 5, D, V, K, seed=11, ignore_frac=0.2)
    flat = fastkd.topk_kd_loss(problem["hidden"], problem["weight"], problem["teacher_ids"],
                               problem["teacher_logprobs"], labels=problem["labels"], reduction="none")
    shaped = fastkd.topk_kd_loss(problem["hidden"].reshape(2, 3, 5, D), problem["weight"],
                                 problem["teacher_ids"].reshape(2, 3, 5, K),
                                 problem["teacher_logprobs"].reshape(2, 3, 5, K),
                                 labels=problem["labels"].reshape(2, 3, 5), reduction="none")
    assert shaped.shape == (30,)
    torch.testing.assert_close(shaped, flat, rtol=0, atol=0)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_ignored_rows_get_exactly_zero(tail, ce_weight):
    problem = make_problem(N, D, V, K, with_bias=True, ignore_frac=0.4, seed=13)
    ignored = problem["labels"] == -100
    # Junk teacher data on ignored rows (padding): repeated ids and impossible log-probs.
    ids = torch.where(ignored.unsqueeze(1), 0, problem["teacher_ids"])
    logprobs = torch.where(ignored.unsqueeze(1), float("nan"), problem["teacher_logprobs"])
    loss = fastkd.topk_kd_loss(problem["hidden"], problem["weight"], ids, logprobs, tail=tail,
                               labels=problem["labels"], ce_weight=ce_weight, bias=problem["bias"],
                               reduction="none")
    grad_out = torch.randn(loss.shape, generator=torch.Generator().manual_seed(0))
    grad_hidden, grad_weight, grad_bias = torch.autograd.grad(
        loss, [problem["hidden"], problem["weight"], problem["bias"]], grad_out)
    assert ignored.any() and (~ignored).any()
    assert (loss[ignored] == 0).all()
    assert (grad_hidden[ignored] == 0).all()
    assert (loss[~ignored] != 0).all() and (grad_hidden[~ignored] != 0).any(dim=1).all()
    # Ignored rows add nothing to the weight and bias gradients: the same as without those rows.
    kept = ~ignored
    kept_loss = fastkd.topk_kd_loss(problem["hidden"][kept], problem["weight"], ids[kept], logprobs[kept],
                                    tail=tail, labels=problem["labels"][kept], ce_weight=ce_weight,
                                    bias=problem["bias"], reduction="none")
    kept_weight, kept_bias = torch.autograd.grad(kept_loss, [problem["weight"], problem["bias"]], grad_out[kept])
    torch.testing.assert_close(grad_weight, kept_weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_bias, kept_bias, rtol=1e-6, atol=1e-7)


def test_every_row_ignored_is_zero_not_nan():
    problem = make_problem(6, D, V, K, seed=17)
    labels = torch.full((6,), -100)
    loss = fastkd.topk_kd_loss(problem["hidden"], problem["weight"], problem["teacher_ids"],
                               problem["teacher_logprobs"], labels=labels, ce_weight=1.0)
    grad_hidden, grad_weight = torch.autograd.grad(loss, [problem["hidden"], problem["weight"]])
    assert loss.item() == 0.0
    assert (grad_hidden == 0).all() and (grad_weight == 0).all()


def test_empty_batch():
    problem = make_problem(0, D, V, K, seed=19)
    loss = fastkd.topk_kd_loss(problem["hidden"], problem["weight"], problem["teacher_ids"],
                               problem["teacher_logprobs"])
    assert loss.item() == 0.0
    (grad_weight,) = torch.autograd.grad(loss, problem["weight"])
    assert (grad_weight == 0).all()


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_gradcheck_float64(tail, divergence):
    # Finite differences of the loss itself: checks the hand-written backward without the reference.
    problem = make_problem(4, 3, 9, 3, dtype=torch.float64, with_bias=True, ragged=True, seed=23)
    labels = torch.tensor([1, -100, 4, 8])

    def loss(hidden, weight, bias):
        return fastkd.topk_kd_loss(hidden, weight, problem["teacher_ids"],
                                   problem["teacher_logprobs"].double(), divergence=divergence,
                                   tail=tail, temperature=1.3, softcap=2.0, labels=labels,
                                   ce_weight=0.4, bias=bias, reduction="none")

    assert torch.autograd.gradcheck(loss, (problem["hidden"], problem["weight"], problem["bias"]))


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_stats_match_reference(tail):
    problem = make_problem(N, D, V, K, ragged=True, ignore_frac=0.3, seed=29)
    options = dict(tail=tail, temperature=1.4, softcap=6.0, labels=problem["labels"], return_stats=True)
    _, stats = fastkd.topk_kd_loss(problem["hidden"], problem["weight"], problem["teacher_ids"],
                                   problem["teacher_logprobs"], **options)
    _, ref = topk_kd_loss_reference(problem["hidden"], problem["weight"], problem["teacher_ids"],
                                    problem["teacher_logprobs"], **options)
    for name in ("kd", "entropy", "lse", "topk_mass"):
        value = getattr(stats, name)
        assert value.shape == (N,) and value.dtype == torch.float32 and not value.requires_grad
        assert_rel_close(value, getattr(ref, name), TOLERANCE[torch.float32], f"stats.{name}")
    assert ((stats.topk_mass > 0) & (stats.topk_mass < 1))[problem["labels"] != -100].all()


def test_temperature_scales_kd_by_tau_squared():
    # The KD term is multiplied by τ² so that its gradient scale does not depend on τ (Hinton).
    problem = make_problem(N, D, V, K, seed=31)
    args = (problem["hidden"], problem["weight"], problem["teacher_ids"], problem["teacher_logprobs"])
    loss, stats = fastkd.topk_kd_loss(*args, temperature=3.0, return_stats=True)
    torch.testing.assert_close(loss, 9.0 * stats.kd.mean(), rtol=1e-6, atol=0)


def test_module_wrapper_equals_function():
    problem = make_problem(N, D, V, K, with_bias=True, ignore_frac=0.2, seed=37)
    options = dict(divergence="jsd", beta=0.3, tail="renormalize", temperature=2.0, ce_weight=0.5)
    module = fastkd.TopKKDLoss(**options)
    out = module(problem["hidden"], problem["weight"], problem["teacher_ids"], problem["teacher_logprobs"],
                 labels=problem["labels"], bias=problem["bias"])
    ref = fastkd.topk_kd_loss(problem["hidden"], problem["weight"], problem["teacher_ids"],
                              problem["teacher_logprobs"], labels=problem["labels"], bias=problem["bias"],
                              **options)
    assert out.item() == ref.item()
    assert "divergence='jsd'" in repr(module)


def test_teacher_inputs_get_no_gradient():
    problem = make_problem(N, D, V, K, seed=41)
    logprobs = problem["teacher_logprobs"].clone().requires_grad_()
    loss = fastkd.topk_kd_loss(problem["hidden"], problem["weight"], problem["teacher_ids"], logprobs)
    loss.backward()
    assert logprobs.grad is None and problem["hidden"].grad is not None


def test_opcheck_topk_ops():
    problem = make_problem(6, 5, 17, 3, with_bias=True, ignore_frac=0.3, seed=43)
    ids = torch.where((problem["labels"] != -100).unsqueeze(1), problem["teacher_ids"], -1)
    for tail, ce_weight, with_stats in [("bucket", 0.5, True), ("renormalize", 0.0, False)]:
        log_tail = torch.full((6,), -2.0) if tail == "bucket" else None
        args = (problem["hidden"], problem["weight"], problem["bias"], ids,
                problem["teacher_logprobs"], log_tail, problem["labels"], "jsd", 0.5, tail, 1.5, 3.0,
                -100, ce_weight, 1.0, 1 << 20, with_stats)
        torch.library.opcheck(torch.ops.fastkd.topk_kd_forward.default, args)


def test_torch_compile_traces_through():
    problem = make_problem(8, 6, 21, 4, with_bias=True, ignore_frac=0.25, seed=47)

    def loss_fn(hidden, weight, bias):
        return fastkd.topk_kd_loss(hidden, weight, problem["teacher_ids"], problem["teacher_logprobs"],
                                   labels=problem["labels"], ce_weight=0.5, bias=bias)

    inputs = (problem["hidden"], problem["weight"], problem["bias"])
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    eager = loss_fn(*inputs)
    eager_grads = torch.autograd.grad(eager, inputs)
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


# float32: the KL of nearby distributions (0.0096 at g=1) is a sum of O(0.3) terms: ~1e-7 absolute.
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 5e-5)])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("sharpness", [1.0, 20.0, 30.0])
def test_confident_student_against_first_principles(divergence, sharpness, dtype, tol):
    # Student logits [g, g, 0, 0] (weight = identity), S = {0, 1}, teacher masses 0.4 and 0.3 and
    # a 0.3 tail. At g=30 the student's tail mass is 1e-13: the loss must keep growing with g and
    # push mass back into the tail. Truth: explicit bucket sums in float64, gradients by autograd.
    hidden = torch.tensor([[sharpness, sharpness, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([0.4, 0.3, 0.3], dtype=torch.float64)
    p_full = torch.softmax(hidden, dim=-1)
    p = torch.stack([p_full[0, 0], p_full[0, 1], p_full[0, 2] + p_full[0, 3]])
    if divergence == "forward_kl":
        truth = (q * (q.log() - p.log())).sum()
    elif divergence == "reverse_kl":
        truth = (p * (p.log() - q.log())).sum()
    else:
        m = 0.5 * p + 0.5 * q
        truth = 0.5 * (q * (q.log() - m.log())).sum() + 0.5 * (p * (p.log() - m.log())).sum()
    (truth_grad,) = torch.autograd.grad(truth, hidden)

    h = hidden.detach().to(dtype).requires_grad_()
    loss = fastkd.topk_kd_loss(h, torch.eye(4, dtype=dtype), torch.tensor([[0, 1]]),
                               q[:2].log().unsqueeze(0).to(dtype), divergence=divergence)
    (grad,) = torch.autograd.grad(loss, h)
    assert_rel_close(loss, truth, tol, "loss")
    assert_rel_close(grad, truth_grad, tol, "grad hidden")
