"""The Triton epilogues of the chunked engine (fastkd/backends/triton_epilogue.py), in the interpreter.

Each case runs the kernels the way the chunked plan does — statistics over a logits buffer, the
``(rows, K)`` math of the torch backend (``_topk_epilogue``), then ``dz`` — and compares with the
float64 references of ``fastkd.reference`` evaluated on the same logits: ``hidden`` = the buffer
(rounded values, as float64) and ``weight`` = the identity, so ``logits = hidden`` exactly and the
reference's ``d loss / d hidden`` is ``dz``. Errors are ‖out − ref‖/‖ref‖ and must stay within
``FACTOR`` times what plain PyTorch achieves in float32 on the same buffer (then rounded to the
output's dtype), or the output dtype's floor, whichever is larger.

Shapes: 6 rows, V = 300 with tiles of 64 columns (``MAX_BLOCK_V`` lowered): 5 tiles, the last one
partial (V not a multiple of the tile); K = 9 with -1 slots, ids at columns 0, V−1 and both sides of
the tile boundary 63|64. Rows 1 and 4 are ignored (label −100) and must come back exactly zero.
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

ROWS, VOCAB, K, TILE = 6, 300, 9, 64
IGNORED = (1, 4)
IGNORE_INDEX = -100
KD_WEIGHT = 0.8
FACTOR = 4.0
# Below this a relative error is rounding of the output dtype itself (a few ulps).
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(te, "MAX_BLOCK_V", TILE)


def _assert_close(out, ref, baseline, dtype, what):
    """``out`` within FACTOR × the float32 PyTorch error ``baseline`` (or the dtype floor) of ``ref``."""
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err, base = rel_error(out, ref), rel_error(baseline, ref)
    tol = max(FACTOR * base, FLOOR[dtype])
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.3e} (float32 PyTorch: {base:.3e})"


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


def _sorted(ids, unused):
    """Ids sorted per row, the -1 slots first (``unused="first"``) or as V, last; int32."""
    key = ids if unused == "first" else torch.where(ids >= 0, ids, VOCAB)
    sorted_ids, perm = key.sort(dim=1, stable=True)
    return sorted_ids.to(torch.int32), perm


def _rows():
    return [torch.full((ROWS,), float("nan")) for _ in range(4)]


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
]


def _topk_kernels(buf, ids, teacher_lp, labels, grad_rows, case, out):
    """The chunked plan's top-k epilogue on one chunk: stats, (rows, K) math, dz."""
    _, _, _, tail, divergence, beta, tau, cap, ce_weight, _, unused = case
    with_tail, use_ce = tail == "bucket", ce_weight != 0.0
    counted = labels != IGNORE_INDEX
    valid = ids >= 0
    sorted_ids, perm = _sorted(ids, unused)
    lse, tail_lse, lse_ce, mean_z = _rows()
    te.topk_stats(buf, ROWS, VOCAB, sorted_ids, K, 1.0 / tau, cap, with_tail, use_ce, True, lse,
                  tail_lse if with_tail else None, lse_ce if use_ce else None, mean_z)
    topk_logits = dv.softcap(buf.gather(1, ids.clamp(min=0)).float(), cap) / tau
    _kd, w, kd_lse, dense, topk_coef = _topk_epilogue(
        topk_logits, lse, tail_lse if with_tail else None, teacher_lp, None, valid, tail,
        divergence, beta)
    kd_scale = torch.where(counted, KD_WEIGHT * tau * grad_rows, 0.0)
    ce_scale = torch.where(counted, ce_weight * grad_rows, 0.0)
    on_topk = kd_scale[:, None] * (w - torch.exp(topk_logits - kd_lse[:, None]) * topk_coef[:, None])
    on_topk = torch.where(valid, on_topk, 0.0).gather(1, perm).contiguous()
    safe_labels = torch.where(counted, labels, 0)
    dz = te.topk_grad(buf, ROWS, VOCAB, sorted_ids, on_topk, K, kd_lse, kd_scale * dense,
                      lse_ce if use_ce else None, ce_scale, safe_labels, 1.0 / tau, cap, with_tail,
                      use_ce, out=out)
    return dict(lse=lse, tail_lse=tail_lse, lse_ce=lse_ce, mean_z=mean_z), dz


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
    buf = x64.to(dtype)
    before = buf.clone()
    out = None if out_dtype is None else torch.full(buf.shape, float("nan"), dtype=out_dtype)
    stats, dz = _topk_kernels(buf, ids, teacher_lp, labels, grad_rows, case, out)
    x = before.double()  # the reference sees exactly the buffer's values (dz may overwrite it)
    ref_stats, ref_dz = _topk_reference(x, ids, teacher_lp, labels, grad_rows, case, torch.float64)
    f32_stats, f32_dz = _topk_reference(x, ids, teacher_lp, labels, grad_rows, case, torch.float32)

    asked = ["lse", "mean_z"] + (["tail_lse"] if tail == "bucket" else []) + (["lse_ce"] if ce_weight else [])
    for key in asked:
        _assert_close(stats[key], ref_stats[key], f32_stats[key], torch.float32, f"{name}: {key}")
    written_dtype = dtype if out_dtype is None else out_dtype
    assert dz.dtype == written_dtype and (out is None or dz is out)
    _assert_close(dz, ref_dz, f32_dz.to(written_dtype), written_dtype, f"{name}: dz")
    assert (dz[list(IGNORED)] == 0).all(), f"{name}: ignored rows not exactly zero"
    if out is not None:
        assert torch.equal(buf, before), f"{name}: out= must leave the logits untouched"


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")  # log(0) = −inf, as meant
def test_topk_set_covering_the_vocabulary_and_no_set():
    """A row whose S is all of V has an empty tail (−inf); K = 0 takes the tail as everything."""
    gen = torch.Generator().manual_seed(3)
    vocab = 40
    buf = torch.randn(2, vocab, generator=gen)
    ids = torch.stack([torch.arange(vocab), torch.randperm(vocab, generator=gen)]).sort(dim=1).values
    ids[1, :5] = -1  # row 1: 35 of the 40 ids, sorted with the -1 slots first
    ids = ids.sort(dim=1).values.to(torch.int32)
    lse, tail_lse = torch.empty(2), torch.empty(2)
    te.topk_stats(buf, 2, vocab, ids, vocab, 1.0, None, True, False, False, lse, tail_lse, None, None)
    missing = torch.ones(vocab, dtype=torch.bool)
    missing[ids[1][ids[1] >= 0].long()] = False
    assert tail_lse[0] == float("-inf")
    assert torch.allclose(tail_lse[1], torch.logsumexp(buf[1][missing], 0), atol=1e-6)
    te.topk_stats(buf, 2, vocab, None, 0, 1.0, None, True, False, False, lse, tail_lse, None, None)
    assert torch.allclose(tail_lse, torch.logsumexp(buf, 1), atol=1e-6)
    assert torch.allclose(lse, torch.logsumexp(buf, 1), atol=1e-6)


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


@pytest.mark.parametrize("case", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
def test_dense_epilogue_matches_reference(case):
    name, dtype, dist, divergence, beta, tau, cap, teacher_cap, ce_weight, out_dtype = case
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    x64, y64 = _logits(dist, gen)
    labels = _labels(gen)
    grad_rows = torch.rand(ROWS, generator=gen) + 0.5
    student, teacher = x64.to(dtype), y64.to(dtype)
    before = student.clone()
    use_ce = ce_weight != 0.0
    counted = labels != IGNORE_INDEX
    kind = te.KIND_CODES[divergence]

    lse, teacher_lse, lse_ce, mean_z = _rows()
    te.dense_stats(student, teacher, ROWS, VOCAB, 1.0 / tau, cap, teacher_cap, use_ce, True, lse,
                   teacher_lse, lse_ce if use_ce else None, mean_z)
    kd, wsum = torch.empty(ROWS), torch.empty(ROWS)
    te.dense_divergence(student, teacher, ROWS, VOCAB, 1.0 / tau, cap, teacher_cap, kind, beta, lse,
                        teacher_lse, kd, wsum)
    loss = KD_WEIGHT * tau**2 * kd
    if use_ce:
        target = dv.softcap(student.gather(1, torch.where(counted, labels, 0)[:, None]).float(), cap)
        loss = loss + ce_weight * (lse_ce - target.squeeze(1))
    loss = torch.where(counted, loss, 0.0)
    out = None if out_dtype is None else torch.full(student.shape, float("nan"), dtype=out_dtype)
    kd_scale = torch.where(counted, KD_WEIGHT * tau * grad_rows, 0.0)
    ce_scale = torch.where(counted, ce_weight * grad_rows, 0.0)
    dz = te.dense_grad(student, teacher, ROWS, VOCAB, 1.0 / tau, cap, teacher_cap, kind, beta, lse,
                       teacher_lse, wsum, kd_scale, lse_ce if use_ce else None, ce_scale,
                       torch.where(counted, labels, 0), use_ce, out=out)

    x, y = before.double(), teacher.double()
    ref_stats, ref_loss, ref_dz = _dense_reference(x, y, labels, grad_rows, case, torch.float64)
    f32_stats, f32_loss, f32_dz = _dense_reference(x, y, labels, grad_rows, case, torch.float32)
    for key in ["lse", "teacher_lse", "mean_z"] + (["lse_ce"] if use_ce else []):
        _assert_close(locals()[key], ref_stats[key], f32_stats[key], torch.float32, f"{name}: {key}")
    _assert_close(loss, ref_loss, f32_loss, torch.float32, f"{name}: loss rows (kd from the kernel)")
    written_dtype = dtype if out_dtype is None else out_dtype
    assert dz.dtype == written_dtype and (out is None or dz is out)
    _assert_close(dz, ref_dz, f32_dz.to(written_dtype), written_dtype, f"{name}: dz")
    assert (dz[list(IGNORED)] == 0).all(), f"{name}: ignored rows not exactly zero"
    if out is not None:
        assert torch.equal(student, before), f"{name}: out= must leave the logits untouched"


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
    (dict(logits=torch.randn(3, 50, dtype=torch.float64)), TypeError, "logits"),
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
    """The offline compile lane on the engine's default float32 buffer (the full matrix:
    ``python scripts/compile_epilogue.py``): no spills, shared memory within each target's limit."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, os.path.join(root, "scripts", "compile_epilogue.py"), "--dtypes", "fp32"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("_kernel") == 15, result.stdout
