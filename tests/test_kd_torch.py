"""``fastkd.kd_loss(impl="torch")``: online teacher, full vocabulary and top-k with topk_from."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.reference import kd_loss_reference
from conftest import assert_rel_close

TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1.5e-2}
# N=29 rows, student D=13, teacher D_t=22 (a teacher wider than the student), V=157 (prime).
N, D, DT, V = 29, 13, 22, 157
SMALL_CHUNK_BYTES = 3 * 7 * V * 4  # 3 rows per chunk on the dense path (7 blocks of V floats)


def _problem(seed, dtype=torch.float32, ignore_frac=0.3, n=N, teacher_dim=DT):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, D, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=gen) / D**0.5).to(dtype).requires_grad_()
    bias = (torch.randn(V, generator=gen) * 0.3).to(dtype).requires_grad_()
    teacher_hidden = torch.randn(n, teacher_dim, generator=gen).to(dtype)
    teacher_weight = (torch.randn(V, teacher_dim, generator=gen) * 1.5 / teacher_dim**0.5).to(dtype)
    teacher_bias = (torch.randn(V, generator=gen) * 0.3).to(dtype)
    labels = torch.randint(0, V, (n,), generator=gen)
    labels = torch.where(torch.rand(n, generator=gen) < ignore_frac, -100, labels)
    return dict(hidden=hidden, weight=weight, bias=bias, teacher_hidden=teacher_hidden,
                teacher_weight=teacher_weight, teacher_bias=teacher_bias, labels=labels)


def _loss_and_grads(fn, p, grad_seed=1, **options):
    loss = fn(p["hidden"], p["weight"], p["teacher_hidden"], p["teacher_weight"], bias=p["bias"],
              teacher_bias=p["teacher_bias"], labels=p["labels"], **options)
    gen = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype)
    return loss, torch.autograd.grad(loss, [p["hidden"], p["weight"], p["bias"]], grad_out)


def _check(p, tol, **options):
    loss, grads = _loss_and_grads(fastkd.kd_loss, p, **options)
    ref_loss, ref_grads = _loss_and_grads(kd_loss_reference, p, **options)
    assert_rel_close(loss, ref_loss, tol, "loss")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert_rel_close(g, r, tol, f"grad {name}")


@pytest.fixture(params=["one chunk", "many chunks"])
def chunking(request, monkeypatch):
    if request.param == "many chunks":
        monkeypatch.setattr(fastkd.config, "chunk_bytes", SMALL_CHUNK_BYTES)
    return request.param


def _plain_kd(p, divergence, beta, temperature, softcap, teacher_softcap, ce_weight):
    """Full-vocabulary KD the way it is usually written: full logits, log_softmax, F.kl_div."""
    logits = p["hidden"].double() @ p["weight"].double().T + p["bias"].double()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    teacher = p["teacher_hidden"].double() @ p["teacher_weight"].double().T + p["teacher_bias"].double()
    if teacher_softcap:
        teacher = teacher_softcap * torch.tanh(teacher / teacher_softcap)
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    log_q = torch.log_softmax(teacher / temperature, dim=-1)
    forward = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)   # KL(q‖p)
    reverse = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)   # KL(p‖q)
    if divergence == "forward_kl":
        kd = forward
    elif divergence == "reverse_kl":
        kd = reverse
    else:
        log_m = torch.log(beta * log_q.exp() + (1 - beta) * log_p.exp())
        kd = (beta * F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1)
              + (1 - beta) * F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1))
    counted = p["labels"] != -100
    ce = F.cross_entropy(logits, p["labels"], ignore_index=-100, reduction="none")
    rows = torch.where(counted, temperature**2 * kd + ce_weight * ce, 0.0)
    return rows.sum() / counted.sum()


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.9)])
@pytest.mark.parametrize("temperature,softcap,teacher_softcap,ce_weight",
                         [(1.0, None, None, 0.0), (2.0, 4.0, 7.0, 0.5)])
def test_dense_against_plain_log_softmax(divergence, beta, temperature, softcap, teacher_softcap,
                                         ce_weight, chunking):
    p = _problem(seed=2)
    options = dict(divergence=divergence, beta=beta, temperature=temperature, softcap=softcap,
                   teacher_softcap=teacher_softcap, ce_weight=ce_weight)
    loss = fastkd.kd_loss(p["hidden"], p["weight"], p["teacher_hidden"], p["teacher_weight"],
                          bias=p["bias"], teacher_bias=p["teacher_bias"], labels=p["labels"], **options)
    plain = _plain_kd(p, divergence, beta, temperature, softcap, teacher_softcap, ce_weight)
    grads = torch.autograd.grad(loss, [p["hidden"], p["weight"], p["bias"]])
    plain_grads = torch.autograd.grad(plain, [p["hidden"], p["weight"], p["bias"]])
    assert_rel_close(loss, plain, TOLERANCE[torch.float32], "loss vs plain log_softmax")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, plain_grads):
        assert_rel_close(g, r, TOLERANCE[torch.float32], f"grad {name} vs plain log_softmax")


DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
# Full vocabulary (topk_from and tail do not apply), then K=1 and K=9 with every set and tail mode.
CASES = [(d, None, "teacher", "bucket") for d in DIVERGENCES] + list(itertools.product(
    DIVERGENCES, [1, 9], ["teacher", "student", "union"], ["bucket", "renormalize"]))


@pytest.mark.parametrize("divergence,topk,topk_from,tail", CASES)
def test_matches_reference(divergence, topk, topk_from, tail, chunking):
    p = _problem(seed=5)
    _check(p, TOLERANCE[torch.float32], divergence=divergence, topk=topk, topk_from=topk_from,
           tail=tail, temperature=1.6, softcap=5.0, teacher_softcap=8.0, ce_weight=0.2,
           reduction="none")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("topk", [None, 6])
def test_input_dtypes(dtype, topk):
    _check(_problem(seed=7, dtype=dtype), TOLERANCE[dtype], divergence="jsd", topk=topk,
           topk_from="union", temperature=1.2)


def test_full_vocabulary_topk_equals_dense():
    # topk=V with the tail bucket is the full-vocabulary divergence (an empty tail, at its 1e-30 floor).
    p = _problem(seed=11, ignore_frac=0.0)
    dense = fastkd.kd_loss(p["hidden"], p["weight"], p["teacher_hidden"], p["teacher_weight"])
    full_topk = fastkd.kd_loss(p["hidden"], p["weight"], p["teacher_hidden"], p["teacher_weight"],
                               topk=V, tail="bucket")
    torch.testing.assert_close(full_topk, dense, rtol=1e-5, atol=1e-6)


def test_union_set_has_no_duplicates_and_covers_both():
    p = _problem(seed=13, ignore_frac=0.0)
    from fastkd.backends.torch_backend import select_topk
    ids, logprobs, log_tail = select_topk(p["hidden"].detach(), p["weight"].detach(), p["bias"].detach(),
                                p["teacher_hidden"], p["teacher_weight"], p["teacher_bias"], 5,
                                "union", 1.0, None, None, 1 << 20)
    student = (p["hidden"] @ p["weight"].T + p["bias"]).topk(5, dim=-1).indices
    teacher_logits = p["teacher_hidden"] @ p["teacher_weight"].T + p["teacher_bias"]
    teacher = teacher_logits.topk(5, dim=-1).indices
    for row in range(N):
        chosen = [i for i in ids[row].tolist() if i >= 0]
        assert len(chosen) == len(set(chosen))
        assert set(chosen) == set(student[row].tolist()) | set(teacher[row].tolist())
    teacher_lp = torch.log_softmax(teacher_logits.double(), dim=-1)
    expected = teacher_lp.gather(1, ids.clamp(min=0))
    torch.testing.assert_close(logprobs, torch.where(ids >= 0, expected, 0.0).float())
    in_set = torch.zeros_like(teacher_lp, dtype=torch.bool).scatter_(1, ids.clamp(min=0), ids >= 0)
    exact_tail = torch.logsumexp(teacher_lp.masked_fill(in_set, float("-inf")), dim=-1)
    torch.testing.assert_close(log_tail, exact_tail.float(), rtol=1e-5, atol=1e-6)


def test_stats():
    p = _problem(seed=17)
    for topk in (None, 4):
        options = dict(topk=topk, temperature=1.5, labels=p["labels"], return_stats=True)
        _, stats = fastkd.kd_loss(p["hidden"], p["weight"], p["teacher_hidden"], p["teacher_weight"], **options)
        _, ref = kd_loss_reference(p["hidden"], p["weight"], p["teacher_hidden"], p["teacher_weight"], **options)
        for name in ("kd", "entropy", "lse"):
            assert_rel_close(getattr(stats, name), getattr(ref, name), TOLERANCE[torch.float32], f"stats.{name}")
        if topk is None:
            assert stats.topk_mass is None
        else:
            assert_rel_close(stats.topk_mass, ref.topk_mass, TOLERANCE[torch.float32], "stats.topk_mass")


@pytest.mark.parametrize("topk", [None, 3])
def test_gradcheck_float64(topk):
    p = _problem(seed=19, dtype=torch.float64, n=4, teacher_dim=5)

    def loss(hidden, weight, bias):
        return fastkd.kd_loss(hidden, weight, p["teacher_hidden"], p["teacher_weight"], bias=bias,
                              divergence="jsd", beta=0.3, topk=topk, topk_from="union",
                              temperature=1.4, softcap=3.0, labels=p["labels"], ce_weight=0.5,
                              reduction="none")

    assert torch.autograd.gradcheck(loss, (p["hidden"], p["weight"], p["bias"]))


def test_teacher_gets_no_gradient_and_module_matches():
    p = _problem(seed=23)
    teacher_weight = p["teacher_weight"].clone().requires_grad_()
    module = fastkd.KDLoss(divergence="forward_kl", topk=5, topk_from="student", ce_weight=0.1)
    loss = module(p["hidden"], p["weight"], p["teacher_hidden"], teacher_weight, labels=p["labels"])
    loss.backward()
    assert teacher_weight.grad is None and p["weight"].grad is not None
    same = fastkd.kd_loss(p["hidden"], p["weight"], p["teacher_hidden"], teacher_weight,
                          divergence="forward_kl", topk=5, topk_from="student", ce_weight=0.1,
                          labels=p["labels"])
    assert loss.item() == same.item()


def test_opcheck_dense_and_select_ops():
    p = _problem(seed=29, n=5, teacher_dim=4)
    dense_args = (p["hidden"], p["weight"], p["bias"], p["teacher_hidden"], p["teacher_weight"],
                  p["teacher_bias"], p["labels"], "jsd", 0.4, 1.5, 3.0, 6.0, -100, 0.5, 1.0, 1 << 20, True)
    torch.library.opcheck(torch.ops.fastkd.dense_kd_forward.default, dense_args)
    select_args = (p["hidden"].detach(), p["weight"].detach(), None, p["teacher_hidden"],
                   p["teacher_weight"], None, 3, "union", 1.0, None, None, 1 << 20)
    torch.library.opcheck(torch.ops.fastkd.select_topk.default, select_args)
