"""Properties of the losses over random problems drawn by hypothesis (DESIGN.md §6)."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkd
from fastkd import divergences as dv
from fastkd.reference import kd_loss_reference, topk_kd_loss_reference

SETTINGS = settings(max_examples=60, deadline=None)
DIVERGENCE = st.sampled_from([("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.8)])


@st.composite
def problems(draw):
    """Student (hidden, weight), a teacher head over the same rows, and sizes that vary freely."""
    n = draw(st.integers(1, 12))
    d = draw(st.integers(1, 9))
    v = draw(st.integers(2, 60))
    k = draw(st.integers(1, v))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0]))
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64)
    teacher_hidden = torch.randn(n, d + 1, generator=gen, dtype=torch.float64) * scale
    teacher_weight = torch.randn(v, d + 1, generator=gen, dtype=torch.float64)
    return hidden, weight, teacher_hidden, teacher_weight, k


def _teacher_topk(teacher_hidden, teacher_weight, k, temperature=1.0):
    logprobs = torch.log_softmax(teacher_hidden @ teacher_weight.T / temperature, dim=-1)
    ids = logprobs.topk(k, dim=-1).indices
    return ids, logprobs.gather(1, ids)


@SETTINGS
@given(problems(), DIVERGENCE, st.sampled_from(["bucket", "renormalize"]), st.sampled_from([0.5, 1.0, 3.0]))
def test_nonnegative_and_matches_reference(problem, div_beta, tail, temperature):
    hidden, weight, teacher_hidden, teacher_weight, k = problem
    ids, logprobs = _teacher_topk(teacher_hidden, teacher_weight, k)
    options = dict(divergence=div_beta[0], beta=div_beta[1], tail=tail, temperature=temperature,
                   reduction="none")
    loss = fastkd.topk_kd_loss(hidden.float(), weight.float(), ids, logprobs.float(), **options)
    ref = topk_kd_loss_reference(hidden.float(), weight.float(), ids, logprobs.float(), **options)
    assert (ref >= -1e-12).all()
    assert (loss >= -1e-6).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)


@SETTINGS
@given(problems(), DIVERGENCE, st.sampled_from(["bucket", "renormalize"]))
def test_zero_when_teacher_is_the_student(problem, div_beta, tail):
    hidden, weight, _, _, k = problem
    options = dict(divergence=div_beta[0], beta=div_beta[1], tail=tail, reduction="none")
    # Online: the teacher is the student itself, every bucket agrees exactly.
    assert fastkd.kd_loss(hidden, weight, hidden, weight, **options).abs().max().item() < 1e-12
    assert fastkd.kd_loss(hidden, weight, hidden, weight, topk=k, **options).abs().max().item() < 1e-12
    # Offline: the student's own top-k log-probs. Rows whose tail is below the teacher floor
    # (the tail of reported log-probs is not known there) are only ≥ 0.
    ids, logprobs = _teacher_topk(hidden, weight, k)
    loss = fastkd.topk_kd_loss(hidden, weight, ids, logprobs, **options)
    known_tail = (1 - logprobs.exp().sum(-1)) > 2 * dv.TEACHER_TAIL_FLOOR
    if tail == "renormalize":
        known_tail = torch.ones_like(known_tail)
    assert (loss[known_tail].abs() < 1e-12).all()
    assert (loss >= -1e-12).all()


@SETTINGS
@given(problems(), DIVERGENCE)
def test_bucket_is_a_lower_bound_on_the_full_divergence(problem, div_beta):
    hidden, weight, teacher_hidden, teacher_weight, k = problem
    options = dict(divergence=div_beta[0], beta=div_beta[1], reduction="none")
    full = kd_loss_reference(hidden, weight, teacher_hidden, teacher_weight, **options)
    bucket = kd_loss_reference(hidden, weight, teacher_hidden, teacher_weight, topk=k, **options)
    # Bucketing can only lose information (data processing inequality).
    assert (bucket <= full + 1e-9).all()


@SETTINGS
@given(problems(), st.sampled_from(["bucket", "renormalize"]), st.sampled_from([None, 3]))
def test_beta_limits_are_forward_and_reverse_kl(problem, tail, topk):
    hidden, weight, teacher_hidden, teacher_weight, k = problem
    topk = None if topk is None else min(topk, weight.shape[0])
    common = dict(topk=topk, tail=tail, reduction="none")
    args = (hidden, weight, teacher_hidden, teacher_weight)
    for beta, kind in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = fastkd.kd_loss(*args, divergence="jsd", beta=beta, **common)
        assert torch.equal(jsd, fastkd.kd_loss(*args, divergence=kind, **common))
    # (The approach JSD(β)/β → forward KL is checked in test_divergences: it is not uniform.)


@SETTINGS
@given(problems(), DIVERGENCE, st.sampled_from(["teacher", "student", "union"]),
       st.sampled_from(["bucket", "renormalize"]), st.floats(0.25, 4.0))
def test_online_topk_equals_offline_topk_of_the_same_set(problem, div_beta, topk_from, tail, temperature):
    # kd_loss(topk=K) is the top-k loss over the set it selects, with the teacher's tempered
    # log-probs and its exact tail mass (float64 reference of the offline loss given that tail).
    hidden, weight, teacher_hidden, teacher_weight, k = problem
    options = dict(divergence=div_beta[0], beta=div_beta[1], tail=tail, temperature=temperature,
                   reduction="none")
    online = fastkd.kd_loss(hidden, weight, teacher_hidden, teacher_weight, topk=k,
                            topk_from=topk_from, **options)
    teacher_logits = teacher_hidden @ teacher_weight.T
    ids = dv.select_topk(hidden @ weight.T, teacher_logits, k, topk_from)
    logprobs = torch.log_softmax(teacher_logits / temperature, -1).gather(1, ids.clamp(min=0))
    teacher_lp = torch.log_softmax(teacher_logits / temperature, -1)
    in_set = dv.topk_mask(ids.clamp(min=0), ids >= 0, teacher_lp.shape[-1])
    exact_tail = dv.masked_logsumexp(teacher_lp, ~in_set)
    offline = topk_kd_loss_reference(hidden, weight, ids, torch.where(ids >= 0, logprobs, 0.0),
                                     teacher_log_tail=exact_tail, **options)
    torch.testing.assert_close(online, offline, rtol=1e-10, atol=1e-12)
    assert math.isfinite(online.sum().item())


@settings(max_examples=12, deadline=None)
@given(problems(), DIVERGENCE, st.sampled_from(["bucket", "renormalize"]), st.sampled_from([None, 4]))
def test_backends_agree(problem, div_beta, tail, topk):
    # impl="triton" (the CPU interpreter here, few examples: it is slow) against impl="torch",
    # on the same float32 inputs: loss and gradients, offline top-k and the online teacher.
    hidden, weight, teacher_hidden, teacher_weight, k = problem
    hidden, weight = hidden.float().requires_grad_(), weight.float().requires_grad_()
    ids, logprobs = _teacher_topk(teacher_hidden, teacher_weight, k)
    options = dict(divergence=div_beta[0], beta=div_beta[1], tail=tail, reduction="sum")
    results = {}
    for impl in ("torch", "triton"):
        offline = fastkd.topk_kd_loss(hidden, weight, ids, logprobs.float(), impl=impl, **options)
        online = fastkd.kd_loss(hidden, weight, teacher_hidden.float(), teacher_weight.float(),
                                topk=None if topk is None else min(topk, weight.shape[0]), impl=impl, **options)
        results[impl] = (offline, online) + torch.autograd.grad(offline + online, [hidden, weight])
    # Norm-wise, with an absolute floor: on S, dz = w_j − p_j·W cancels to float32 rounding of
    # O(1) terms (the two backends round their exps differently), then dz·W and dzᵀ·h scale that
    # noise by ‖W‖ and ‖h‖; a gradient near a minimum is itself no larger than that noise.
    floor = 1e-6 * (1.0 + weight.norm().item() + hidden.norm().item())
    for name, a, b in zip(("offline loss", "online loss", "grad hidden", "grad weight"),
                          results["triton"], results["torch"]):
        diff = (a - b).double().norm().item()
        assert diff <= 1e-3 * b.double().norm().item() + floor, f"{name}: {a} vs {b}"
