"""``impl="triton"`` against the exact float64 reference (DESIGN.md §6).

Without a GPU these run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by conftest.py),
on small shapes and fp32/fp16 inputs: in the interpreter ``tl.dot`` on bf16 operands is wrong
(triton 3.9), so bf16 is tested on the GPU lane (``-m gpu``) only.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

import fastkd
from fastkd.reference import kd_loss_reference, topk_kd_loss_reference
from conftest import assert_rel_close, make_problem, rel_error
# The torch backend's test matrices, run here against impl="triton" as well.
from test_kd_torch import CASES as ONLINE_CASES
from test_kd_torch import _loss_and_grads as _online_loss_and_grads
from test_kd_torch import _plain_kd
from test_kd_torch import _problem as _online_torch_problem
from test_topk_torch import MATRIX as TOPK_MATRIX

# Relative error allowed: float32 logits and gradients in both; the 16-bit budget is added to the
# rounding of the reference's gradients to the input dtype (see test_sixteen_bit_inputs).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

# N=37 rows (two row blocks and a ragged one in the interpreter's 16-row tiles), D=19 (not a
# multiple of the 16-wide D tiles), V=203 (prime: the last vocabulary tile is partial), K=7.
N, D, V, K = 37, 19, 203, 7
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _grad_inputs(problem):
    return [problem["hidden"], problem["weight"]] + ([problem["bias"]] if problem["bias"] is not None else [])


def _topk(problem, impl, grad_out_seed=None, **options):
    fn = topk_kd_loss_reference if impl == "reference" else fastkd.topk_kd_loss
    if impl != "reference":
        options["impl"] = impl
    loss = fn(problem["hidden"], problem["weight"], problem["teacher_ids"], problem["teacher_logprobs"],
              bias=problem["bias"], **options)
    if isinstance(loss, tuple):
        loss = loss[0]
    grad_out = None
    if loss.dim():
        gen = torch.Generator().manual_seed(grad_out_seed or 1)
        grad_out = torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype)
    return loss, torch.autograd.grad(loss, _grad_inputs(problem), grad_out)


def _compare(problem, tol, **options):
    loss, grads = _topk(problem, "triton", **options)
    ref_loss, ref_grads = _topk(problem, "reference", **options)
    assert loss.dtype == torch.float32
    assert_rel_close(loss, ref_loss, tol, "loss")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == problem[name].dtype
        assert_rel_close(g, r, tol, f"grad {name}")


def _on_device(problem):
    moved = {}
    for name, x in problem.items():
        if isinstance(x, torch.Tensor):
            leaf = x.detach().to(DEVICE)
            moved[name] = leaf.requires_grad_() if x.requires_grad else leaf
        else:
            moved[name] = x
    return moved


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("variant", ["plain", "tempered, capped, CE, ignored rows"])
def test_topk_matches_reference(divergence, beta, tail, variant):
    full = variant != "plain"
    problem = _on_device(make_problem(N, D, V, K, with_bias=full, ragged=True,
                                      ignore_frac=0.3 if full else 0.0,
                                      seed=zlib.crc32(repr((divergence, tail, variant)).encode())))
    options = dict(divergence=divergence, beta=beta, tail=tail)
    if full:
        options.update(temperature=2.5, softcap=3.0, labels=problem["labels"], ce_weight=0.4,
                       reduction="none")
    _compare(problem, TOLERANCE[torch.float32], **options)


@pytest.mark.parametrize("div_beta,tail,temperature,softcap,ignore_frac", TOPK_MATRIX)
def test_torch_backend_matrix(div_beta, tail, temperature, softcap, ignore_frac):
    divergence, beta = div_beta
    problem = _on_device(make_problem(N, D, V, K, with_bias=True, ragged=True, ignore_frac=ignore_frac,
                                      seed=zlib.crc32(repr((div_beta, tail, temperature, softcap)).encode())))
    _compare(problem, TOLERANCE[torch.float32], divergence=divergence, beta=beta, tail=tail,
             temperature=temperature, softcap=softcap, labels=problem["labels"])


@pytest.mark.parametrize("divergence,topk,topk_from,tail", ONLINE_CASES)
def test_online_torch_backend_matrix(divergence, topk, topk_from, tail):
    p = _on_device(_online_torch_problem(seed=5))
    options = dict(divergence=divergence, topk=topk, topk_from=topk_from, tail=tail, temperature=1.6,
                   softcap=5.0, teacher_softcap=8.0, ce_weight=0.2, reduction="none")
    loss, grads = _online_loss_and_grads(lambda *a, **o: fastkd.kd_loss(*a, impl="triton", **o), p, **options)
    ref_loss, ref_grads = _online_loss_and_grads(kd_loss_reference, p, **options)
    assert_rel_close(loss, ref_loss, TOLERANCE[torch.float32], "loss")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert_rel_close(g, r, TOLERANCE[torch.float32], f"grad {name}")


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.9)])
def test_dense_against_plain_log_softmax(divergence, beta):
    p = _on_device(_online_torch_problem(seed=2))
    options = dict(divergence=divergence, beta=beta, temperature=2.0, softcap=4.0, teacher_softcap=7.0,
                   ce_weight=0.5)
    loss = fastkd.kd_loss(p["hidden"], p["weight"], p["teacher_hidden"], p["teacher_weight"], bias=p["bias"],
                          teacher_bias=p["teacher_bias"], labels=p["labels"], impl="triton", **options)
    plain = _plain_kd(p, divergence, beta, 2.0, 4.0, 7.0, 0.5)
    inputs = [p["hidden"], p["weight"], p["bias"]]
    assert_rel_close(loss, plain, TOLERANCE[torch.float32], "loss vs plain log_softmax")
    for name, g, r in zip(("hidden", "weight", "bias"), torch.autograd.grad(loss, inputs),
                          torch.autograd.grad(plain, inputs)):
        assert_rel_close(g, r, TOLERANCE[torch.float32], f"grad {name} vs plain log_softmax")


@pytest.mark.parametrize("n,d,v,k", [
    (1, 5, 11, 1),      # one row, K=1, V below one tile
    (9, 33, 64, 64),    # K=V: the tail is empty, at its floor
    (5, 8, 300, 3),     # several vocabulary tiles, the last one partial
])
def test_odd_shapes(n, d, v, k):
    problem = _on_device(make_problem(n, d, v, k, with_bias=True, seed=7))
    for tail in ("bucket", "renormalize"):
        _compare(problem, TOLERANCE[torch.float32], tail=tail, temperature=0.7)


def test_leading_dimensions_and_stats():
    problem = _on_device(make_problem(2 * 3 * 5, D, V, K, seed=11, ignore_frac=0.2))
    options = dict(labels=problem["labels"], reduction="none", return_stats=True, ce_weight=0.2)
    flat, flat_stats = fastkd.topk_kd_loss(problem["hidden"], problem["weight"], problem["teacher_ids"],
                                           problem["teacher_logprobs"], impl="triton", **options)
    shaped, _ = fastkd.topk_kd_loss(
        problem["hidden"].reshape(2, 3, 5, D), problem["weight"], problem["teacher_ids"].reshape(2, 3, 5, K),
        problem["teacher_logprobs"].reshape(2, 3, 5, K), impl="triton",
        **{**options, "labels": problem["labels"].reshape(2, 3, 5)})
    assert shaped.shape == (30,)
    torch.testing.assert_close(shaped, flat, rtol=0, atol=0)
    _, ref_stats = topk_kd_loss_reference(problem["hidden"], problem["weight"], problem["teacher_ids"],
                                          problem["teacher_logprobs"], **options)
    for field in ("kd", "entropy", "lse", "topk_mass"):
        assert_rel_close(getattr(flat_stats, field), getattr(ref_stats, field), 1e-5, f"stats.{field}")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_sixteen_bit_inputs(dtype, tail):
    problem = _on_device(make_problem(N, D, V, K, dtype=dtype, with_bias=True, ignore_frac=0.2, seed=5))
    options = dict(divergence="jsd", tail=tail, temperature=1.5, softcap=5.0, labels=problem["labels"],
                   ce_weight=0.3)
    loss, grads = _topk(problem, "triton", **options)
    exact = {**problem, **{k: problem[k].detach().double().requires_grad_() for k in ("hidden", "weight", "bias")}}
    ref_loss, ref_grads = _topk(exact, "reference", **options)
    assert_rel_close(loss, ref_loss, TOLERANCE[torch.float32], "loss")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == dtype
        assert_rel_close(g, r, 2 * rel_error(r.to(dtype), r) + TOLERANCE[dtype], f"grad {name}")


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_ignored_rows_get_exactly_zero(tail):
    problem = _on_device(make_problem(N, D, V, K, with_bias=True, ignore_frac=0.4, seed=13))
    ignored = problem["labels"] == -100
    ids = torch.where(ignored.unsqueeze(1), 0, problem["teacher_ids"])  # junk on ignored rows
    logprobs = torch.where(ignored.unsqueeze(1), float("nan"), problem["teacher_logprobs"])
    loss = fastkd.topk_kd_loss(problem["hidden"], problem["weight"], ids, logprobs, tail=tail,
                               labels=problem["labels"], ce_weight=0.5, bias=problem["bias"],
                               reduction="none", impl="triton")
    grad_out = torch.randn(loss.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    grad_hidden, grad_weight = torch.autograd.grad(loss, [problem["hidden"], problem["weight"]], grad_out)
    assert ignored.any() and (~ignored).any()
    assert (loss[ignored] == 0).all() and (grad_hidden[ignored] == 0).all()
    assert (loss[~ignored] != 0).all() and (grad_hidden[~ignored] != 0).any(dim=1).all()
    kept = ~ignored
    kept_loss = fastkd.topk_kd_loss(problem["hidden"][kept], problem["weight"], ids[kept], logprobs[kept],
                                    tail=tail, labels=problem["labels"][kept], ce_weight=0.5,
                                    bias=problem["bias"], reduction="none", impl="triton")
    (kept_weight,) = torch.autograd.grad(kept_loss, [problem["weight"]], grad_out[kept])
    torch.testing.assert_close(grad_weight, kept_weight, rtol=1e-5, atol=1e-7)


def test_every_row_ignored_and_empty_batch():
    problem = _on_device(make_problem(20, D, V, K, seed=17))
    loss = fastkd.topk_kd_loss(problem["hidden"], problem["weight"], problem["teacher_ids"],
                               problem["teacher_logprobs"], labels=torch.full((20,), -100, device=DEVICE),
                               ce_weight=1.0, impl="triton")
    grad_hidden, grad_weight = torch.autograd.grad(loss, [problem["hidden"], problem["weight"]])
    assert loss.item() == 0.0 and (grad_hidden == 0).all() and (grad_weight == 0).all()
    empty = _on_device(make_problem(0, D, V, K, seed=19))
    loss = fastkd.topk_kd_loss(empty["hidden"], empty["weight"], empty["teacher_ids"],
                               empty["teacher_logprobs"], impl="triton")
    (grad_weight,) = torch.autograd.grad(loss, empty["weight"])
    assert loss.item() == 0.0 and (grad_weight == 0).all()


def _online_problem(seed, n=21, d=19, teacher_d=24, v=150):
    gen = torch.Generator().manual_seed(seed)
    student = dict(hidden=torch.randn(n, d, generator=gen), weight=torch.randn(v, d, generator=gen) / d**0.5,
                   bias=torch.randn(v, generator=gen) * 0.5)
    student = {k: x.to(DEVICE).requires_grad_() for k, x in student.items()}
    teacher = dict(teacher_hidden=torch.randn(n, teacher_d, generator=gen),
                   teacher_weight=torch.randn(v, teacher_d, generator=gen) * 2 / teacher_d**0.5,
                   teacher_bias=torch.randn(v, generator=gen))
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::4] = -100
    return student, {k: x.to(DEVICE) for k, x in teacher.items()}, labels.to(DEVICE)


@pytest.mark.parametrize("topk,topk_from,divergence,tail", [
    (None, "teacher", "forward_kl", "bucket"),
    (None, "teacher", "reverse_kl", "bucket"),
    (None, "teacher", "jsd", "bucket"),
    (5, "teacher", "forward_kl", "bucket"),
    (5, "student", "reverse_kl", "bucket"),   # on-policy: the student's own top-k
    (4, "union", "jsd", "renormalize"),
])
def test_online_teacher_matches_reference(topk, topk_from, divergence, tail):
    student, teacher, labels = _online_problem(zlib.crc32(repr((topk, topk_from, divergence)).encode()))
    options = dict(divergence=divergence, beta=0.4, topk=topk, topk_from=topk_from, tail=tail,
                   temperature=1.7, softcap=4.0, teacher_softcap=5.0, labels=labels, ce_weight=0.2,
                   bias=student["bias"], teacher_bias=teacher["teacher_bias"], return_stats=True)
    args = (student["hidden"], student["weight"], teacher["teacher_hidden"], teacher["teacher_weight"])
    loss, stats = fastkd.kd_loss(*args, impl="triton", **options)
    ref_loss, ref_stats = kd_loss_reference(*args, **options)
    inputs = [student["hidden"], student["weight"], student["bias"]]
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad(ref_loss, inputs)
    assert_rel_close(loss, ref_loss, TOLERANCE[torch.float32], "loss")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert_rel_close(g, r, TOLERANCE[torch.float32], f"grad {name}")
    for field in ("kd", "entropy", "lse") + (("topk_mass",) if topk else ()):
        assert_rel_close(getattr(stats, field), getattr(ref_stats, field), 1e-5, f"stats.{field}")
    assert (stats.topk_mass is None) == (topk is None)


def test_deterministic_mode_is_bit_identical_and_exact(monkeypatch):
    problem = _on_device(make_problem(N, D, V, K, with_bias=True, ragged=True, ignore_frac=0.2, seed=23))
    options = dict(divergence="forward_kl", tail="bucket", labels=problem["labels"], ce_weight=0.3,
                   softcap=4.0)
    monkeypatch.setattr(fastkd.config, "deterministic", True)
    first = _topk(problem, "triton", **options)[1]
    second = _topk(problem, "triton", **options)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ref_grads = _topk(problem, "reference", **options)[1]
    for name, g, r in zip(("hidden", "weight", "bias"), first, ref_grads):
        assert_rel_close(g, r, TOLERANCE[torch.float32], f"deterministic grad {name}")
    # The renormalised loss without CE takes the streaming backward too in deterministic mode.
    options = dict(divergence="reverse_kl", tail="renormalize", labels=problem["labels"])
    grads = _topk(problem, "triton", **options)[1]
    for name, g, r in zip(("hidden", "weight", "bias"), grads, _topk(problem, "reference", **options)[1]):
        assert_rel_close(g, r, TOLERANCE[torch.float32], f"deterministic renormalize grad {name}")


def _student_like(problem, kind: str, dtype):
    """The problem's student made flat, peaked or near-converged (its teacher = itself + noise)."""
    gen = torch.Generator().manual_seed(61)
    hidden, weight = problem["hidden"].detach().double(), problem["weight"].detach().double()
    if kind == "peaked":
        hidden = hidden * 8.0
    logits = hidden @ weight.T
    if kind == "converged":  # the teacher's top-k and log-probs from the student's own logits
        teacher_lp = torch.log_softmax(logits + 1e-3 * torch.randn(logits.shape, generator=gen,
                                                                   dtype=torch.float64), dim=-1)
        ids = teacher_lp.topk(problem["teacher_ids"].shape[1], dim=-1).indices
        problem = {**problem, "teacher_ids": ids, "teacher_logprobs": teacher_lp.gather(1, ids).float()}
    return {**problem, "hidden": hidden.to(dtype).to(DEVICE).requires_grad_(),
            "weight": weight.to(dtype).to(DEVICE).requires_grad_(), "bias": None}


@pytest.mark.parametrize("kind", ["flat", "peaked", "converged"])
def test_whole_gradient_at_gpu_tile_sizes(kind):
    # Every backward tile is accumulated, at the tile sizes an H100 launch uses (128 x 256 x 64,
    # run here in the interpreter): an earlier "gradient filter" skipped tiles whose largest entry
    # looked small and lost 38-45 % of dh, and all of it for a near-converged student. fp16 only:
    # the interpreter's bf16 tl.dot is wrong (triton 3.9), bf16 is the GPU lane's.
    from fastkd.backends import launch_configs

    dtype = torch.float16
    problem = _student_like(make_problem(70, 64, 300, 8, seed=67, scale=1.0), kind, dtype)
    options = dict(divergence="reverse_kl", tail="bucket", labels=problem["labels"])
    assert not hasattr(fastkd.config, "triton_grad_filter")
    with launch_configs.for_target(90):
        assert launch_configs.tiles("backward", problem["hidden"].device, dtype).BN == 256
        loss, grads = _topk(problem, "triton", **options)
    exact = {**problem, **{k: problem[k].detach().double().requires_grad_() for k in ("hidden", "weight")}}
    ref_loss, ref_grads = _topk(exact, "reference", **options)
    # A near-converged loss (~1e-7) is a float32 sum of O(1) log-probability differences: below
    # 1e-3 it is held to an absolute 2e-8, float32's resolution of those terms.
    assert abs(loss.item() - ref_loss.item()) <= TOLERANCE[torch.float32] * max(abs(ref_loss.item()), 1e-3)
    for name, g, r in zip(("hidden", "weight"), grads, ref_grads):
        assert r.abs().max() > 0
        assert_rel_close(g, r, 2 * rel_error(r.to(dtype), r) + TOLERANCE[dtype], f"{kind} grad {name}")


def test_opcheck_triton_ops():
    problem = _on_device(make_problem(6, 5, 40, 3, with_bias=True, ignore_frac=0.3, seed=43))
    ids = torch.where((problem["labels"] != -100).unsqueeze(1), problem["teacher_ids"], -1)
    args = (problem["hidden"], problem["weight"], problem["bias"], ids, problem["teacher_logprobs"],
            None, None, None, problem["labels"], "jsd", 0.5, "bucket", 1.5, 3.0, None, -100, 0.5, 1.0, True)
    torch.library.opcheck(torch.ops.fastkd.triton_topk_kd_forward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_impl_errors(monkeypatch):
    problem = make_problem(4, 5, 11, 2, dtype=torch.float64, seed=31)
    args = (problem["hidden"], problem["weight"], problem["teacher_ids"], problem["teacher_logprobs"])
    with pytest.raises(TypeError, match="float64"):
        fastkd.topk_kd_loss(*args, impl="triton")
    assert fastkd.resolve_impl("auto", torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        fastkd.resolve_impl("triton", torch.device("cpu"), torch.float32)


@pytest.mark.gpu
def test_auto_picks_triton_on_gpu():
    assert fastkd.resolve_impl("auto", torch.device("cuda"), torch.bfloat16) == "chunked"


@pytest.mark.gpu
def test_int64_offsets_beyond_two_to_the_31():
    # N·V > 2³¹: row offsets into the logits space overflow int32 if computed in 32 bits.
    n, d, v, k = 17000, 16, 131072, 4
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, d, device="cuda", generator=gen) / 4).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, v, (n, k), device="cuda", generator=gen)
    ids[:, 1:] = (ids[:, :1] + torch.arange(1, k, device="cuda")) % v
    logprobs = torch.full((n, k), -3.0, device="cuda")
    loss = fastkd.topk_kd_loss(hidden, weight, ids, logprobs, impl="triton", reduction="none")
    ref = fastkd.topk_kd_loss(hidden, weight, ids, logprobs, impl="torch", reduction="none")
    assert_rel_close(loss, ref, 1e-3, "loss at N·V > 2^31")
    assert_rel_close(loss[-64:], ref[-64:], 1e-3, "last rows")
    assert os.environ.get("TRITON_INTERPRET") != "1"


@pytest.mark.parametrize("hidden_dtype,weight_dtype", [(torch.float16, torch.float32),
                                                      (torch.float32, torch.float16)])
def test_mixed_dtypes(hidden_dtype, weight_dtype):
    # Activations and LM head in different dtypes: the GEMM operands are the 16-bit dtype (as under
    # autocast, issue #19; fastkd.api.operand_dtype), accumulated in float32; the gradients come
    # back in each input's dtype, rounded once to the 16-bit dtype on the way.
    problem = _on_device(make_problem(N, D, V, K, with_bias=True, seed=37))
    problem["hidden"] = problem["hidden"].detach().to(hidden_dtype).requires_grad_()
    problem["weight"] = problem["weight"].detach().to(weight_dtype).requires_grad_()
    sixteen = torch.float16
    for tail in ("bucket", "renormalize"):
        loss, grads = _topk(problem, "triton", tail=tail, labels=problem["labels"], ce_weight=0.2)
        exact = {**problem, **{k: problem[k].detach().to(sixteen if k != "bias" else torch.float32).double()
                               .requires_grad_() for k in ("hidden", "weight", "bias")}}
        ref_loss, ref_grads = _topk(exact, "reference", tail=tail, labels=problem["labels"], ce_weight=0.2)
        assert_rel_close(loss, ref_loss, TOLERANCE[torch.float32], f"loss ({tail})")
        for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
            assert g.dtype == problem[name].dtype
            assert_rel_close(g, r, 2 * rel_error(r.to(sixteen), r) + TOLERANCE[torch.float32], f"grad {name} ({tail})")


def _assert_is_topk(ids, logits, k):
    """``ids`` hold k distinct columns whose logits are the k largest (up to float32 rounding)."""
    assert ids.shape == (logits.shape[0], k) and (ids >= 0).all() and (ids < logits.shape[1]).all()
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all(), "an id chosen twice"
    kth = logits.topk(k, dim=1).values[:, -1:]
    assert (logits.gather(1, ids) >= kth - 1e-4).all()


@pytest.mark.parametrize("k,topk_from", [
    (64, "teacher"),
    (64, "union"),
    (130, "student"),  # K=130: 256 slots, the selection's 32-row blocks
])
def test_selection_at_gpu_tile_sizes(k, topk_from):
    # The running top-K without a sort network, at an H100's tiles and vocabulary splits (several
    # splits per row block, merged on the host), against the float64 logits' top-K.
    from fastkd.backends import launch_configs, triton_backend

    gen = torch.Generator().manual_seed(71)
    n, d, teacher_d, v = 24, 32, 48, 500
    hidden, weight = torch.randn(n, d, generator=gen).half(), torch.randn(v, d, generator=gen).half()
    teacher_hidden = torch.randn(n, teacher_d, generator=gen).half()
    teacher_weight = torch.randn(v, teacher_d, generator=gen).half()
    with launch_configs.for_target(90):
        ids = triton_backend.select_topk(hidden.to(DEVICE), weight.to(DEVICE), None,
                                         teacher_hidden.to(DEVICE), teacher_weight.to(DEVICE), None,
                                         k, topk_from, None, None).cpu()
    student_logits = hidden.double() @ weight.double().T
    teacher_logits = teacher_hidden.double() @ teacher_weight.double().T
    if topk_from == "student":
        _assert_is_topk(ids, student_logits, k)
        return
    _assert_is_topk(ids[:, :k], teacher_logits, k)
    if topk_from == "union":  # then the student's top-K ids the teacher's set lacks, -1 elsewhere
        student = student_logits.topk(k, dim=1).indices
        for extra, own, theirs in zip(ids[:, k:], student, ids[:, :k]):
            assert set(extra[extra >= 0].tolist()) == set(own.tolist()) - set(theirs.tolist())
