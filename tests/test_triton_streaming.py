"""The streaming top-k backward at real GPU tile sizes: tail-formula tiles + the correction kernel.

The backward tiles no longer look the teacher's ids S up: they write the tail formula below a
per-row threshold and 0 above it, and ``topk_correction_kernel`` adds each id's exact value
(``triton_backend._tail_threshold`` / ``_slot_coefficients``). These tests run the kernels in the
interpreter at the launch configurations of an H100 (``for_target(90)``: 16-bit backward tiles of
128 x 256 in two 128-column parts, 128 x 128 with CE, a 128 x 128 forward) on shapes that cross
them: two row blocks, three vocabulary tiles (the last partial), ids in every tile.
"""
from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd.backends import launch_configs
from fastkd.backends import triton_backend as tb
from fastkd.reference import kd_loss_reference, topk_kd_loss_reference
from conftest import assert_rel_close, make_problem, rel_error

# 150 rows: a full 128-row block and a ragged one; V = 600: backward tiles 256, 256, 88 (and
# 128-wide forward tiles); D = 40 below one 64-wide D tile; K = 24 ids spread over V.
N, D, V, K = 150, 40, 600, 24
FP32_TOL = 2e-5


def _loss_and_grads(problem, impl, **options):
    fn = topk_kd_loss_reference if impl == "reference" else fastkd.topk_kd_loss
    if impl != "reference":
        options["impl"] = impl
    loss = fn(problem["hidden"], problem["weight"], problem["teacher_ids"],
              problem["teacher_logprobs"], bias=problem["bias"], reduction="none", **options)
    grad_out = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inputs = [problem["hidden"], problem["weight"]] + ([problem["bias"]] if problem["bias"] is not None else [])
    return loss, torch.autograd.grad(loss, inputs, grad_out.to(loss.dtype))


def _exact(problem):
    return {**problem, **{k: problem[k].detach().double().requires_grad_()
                          for k in ("hidden", "weight", "bias") if problem[k] is not None}}


CASES = {
    # divergence, temperature, softcap, CE weight, bias, student scale
    "reverse KL, tempered, capped": ("reverse_kl", 1.7, 4.0, 0.0, False, 1.0),
    "forward KL, peaked student, CE, bias": ("forward_kl", 1.0, None, 0.4, True, 6.0),
    "JSD, capped, CE": ("jsd", 0.8, 3.0, 0.3, False, 2.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_streaming_backward_at_h100_tiles(case, dtype):
    divergence, temperature, softcap, ce_weight, with_bias, scale = CASES[case]
    problem = make_problem(N, D, V, K, dtype=dtype, seed=29, ragged=True, ignore_frac=0.25,
                           with_bias=with_bias, scale=scale)
    # rows 128-143 ignored (a whole block of the correction kernel's 16 rows: skipped) and a row
    # without any id
    labels = problem["labels"].clone()
    labels[128:144] = -100
    ids = problem["teacher_ids"].clone()
    ids[5] = -1
    problem = {**problem, "labels": labels, "teacher_ids": ids}
    options = dict(divergence=divergence, tail="bucket", temperature=temperature, softcap=softcap,
                   labels=labels, ce_weight=ce_weight)
    with launch_configs.for_target(90):
        device = problem["hidden"].device
        family = "backward_ce" if ce_weight or with_bias else "backward"
        tiles = launch_configs.tiles(family, device, dtype)
        if dtype == torch.float16:  # the real H100 tiles, crossed by this problem
            assert (tiles.BM, tiles.BN, tiles.split) == ((128, 128, 2) if family == "backward_ce" else (128, 256, 2))
            assert launch_configs.tiles("stream", device, dtype).BM == 128
        assert N > tiles.BM and V > 2 * tiles.BN
        loss, grads = _loss_and_grads(problem, "triton", **options)
    ref_loss, ref_grads = _loss_and_grads(_exact(problem), "reference", **options)
    assert_rel_close(loss, ref_loss, FP32_TOL, f"{case} loss")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == dtype and r.abs().max() > 0
        tol = FP32_TOL if dtype == torch.float32 else 2 * rel_error(r.to(dtype), r) + 2e-3
        assert_rel_close(g, r, tol, f"{case} grad {name}")
    ignored = labels == -100
    live = ~ignored
    live[5] &= ce_weight != 0  # no id and no CE: one bucket (all of V) on both sides, no gradient
    assert (grads[0][ignored] == 0).all() and (grads[0][live] != 0).any(dim=1).all()


def test_deterministic_streaming_at_h100_tiles(monkeypatch):
    # MODE 1/2 tiles and the id-sorted dW pass: bit-identical twice, and exact
    problem = make_problem(N, D, V, K, seed=31, ragged=True, ignore_frac=0.2, with_bias=True, scale=3.0)
    options = dict(divergence="forward_kl", tail="bucket", temperature=1.3, softcap=5.0,
                   labels=problem["labels"], ce_weight=0.2)
    monkeypatch.setattr(fastkd.config, "deterministic", True)
    with launch_configs.for_target(90):
        first = _loss_and_grads(problem, "triton", **options)[1]
        second = _loss_and_grads(problem, "triton", **options)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ref = _loss_and_grads(_exact(problem), "reference", **options)[1]
    for name, g, r in zip(("hidden", "weight", "bias"), first, ref):
        assert_rel_close(g, r, FP32_TOL, f"deterministic grad {name}")


@pytest.mark.parametrize("dtype,deterministic", [(torch.float32, False), (torch.float32, True),
                                                 (torch.float16, False)])
def test_repeated_ids_are_set_once(monkeypatch, dtype, deterministic):
    # With value checks off, an id repeated in a row is one column whose gradient is *set* to its
    # slot value (the last slot, sorted order), never added twice: the float64 torch backend's
    # scatter does the same. Both slots get the same log-prob, so which one wins does not matter.
    problem = make_problem(N, D, V, K, dtype=dtype, seed=37, ragged=True)
    ids, logprobs = problem["teacher_ids"].clone(), problem["teacher_logprobs"].clone()
    ids[:, K - 1], logprobs[:, K - 1] = ids[:, 0], logprobs[:, 0]
    ids[3, K - 1] = -1
    ids[4, 0] = -1
    problem = {**problem, "teacher_ids": ids, "teacher_logprobs": logprobs}
    monkeypatch.setattr(fastkd.config, "check_values", False)
    monkeypatch.setattr(fastkd.config, "deterministic", deterministic)
    options = dict(divergence="reverse_kl", tail="bucket", temperature=1.2, softcap=6.0)
    with launch_configs.for_target(90):
        _, grads = _loss_and_grads(problem, "triton", **options)
    _, ref = _loss_and_grads(_exact(problem), "torch", **options)
    for name, g, r in zip(("hidden", "weight"), grads, ref):
        tol = FP32_TOL if dtype == torch.float32 else 2 * rel_error(r.to(dtype), r) + 2e-3
        assert_rel_close(g, r, tol, f"repeated ids grad {name}")
    # adding the repeated slot twice would be far off
    unique = ids.clone()
    unique[:, K - 1] = -1
    assert rel_error(_loss_and_grads({**problem, "teacher_ids": unique}, "torch", **options)[1][0],
                     ref[0]) > 10 * FP32_TOL


def test_threshold_keeps_its_distance():
    gen = torch.Generator().manual_seed(41)
    n, k = 64, 16
    tail_lse = torch.randn(n, generator=gen, dtype=torch.float64).float()
    # logits of S packed just above the tail (the worst case), spread, and below it
    base = tail_lse.unsqueeze(1) + tb.THRESHOLD_GAP
    packed = base + 2 * tb.THRESHOLD_GAP * torch.arange(k) + tb.THRESHOLD_GAP * torch.rand(n, k, generator=gen)
    spread = tail_lse.unsqueeze(1) + 4 * torch.randn(n, k, generator=gen)
    logits = torch.where(torch.arange(n).unsqueeze(1) % 2 == 0, packed, spread)
    valid = torch.rand(n, k, generator=gen) > 0.1
    theta = tb._tail_threshold(logits, tail_lse, valid)
    assert (theta >= tail_lse + 2 * tb.THRESHOLD_GAP - 1e-6).all()
    gap = torch.where(valid, (logits - theta.unsqueeze(1)).abs(), float("inf")).amin(dim=1)
    assert (gap >= tb.THRESHOLD_GAP - 1e-5).all()
    assert (theta <= tail_lse + (2 * k + 2) * tb.THRESHOLD_GAP + 1e-5).all()
    # no tail (S covers the vocabulary): -inf, every tile entry of the row is left to S
    empty = tb._tail_threshold(logits[:2], torch.full((2,), float("-inf")), valid[:2])
    assert torch.isneginf(empty).all()


def test_confident_student_in_16_bit():
    # Forward KL, a student that has almost no mass off S (P_T ~ 1e-6) and a flatter teacher
    # (Q_T ~ 0.16): the tail coefficient dense = 1 − Q_T/P_T is ~ -1e5. Writing the tail formula
    # at the ids of S too and subtracting it afterwards overflows the 16-bit dz there (NaN
    # gradients, measured); above the threshold the tiles write 0 and the exact value is set.
    problem = make_problem(N, D, V, K, dtype=torch.float16, seed=29, scale=12.0)
    logits = problem["hidden"].detach().double() @ problem["weight"].detach().double().T
    teacher = torch.log_softmax(logits / 4.0, dim=-1)
    ids = teacher.topk(K, dim=-1).indices
    problem = {**problem, "teacher_ids": ids, "teacher_logprobs": teacher.gather(1, ids).float()}
    student_tail = 1 - torch.log_softmax(logits, -1).gather(1, ids).exp().sum(1)
    assert student_tail.median() < 1e-5 < 0.1 < 1 - teacher.gather(1, ids).exp().sum(1).median()
    options = dict(divergence="forward_kl", tail="bucket")
    with launch_configs.for_target(90):
        _, grads = _loss_and_grads(problem, "triton", **options)
    _, ref = _loss_and_grads(_exact(problem), "reference", **options)
    for name, g, r in zip(("hidden", "weight"), grads, ref):
        assert_rel_close(g, r, 2 * rel_error(r.to(torch.float16), r) + 2e-4, f"confident grad {name}")


@pytest.mark.parametrize("case", ["reverse KL, tempered, capped", "forward KL, peaked student, CE, bias"])
def test_float32_dw_by_vocabulary_slab(case, monkeypatch):
    # 16-bit weights: dW accumulated in float32 a slab of rows at a time (triton_backend._slabs).
    # Slabs of 256 rows (forced small here) over V = 600: 256, 256, 88, with ids, labels and bias
    # entries in every slab; the gradients equal the float64 reference as closely as one slab's.
    divergence, temperature, softcap, ce_weight, with_bias, scale = CASES[case]
    problem = make_problem(N, D, V, K, dtype=torch.float16, seed=31, ragged=True, ignore_frac=0.25,
                           with_bias=with_bias, scale=scale)
    options = dict(divergence=divergence, tail="bucket", temperature=temperature, softcap=softcap,
                   labels=problem["labels"], ce_weight=ce_weight)
    with launch_configs.for_target(90):
        whole, grads_whole = _loss_and_grads(problem, "triton", **options)
        monkeypatch.setattr(tb, "SLAB_BYTES", 256 * D * 4)
        assert tb._slabs(V, D, torch.float16, 128) == [(0, 256), (256, 512), (512, 600)]
        assert tb._slabs(V, D, torch.float32, 128) == [(0, V)]  # the result is the accumulator
        sliced, grads = _loss_and_grads(problem, "triton", **options)
    _, ref = _loss_and_grads(_exact(problem), "reference", **options)
    for name, g, g1, r in zip(("hidden", "weight", "bias"), grads, grads_whole, ref):
        assert g.dtype == torch.float16
        tol = 2 * rel_error(r.to(torch.float16), r) + 2e-3
        assert_rel_close(g, r, tol, f"{case} slabs grad {name}")
        assert rel_error(g.double(), g1.double()) <= 2 * rel_error(r.to(torch.float16), r), name


def test_slab_size_follows_the_float32_dh():
    # The slab is at most 1/SLAB_SHARE of the float32 dh (so the extra memory stays ~1.1x dh),
    # between SLAB_MIN_BYTES and SLAB_BYTES; slabs are whole backward tiles and cover V once.
    mib = 2**20
    assert tb._slab_bytes(8192, 4096) == 16 * mib        # Llama-3-8B at N 8192: dh 128 MiB
    assert tb._slab_bytes(32768, 4096) == 64 * mib       # capped at SLAB_BYTES
    assert tb._slab_bytes(64, 4096) == tb.SLAB_MIN_BYTES  # small N: no slab below the floor
    slabs = tb._slabs(128256, 4096, torch.bfloat16, 256, 8192)
    assert [v1 - v0 for v0, v1 in slabs[:-1]] == [1024] * (len(slabs) - 1)
    assert slabs[0][0] == 0 and slabs[-1][1] == 128256 and len(slabs) == 126
    assert all(a[1] == b[0] for a, b in zip(slabs, slabs[1:]))
    assert tb._slabs(128256, 4096, torch.float32, 256, 8192) == [(0, 128256)]


def test_dense_teacher_dw_by_vocabulary_slab(monkeypatch):
    problem = make_problem(N, D, V, K, dtype=torch.float16, seed=33, with_bias=True)
    gen = torch.Generator().manual_seed(5)
    teacher_hidden = torch.randn(N, 2 * D, generator=gen).to(torch.float16)
    teacher_weight = (torch.randn(V, 2 * D, generator=gen) / (2 * D) ** 0.5).to(torch.float16)
    monkeypatch.setattr(tb, "SLAB_BYTES", 256 * D * 4)

    def grads(dtype, impl):
        h = problem["hidden"].detach().to(dtype).requires_grad_()
        w = problem["weight"].detach().to(dtype).requires_grad_()
        b = problem["bias"].detach().to(dtype).requires_grad_()
        fn = fastkd.kd_loss if impl else kd_loss_reference
        extra = dict(impl=impl) if impl else {}
        loss = fn(h, w, teacher_hidden.to(dtype), teacher_weight.to(dtype), divergence="jsd", bias=b,
                  labels=problem["labels"], ce_weight=0.2, softcap=5.0, teacher_softcap=5.0, **extra)
        return torch.autograd.grad(loss, [h, w, b])

    with launch_configs.for_target(90):
        got = grads(torch.float16, "triton")
    ref = grads(torch.float64, None)
    for name, g, r in zip(("hidden", "weight", "bias"), got, ref):
        assert_rel_close(g, r, 2 * rel_error(r.to(torch.float16), r) + 2e-3, f"dense slabs grad {name}")
