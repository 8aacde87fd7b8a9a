"""The math module (DESIGN.md §1) on its own, in float64, against first principles."""
from __future__ import annotations

import decimal
import math

import pytest
import torch

from fastkd import divergences as dv

DIVS = ["forward_kl", "reverse_kl", "jsd"]


def _random_logprobs(rows, cols, seed, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(rows, cols, generator=gen, dtype=torch.float64) * scale, dim=-1)


def _log1mexp_exact(x: float) -> float:
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        return float((1 - decimal.Decimal(x).exp()).ln())


def test_log1mexp_is_accurate_on_both_branches():
    # float32 stops at -80: below it exp(x) is subnormal in float32 and loses digits by itself.
    for dtype, lowest, tol in ((torch.float64, 2.0, 1e-14), (torch.float32, math.log10(80), 2e-6)):
        x = (-torch.logspace(-12, lowest, 400, dtype=torch.float64)).to(dtype)
        exact = torch.tensor([_log1mexp_exact(v) for v in x.tolist()], dtype=torch.float64)
        rel = ((dv.log1mexp(x).double() - exact).abs() / exact.abs()).max().item()
        assert rel < tol, (dtype, rel)


def test_tail_logmass_paths_and_floor():
    lse_all = torch.tensor([3.0, 3.0, 3.0, 3.0], dtype=torch.float64)
    lse_topk = torch.tensor([3.0 + math.log(0.25), 3.0 + math.log(1 - 1e-12), 3.0, 3.0 + 1e-9], dtype=torch.float64)
    # From log1mexp(lse_S − lse_all) alone: a rounded lse_S ≥ lse_all lands on the floor, finite.
    tail, at_floor = dv.tail_logmass(lse_topk, lse_all)
    assert tail[0].item() == pytest.approx(math.log(0.75), rel=1e-14)
    assert tail[1].item() == pytest.approx(math.log(1e-12), rel=1e-3)
    assert tail[2].item() == tail[3].item() == pytest.approx(dv.LOG_STUDENT_TAIL_FLOOR, rel=1e-9)
    assert at_floor.tolist() == [False, False, True, True]
    # With the tail's own log-sum-exp, a tiny tail is exact (here 1e-20, far below 1 − Σ_S resolution).
    tail_lse = torch.tensor([3.0 + math.log(0.75), 3.0 + math.log(1e-20), -math.inf, 3.0 - 60.0], dtype=torch.float64)
    tail, at_floor = dv.tail_logmass(lse_topk, lse_all, tail_lse)
    assert tail[0].item() == pytest.approx(math.log(0.75), rel=1e-14)
    assert tail[1].item() == pytest.approx(math.log(1e-20), rel=1e-12)
    assert tail[2].item() == pytest.approx(dv.LOG_STUDENT_TAIL_FLOOR, rel=1e-12) and at_floor[2]
    assert tail[3].item() == pytest.approx(-60.0, rel=1e-12) and not at_floor[3]


def test_teacher_topk_masses_rescaled_within_slack():
    # Top-k masses summing to 1.01 (rounded log-probs from a server): rescaled to leave the floor.
    logprobs = torch.log(torch.tensor([[0.6, 0.41, 0.0]], dtype=torch.float64))
    valid = torch.tensor([[True, True, False]])
    log_topk, log_tail = dv.teacher_topk_logmasses(torch.where(valid, logprobs, 0.0), valid)
    total = torch.where(valid, log_topk.exp(), 0.0).sum() + log_tail.exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-15)
    assert log_tail.exp().item() == pytest.approx(dv.TEACHER_TAIL_FLOOR, rel=1e-9)
    assert (log_topk[0, 0] - log_topk[0, 1]).item() == pytest.approx(math.log(0.6 / 0.41), rel=1e-14)
    # Masses that leave a real tail are used as given.
    fine = torch.log(torch.tensor([[0.5, 0.2]], dtype=torch.float64))
    log_topk, log_tail = dv.teacher_topk_logmasses(fine, None)
    torch.testing.assert_close(log_topk, fine, rtol=0, atol=0)
    assert log_tail.exp().item() == pytest.approx(0.3, rel=1e-14)


@pytest.mark.parametrize("kind", DIVS)
def test_divergence_values_from_first_principles(kind):
    log_p, log_q = _random_logprobs(5, 11, 1), _random_logprobs(5, 11, 2)
    p, q = log_p.exp(), log_q.exp()
    beta = 0.3
    if kind == "forward_kl":
        expected = (q * (q / p).log()).sum(-1)
    elif kind == "reverse_kl":
        expected = (p * (p / q).log()).sum(-1)
    else:
        m = beta * q + (1 - beta) * p
        expected = beta * (q * (q / m).log()).sum(-1) + (1 - beta) * (p * (p / m).log()).sum(-1)
    torch.testing.assert_close(dv.divergence(log_p, log_q, None, kind, beta), expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.05)])
def test_gradient_formula_equals_autograd(kind, beta):
    # ∂L/∂z_j = p_j·(G_j − Ḡ) = w_j − p_j·W for singleton buckets (DESIGN.md §1).
    gen = torch.Generator().manual_seed(3)
    z = (torch.randn(4, 13, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    log_q = _random_logprobs(4, 13, 4)
    log_p = torch.log_softmax(z, dim=-1)
    (grad,) = torch.autograd.grad(dv.divergence(log_p, log_q, None, kind, beta).sum(), z)
    w = dv.bucket_weights(log_p.detach(), log_q, None, kind, beta)
    formula = w - log_p.detach().exp() * w.sum(-1, keepdim=True)
    torch.testing.assert_close(formula, grad, rtol=1e-12, atol=1e-14)


def test_bucket_gradient_formula_with_a_tail_equals_autograd():
    # Top-k with a tail: dz = (G_T − Ḡ)·p + Σ_{j∈S} p_j (G_j − G_T) e_j.
    gen = torch.Generator().manual_seed(5)
    z = (torch.randn(3, 17, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    ids = torch.stack([torch.randperm(17, generator=gen)[:4] for _ in range(3)])
    valid = torch.ones_like(ids, dtype=torch.bool)
    teacher_lp = _random_logprobs(3, 17, 6).gather(1, ids)
    for kind in DIVS:
        lse = torch.logsumexp(z, -1)
        log_p, log_q, vb, _, _ = dv.topk_bucket_logmasses(z.gather(1, ids), lse, teacher_lp, valid, "bucket")
        (grad,) = torch.autograd.grad(dv.divergence(log_p, log_q, vb, kind, 0.4).sum(), z)
        w = dv.bucket_weights(log_p.detach(), log_q, vb, kind, 0.4)
        p = torch.softmax(z.detach(), -1)
        g_tail = w[:, -1] / log_p[:, -1].detach().exp()
        dz = p * (g_tail - w.sum(-1)).unsqueeze(1)
        dz.scatter_add_(1, ids, w[:, :-1] - p.gather(1, ids) * g_tail.unsqueeze(1))
        torch.testing.assert_close(dz, grad, rtol=1e-12, atol=1e-14)


def test_jsd_limits():
    log_p, log_q = _random_logprobs(6, 9, 7), _random_logprobs(6, 9, 8)
    fkl = dv.divergence(log_p, log_q, None, "forward_kl")
    rkl = dv.divergence(log_p, log_q, None, "reverse_kl")
    # β=0 and β=1 are forward and reverse KL exactly (GKD/TRL), not the literal formula's 0 ...
    assert torch.equal(dv.divergence(log_p, log_q, None, "jsd", 0.0), fkl)
    assert torch.equal(dv.divergence(log_p, log_q, None, "jsd", 1.0), rkl)
    # ... and the formula approaches them as JSD(β)/β → KL(Q‖P), JSD(β)/(1−β) → KL(P‖Q).
    eps = 1e-6
    torch.testing.assert_close(dv.divergence(log_p, log_q, None, "jsd", eps) / eps, fkl, rtol=1e-4, atol=0)
    torch.testing.assert_close(dv.divergence(log_p, log_q, None, "jsd", 1 - eps) / eps, rkl, rtol=1e-4, atol=0)


def test_invalid_buckets_contribute_nothing_and_stay_finite():
    log_p, log_q = _random_logprobs(2, 5, 9), _random_logprobs(2, 5, 10)
    valid = torch.tensor([[True, True, False, True, False], [False] * 5])
    poisoned_p = torch.where(valid, log_p, float("nan")).requires_grad_()
    for kind in DIVS:
        value = dv.divergence(poisoned_p, torch.where(valid, log_q, float("-inf")), valid, kind)
        assert torch.isfinite(value).all() and value[1].item() == 0.0
        (grad,) = torch.autograd.grad(value.sum(), poisoned_p)
        assert torch.isfinite(grad).all() and (grad[~valid] == 0).all()


def test_select_topk_modes():
    student = torch.tensor([[5.0, 4.0, 0.0, 1.0, 3.0]])
    teacher = torch.tensor([[0.0, 9.0, 8.0, 1.0, 2.0]])
    assert set(dv.select_topk(student, teacher, 2, "teacher")[0].tolist()) == {1, 2}
    assert set(dv.select_topk(student, teacher, 2, "student")[0].tolist()) == {0, 1}
    union = dv.select_topk(student, teacher, 2, "union")[0].tolist()
    assert sorted(union) == [-1, 0, 1, 2]
