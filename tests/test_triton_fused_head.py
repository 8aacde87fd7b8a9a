"""The fused head of the chunked plan (fastkd/backends/triton_fused_head.py), in the interpreter.

The whole offline top-k plan with ``epilogue="fused"`` — GEMM 1 with its statistics in the epilogue
(``tl.dot``), the combine, the (C, K) epilogue, the gradient pass over the stored tiles, the gradient
GEMMs — against the float64 reference (``fastkd.reference``) on random problems: loss, d hidden,
d weight, d bias. Each error must stay within FACTOR × the error of plain PyTorch computing the loss
in the operand dtype on the same (rounded) inputs, or a floor of a few ulps of that dtype; the unfused
plan (torch epilogues) is run too and the fused plan must stay within FACTOR × its error or the
floor of the tile's rounding (float16 tiles: ``|z − m_t|·2⁻¹¹``).

Operands float16 and float32 (bfloat16 ``tl.dot`` is wrong in the triton 3.9 interpreter, so
bfloat16 is covered by compiling: ``test_kernels_compile_for_sm90_sm89``). Shapes are tiny
and the interpreter tiles small (16×32, BLOCK_D 16) so a problem spans several row tiles, vocabulary
tiles (V = 101: the last partial), D steps and chunks.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch

from conftest import rel_error
from fastkd.backends import chunked
from fastkd.backends import triton_fused_head as fh
from fastkd.reference import topk_kd_loss_reference

ROWS, VOCAB, DIM, K = 24, 101, 32, 6
CHUNK_ROWS = 16  # two chunks: 16 + 8 rows
IGNORED = (1, 7, 20)
IGNORE_INDEX = -100
KD_WEIGHT = 0.8
FACTOR = 4.0
# Below this a relative error is rounding of the dtype itself (a few ulps).
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3}

# id, operand dtype, student distribution, tail, divergence, beta, temperature, softcap,
# ce_weight, reduction, bias
CASES = [
    ("flat-f32-rkl-mean", torch.float32, "flat", "bucket", "reverse_kl", 0.5, 1.0, None, 0.0,
     "mean", False),
    ("peaked-f16-fkl-cap-tau-ce-none", torch.float16, "peaked", "bucket", "forward_kl", 0.5, 2.0,
     5.0, 0.7, "none", True),
    ("converged-f16-jsd-ce-mean", torch.float16, "converged", "bucket", "jsd", 0.3, 1.0, None, 0.5,
     "mean", False),
    ("flat-f16-renormalize-cap-ce-sum", torch.float16, "flat", "renormalize", "reverse_kl", 0.5,
     0.7, 3.0, 0.3, "sum", True),
    ("peaked-f32-rkl-tau-cap-none", torch.float32, "peaked", "bucket", "reverse_kl", 0.5, 1.5,
     30.0, 1.0, "none", False),
]


def _problem(dist, dtype, gen):
    """hidden, weight (operand dtype) and bias; teacher ids/log-probs with -1 slots and ids at a
    tile's edges; labels with ignored rows; a per-row grad_output."""
    scale = {"flat": 0.3, "peaked": 2.0, "converged": 1.0}[dist]
    hidden = torch.randn(ROWS, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(VOCAB, DIM, generator=gen, dtype=torch.float64) * (scale / DIM**0.5)
    if dist == "converged":  # one dominant token per row: its weight row aligned with the row
        top = torch.randint(0, VOCAB, (ROWS,), generator=gen)
        weight[top] += 3.0 * hidden / hidden.norm(dim=1, keepdim=True) ** 2 * 4.0
    bias = torch.randn(VOCAB, generator=gen, dtype=torch.float64) * 0.1
    teacher = hidden @ weight.T + 0.3 * torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64)
    teacher_lp = torch.log_softmax(teacher, dim=-1)
    ids = teacher_lp.topk(K, dim=-1).indices
    for row, edges in ((0, [31, 32]), (3, [VOCAB - 1])):  # a tile edge, the vocabulary's end
        edges = torch.tensor(edges)
        free = edges[~torch.isin(edges, ids[row])]  # no duplicate ids
        ids[row, K - len(free):] = free
    ids[2, 1] = ids[5, 0] = ids[5, 4] = -1
    logprobs = torch.where(ids >= 0, teacher_lp.gather(1, ids.clamp(min=0)), 0.0).float()
    labels = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    labels[list(IGNORED)] = IGNORE_INDEX
    grad_rows = torch.rand(ROWS, generator=gen, dtype=torch.float64) + 0.5
    return hidden.to(dtype), weight.to(dtype), bias.float(), ids, logprobs, labels, grad_rows


def _plan(epilogue, hidden, weight, bias, ids, logprobs, labels, grad_rows, case, row_extra=0):
    """Loss and (dh, dW, db) of the chunked op, reduced as ``reduction`` says (``row_extra``: bytes
    per row the plan holds beyond its chunk x V blocks, so that it still takes two chunks)."""
    _name, dtype, _dist, tail, div, beta, temp, cap, ce, reduction, _b = case
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    per_element = 4 if dtype == torch.float32 else 6  # fused: tile + a float32 dz block on the CPU
    chunk_bytes = CHUNK_ROWS * (VOCAB * per_element + row_extra)
    ids_in = torch.where((labels != IGNORE_INDEX).unsqueeze(1), ids, -1)
    out = chunked.topk_forward(
        h, w, b, ids_in, logprobs, None, None, None, labels, div, beta, tail, temp, cap, None, 0,
        "teacher", IGNORE_INDEX, ce, KD_WEIGHT, chunk_bytes, False, reduction != "none", True,
        epilogue, dtype)
    loss = _reduce(out[0], labels, reduction, grad_rows)
    loss.backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def _reduce(loss_rows, labels, reduction, grad_rows):
    if reduction == "none":
        return (loss_rows * grad_rows.to(loss_rows.dtype)).sum()
    total = loss_rows.sum()
    return total / (labels != IGNORE_INDEX).sum() if reduction == "mean" else total


def _reference(compute, hidden, weight, bias, ids, logprobs, labels, grad_rows, case):
    """The float64 reference (``compute`` float64), or plain PyTorch as real code runs it: the
    head's GEMM in the operand dtype (16-bit logits), the loss on them in float32, the gradient
    GEMMs on the 16-bit ``dz`` that autograd hands the head."""
    _name, dtype, _dist, tail, div, beta, temp, cap, ce, reduction, _b = case
    h = hidden.to(compute).requires_grad_()
    w = weight.to(compute).requires_grad_()
    b = None if bias is None else bias.to(compute).requires_grad_()
    if compute == torch.float64 or dtype == torch.float32:
        head, eye, head_bias = h, w, b
    else:  # logits = linear(h, W, b) in the 16-bit dtype, the loss in float32 over an identity head
        logits = torch.nn.functional.linear(h, w, None if b is None else b.to(dtype))
        head, eye, head_bias = logits.float(), torch.eye(VOCAB), None
        compute = torch.float32
    loss = topk_kd_loss_reference(
        head, eye, ids, logprobs, divergence=div, beta=beta, tail=tail, temperature=temp,
        labels=labels, ignore_index=IGNORE_INDEX, ce_weight=ce, kd_weight=KD_WEIGHT, softcap=cap,
        bias=head_bias, reduction=reduction, compute_dtype=compute)
    if reduction == "none":
        loss = (loss * grad_rows.to(compute)).sum()
    loss.backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("grad_in_gemms", [False, True], ids=["grad-pass", "dz-in-gemms"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_plan_matches_reference(case, grad_in_gemms, monkeypatch):
    """Both ways to the gradients: the gradient pass then the plan's GEMMs, and dz made inside
    the Triton gradient GEMMs (``GRAD_IN_GEMMS``)."""
    monkeypatch.setattr(fh, "GRAD_IN_GEMMS", grad_in_gemms)
    name, dtype, dist, *_rest, with_bias = case
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    hidden, weight, bias, ids, logprobs, labels, grad_rows = _problem(dist, dtype, gen)
    bias = bias if with_bias else None
    args = (hidden, weight, bias, ids, logprobs, labels, grad_rows, case)
    fused = _plan("fused", *args)
    unfused = _plan("torch", *args)
    ref = _reference(torch.float64, *args)
    plain = _reference(dtype, *args)
    for what, out, unf, r, p in zip(("loss", "d hidden", "d weight", "d bias"), fused, unfused, ref, plain):
        if r is None:
            continue
        assert torch.isfinite(out).all(), f"{name}: {what} not finite"
        err, err_plain, err_unfused = rel_error(out, r), rel_error(p, r), rel_error(unf, r)
        tol = max(FACTOR * err_plain, FLOOR[dtype])
        assert err <= tol, f"{name}: {what} error {err:.2e} > {tol:.2e} (plain {dtype}: {err_plain:.2e})"
        tol_unfused = max(FACTOR * err_unfused, FLOOR[dtype])
        assert err <= tol_unfused, (f"{name}: {what} error {err:.2e} > {tol_unfused:.2e} "
                                    f"(unfused plan: {err_unfused:.2e})")
    dh = fused[1]
    assert (dh[list(IGNORED)] == 0).all(), f"{name}: ignored rows' d hidden not exactly zero"


# The scaled tile (``SCALED_TILE``, the default for bfloat16 on tensor cores): forced on here for
# float32 operands (a float32 G: the algebra alone) and float16 operands (a bfloat16 G, as the GPU
# stores it). Eligible: the bucket tail or CE at τ = 1. The last three add softcap + CE + bias with
# reduction="none" (the recomputing backward, against the forward's lse), τ ≠ 1 without CE, and
# renormalize with CE alone.
SCALED_CASES = [c for c in CASES if c[3] == "bucket" and (c[8] == 0.0 or c[6] == 1.0)] + [
    ("peaked-f16-rkl-cap-ce-bias-none", torch.float16, "peaked", "bucket", "reverse_kl", 0.5, 1.0,
     5.0, 0.4, "none", True),
    ("converged-f32-fkl-tau-bias-sum", torch.float32, "converged", "bucket", "forward_kl", 0.5, 2.0,
     None, 0.0, "sum", True),
    ("flat-f16-renormalize-ce-mean", torch.float16, "flat", "renormalize", "jsd", 0.5, 1.0, None,
     0.6, "mean", False),
]


# what the scaled tile holds per row beside the tile (the float32 dh, the 16-bit σ ⊙ h)
SCALED_ROW_BYTES = DIM * (4 + 2)


def _rounded_dz_reference(hidden, weight, bias, ids, logprobs, labels, grad_rows, case):
    """(dh, dW, db) in float64 from the exact dz rounded once to bfloat16: what any plan that
    hands its gradient GEMMs a bfloat16 dz gets (the floor of a bfloat16 G)."""
    _name, _dtype, _dist, tail, div, beta, temp, cap, ce, reduction, _b = case
    h, w = hidden.double(), weight.double()
    logits = torch.nn.functional.linear(h, w, None if bias is None else bias.double()).requires_grad_()
    loss = topk_kd_loss_reference(
        logits, torch.eye(VOCAB, dtype=torch.float64), ids, logprobs, divergence=div, beta=beta,
        tail=tail, temperature=temp, labels=labels, ignore_index=IGNORE_INDEX, ce_weight=ce,
        kd_weight=KD_WEIGHT, softcap=cap, reduction=reduction, compute_dtype=torch.float64)
    if reduction == "none":
        loss = (loss * grad_rows).sum()
    (dz,) = torch.autograd.grad(loss, logits)
    dz = dz.to(torch.bfloat16).double()
    return dz @ w, dz.T @ h, None if bias is None else dz.sum(0)


@pytest.mark.parametrize("case", SCALED_CASES, ids=[c[0] for c in SCALED_CASES])
def test_scaled_tile_plan_matches_reference(case, monkeypatch):
    """The whole plan with the scaled tile against float64: within FACTOR × plain PyTorch in the
    operand dtype, or (a bfloat16 G) × the float64 gradient from a bfloat16-rounded dz."""
    monkeypatch.setattr(fh, "SCALED_TILE", True)
    calls = []
    original = fh.scaled_grad
    monkeypatch.setattr(fh, "scaled_grad", lambda *a, **k: calls.append(1) or original(*a, **k))
    name, dtype, dist, *_rest, with_bias = case
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    hidden, weight, bias, ids, logprobs, labels, grad_rows = _problem(dist, dtype, gen)
    bias = bias if with_bias else None
    args = (hidden, weight, bias, ids, logprobs, labels, grad_rows, case)
    fused = _plan("fused", *args, row_extra=SCALED_ROW_BYTES)
    assert len(calls) == 2, f"{name}: the scaled tile ran for {len(calls)} of 2 chunks"
    ref = _reference(torch.float64, *args)
    plain = _reference(dtype, *args)
    rounded = (None,) + _rounded_dz_reference(*args) if dtype != torch.float32 else (None,) * 4
    for what, out, r, p, q in zip(("loss", "d hidden", "d weight", "d bias"), fused, ref, plain, rounded):
        if r is None:
            continue
        assert torch.isfinite(out).all(), f"{name}: {what} not finite"
        err, bar = rel_error(out, r), rel_error(p, r)
        if q is not None:
            bar = max(bar, rel_error(q, r))
        tol = max(FACTOR * bar, FLOOR[dtype])
        assert err <= tol, f"{name}: {what} error {err:.2e} > {tol:.2e}"
    assert (fused[1][list(IGNORED)] == 0).all(), f"{name}: ignored rows' d hidden not exactly zero"


def test_scaled_tile_eligibility(monkeypatch):
    """``SCALED_TILE="auto"``: bfloat16 on tensor cores only (never on the CPU); forced on, wherever
    the dense part of dz is a per-row multiple of e^z — not CE at τ ≠ 1, not renormalize without
    CE, not with ``GRAD_IN_GEMMS``."""
    hidden, weight = torch.zeros(4, 8), torch.zeros(16, 8)
    ps = fh._FusedPass(hidden.bfloat16(), weight.bfloat16(), None, None, -100, 2**20, torch.bfloat16)
    assert not ps.scaled(True, False, 1.0)  # "auto" on the CPU
    monkeypatch.setattr(fh, "SCALED_TILE", True)
    assert ps.scaled(True, False, 2.0) and ps.scaled(True, True, 1.0) and ps.scaled(False, True, 1.0)
    assert not ps.scaled(True, True, 2.0) and not ps.scaled(False, False, 1.0)
    monkeypatch.setattr(fh, "GRAD_IN_GEMMS", True)
    assert not ps.scaled(True, False, 1.0)


def test_scaled_tile_not_taken_for_ce_at_a_temperature(monkeypatch):
    # CE's softmax is of τ·z at τ ≠ 1: not a per-row multiple of e^z, so the gradient pass runs
    monkeypatch.setattr(fh, "SCALED_TILE", True)
    monkeypatch.setattr(fh, "scaled_grad", lambda *a, **k: pytest.fail("scaled tile taken"))
    case = CASES[1]  # peaked-f16-fkl-cap-tau-ce-none: τ 2 with CE
    gen = torch.Generator().manual_seed(3)
    hidden, weight, bias, ids, logprobs, labels, grad_rows = _problem("peaked", torch.float16, gen)
    _plan("fused", hidden, weight, bias, ids, logprobs, labels, grad_rows, case)


def test_scaled_tile_far_reference_is_recomputed(monkeypatch):
    """A row whose max logit lies far (> REF_WINDOW) above the student's logits at the teacher's
    first ids: GEMM 1 runs again for the program tiles holding it, with that row's own max, and
    the gradients stay exact."""
    monkeypatch.setattr(fh, "SCALED_TILE", True)
    rewritten = []
    original = fh.scaled_grad

    def counting(*args, **kwargs):
        count = original(*args, **kwargs)
        rewritten.append(int(count))
        return count

    monkeypatch.setattr(fh, "scaled_grad", counting)
    case = ("far-f32", torch.float32, "peaked", "bucket", "reverse_kl", 0.5, 1.0, None, 0.5, "mean", False)
    gen = torch.Generator().manual_seed(11)
    hidden, weight, bias, ids, logprobs, labels, grad_rows = _problem("peaked", torch.float32, gen)
    # row 4 (first chunk): a token the teacher does not rank 60 nats above every other logit
    top = int(torch.isin(torch.arange(VOCAB), ids[4], invert=True).nonzero()[0])
    weight = weight.double()
    weight[top] += 60.0 * hidden[4].double() / hidden[4].double().norm() ** 2
    weight = weight.float()
    args = (hidden, weight, None, ids, logprobs, labels, grad_rows, case)
    fused = _plan("fused", *args, row_extra=SCALED_ROW_BYTES)
    assert rewritten == [1, 0], f"rows written again per chunk: {rewritten}"
    ref = _reference(torch.float64, *args)
    plain = _reference(torch.float32, *args)
    for what, out, r, p in zip(("loss", "d hidden", "d weight"), fused, ref, plain):
        err, tol = rel_error(out, r), max(FACTOR * rel_error(p, r), FLOOR[torch.float32])
        assert err <= tol, f"{what} error {err:.2e} > {tol:.2e}"


def test_scaled_grad_rows_with_a_tiny_or_zero_sigma():
    """``scaled_grad`` directly: σ = 0 with values on S, σ ≈ 2e-40 (dz/σ would overflow
    bfloat16): both rows are written again against R = +inf (G = 0 off S, σ = 1; the rerun stands
    in for GEMM 1), σ ordinary; repeated ids keep the last value, unused slots none. dh, dW, db
    against float64 from the dz they stand for (the tiny row's part off S, ~1e-40, dropped)."""
    gen = torch.Generator().manual_seed(2)
    c, vocab, dim = 3, 40, 8
    hidden = torch.randn(c, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen)
    bias = torch.zeros(vocab)
    g = torch.rand(c, vocab, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    sorted_ids = torch.tensor([[3, 7, 7, vocab], [0, 5, 39, vocab], [1, 2, 3, 4]], dtype=torch.int32)
    values = torch.tensor([[0.5, -0.25, 0.75, 9.0], [1e-3, -2e-3, 4e-3, 9.0], [0.1, 0.2, -0.3, 0.4]])
    kd_lse = torch.tensor([0.0, 10.0, 1.0])
    reference = torch.tensor([0.0, -70.0, 0.5])
    dense = torch.tensor([0.0, 1e-5, 2.0])  # σ = 0, 1e-5·e^{-80} ≈ 2e-40, 2·e^{-0.5}
    sigma = dense.double() * torch.exp((reference - kd_lse).double())
    dz = sigma.unsqueeze(1) * g.double()
    dz[:2] = 0.0  # rows 0 and 1: nothing off S
    for r in range(c):
        for j in range(4):
            i = int(sorted_ids[r, j])
            if i < vocab:
                dz[r, i] = float(values[r, j])
    head = chunked._Head(weight, bias, torch.float32)
    grads = chunked._Grads(hidden, weight, bias, head, True)
    partials = torch.zeros(fh.N_PARTIALS, c, 1)
    partials[fh._M] = reference.unsqueeze(1)  # the rows' max z: within REF_WINDOW of R
    chunk = fh.HeadChunk(g, partials, torch.zeros(c, 4), torch.zeros(c), 32, None)
    reruns = []

    def rerun(ref, flags):  # GEMM 1 again for the flagged rows against ``ref``
        reruns.append(flags.tolist())
        at = flags.bool()
        g[at] = (g[at].double() * torch.exp(reference[at].double() - ref[at].double()).unsqueeze(1)).to(g.dtype)

    count = fh.scaled_grad(g, chunk, sorted_ids, values, kd_lse, dense, None, None, None, 1.0, 0.0,
                           True, False, reference, head, hidden, grads, slice(0, c), rerun)
    assert reruns == [[1, 1, 0]] and int(count) == 2
    dh, dw, db = grads.result()
    h64, w64 = hidden.double(), weight.double()
    for what, out, ref in (("dh", dh, dz @ w64), ("dW", dw, dz.T @ h64), ("db", db, dz.sum(0))):
        assert torch.isfinite(out).all(), what
        assert rel_error(out, ref) < 2**-7, f"{what}: {rel_error(out, ref):.2e}"
    for r in range(2):  # the rows' own gradients, each carried by its values on S alone
        assert rel_error(dh[r], dz[r] @ w64) < 2**-7, r


def test_scaled_tile_stored_against_float64():
    """``head_stats`` with a reference: G = e^{z − R}·softcap'(s) in bfloat16 (float16 operands,
    bias, softcap, τ) within bfloat16 rounding, the exponent capped at 64 for a row whose
    reference lies far below, and the statistics as without it."""
    gen = torch.Generator().manual_seed(7)
    c, vocab, dim, k = 12, 70, 16, 4
    h = torch.randn(c, dim, generator=gen).half()
    w = (torch.randn(vocab, dim, generator=gen) * 0.5).half()
    b = torch.randn(vocab, generator=gen)
    sorted_ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(c)]).sort(dim=1).values.to(torch.int32)
    inv_temp, cap = 0.5, 3.0
    x = h.double() @ w.double().T + b.double()
    s = cap * torch.tanh(x / cap)
    z = s * inv_temp
    reference = (z.max(dim=1).values - torch.rand(c, generator=gen, dtype=torch.float64) * 5).float()
    reference[3] = -1000.0  # far below: G capped, finite
    tile = torch.empty(c, vocab, dtype=torch.bfloat16)
    plain = fh.head_stats(h, w, b, sorted_ids, None, inv_temp, cap, True, False, False, False)
    chunk = fh.head_stats(h, w, b, sorted_ids, None, inv_temp, cap, True, False, False, False,
                          tile=tile, reference=reference)
    scale = torch.exp((z - reference.double().unsqueeze(1)).clamp(max=64.0))
    expect = scale * (1 - (s / cap) ** 2)
    assert torch.isfinite(chunk.tile.float()).all()
    # bfloat16 rounding (2⁻⁸ on a GPU; the triton 3.9 interpreter truncates float32 to bfloat16:
    # 2⁻⁷), plus float32 cancellation in 1 − (s/cap)² where the cap saturates
    err = (chunk.tile.double() - expect).abs() - 2.0**-7 * expect.abs()
    assert (err <= 1e-6 * scale).all(), f"G rounding {(err / scale).max():.2e}"
    written = [fh._M, fh._SUM, fh._TAIL]  # the planes these flags write
    assert torch.equal(chunk.partials[written], plain.partials[written])
    assert torch.equal(chunk.zs, plain.zs)
    with pytest.raises(TypeError, match="bfloat16 or float32 tile"):
        fh.head_stats(h, w, b, sorted_ids, None, inv_temp, cap, True, False, False, False,
                      reference=reference)


@pytest.mark.parametrize("split", [1, 2])
def test_statistics_of_one_chunk_against_float64(split, monkeypatch):
    """head_stats + combine: lse, exact tail lse, CE lse at τ ≠ 1, E_p[z], z at S, the CE target
    and the stored tile (z − m_t, float16) against float64, float16 operands, bias and softcap;
    the epilogue on whole program tiles (``SPLIT=1``, sm_80/89) and on two halves (sm_90)."""
    monkeypatch.setattr(fh, "INTERPRETER_TILES", dict(BLOCK_M=16, BLOCK_N=32 * split, BLOCK_D=16,
                                                      SPLIT=split))
    gen = torch.Generator().manual_seed(5)
    c, vocab, dim, k = 20, 101, 24, 5
    h = torch.randn(c, dim, generator=gen).half()
    w = (torch.randn(vocab, dim, generator=gen) * 0.5).half()
    b = torch.randn(vocab, generator=gen)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(c)])
    ids[0, 2] = -1
    sorted_ids = torch.where(ids >= 0, ids, vocab).sort(dim=1).values.to(torch.int32)
    labels = torch.randint(0, vocab, (c,), generator=gen)
    inv_temp, cap = 0.5, 3.0
    chunk = fh.head_stats(h, w, b, sorted_ids, labels, inv_temp, cap, True, True, True, True)
    lse, tail_lse, lse_ce, mean_z = fh.combine(chunk, True, True, True, True)
    x = h.double() @ w.double().T + b.double()
    s = cap * torch.tanh(x / cap)
    z = s * inv_temp
    in_s = torch.zeros(c, vocab, dtype=torch.bool).scatter_(1, ids.clamp(min=0), ids >= 0)
    p = torch.softmax(z, dim=1)
    checks = [("lse", lse, torch.logsumexp(z, 1)),
              ("tail lse", tail_lse, torch.logsumexp(z.masked_fill(in_s, float("-inf")), 1)),
              ("CE lse", lse_ce, torch.logsumexp(s, 1)), ("E_p[z]", mean_z, (p * z).sum(1)),
              ("target", chunk.target, s.gather(1, labels.unsqueeze(1)).squeeze(1))]
    for what, out, ref in checks:
        assert (out.double() - ref).abs().max() < 2e-6, f"{what}: {(out.double() - ref).abs().max():.2e}"
    valid = sorted_ids < vocab
    zs_ref = z.gather(1, sorted_ids.long().clamp(max=vocab - 1))
    assert (chunk.zs.double() - zs_ref)[valid].abs().max() < 2e-6, "z at S"
    bn = chunk.block_n
    m_t = chunk.partials[0].repeat_interleave(bn, dim=1)[:, :vocab].double()
    y = z - m_t
    assert (y <= 1e-6).all(), "z − m_t above 0"
    err = (chunk.tile.double() - y).abs()
    assert (err <= y.abs() * 2.0**-11 + 1e-6).all(), f"tile rounding {err.max():.2e}"


def test_bad_arguments_raise_before_any_kernel():
    h = torch.zeros(4, 8, dtype=torch.float16)
    w = torch.zeros(10, 8, dtype=torch.float16)
    with pytest.raises(TypeError, match="weight"):
        fh.head_stats(h, w.float(), None, None, None, 1.0, 0.0, False, False, False, False)
    with pytest.raises(ValueError, match="weight"):
        fh.head_stats(h, torch.zeros(10, 9, dtype=torch.float16), None, None, None, 1.0, 0.0,
                      False, False, False, False)
    with pytest.raises(TypeError, match="hidden"):
        fh.head_stats(h.double(), w.double(), None, None, None, 1.0, 0.0, False, False, False, False)
    with pytest.raises(TypeError, match="sorted_ids"):
        fh.head_stats(h, w, None, torch.zeros(4, 2, dtype=torch.int64), None, 1.0, 0.0, True,
                      False, False, False)
    with pytest.raises(TypeError, match="bias"):
        fh.head_stats(h, w, torch.zeros(10, dtype=torch.float16), None, None, 1.0, 0.0, False,
                      False, False, False)


def test_compile_specs_follow_the_target():
    """The recorded launches carry each target's configuration (stages: 4 on sm_90, else 3; the
    wide 128×256 tile on sm_90 for the flag sets ``wide_flags`` admits, nowhere else); partials,
    the gradient pass and the gradient GEMMs' vocabulary steps always walk 128-column tiles."""
    for cc, stages in ((90, 4), (89, 3), (80, 3)):
        specs = fh.compile_specs(cc=cc, vocab=1000, dim=256, k=8)
        assert [s["name"] for s in specs] == ["head_stats_kernel"] * 8 + [
            "head_grad_kernel", "head_dh_kernel", "head_dw_kernel", "dense_pair_kernel",
            "dense_pair_kernel"]
        dh, dw = (s["constexprs"] for s in specs[9:11])
        assert dh["TILE_N"] == dw["TILE_N"] == 128 and 128 % dh["BLOCK_K"] == 128 % dw["BLOCK_V"] == 0
        assert dh["BLOCK_N"] == dw["BLOCK_N"] == (256 if cc == 90 else 128)
        heads = [s["constexprs"] for s in specs[:8]]
        grad = specs[8]["constexprs"]
        # every option with CE, the backward's values-at-S pass, the forward without CE, a
        # teacher; then the scaled tile: the summing forward without and with CE, the chunk's
        # rerun against its rows' max, the recomputing backward with CE
        assert [c["SCALED"] for c in heads] == [False] * 4 + [True] * 4
        wide = [not c["WITH_CE"] and (c["WITH_TAIL"] or not c["HAS_SET"]) for c in heads]
        assert wide == [False, False, True, True, True, False, True, False]
        for spec, c, w in zip(specs, heads, wide):
            assert c["BLOCK_N"] == (256 if w and cc == 90 else 128), (cc, c)
            assert c["BLOCK_N"] // c["SPLIT"] == grad["BLOCK_N"] == 128
            assert spec["options"]["num_stages"] == stages
    assert not fh.wide_flags(True, False, False) and not fh.wide_flags(True, True, True)
    assert fh.wide_flags(True, True, False) and fh.wide_flags(False, False, False)


def test_kernels_compile_for_sm90_sm89():
    """``scripts/compile_fused_head.py --dtypes bf16 --targets 90 89`` (sm_80 and fp16: the script
    without arguments, ~80 s): HGMMA on sm_90 and HMMA on sm_89 in the SASS of the stats kernel
    and of the gradient GEMMs, no spills, shared memory within each target's limit, compiled in
    < 60 s (no GPU needed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, os.path.join(root, "scripts", "compile_fused_head.py"),
                          "--dtypes", "bf16", "--targets", "90", "89"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_cuda_epilogue_choice(monkeypatch):
    """``config.chunked_epilogue``: "auto" runs the fused head for 16-bit operands and the Triton
    epilogues for float32; "fused" applies to 16-bit operands only; "triton" keeps cuBLAS and the
    Triton epilogues; a bad value is refused by name."""
    from fastkd import api, config
    assert api._epilogue("chunked", torch.bfloat16) == "fused"
    assert api._epilogue("chunked", torch.float16) == "fused"
    assert api._epilogue("chunked", torch.float32) == "triton"
    assert api._epilogue("torch", torch.bfloat16) == "torch"
    monkeypatch.setattr(config, "chunked_epilogue", "triton")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert api._epilogue("chunked", dtype) == "triton"
    monkeypatch.setattr(config, "chunked_epilogue", "fused")
    assert api._epilogue("chunked", torch.bfloat16) == "fused"
    assert api._epilogue("chunked", torch.float16) == "fused"
    assert api._epilogue("chunked", torch.float32) == "triton"
    monkeypatch.setattr(config, "chunked_epilogue", "cublas")
    with pytest.raises(ValueError, match="chunked_epilogue"):
        api._epilogue("chunked", torch.bfloat16)


def test_through_topk_kd_loss(monkeypatch):
    """``fastkd.topk_kd_loss`` on (B, T, D) float16 inputs with the fused provider behind the
    chunked plan (as on CUDA): loss and gradients against the float64 reference."""
    import fastkd
    from fastkd import api, config
    monkeypatch.setitem(api._EPILOGUE, "torch", "fused")
    monkeypatch.setattr(config, "chunk_bytes", CHUNK_ROWS * VOCAB * 6)
    launched = []
    stats = fh.head_stats
    monkeypatch.setattr(fh, "head_stats", lambda *a, **kw: launched.append(1) or stats(*a, **kw))
    gen = torch.Generator().manual_seed(11)
    hidden, weight, bias, ids, logprobs, labels, _g = _problem("peaked", torch.float16, gen)
    case = ("api", torch.float16, "peaked", "bucket", "reverse_kl", 0.5, 1.3, 20.0, 0.4, "mean", False)
    h = hidden.view(2, ROWS // 2, DIM).clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = fastkd.topk_kd_loss(h, w, ids.view(2, ROWS // 2, K), logprobs.view(2, ROWS // 2, K),
                               labels=labels.view(2, ROWS // 2), temperature=1.3, softcap=20.0,
                               ce_weight=0.4, kd_weight=KD_WEIGHT, impl="torch")
    loss.backward()
    assert len(launched) == 2, "the fused head did not run (two chunks expected)"
    ref = _reference(torch.float64, hidden, weight, None, ids, logprobs, labels, _g, case)
    plain = _reference(torch.float16, hidden, weight, None, ids, logprobs, labels, _g, case)
    for what, out, r, p in (("loss", loss, ref[0], plain[0]),
                            ("d hidden", h.grad.view(ROWS, DIM), ref[1], plain[1]),
                            ("d weight", w.grad, ref[2], plain[2])):
        err, base = rel_error(out, r), rel_error(p, r)
        assert err <= max(FACTOR * base, FLOOR[torch.float16]), f"{what}: {err:.2e} (plain {base:.2e})"


def _grad_problem(seed: int, c: int, dim: int, dtype: torch.dtype):
    """A chunk of ``c`` rows (V 101, K 4) for the gradient pass: operands in ``dtype``, sorted
    ids, labels, and ``head_grad``'s arguments (τ 1.7, softcap 9, tail and CE) with row 3
    ignored (zero scales and zero values on S). Returns the generator too, for more draws."""
    gen = torch.Generator().manual_seed(seed)
    vocab, k = 101, 4
    h = torch.randn(c, dim, generator=gen).to(dtype)
    w = (torch.randn(vocab, dim, generator=gen) * 0.7).to(dtype)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(c)])
    sorted_ids = ids.sort(dim=1).values.to(torch.int32)
    labels = torch.randint(0, vocab, (c,), generator=gen)
    values = torch.randn(c, k, generator=gen)
    kd_lse, dense, lse_ce, ce = (torch.randn(c, generator=gen) for _ in range(4))
    dense[3] = ce[3] = 0.0
    values[3] = 0.0
    args = (sorted_ids, values, kd_lse, dense, lse_ce, ce, labels, 1.7, 9.0, True, True)
    return gen, c, vocab, h, w, sorted_ids, labels, args


def test_grad_pass_in_place_over_the_tile():
    """On CUDA ``dz`` overwrites the tile it is computed from (float16, or bfloat16 through a
    view): the same values as into a float32 buffer, rounded once to the written dtype; ignored
    rows (zero scales, zero values on S) exact zeros."""
    _gen, c, vocab, h, w, sorted_ids, labels, args = _grad_problem(8, 12, 16, torch.float16)
    outs = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        chunk = fh.head_stats(h, w, None, sorted_ids, labels, 1 / 1.7, 9.0, True, True, True, False)
        out = (torch.empty(c, vocab) if dtype == torch.float32
               else chunk.tile if dtype == torch.float16 else chunk.tile.view(torch.bfloat16))
        outs[dtype] = fh.head_grad(chunk, *args, out).clone()
    ref = outs[torch.float32]
    assert torch.equal(outs[torch.float16], ref.half()), "float16 in place"
    # The interpreter rounds float32 to bfloat16 toward zero (no numpy bfloat16), the GPU to nearest:
    # within one bfloat16 ulp of the float32 values.
    err = (outs[torch.bfloat16].float() - ref).abs()
    assert (err <= ref.abs() * 2.0**-7).all(), f"bfloat16 in place: {err.max():.2e}"
    assert (outs[torch.float32][3] == 0).all(), "ignored row not exactly zero"


@pytest.mark.parametrize("divergence, reduction", [("jsd", "mean"), ("forward_kl", "none")])
def test_online_dense_teacher_float16(divergence, reduction, monkeypatch):
    """``fastkd.kd_loss(topk=None)`` with both heads fused (float16 operands, student and teacher
    softcaps, τ ≠ 1, CE, ignored rows): loss and gradients against float64, within FACTOR × the
    error of plain PyTorch (16-bit logits from both heads, the loss in float32)."""
    import fastkd
    from fastkd import api, config
    from fastkd.reference import kd_loss_reference
    monkeypatch.setitem(api._EPILOGUE, "torch", "fused")
    monkeypatch.setattr(config, "chunk_bytes", 2 * CHUNK_ROWS * VOCAB * 6)
    launched = []
    pair = fh.dense_pair
    monkeypatch.setattr(fh, "dense_pair", lambda *a, **kw: launched.append(1) or pair(*a, **kw))
    gen = torch.Generator().manual_seed(13)
    hidden, weight, _b, _ids, _lp, labels, grad_rows = _problem("peaked", torch.float16, gen)
    teacher_hidden = torch.randn(ROWS, 20, generator=gen).half()
    teacher_weight = (torch.randn(VOCAB, 20, generator=gen) * 0.6).half()
    options = dict(divergence=divergence, beta=0.4, temperature=1.4, softcap=8.0,
                   teacher_softcap=10.0, labels=labels, ce_weight=0.3, reduction=reduction)

    def run(h, w, th, tw, reference=None):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        if reference is None:
            loss = fastkd.kd_loss(h, w, th, tw, impl="torch", **options)
        elif reference == torch.float64:
            loss = kd_loss_reference(h, w, th.double(), tw.double(), **options)
        else:  # plain PyTorch: 16-bit logits of both heads, the loss in float32 on them
            logits = torch.nn.functional.linear(h, w).float()
            teacher_logits = torch.nn.functional.linear(th, tw).float()
            eye = torch.eye(VOCAB)
            loss = kd_loss_reference(logits, eye, teacher_logits, eye, compute_dtype=torch.float32,
                                     **options)
        total = (loss * grad_rows.to(loss.dtype)).sum() if reduction == "none" else loss
        total.backward()
        return total.detach(), h.grad, w.grad

    fused = run(hidden, weight, teacher_hidden, teacher_weight)
    assert launched, "the fused dense passes did not run"
    ref = run(hidden.double(), weight.double(), teacher_hidden, teacher_weight, torch.float64)
    plain = run(hidden, weight, teacher_hidden, teacher_weight, torch.float16)
    for what, out, r, p in zip(("loss", "d hidden", "d weight"), fused, ref, plain):
        err, base = rel_error(out, r), rel_error(p, r)
        assert err <= max(FACTOR * base, FLOOR[torch.float16]), f"{what}: {err:.2e} (plain {base:.2e})"
    assert (fused[1][list(IGNORED)] == 0).all(), "ignored rows' d hidden not exactly zero"


def test_fused_ops_pass_opcheck():
    """The chunked custom ops with ``epilogue="fused"`` (float16 operands): fake implementations,
    schemas and autograd registrations agree with what the fused path returns."""
    gen = torch.Generator().manual_seed(21)
    hidden, weight, bias, ids, logprobs, labels, _g = _problem("flat", torch.float16, gen)
    ids = torch.where((labels != IGNORE_INDEX).unsqueeze(1), ids, -1)
    budget = CHUNK_ROWS * VOCAB * 6
    topk_args = (hidden, weight, bias, ids, logprobs, None, None, None, labels, "jsd", 0.5,
                 "bucket", 1.3, 5.0, None, 0, "teacher", IGNORE_INDEX, 0.2, 1.0, budget, True)
    torch.library.opcheck(chunked.topk_forward, topk_args + (True, True, "fused", torch.float16))
    teacher_hidden = torch.randn(ROWS, 5, generator=gen).half()
    teacher_weight = torch.randn(VOCAB, 5, generator=gen).half()
    dense_args = (hidden, weight, None, teacher_hidden, teacher_weight, None, labels, "reverse_kl",
                  0.5, 1.0, None, None, IGNORE_INDEX, 0.0, 1.0, 2 * budget, False)
    torch.library.opcheck(chunked.dense_forward, dense_args + (True, True, "fused", torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [1.2, 1.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_plan_on_gpu_at_llama_vocab(dtype, temperature, monkeypatch):
    """On a GPU, at Llama-3's vocabulary with the real launch configuration (128×128 tiles, 1002
    partial tiles per row, bfloat16 dz in place through a view): the default path for 16-bit
    operands against float64, within FACTOR × the unfused plan's error (cuBLAS into float32, the
    Triton epilogues) or the dtype's floor. At τ = 1 with bfloat16 that default is the scaled
    tile (``scaled_grad``); at τ 1.2 with CE, and with float16, the gradient pass."""
    import fastkd
    calls = []
    original = fh.scaled_grad
    monkeypatch.setattr(fh, "scaled_grad", lambda *a, **k: calls.append(1) or original(*a, **k))
    rows, vocab, dim, k = 256, 128256, 512, 64
    gen = torch.Generator().manual_seed(31)
    hidden = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64) * (2.0 / dim**0.5)
    noise = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    teacher_lp = torch.log_softmax(hidden @ weight.T + noise, dim=-1)
    ids = teacher_lp.topk(k, dim=-1).indices
    logprobs = teacher_lp.gather(1, ids).float()
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::7] = IGNORE_INDEX
    options = dict(ce_weight=0.3, temperature=temperature, softcap=30.0)
    monkeypatch.setattr(fastkd.config, "chunk_bytes", 96 * vocab * 4)  # several chunks
    results = {}
    for provider in ("fused", "triton"):
        monkeypatch.setattr(fastkd.config, "chunked_epilogue", provider)
        h = hidden.to("cuda", dtype).requires_grad_()
        w = weight.to("cuda", dtype).requires_grad_()
        loss = fastkd.topk_kd_loss(h, w, ids.cuda(), logprobs.cuda(), labels=labels.cuda(), **options)
        loss.backward()
        results[provider] = (loss.cpu(), h.grad.cpu(), w.grad.cpu())
    ref_h, ref_w = hidden.to(dtype).double().requires_grad_(), weight.to(dtype).double().requires_grad_()
    ref = topk_kd_loss_reference(ref_h, ref_w, ids, logprobs, labels=labels, **options)
    ref.backward()
    floor = 8e-3 if dtype == torch.bfloat16 else 2e-3
    for i, (what, r) in enumerate((("loss", ref), ("d hidden", ref_h.grad), ("d weight", ref_w.grad))):
        err, base = rel_error(results["fused"][i], r), rel_error(results["triton"][i], r)
        assert err <= max(FACTOR * base, floor), f"{what}: {err:.2e} (unfused plan {base:.2e})"
    assert bool(calls) == (dtype == torch.bfloat16 and temperature == 1.0), len(calls)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gradient_gemms_make_dz_from_the_tile(dtype):
    """``head_grad_gemms`` (dz made inside the dh and dW GEMMs, never written) against the
    gradient pass into float32 followed by float64 GEMMs on dz rounded to the operand dtype:
    dh, dW written then accumulated, db; odd C, V and D so every loop has a partial step;
    an ignored row (zero scales and values) contributes nothing."""
    gen, c, vocab, h, w, sorted_ids, labels, args = _grad_problem(17, 13, 24, dtype)
    dim = h.shape[1]
    chunk = fh.head_stats(h, w, None, sorted_ids, labels, 1 / 1.7, 9.0, True, True, True, False)
    dz = fh.head_grad(chunk, *args, torch.empty(c, vocab)).to(dtype).double()
    previous = torch.randn(vocab, dim, generator=gen)
    dh, dw, db = torch.empty(c, dim, dtype=dtype), previous.clone(), torch.ones(vocab)
    fh.head_grad_gemms(chunk, *args, w, h, dh, dw, db, accumulate=True)
    ref_dh = dz @ w.double()
    ref_dw = previous.double() + dz.T @ h.double()
    floor = FLOOR[dtype]
    assert rel_error(dh, ref_dh) <= floor, f"dh: {rel_error(dh, ref_dh):.2e}"
    assert rel_error(dw, ref_dw) <= floor, f"dW accumulated: {rel_error(dw, ref_dw):.2e}"
    assert rel_error(db, 1.0 + dz.sum(0)) <= floor, f"db: {rel_error(db, 1.0 + dz.sum(0)):.2e}"
    assert (dh[3] == 0).all(), "ignored row's dh not exactly zero"
    fh.head_grad_gemms(chunk, *args, w, h, dh, dw, None, accumulate=False)
    assert rel_error(dw, dz.T @ h.double()) <= floor, "dW written (first chunk)"
