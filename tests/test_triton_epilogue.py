"""The Triton epilogues of the chunked engine (fastkd/backends/triton_epilogue.py), in the interpreter.

Each case runs the kernels the way the chunked plan does — statistics over a logits buffer, the
``(rows, K)`` math of the torch backend (``_topk_epilogue``), then ``dz`` — and compares with the
float64 references of ``fastkd.reference`` evaluated on the same logits: ``hidden`` = the buffer
(rounded values, as float64) and ``weight`` = the identity, so ``logits = hidden`` exactly and the
reference's ``d loss / d hidden`` is ``dz``. Errors are ‖out − ref‖/‖ref‖ and must stay within
``FACTOR`` times what plain PyTorch achieves in float32 on the same buffer (then rounded to the
output's dtype), or the output dtype's floor, whichever is larger.

Shapes: 6 rows, V = 200 with tiles of 64 columns (``MAX_BLOCK_V`` lowered): 4 tiles, the last one
partial (V not a multiple of the tile); K = 9 with -1 slots, ids at columns 0, V−1 and both sides of
the tile boundary 63|64. Rows 1 and 4 are ignored (label −100) and must come back exactly zero.
float64 buffers are checked against float64 itself (1e-13). ``test_epilogues_through_a_head`` runs
the chain behind a real head (``dh = dz·W`` against the references' ``d hidden``); its GPU-marked
twin does so at V = 128256 with the GPU's own tile. The compile test builds every kernel for
sm_90/89/80 with ``scripts/compile_epilogue.py`` (no GPU needed).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import rel_error
from fastkd import divergences as dv
from fastkd.backends import triton_epilogue as te
from fastkd.backends.torch_backend import _topk_epilogue
from fastkd.reference import kd_loss_reference, topk_kd_loss_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEFAULT_TILE = te.MAX_BLOCK_V
ROWS, VOCAB, K, TILE = 6, 200, 9, 64
IGNORED = (1, 4)
IGNORE_INDEX = -100
KD_WEIGHT = 0.8
FACTOR = 4.0
# Below this a relative error is rounding of the output dtype itself (a few ulps).
FLOOR = {torch.float64: 1e-13, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(te, "MAX_BLOCK_V", TILE)


def _assert_close(out, ref, baseline, dtype, what):
    """``out`` within FACTOR × the float32 PyTorch error ``baseline`` (or the dtype floor) of ``ref``."""
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err, base = rel_error(out, ref), rel_error(baseline, ref)
    tol = max(FACTOR * base, FLOOR[dtype])
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.3e} (float32 PyTorch: {base:.3e})"


def _baseline(dtype):
    """The dtype plain PyTorch computes in for a buffer of ``dtype``: float32, or float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(dist: str, gen: torch.Generator):
    """Student logits (rows, V) float64 and a teacher's: flat, peaked, or near-converged (one
    dominant token per row, teacher ≈ student)."""
    x = torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64)
    teacher = torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64) * 2.0
    if dist == "flat":
        return 0.5 * x, teacher
    if dist == "peaked":
        return 4.0 * x, 3.0 * teacher
    top = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    x[torch.arange(ROWS), top] += 12.0
    return x, x + 0.05 * torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64)


def _labels(gen):
    labels = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    labels[list(IGNORED)] = IGNORE_INDEX
    return labels


def _topk_set(teacher_logits, gen):
    """The teacher's top-K ids and log-probs, with -1 slots and ids at the edges of the vocabulary
    and of a tile."""
    teacher_lp = torch.log_softmax(teacher_logits, dim=-1)
    ids = teacher_lp.topk(K, dim=-1).indices
    edges = torch.tensor([0, VOCAB - 1, TILE - 1, TILE])
    for row in (0, 2, 3):
        free = edges[~torch.isin(edges, ids[row])]
        ids[row, K - len(free):] = free  # replaces the lowest-ranked ids
    ids[2, 1] = ids[5, 0] = ids[5, 4] = -1
    logprobs = torch.where(ids >= 0, teacher_lp.gather(1, ids.clamp(min=0)), 0.0)
    return ids, logprobs.float()


def _sorted(ids, vocab, unused):
    """Ids sorted per row, the -1 slots first (``unused="first"``) or as V, last; int32."""
    key = ids if unused == "first" else torch.where(ids >= 0, ids, vocab)
    sorted_ids, perm = key.sort(dim=1, stable=True)
    return sorted_ids.to(torch.int32), perm


def _rows(n, dtype=torch.float32, device="cpu"):
    return [torch.full((n,), float("nan"), dtype=dtype, device=device) for _ in range(4)]


# ------------------------------------------------------------------------------------------------
# top-k
# ------------------------------------------------------------------------------------------------

TOPK_CASES = [
    # id, buffer dtype, distribution, tail, divergence, beta, temperature, softcap, ce_weight,
    # out dtype (None: in place), where the -1 slots sort
    ("flat-f32-rkl", torch.float32, "flat", "bucket", "reverse_kl", 0.5, 1.0, None, 0.0, None, "last"),
    ("peaked-f32-fkl-cap-tau-ce", torch.float32, "peaked", "bucket", "forward_kl", 0.5, 2.0, 5.0, 0.7,
     None, "first"),
    ("converged-f32-jsd-ce", torch.float32, "converged", "bucket", "jsd", 0.3, 1.0, None, 0.5, None,
     "last"),
    ("converged-f32-cap-out16", torch.float32, "converged", "bucket", "reverse_kl", 0.5, 1.0, 30.0,
     1.0, torch.float16, "last"),
    ("flat-f16-renormalize-cap-ce", torch.float16, "flat", "renormalize", "reverse_kl", 0.5, 0.7,
     3.0, 0.3, None, "last"),
    ("peaked-f16-tau-outbf16", torch.float16, "peaked", "bucket", "reverse_kl", 0.5, 1.5, None, 0.0,
     torch.bfloat16, "first"),
    # float64 buffers (the chunked plan's float64 path) are computed in float64
    ("peaked-f64-fkl-cap-tau-ce", torch.float64, "peaked", "bucket", "forward_kl", 0.5, 0.7, 5.0, 0.6,
     None, "last"),
]


def _topk_kernels(buf, ids, teacher_lp, labels, grad_rows, case, out):
    """The chunked plan's top-k epilogue on one chunk (on the buffer's device): stats, the
    (rows, K) math of the torch backend, dz. Returns the statistics and dz, on the CPU."""
    _, _, _, tail, divergence, beta, tau, cap, ce_weight, _, unused = case
    (rows, vocab), k, device = buf.shape, ids.shape[1], buf.device
    with_tail, use_ce = tail == "bucket", ce_weight != 0.0
    ids, labels = ids.to(device), labels.to(device)
    counted = labels != IGNORE_INDEX
    valid = ids >= 0
    sorted_ids, perm = _sorted(ids, vocab, unused)
    acc = _baseline(buf.dtype)  # the plan's state dtype: float32, float64 for float64 buffers
    teacher_lp, grad_rows = teacher_lp.to(device, acc), grad_rows.to(device, acc)
    lse, tail_lse, lse_ce, mean_z = _rows(rows, acc, device)
    te.topk_stats(buf, rows, vocab, sorted_ids, k, 1.0 / tau, cap, with_tail, use_ce, True, lse,
                  tail_lse if with_tail else None, lse_ce if use_ce else None, mean_z)
    topk_logits = dv.softcap(buf.gather(1, ids.clamp(min=0)).to(acc), cap) / tau
    _kd, w, kd_lse, dense, topk_coef = _topk_epilogue(
        topk_logits, lse, tail_lse if with_tail else None, teacher_lp, None, valid, tail,
        divergence, beta)
    kd_scale = torch.where(counted, KD_WEIGHT * tau * grad_rows, 0.0)
    ce_scale = torch.where(counted, ce_weight * grad_rows, 0.0)
    on_topk = kd_scale[:, None] * (w - torch.exp(topk_logits - kd_lse[:, None]) * topk_coef[:, None])
    on_topk = torch.where(valid, on_topk, 0.0).gather(1, perm).contiguous()
    safe_labels = torch.where(counted, labels, 0)
    dz = te.topk_grad(buf, rows, vocab, sorted_ids, on_topk, k, kd_lse, kd_scale * dense,
                      lse_ce if use_ce else None, ce_scale, safe_labels, 1.0 / tau, cap, with_tail,
                      use_ce, out=out)
    assert dz is (buf if out is None else out)
    stats = dict(lse=lse, tail_lse=tail_lse, lse_ce=lse_ce, mean_z=mean_z)
    return {key: value.cpu() for key, value in stats.items()}, dz.cpu()


def _topk_reference(x, ids, teacher_lp, labels, grad_rows, case, dtype):
    """``d Σ g·loss / d logits`` and the row statistics, computed in ``dtype`` from the buffer."""
    _, _, _, tail, divergence, beta, tau, cap, ce_weight, _, _ = case
    hidden = x.detach().to(dtype, copy=True).requires_grad_()
    loss = topk_kd_loss_reference(
        hidden, torch.eye(VOCAB, dtype=dtype), ids, teacher_lp, divergence=divergence, beta=beta,
        tail=tail, temperature=tau, labels=labels, ignore_index=IGNORE_INDEX, ce_weight=ce_weight,
        kd_weight=KD_WEIGHT, softcap=cap, reduction="none", compute_dtype=dtype)
    (loss * grad_rows.to(dtype)).sum().backward()
    capped = dv.softcap(x.to(dtype), cap)
    z = capped / tau
    in_set = dv.topk_mask(ids.clamp(min=0), ids >= 0, VOCAB)
    stats = dict(lse=torch.logsumexp(z, dim=1), tail_lse=dv.masked_logsumexp(z, ~in_set),
                 lse_ce=torch.logsumexp(capped, dim=1), mean_z=(torch.softmax(z, dim=1) * z).sum(1))
    return stats, hidden.grad


@pytest.mark.parametrize("case", TOPK_CASES, ids=[c[0] for c in TOPK_CASES])
def test_topk_epilogue_matches_reference(case):
    name, dtype, dist, tail, _div, _beta, _tau, _cap, ce_weight, out_dtype, _unused = case
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    x64, teacher_logits = _logits(dist, gen)
    ids, teacher_lp = _topk_set(teacher_logits, gen)
    labels = _labels(gen)
    grad_rows = torch.rand(ROWS, generator=gen) + 0.5
    buf = x64.to(DEVICE, dtype)
    before = buf.cpu().clone()
    out = None if out_dtype is None else torch.full(buf.shape, float("nan"), dtype=out_dtype, device=DEVICE)
    stats, dz = _topk_kernels(buf, ids, teacher_lp, labels, grad_rows, case, out)
    x = before.double()  # the reference sees exactly the buffer's values (dz may overwrite it)
    ref_stats, ref_dz = _topk_reference(x, ids, teacher_lp, labels, grad_rows, case, torch.float64)
    f32_stats, f32_dz = _topk_reference(x, ids, teacher_lp, labels, grad_rows, case, _baseline(dtype))

    asked = ["lse", "mean_z"] + (["tail_lse"] if tail == "bucket" else []) + (["lse_ce"] if ce_weight else [])
    for key in asked:
        _assert_close(stats[key], ref_stats[key], f32_stats[key], _baseline(dtype), f"{name}: {key}")
    written_dtype = dtype if out_dtype is None else out_dtype
    assert dz.dtype == written_dtype
    _assert_close(dz, ref_dz, f32_dz.to(written_dtype), written_dtype, f"{name}: dz")
    assert (dz[list(IGNORED)] == 0).all(), f"{name}: ignored rows not exactly zero"
    if out is not None:
        assert torch.equal(buf.cpu(), before), f"{name}: out= must leave the logits untouched"


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")  # log(0) = −inf, as meant
def test_topk_set_covering_the_vocabulary_and_no_set():
    """A row whose S is all of V has an empty tail (−inf); K = 0 takes the tail as everything."""
    gen = torch.Generator().manual_seed(3)
    vocab = 40
    buf = torch.randn(2, vocab, generator=gen)
    ids = torch.stack([torch.arange(vocab), torch.randperm(vocab, generator=gen)]).sort(dim=1).values
    ids[1, :5] = -1  # row 1: 35 of the 40 ids, sorted with the -1 slots first
    ids = ids.sort(dim=1).values.to(torch.int32)
    lse, tail_lse = torch.empty(2, device=DEVICE), torch.empty(2, device=DEVICE)
    te.topk_stats(buf.to(DEVICE), 2, vocab, ids.to(DEVICE), vocab, 1.0, None, True, False, False, lse,
                  tail_lse, None, None)
    missing = torch.ones(vocab, dtype=torch.bool)
    missing[ids[1][ids[1] >= 0].long()] = False
    assert tail_lse[0].item() == float("-inf")
    assert torch.allclose(tail_lse[1].cpu(), torch.logsumexp(buf[1][missing], 0), atol=1e-6)
    te.topk_stats(buf.to(DEVICE), 2, vocab, None, 0, 1.0, None, True, False, False, lse, tail_lse,
                  None, None)
    assert torch.allclose(tail_lse.cpu(), torch.logsumexp(buf, 1), atol=1e-6)
    assert torch.allclose(lse.cpu(), torch.logsumexp(buf, 1), atol=1e-6)


def test_strided_buffer_and_state_give_the_same_bits():
    """A buffer that is a column slice of a wider one (row stride > V) and per-row state that is
    columns of an (N, 4) tensor give exactly what contiguous tensors give."""
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(ROWS, VOCAB + 24, generator=gen).to(DEVICE)
    ids = torch.stack([torch.randperm(VOCAB, generator=gen)[:K] for _ in range(ROWS)])
    ids, _ = _sorted(ids.to(DEVICE), VOCAB, "last")
    results = []
    for strided in (False, True):
        buf = wide[:, :VOCAB] if strided else wide[:, :VOCAB].contiguous()
        state = torch.zeros(ROWS, 4, device=DEVICE)
        cols = [state[:, i] if strided else torch.zeros(ROWS, device=DEVICE) for i in range(4)]
        te.topk_stats(buf, ROWS, VOCAB, ids, K, 0.5, 4.0, True, True, True, *cols)
        out = torch.empty(ROWS, VOCAB, device=DEVICE)
        te.topk_grad(buf, ROWS, VOCAB, ids, torch.zeros(ROWS, K, device=DEVICE), K, cols[0], cols[3],
                     cols[2], cols[3], torch.zeros(ROWS, dtype=torch.int64, device=DEVICE), 0.5, 4.0,
                     True, True, out=out)
        results.append([c.cpu() for c in cols] + [out.cpu()])
    for plain, strided in zip(*results):
        assert torch.equal(plain, strided)


# ------------------------------------------------------------------------------------------------
# dense (online teacher)
# ------------------------------------------------------------------------------------------------

DENSE_CASES = [
    # id, buffer dtype, distribution, divergence, beta, temperature, softcap, teacher softcap,
    # ce_weight, out dtype
    ("flat-f32-fkl", torch.float32, "flat", "forward_kl", 0.5, 1.0, None, None, 0.0, None),
    ("peaked-f32-rkl-caps-tau-ce", torch.float32, "peaked", "reverse_kl", 0.5, 2.0, 5.0, 8.0, 0.6, None),
    ("converged-f32-jsd-tcap-outbf16", torch.float32, "converged", "jsd", 0.3, 0.8, None, 4.0, 0.4,
     torch.bfloat16),
    ("flat-f16-jsd-cap-ce", torch.float16, "flat", "jsd", 0.7, 1.0, 3.0, None, 1.0, None),
    ("peaked-f16-rkl-tau-out16", torch.float16, "peaked", "reverse_kl", 0.5, 1.3, None, None, 0.0,
     torch.float16),
    ("flat-f64-jsd-caps-tau-ce", torch.float64, "flat", "jsd", 0.4, 0.7, 3.0, 6.0, 0.5, None),
]


def _dense_reference(x, y, labels, grad_rows, case, dtype):
    _, _, _, divergence, beta, tau, cap, teacher_cap, ce_weight, _ = case
    hidden = x.detach().to(dtype, copy=True).requires_grad_()
    eye = torch.eye(VOCAB, dtype=dtype)
    loss = kd_loss_reference(
        hidden, eye, y.to(dtype), eye, divergence=divergence, beta=beta, temperature=tau,
        labels=labels, ignore_index=IGNORE_INDEX, ce_weight=ce_weight, kd_weight=KD_WEIGHT,
        softcap=cap, teacher_softcap=teacher_cap, reduction="none", compute_dtype=dtype)
    (loss * grad_rows.to(dtype)).sum().backward()
    z = dv.softcap(x.to(dtype), cap) / tau
    t = dv.softcap(y.to(dtype), teacher_cap) / tau
    stats = dict(lse=torch.logsumexp(z, 1), teacher_lse=torch.logsumexp(t, 1),
                 lse_ce=torch.logsumexp(z * tau, 1), mean_z=(torch.softmax(z, 1) * z).sum(1))
    return stats, loss.detach(), hidden.grad


def _dense_kernels(student, teacher, labels, grad_rows, case, out):
    """The chunked plan's dense epilogue on one chunk (on the buffers' device): stats, divergence,
    dz. Returns the statistics, the loss rows (kd from the kernel, CE from its lse) and dz, on the CPU."""
    _, _, _, divergence, beta, tau, cap, teacher_cap, ce_weight, _ = case
    (rows, vocab), device = student.shape, student.device
    acc = _baseline(student.dtype)
    use_ce = ce_weight != 0.0
    labels = labels.to(device)
    counted = labels != IGNORE_INDEX
    safe_labels = torch.where(counted, labels, 0)
    kind = te.KIND_CODES[divergence]
    lse, teacher_lse, lse_ce, mean_z = _rows(rows, acc, device)
    te.dense_stats(student, teacher, rows, vocab, 1.0 / tau, cap, teacher_cap, use_ce, True, lse,
                   teacher_lse, lse_ce if use_ce else None, mean_z)
    kd, wsum = torch.empty(rows, dtype=acc, device=device), torch.empty(rows, dtype=acc, device=device)
    te.dense_divergence(student, teacher, rows, vocab, 1.0 / tau, cap, teacher_cap, kind, beta, lse,
                        teacher_lse, kd, wsum)
    loss = KD_WEIGHT * tau**2 * kd
    if use_ce:
        target = dv.softcap(student.gather(1, safe_labels[:, None]).to(acc), cap).squeeze(1)
        loss = loss + ce_weight * (lse_ce - target)
    loss = torch.where(counted, loss, 0.0)
    g = grad_rows.to(device, acc)
    kd_scale = torch.where(counted, KD_WEIGHT * tau * g, 0.0)
    ce_scale = torch.where(counted, ce_weight * g, 0.0)
    dz = te.dense_grad(student, teacher, rows, vocab, 1.0 / tau, cap, teacher_cap, kind, beta, lse,
                       teacher_lse, wsum, kd_scale, lse_ce if use_ce else None, ce_scale, safe_labels,
                       use_ce, out=out)
    assert dz is (student if out is None else out)
    stats = dict(lse=lse, teacher_lse=teacher_lse, lse_ce=lse_ce, mean_z=mean_z)
    return {key: value.cpu() for key, value in stats.items()}, loss.cpu(), dz.cpu()


@pytest.mark.parametrize("case", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
def test_dense_epilogue_matches_reference(case):
    name, dtype, dist, _div, _beta, _tau, _cap, _tcap, ce_weight, out_dtype = case
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    x64, y64 = _logits(dist, gen)
    labels = _labels(gen)
    grad_rows = torch.rand(ROWS, generator=gen) + 0.5
    student, teacher = x64.to(DEVICE, dtype), y64.to(DEVICE, dtype)
    before = student.cpu().clone()
    out = None if out_dtype is None else torch.full(student.shape, float("nan"), dtype=out_dtype,
                                                   device=DEVICE)
    stats, loss, dz = _dense_kernels(student, teacher, labels, grad_rows, case, out)

    x, y = before.double(), teacher.cpu().double()
    ref_stats, ref_loss, ref_dz = _dense_reference(x, y, labels, grad_rows, case, torch.float64)
    f32_stats, f32_loss, f32_dz = _dense_reference(x, y, labels, grad_rows, case, _baseline(dtype))
    for key in ["lse", "teacher_lse", "mean_z"] + (["lse_ce"] if ce_weight else []):
        _assert_close(stats[key], ref_stats[key], f32_stats[key], _baseline(dtype), f"{name}: {key}")
    _assert_close(loss, ref_loss, f32_loss, _baseline(dtype), f"{name}: loss rows (kd from the kernel)")
    written_dtype = dtype if out_dtype is None else out_dtype
    assert dz.dtype == written_dtype
    _assert_close(dz, ref_dz, f32_dz.to(written_dtype), written_dtype, f"{name}: dz")
    assert (dz[list(IGNORED)] == 0).all(), f"{name}: ignored rows not exactly zero"
    if out is not None:
        assert torch.equal(student.cpu(), before), f"{name}: out= must leave the logits untouched"


# ------------------------------------------------------------------------------------------------
# through a real head: dh = dz·W against the references' d hidden (GPU: Llama-3's vocabulary)
# ------------------------------------------------------------------------------------------------

def _through_head(rows, vocab, dim, k, device, case, dense):
    """Logits ``h·Wᵀ`` rounded to a float32 buffer on ``device``, the epilogue chain, then
    ``dh = dz·W`` in float64, against the float64 reference's ``d hidden`` (and float32 PyTorch's)."""
    gen = torch.Generator().manual_seed(rows + vocab)
    hidden = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64) * (2.0 / dim**0.5)
    teacher_hidden = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[1::3] = IGNORE_INDEX
    grad_rows = torch.rand(rows, generator=gen) + 0.5
    buf = (hidden @ weight.T).to(device, torch.float32)
    if dense:
        teacher = (teacher_hidden @ weight.T).to(device, torch.float32)
        _stats, _loss, dz = _dense_kernels(buf, teacher, labels, grad_rows, case, None)
    else:
        teacher_lp = torch.log_softmax(teacher_hidden @ weight.T, dim=-1)
        ids = teacher_lp.topk(k, dim=-1).indices
        ids[0, -3:] = -1
        teacher_lp = torch.where(ids >= 0, teacher_lp.gather(1, ids.clamp(min=0)), 0.0).float()
        _stats, dz = _topk_kernels(buf, ids, teacher_lp, labels, grad_rows, case, None)
    dh = dz.double() @ weight

    def reference(dtype):
        h = hidden.to(dtype, copy=True).requires_grad_()
        options = dict(divergence=case[3 if dense else 4], beta=case[4 if dense else 5],
                       temperature=case[5 if dense else 6], softcap=case[6 if dense else 7],
                       labels=labels, ignore_index=IGNORE_INDEX, ce_weight=case[8],
                       kd_weight=KD_WEIGHT, reduction="none", compute_dtype=dtype)
        if dense:
            loss = kd_loss_reference(h, weight, teacher_hidden, weight, teacher_softcap=case[7], **options)
        else:
            loss = topk_kd_loss_reference(h, weight, ids, teacher_lp, tail=case[3], **options)
        (loss * grad_rows.to(dtype)).sum().backward()
        return h.grad

    _assert_close(dh, reference(torch.float64), reference(torch.float32), torch.float32, "dh = dz·W")
    assert (dh[1::3] == 0).all(), "ignored rows not exactly zero"


HEAD_CASES = [("topk", TOPK_CASES[1]), ("dense", DENSE_CASES[1])]


@pytest.mark.parametrize("kind, case", HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_epilogues_through_a_head(kind, case):
    _through_head(ROWS, VOCAB, 24, K, DEVICE, case, kind == "dense")


@pytest.mark.gpu
@pytest.mark.parametrize("kind, case", HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_epilogues_through_a_head_at_llama_vocab_on_gpu(kind, case, monkeypatch):
    """V = 128256 with the launch configuration the GPU uses (1024-column tiles, 126 per row)."""
    monkeypatch.setattr(te, "MAX_BLOCK_V", DEFAULT_TILE)
    _through_head(64, 128256, 64, 64, "cuda", case, kind == "dense")


# ------------------------------------------------------------------------------------------------
# argument checks, recorded launches, GPU compilation
# ------------------------------------------------------------------------------------------------

def _topk_stats_args(**change):
    buf = torch.randn(3, 50)
    args = dict(logits=buf, rows=3, vocab=50, sorted_ids=torch.zeros(3, 4, dtype=torch.int32), k=4,
                inv_temp=1.0, cap=None, with_tail=True, with_ce=False, with_stats=False,
                lse=torch.empty(3), tail_lse=torch.empty(3), lse_ce=None, mean_z=None)
    args.update(change)
    return args


@pytest.mark.parametrize("change, error, names", [
    (dict(logits=torch.ones(3, 50, dtype=torch.int32)), TypeError, "logits"),
    (dict(rows=4), ValueError, "logits"),
    (dict(lse=torch.empty(2)), ValueError, "lse"),
    (dict(lse=torch.empty(3, dtype=torch.float16)), TypeError, "lse"),
    (dict(tail_lse=None), TypeError, "tail_lse"),
    (dict(sorted_ids=torch.zeros(3, 4)), TypeError, "sorted_ids"),
    (dict(inv_temp=torch.tensor(1.0)), TypeError, "inv_temp"),
    (dict(inv_temp=0.0), ValueError, "inv_temp"),
    (dict(cap=float("nan")), ValueError, "cap"),
    (dict(vocab=0), ValueError, "vocab"),
])
def test_topk_stats_rejects_bad_arguments(change, error, names):
    with pytest.raises(error, match=names):
        te.topk_stats(**_topk_stats_args(**change))


def test_dense_and_grad_reject_bad_arguments():
    s, t = torch.randn(2, 30), torch.randn(2, 30)
    row = [torch.empty(2) for _ in range(4)]
    with pytest.raises(ValueError, match="kind"):
        te.dense_divergence(s, t, 2, 30, 1.0, None, None, 3, 0.5, *row)
    with pytest.raises(ValueError, match="beta"):
        te.dense_divergence(s, t, 2, 30, 1.0, None, None, 2, 0.0, *row)
    with pytest.raises(ValueError, match="teacher"):
        te.dense_stats(s, t[:1], 2, 30, 1.0, None, None, False, False, row[0], row[1], None, None)
    with pytest.raises(ValueError, match="out"):
        te.dense_grad(s, t, 2, 30, 1.0, None, None, 1, 0.5, *row, None, None, None, False,
                      out=torch.empty(2, 31))
    with pytest.raises(ValueError, match="sorted_values"):
        te.topk_grad(s, 2, 30, torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 4), 3, row[0],
                     None, None, None, None, 1.0, None, False, False)
    with pytest.raises(TypeError, match="labels"):
        te.topk_grad(s, 2, 30, None, None, 0, row[0], None, row[1], row[2], torch.zeros(2), 1.0,
                     None, False, True)


def test_compile_specs_record_the_launchers_configurations():
    specs = te.compile_specs(vocab=1000, k=5, dtype=torch.bfloat16, out_dtype=torch.float16)
    assert [s["name"] for s in specs] == ["topk_stats_kernel", "topk_grad_kernel", "dense_stats_kernel",
                                         "dense_divergence_kernel", "dense_grad_kernel"]
    config = te.topk_stats_config(1000, 5, torch.bfloat16)
    assert specs[0]["constexprs"]["BLOCK_V"] == config["BLOCK_V"] == TILE
    assert specs[0]["options"]["num_warps"] == config["num_warps"]
    assert specs[0]["signature"]["logits_ptr"] == "*bf16"
    assert specs[1]["signature"]["out_ptr"] == "*fp16" and specs[1]["constexprs"]["WITH_CE"]
    assert specs[4]["constexprs"]["KIND"] == 2


def test_kernels_compile_for_sm90_sm89_sm80_without_spills():
    """The offline compile lane on the engine's default float32 buffer, its bf16 ``dz`` output and a
    bf16 buffer (the full matrix: ``python scripts/compile_epilogue.py``): no spills, shared memory
    within each target's limit."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, os.path.join(root, "scripts", "compile_epilogue.py"), "--dtypes", "fp32", "fp32>bf16",
         "bf16"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    # 5 kernels x 3 targets for each buffer dtype, and the 2 grad kernels x 3 writing bf16 dz
    assert result.stdout.count("_kernel") == 15 + 6 + 15, result.stdout
