"""Reliability (issue #9): bad input, ignored and empty batches, numerical edges, determinism.

What tests/test_validation.py already covers (one bad argument at a time, each message checked) is
not repeated here; this module adds the cases it lacks, a hypothesis fuzz test over the whole
argument space of ``topk_kd_loss`` (an error naming the argument, or a finite loss equal to the
float64 reference), numerical edges against the float64 reference for the ``torch`` and ``triton``
backends (Triton in its CPU interpreter here, so its shapes are tiny), and bit-identical
gradients run to run. RELIABILITY.md says what each test guarantees.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fastkd
from fastkd import divergences as dv
from fastkd.bytes import ByteVocab
from fastkd.reference import topk_kd_loss_reference
from conftest import assert_rel_close, make_problem, rel_error

# Relative error allowed against the float64 reference, per input dtype (loss and gradients).
# 16-bit inputs are rounded before the reference sees them too; what is left is fastkd's float32
# arithmetic on logits rounded to the input dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
IMPLS = ["torch", "triton"]
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None], allow_unused=True)


def _unit_rows(x: torch.Tensor, norm: float) -> torch.Tensor:
    x = x.detach()
    return (x / x.norm(dim=-1, keepdim=True) * norm).requires_grad_()


# ------------------------------------------------------------------------------------------------
# 1. bad input: the cases test_validation.py does not have
# ------------------------------------------------------------------------------------------------

def _good(n=6, d=4, v=23, k=3):
    p = make_problem(n, d, v, k, with_bias=True, seed=3)
    return dict(hidden=p["hidden"], weight=p["weight"], teacher_ids=p["teacher_ids"],
                teacher_logprobs=p["teacher_logprobs"], labels=p["labels"], bias=p["bias"])


def _topk(args):
    args = dict(args)
    return fastkd.topk_kd_loss(args.pop("hidden"), args.pop("weight"), args.pop("teacher_ids"),
                               args.pop("teacher_logprobs"), **args)


MORE_BAD = [
    # (name, change, exception, words the message must contain)
    ("teacher_ids 1-D", lambda g: dict(teacher_ids=g["teacher_ids"][0], teacher_logprobs=g["teacher_logprobs"][0]),
     ValueError, "teacher_ids must have at least 2 dimensions"),
    ("teacher_ids extra dim", lambda g: dict(teacher_ids=g["teacher_ids"][None], teacher_logprobs=g["teacher_logprobs"][None]),
     ValueError, "teacher_ids must have shape (6,) + (K,)"),
    ("hidden complex", lambda g: dict(hidden=g["hidden"].detach().to(torch.complex64)), TypeError, "hidden must have dtype"),
    ("weight int", lambda g: dict(weight=g["weight"].detach().long()), TypeError, "weight must have dtype"),
    ("weight V=0", lambda g: dict(weight=g["weight"][:0], bias=None), ValueError, "weight must be non-empty"),
    ("bias 2-D", lambda g: dict(bias=g["bias"][None]), ValueError, "bias must have 1 dimension"),
    ("bias on meta", lambda g: dict(bias=g["bias"].detach().to("meta")), ValueError, "bias is on meta"),
    ("weight on meta", lambda g: dict(weight=g["weight"].detach().to("meta")), ValueError, "weight is on meta"),
    ("labels on meta", lambda g: dict(labels=g["labels"].to("meta")), ValueError, "labels is on meta"),
    ("logprobs on meta", lambda g: dict(teacher_logprobs=g["teacher_logprobs"].to("meta")), ValueError, "teacher_logprobs is on meta"),
    ("logprob +inf", lambda g: dict(teacher_logprobs=_set(g["teacher_logprobs"], (2, 0), math.inf)), ValueError, "teacher_logprobs must be finite"),
    ("logprob just above slack", lambda g: dict(teacher_logprobs=_set(g["teacher_logprobs"], (2, 0), 0.03)),
     ValueError, "teacher_logprobs must be log-probabilities (<= 0); row 2"),
    ("mass 1.03 over two ids", lambda g: dict(teacher_logprobs=_set(g["teacher_logprobs"], (5, slice(0, 2)), math.log(0.515))),
     ValueError, "sum to at most 1 + 0.02; row 5"),
    ("label -1", lambda g: dict(labels=_set(g["labels"], 1, -1)), ValueError, "labels must be in [0, 23) or ignore_index; row 1"),
    ("divergence None", lambda g: dict(divergence=None), ValueError, "divergence must be one of"),
    ("divergence case", lambda g: dict(divergence="Reverse_KL"), ValueError, "divergence must be one of"),
    ("tail None", lambda g: dict(tail=None), ValueError, "tail must be one of"),
    ("reduction None", lambda g: dict(reduction=None), ValueError, "reduction must be one of"),
    ("impl None", lambda g: dict(impl=None), ValueError, "impl must be one of"),
    ("beta str", lambda g: dict(beta="0.5"), TypeError, "beta must be a finite real"),
    ("beta bool", lambda g: dict(beta=True), TypeError, "beta must be a finite real"),
    ("temperature negative", lambda g: dict(temperature=-1.0), ValueError, "temperature must be > 0"),
    ("temperature inf", lambda g: dict(temperature=math.inf), TypeError, "temperature must be a finite real"),
    ("temperature tensor", lambda g: dict(temperature=torch.tensor([1.0, 2.0])), TypeError, "temperature must be a finite real"),
    ("softcap 0", lambda g: dict(softcap=0.0), ValueError, "softcap must be > 0"),
    ("kd_weight negative", lambda g: dict(kd_weight=-0.5), ValueError, "kd_weight must be >= 0"),
    ("kd_weight NaN", lambda g: dict(kd_weight=math.nan), TypeError, "kd_weight must be a finite real"),
    ("float64 on triton", lambda g: dict(hidden=g["hidden"].detach().double(), weight=g["weight"].detach().double(),
                                         bias=None, impl="triton"), TypeError, "impl='triton' takes float16"),
]


def _set(tensor, index, value):
    out = tensor.detach().clone()
    out[index] = value
    return out


@pytest.mark.parametrize("name,change,error,words", MORE_BAD, ids=[b[0] for b in MORE_BAD])
def test_more_bad_input_is_rejected_before_any_kernel(name, change, error, words, monkeypatch):
    from fastkd.backends import chunked, torch_backend

    monkeypatch.setattr(torch_backend, "topk_kd_forward", lambda *a, **k: pytest.fail("a kernel ran"))
    monkeypatch.setattr(chunked, "topk_forward", lambda *a, **k: pytest.fail("a kernel ran"))
    good = _good()
    with pytest.raises(error) as info:
        _topk({**good, **change(good)})
    assert words in str(info.value), str(info.value)


def test_top_k_mass_within_slack_is_tolerated_and_rescaled():
    # Σ Q_S = 1.019 (inside the documented 1 + 0.02): accepted, and equal to the reference's
    # rescaling (S scaled to 1 − TEACHER_TAIL_FLOOR, tail at the floor).
    good = _good()
    logprobs = torch.log(torch.tensor([0.6, 0.3, 0.119])).expand(6, 3).clone()
    loss = _topk({**good, "teacher_logprobs": logprobs, "impl": "torch"})
    ref = topk_kd_loss_reference(good["hidden"], good["weight"], good["teacher_ids"], logprobs,
                                 bias=good["bias"], labels=good["labels"])
    assert torch.isfinite(loss)
    assert_rel_close(loss, ref, TOLERANCE[torch.float32], "loss with masses summing to 1.019")


def _byte_problem(v=40, d=5, n=4):
    gen = torch.Generator().manual_seed(0)
    table = [b""] + [bytes([32 + (i % 90)]) + b"x" for i in range(v - 1)]
    vocab = ByteVocab.from_bytes(table)
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    weight = torch.randn(v, d, generator=gen, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(n, 257, generator=gen), dim=-1)
    pairs = torch.stack([torch.arange(n), torch.arange(n)], dim=1)
    return vocab, hidden, weight, teacher, pairs


BYTE_BAD = [
    ("byte_vocab not a ByteVocab", lambda v, h, w, t, p: dict(byte_vocab=list(range(40))), TypeError, "byte_vocab must be a fastkd.ByteVocab"),
    ("byte_vocab size", lambda v, h, w, t, p: dict(weight=w[:-1]), ValueError, "byte_vocab has 40 ids but weight has V=39"),
    ("hidden int", lambda v, h, w, t, p: dict(hidden=h.detach().long()), TypeError, "hidden must have dtype"),
    ("hidden D", lambda v, h, w, t, p: dict(hidden=h[:, :-1]), ValueError, "weight must have shape (V, 4)"),
    ("temperature 0", lambda v, h, w, t, p: dict(temperature=0.0), ValueError, "temperature must be > 0"),
    ("softcap negative", lambda v, h, w, t, p: dict(softcap=-1.0), ValueError, "softcap must be > 0"),
    ("divergence", lambda v, h, w, t, p: dict(divergence="kl"), ValueError, "divergence must be one of"),
    ("beta", lambda v, h, w, t, p: dict(beta=2.0), ValueError, "beta must be <= 1"),
    ("reduction", lambda v, h, w, t, p: dict(reduction="avg"), ValueError, "reduction must be one of"),
    ("impl", lambda v, h, w, t, p: dict(impl="cpu"), ValueError, "impl must be one of"),
    ("teacher byte logprobs width", lambda v, h, w, t, p: dict(teacher_byte_logprobs=t[:, :-1]), ValueError,
     "teacher_byte_logprobs must have shape (..., 257)"),
    ("teacher byte logprobs positive", lambda v, h, w, t, p: dict(teacher_byte_logprobs=_set(t, (1, 3), 0.5)), ValueError,
     "teacher_byte_logprobs must be log-probabilities"),
    ("pair out of range", lambda v, h, w, t, p: dict(alignment=_set(p, (3, 0), 99)), ValueError, "alignment pair 3"),
    ("alignment float", lambda v, h, w, t, p: dict(alignment=p.float()), TypeError, "alignment must have an integer dtype"),
    ("chunk without labels", lambda v, h, w, t, p: dict(chunk_weight=0.5), ValueError, "chunk_weight > 0 needs labels"),
]


@pytest.mark.parametrize("name,change,error,words", BYTE_BAD, ids=[b[0] for b in BYTE_BAD])
def test_byte_losses_reject_bad_input(name, change, error, words):
    vocab, hidden, weight, teacher, pairs = _byte_problem()
    changes = change(vocab, hidden, weight, teacher, pairs)
    args = dict(hidden=hidden, weight=weight, byte_vocab=vocab, alignment=pairs, teacher_byte_logprobs=teacher)
    args.update(changes)
    with pytest.raises(error) as info:
        fastkd.byte_kd_loss(args.pop("hidden"), args.pop("weight"), args.pop("byte_vocab"),
                            args.pop("alignment"), **args)
    assert words in str(info.value), str(info.value)
    if set(changes) <= {"hidden", "weight", "byte_vocab", "temperature", "softcap"}:
        # the same checks guard byte_logprobs
        with pytest.raises(error) as info:
            fastkd.byte_logprobs(**{**dict(hidden=hidden, weight=weight, byte_vocab=vocab), **changes})
        assert words in str(info.value), str(info.value)


# ------------------------------------------------------------------------------------------------
# 1. empty batches and every row ignored: loss 0, never NaN, gradients exactly 0
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(impl, reduction):
    hidden = torch.zeros(0, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    ids, logprobs = torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3)
    loss = fastkd.topk_kd_loss(hidden, weight, ids, logprobs, impl=impl, reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert loss.dtype == torch.float32 and not torch.isnan(loss).any()
    if reduction != "none":
        assert loss.item() == 0.0
    (grad_weight,) = torch.autograd.grad(loss.sum(), weight)
    assert torch.equal(grad_weight, torch.zeros_like(weight))
    online = fastkd.kd_loss(hidden, weight, torch.zeros(0, 5), torch.randn(10, 5), impl=impl, reduction=reduction)
    assert online.shape == loss.shape and not torch.isnan(online).any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_every_row_ignored_gives_zero_loss_and_zero_gradients(impl, divergence, beta):
    problem = make_problem(5, 4, 17, 3, with_bias=True, seed=2, ragged=True)
    hidden, weight, bias = problem["hidden"], problem["weight"], problem["bias"]
    labels = torch.full((5,), -100)
    options = dict(divergence=divergence, beta=beta, labels=labels, ce_weight=0.5, bias=bias, impl=impl)
    # garbage teacher data on ignored rows is neither checked nor read
    ids = torch.full_like(problem["teacher_ids"], 10_000)
    logprobs = torch.full_like(problem["teacher_logprobs"], math.nan)
    for tail in ("bucket", "renormalize"):
        loss = fastkd.topk_kd_loss(hidden, weight, ids, logprobs, tail=tail, **options)
        assert loss.item() == 0.0
        for grad in _grads(loss, hidden, weight, bias):
            assert torch.equal(grad, torch.zeros_like(grad))
    teacher_hidden, teacher_weight = torch.randn(5, 3), torch.randn(17, 3)
    for topk in (None, 4):
        loss = fastkd.kd_loss(hidden, weight, teacher_hidden, teacher_weight, topk=topk, **options)
        assert loss.item() == 0.0
        for grad in _grads(loss, hidden, weight, bias):
            assert torch.equal(grad, torch.zeros_like(grad))


def test_byte_loss_every_row_ignored():
    vocab, hidden, weight, teacher, pairs = _byte_problem()
    labels = torch.full((hidden.shape[0],), -100)
    loss = fastkd.byte_kd_loss(hidden, weight, vocab, pairs, teacher_byte_logprobs=teacher, labels=labels,
                               ce_weight=0.3, impl="torch")
    assert loss.item() == 0.0
    for grad in _grads(loss, hidden, weight):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_a_row_without_any_teacher_id_is_finite():
    # every slot of row 0 unused (-1): only the tail bucket is left, Q_T = P_T = 1, KD = 0 there
    problem = make_problem(4, 4, 17, 3, seed=5)
    ids = _set(problem["teacher_ids"], 0, -1)
    logprobs = _set(problem["teacher_logprobs"], 0, 0.0)
    for tail in ("bucket", "renormalize"):
        loss = fastkd.topk_kd_loss(problem["hidden"], problem["weight"], ids, logprobs, tail=tail,
                                   reduction="none", impl="torch")
        ref = topk_kd_loss_reference(problem["hidden"], problem["weight"], ids, logprobs, tail=tail, reduction="none")
        assert torch.isfinite(loss).all() and loss[0].abs().item() < 1e-6
        assert_rel_close(loss, ref, TOLERANCE[torch.float32], f"loss, tail={tail}")


# ------------------------------------------------------------------------------------------------
# 1. fuzz: either a clear error naming the argument, or a finite loss equal to the reference
# ------------------------------------------------------------------------------------------------

FUZZ_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# per option: (valid values, invalid values); a case has at most one invalid option, so most
# cases are valid and reach the reference comparison
FUZZ_OPTIONS = {
    "divergence": (["reverse_kl", "forward_kl", "jsd"], ["kl", 3, None]),
    "tail": (["bucket", "renormalize"], ["none", "truncate"]),
    "reduction": (["mean", "sum", "none"], ["batchmean"]),
    "impl": (["torch", "auto"], ["numpy"]),
    "beta": ([0.0, 0.5, 1.0, 0.2], [-0.01, 1.5, math.nan]),
    "temperature": ([1.0, 0.3, 4.0], [0.0, -2.0, math.inf]),
    "softcap": ([None, 5.0], [0.0, -1.0]),
}
# corruptions of one tensor argument, each naming the argument its error must mention
CORRUPTIONS = ["id >= V", "id < -1", "logprob > 0", "logprob NaN", "mass > 1", "ids shape",
               "logprobs shape", "labels shape", "weight D", "ids float", "label >= V"]


@st.composite
def fuzz_cases(draw):
    n = draw(st.integers(1, 9))
    d = draw(st.integers(1, 8))
    v = draw(st.integers(2, 40))
    k = draw(st.integers(1, min(v, 6)))
    case = dict(
        shape=(n, d, v, k),
        leading=draw(st.sampled_from([(), (1,), (3,)])),  # hidden (n, d), or (b, n, d) flattened
        dtype=draw(st.sampled_from(FUZZ_DTYPES)),
        seed=draw(st.integers(0, 2**16)),
        scale=draw(st.sampled_from([0.1, 1.0, 5.0])),
        ragged=draw(st.booleans()),
        ignore=draw(st.sampled_from([0.0, 0.5, 1.0])),
        ce_weight=draw(st.sampled_from([0.0, 0.4])),
    )
    for name, (valid, _) in FUZZ_OPTIONS.items():
        case[name] = draw(st.sampled_from(valid))
    kind = draw(st.sampled_from(["valid", "valid", "bad option", "bad tensor"]))
    case["bad_option"] = None
    case["corruption"] = None
    if kind == "bad option":
        name = draw(st.sampled_from(sorted(FUZZ_OPTIONS)))
        case[name] = draw(st.sampled_from(FUZZ_OPTIONS[name][1]))
        case["bad_option"] = name
    elif kind == "bad tensor":
        case["corruption"] = draw(st.sampled_from(CORRUPTIONS))
    return case


def _corrupt(args, corruption, vocab):
    """Applies one corruption; returns the argument name its error must mention (None: valid)."""
    ids, logprobs, labels = args["teacher_ids"], args["teacher_logprobs"], args["labels"]
    counted = (labels != -100).nonzero()
    if corruption is None:
        return None
    if corruption in ("id >= V", "id < -1", "logprob > 0", "logprob NaN", "mass > 1", "label >= V"):
        if counted.numel() == 0:
            return None  # value checks only look at counted rows: nothing to corrupt
        row = tuple(counted[0].tolist())
        if corruption == "label >= V":
            args["labels"] = _set(labels, row, vocab)
            return "labels"
        slot = row + (0,)
        if corruption == "id >= V":
            args["teacher_ids"] = _set(ids, slot, vocab)
            return "teacher_ids"
        if corruption == "id < -1":
            args["teacher_ids"] = _set(ids, slot, -7)
            return "teacher_ids"
        used = ids[row] >= 0
        if not used.any():
            return None
        first = row + (int(used.nonzero()[0, 0]),)
        if corruption == "logprob > 0":
            args["teacher_logprobs"] = _set(logprobs, first, 0.5)
        elif corruption == "logprob NaN":
            args["teacher_logprobs"] = _set(logprobs, first, math.nan)
        else:  # every used slot at log(0.9): with >= 2 used slots the mass is >= 1.8
            if int(used.sum()) < 2:
                return None
            args["teacher_logprobs"] = torch.where(ids >= 0, math.log(0.9), logprobs)
        return "teacher"  # "teacher_logprobs ..." or "teacher top-k masses ..."
    if corruption == "ids shape":
        args["teacher_ids"] = ids[..., :-1, :] if ids.shape[-2] > 1 else ids[..., :0, :]
        return "teacher_ids"
    if corruption == "logprobs shape":
        args["teacher_logprobs"] = torch.cat([logprobs, logprobs[..., :1]], dim=-1)
        return "teacher_logprobs"
    if corruption == "labels shape":
        args["labels"] = labels.reshape(-1)[:-1]
        return "labels"
    if corruption == "weight D":
        args["weight"] = torch.cat([args["weight"], args["weight"][:, :1]], dim=1)
        return "weight"
    if corruption == "ids float":
        args["teacher_ids"] = ids.float()
        return "teacher_ids"
    return None


@settings(max_examples=100, deadline=None)
@given(fuzz_cases())
def test_fuzz_error_or_reference(case):
    n, d, v, k = case["shape"]
    p = make_problem(n, d, v, k, dtype=case["dtype"], seed=case["seed"], scale=case["scale"],
                     ragged=case["ragged"], ignore_frac=case["ignore"])
    lead = case["leading"]
    if lead == (3,):
        # three sequences of n rows: (3, n, d), one teacher per row
        more = [make_problem(n, d, v, k, dtype=case["dtype"], seed=case["seed"] + i, ragged=case["ragged"],
                             ignore_frac=case["ignore"]) for i in (1, 2)]
        pick = lambda name: torch.stack([p[name].detach()] + [m[name].detach() for m in more])
        hidden = pick("hidden").requires_grad_()
        ids, logprobs, labels = pick("teacher_ids"), pick("teacher_logprobs"), pick("labels")
    else:
        hidden = p["hidden"].detach().reshape(*lead, n, d).requires_grad_()
        ids, logprobs, labels = (p[name].reshape(*lead, *p[name].shape) for name in
                                 ("teacher_ids", "teacher_logprobs", "labels"))
    weight = p["weight"]
    args = dict(hidden=hidden, weight=weight, teacher_ids=ids, teacher_logprobs=logprobs, labels=labels)
    for name in FUZZ_OPTIONS:
        args[name] = case[name]
    expected = case["bad_option"] or _corrupt(args, case["corruption"], v)  # the argument to name
    ce_weight = case["ce_weight"]
    if ce_weight and args["labels"].numel() == 0:
        ce_weight = 0.0
    args["ce_weight"] = ce_weight

    event("rejected" if expected else "compared with the reference")
    if expected:
        with pytest.raises((ValueError, TypeError)) as info:
            _topk(args)
        assert expected in str(info.value), f"{str(info.value)!r} does not name {expected!r}"
        return

    loss = _topk(args)
    ref_args = {key: value for key, value in args.items() if key != "impl"}
    ref = _topk_reference(ref_args)
    assert torch.isfinite(loss).all(), loss
    assert loss.dtype == (torch.float64 if case["dtype"] == torch.float64 else torch.float32)
    # τ² scales the KD term; with bucket tails the loss can be tiny, so compare with an absolute floor
    tol = TOLERANCE[case["dtype"]] * max(1.0, case["temperature"] ** 2)
    assert (loss.double() - ref).abs().max().item() <= tol * (1.0 + ref.abs().max().item()), (loss, ref)


def _topk_reference(args):
    args = dict(args)
    return topk_kd_loss_reference(args.pop("hidden"), args.pop("weight"), args.pop("teacher_ids"),
                                  args.pop("teacher_logprobs"), **args)


# ------------------------------------------------------------------------------------------------
# 2. numerical edges, against the float64 reference
# ------------------------------------------------------------------------------------------------

def _edge_check(loss, ref, tensors, what, tol, naive_tensors=None):
    """Finite loss and gradients, relative error within ``tol`` — or within 8x the error of the
    naive float32 computation (``naive_tensors``: its gradients) where fp32 itself cannot do better."""
    assert torch.isfinite(loss).all(), f"{what}: loss {loss}"
    grads = _grads(loss.sum(), *tensors)
    ref_grads = _grads(ref.sum(), *tensors)
    assert_rel_close(loss, ref, tol, f"{what}: loss")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        bound = tol
        if naive_tensors is not None:
            bound = max(tol, 8 * rel_error(naive_tensors[i], r))
        assert_rel_close(g, r, bound, f"{what}: gradient {i}")


def _edge_problem(impl, seed=0):
    # triton runs in the CPU interpreter here: 8 rows, D=8, V=48 (not a tile multiple), K=4
    n, d, v, k = (8, 8, 48, 4) if impl == "triton" else (16, 12, 97, 5)
    return make_problem(n, d, v, k, seed=seed, with_bias=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("norm", [1e3, 1e4])
def test_huge_logits(impl, norm):
    # |logit| up to ~norm: rows of hidden and weight scaled so h·w spans ±norm
    p = _edge_problem(impl)
    hidden = _unit_rows(p["hidden"], norm)
    weight = _unit_rows(p["weight"], 1.0)
    for divergence, beta in DIVERGENCES:
        for tail in ("bucket", "renormalize"):
            options = dict(divergence=divergence, beta=beta, tail=tail, reduction="none")
            loss = fastkd.topk_kd_loss(hidden, weight, p["teacher_ids"], p["teacher_logprobs"], impl=impl, **options)
            ref = topk_kd_loss_reference(hidden, weight, p["teacher_ids"], p["teacher_logprobs"], **options)
            naive = topk_kd_loss_reference(hidden, weight, p["teacher_ids"], p["teacher_logprobs"],
                                           compute_dtype=torch.float32, **options)
            _edge_check(loss, ref, (hidden, weight), f"{impl} |z|~{norm:g} {divergence} {tail}",
                        TOLERANCE[torch.float32], _grads(naive.sum(), hidden, weight))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1e-3, 1e3])
def test_extreme_temperatures(impl, temperature):
    p = _edge_problem(impl, seed=1)
    hidden, weight = p["hidden"], p["weight"]
    for divergence, beta in DIVERGENCES:
        options = dict(divergence=divergence, beta=beta, temperature=temperature, labels=p["labels"],
                       ce_weight=0.3, reduction="none")
        loss = fastkd.topk_kd_loss(hidden, weight, p["teacher_ids"], p["teacher_logprobs"], impl=impl, **options)
        ref = topk_kd_loss_reference(hidden, weight, p["teacher_ids"], p["teacher_logprobs"], **options)
        naive = topk_kd_loss_reference(hidden, weight, p["teacher_ids"], p["teacher_logprobs"],
                                       compute_dtype=torch.float32, **options)
        _edge_check(loss, ref, (hidden, weight), f"{impl} τ={temperature:g} {divergence}",
                    TOLERANCE[torch.float32], _grads(naive.sum(), hidden, weight))


@pytest.mark.parametrize("impl", IMPLS)
def test_softcap_with_huge_logits(impl):
    # Gemma-2's cap of 30 on logits of ±1e4: tanh saturates, its derivative underflows to 0
    p = _edge_problem(impl, seed=2)
    hidden, weight = _unit_rows(p["hidden"], 1e4), _unit_rows(p["weight"], 1.0)
    for tail in ("bucket", "renormalize"):
        options = dict(divergence="jsd", beta=0.5, tail=tail, softcap=30.0, temperature=0.7, reduction="none")
        loss = fastkd.topk_kd_loss(hidden, weight, p["teacher_ids"], p["teacher_logprobs"], impl=impl, **options)
        ref = topk_kd_loss_reference(hidden, weight, p["teacher_ids"], p["teacher_logprobs"], **options)
        naive = topk_kd_loss_reference(hidden, weight, p["teacher_ids"], p["teacher_logprobs"],
                                       compute_dtype=torch.float32, **options)
        _edge_check(loss, ref, (hidden, weight), f"{impl} softcap {tail}", TOLERANCE[torch.float32],
                    _grads(naive.sum(), hidden, weight))


@pytest.mark.parametrize("impl", IMPLS)
def test_one_hot_teacher(impl):
    # all teacher mass on one id: log-prob 0 there, the other slots unused (-1) or near -inf
    p = _edge_problem(impl, seed=3)
    n, k = p["teacher_ids"].shape
    ids = p["teacher_ids"].clone()
    padded = ids.clone()
    padded[:, 1:] = -1
    logprobs = torch.zeros(n, k)
    logprobs[:, 1:] = -80.0  # e^-80: no mass in float32 arithmetic, still a finite log-prob
    for divergence, beta in DIVERGENCES:
        for teacher_ids, teacher_logprobs in ((padded, torch.zeros(n, k)), (ids, logprobs)):
            for tail in ("bucket", "renormalize"):
                options = dict(divergence=divergence, beta=beta, tail=tail, reduction="none")
                loss = fastkd.topk_kd_loss(p["hidden"], p["weight"], teacher_ids, teacher_logprobs, impl=impl, **options)
                ref = topk_kd_loss_reference(p["hidden"], p["weight"], teacher_ids, teacher_logprobs, **options)
                _edge_check(loss, ref, (p["hidden"], p["weight"]), f"{impl} one-hot {divergence} {tail}",
                            TOLERANCE[torch.float32])


@pytest.mark.parametrize("impl", IMPLS)
def test_identical_teacher_and_student(impl):
    p = _edge_problem(impl, seed=4)
    hidden, weight, bias = p["hidden"], p["weight"], p["bias"]
    k = p["teacher_ids"].shape[1]
    for divergence, beta in DIVERGENCES:
        options = dict(divergence=divergence, beta=beta, reduction="none", impl=impl)
        for topk in (None, k):  # online: the teacher is the student itself
            loss = fastkd.kd_loss(hidden, weight, hidden.detach(), weight.detach(), topk=topk, bias=bias,
                                  teacher_bias=bias.detach(), **options)
            assert loss.abs().max().item() < 1e-6, (divergence, topk, loss)
            for grad in _grads(loss.sum(), hidden, weight, bias):
                assert grad.abs().max().item() < 1e-6, (divergence, topk, grad.abs().max())
        # offline, tail renormalised: the student's own top-k log-probs over S
        with torch.no_grad():
            own = torch.log_softmax(hidden @ weight.T + bias, dim=-1)
            ids = own.topk(k, dim=-1).indices
        loss = fastkd.topk_kd_loss(hidden, weight, ids, own.gather(1, ids), bias=bias, tail="renormalize", **options)
        assert loss.abs().max().item() < 1e-6
        for grad in _grads(loss.sum(), hidden, weight, bias):
            assert grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("missing", [1e-9, 1e-6, 1e-3])
def test_teacher_top_k_mass_near_one(impl, missing):
    # Σ Q_S = 1 − missing: the tail log-mass log(missing) — below TEACHER_TAIL_FLOOR it is taken
    # as the floor (DESIGN.md §1) — stays finite, and the loss matches the reference
    p = _edge_problem(impl, seed=5)
    n, k = p["teacher_ids"].shape
    masses = torch.full((n, k), 1.0 / k, dtype=torch.float64) * (1 - missing)
    logprobs = masses.log()  # float64 log-probs: the caller's exact top-k (float32 would round Σ to 1)
    for divergence, beta in DIVERGENCES:
        options = dict(divergence=divergence, beta=beta, reduction="none")
        loss = fastkd.topk_kd_loss(p["hidden"], p["weight"], p["teacher_ids"], logprobs, impl=impl, **options)
        ref = topk_kd_loss_reference(p["hidden"], p["weight"], p["teacher_ids"], logprobs, **options)
        _edge_check(loss, ref, (p["hidden"], p["weight"]), f"{impl} mass 1-{missing:g} {divergence}",
                    TOLERANCE[torch.float32])
    # the floor itself, from the math module: log Q_T never below log(TEACHER_TAIL_FLOOR), never NaN
    _, log_tail = dv.teacher_topk_logmasses(logprobs, torch.ones_like(logprobs, dtype=torch.bool))
    expected = math.log(max(missing, dv.TEACHER_TAIL_FLOOR))
    assert torch.allclose(log_tail, torch.full_like(log_tail, expected), rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_student_top_k_mass_near_one(impl):
    # a sharp student whose top-k holds all but ~e^-60 of its mass: log P_T ≈ -60, exact, finite
    p = _edge_problem(impl, seed=6)
    hidden = _unit_rows(p["hidden"], 200.0)
    weight = _unit_rows(p["weight"], 1.0)
    with torch.no_grad():
        ids = (hidden @ weight.T).topk(p["teacher_ids"].shape[1], dim=-1).indices
    for divergence, beta in DIVERGENCES:
        options = dict(divergence=divergence, beta=beta, reduction="none")
        loss, stats = fastkd.topk_kd_loss(hidden, weight, ids, p["teacher_logprobs"], impl=impl,
                                          return_stats=True, **options)
        ref = topk_kd_loss_reference(hidden, weight, ids, p["teacher_logprobs"], **options)
        naive = topk_kd_loss_reference(hidden, weight, ids, p["teacher_logprobs"], compute_dtype=torch.float32, **options)
        assert torch.isfinite(stats.topk_mass).all() and (stats.topk_mass <= 1.0 + 1e-6).all()
        _edge_check(loss, ref, (hidden, weight), f"{impl} student top-k ≈ 1 {divergence}",
                    TOLERANCE[torch.float32], _grads(naive.sum(), hidden, weight))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_more_than_2_31_logits(impl):
    # N·V = 65_600 · 32_771 ≈ 2.15e9 > 2³¹: row offsets into the virtual N x V logits need int64.
    # Rows are independent, so the last rows (whose offsets are past 2³¹) are checked against the
    # float64 reference of those rows alone.
    n, d, v, k = 65_600, 16, 32_771, 8
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, d, device="cuda", generator=gen) / 4).to(torch.bfloat16).requires_grad_()
    teacher = torch.log_softmax(torch.randn(n, 64, device="cuda", generator=gen), dim=-1)
    ids = torch.randint(0, v, (n, k), device="cuda", generator=gen)
    ids = torch.where(torch.arange(k, device="cuda") == 0, ids, (ids + torch.arange(k, device="cuda")) % v)
    logprobs = teacher[:, :k]
    loss = fastkd.topk_kd_loss(hidden, weight, ids, logprobs, impl=impl, reduction="none")
    assert torch.isfinite(loss).all()
    tail = slice(n - 64, n)
    ref = topk_kd_loss_reference(hidden[tail], weight, ids[tail], logprobs[tail], reduction="none")
    assert_rel_close(loss[tail], ref, TOLERANCE[torch.float32], "last rows' loss")
    (grad_hidden,) = torch.autograd.grad(loss.sum(), hidden)
    (ref_grad,) = torch.autograd.grad(ref.sum(), hidden)
    assert torch.isfinite(grad_hidden).all()
    assert_rel_close(grad_hidden[tail], ref_grad[tail], 2 * TOLERANCE[torch.bfloat16], "last rows' grad hidden")


# ------------------------------------------------------------------------------------------------
# 3. determinism: bit-identical gradients run to run
# ------------------------------------------------------------------------------------------------

def _gradients_of_one_run(impl, online):
    p = make_problem(16, 16, 64, 4, with_bias=True, seed=7, ragged=True, ignore_frac=0.2)
    options = dict(divergence="jsd", beta=0.3, labels=p["labels"], ce_weight=0.2, bias=p["bias"], impl=impl)
    if online:
        gen = torch.Generator().manual_seed(8)
        loss = fastkd.kd_loss(p["hidden"], p["weight"], torch.randn(16, 8, generator=gen),
                              torch.randn(64, 8, generator=gen), **options)
    else:
        loss = fastkd.topk_kd_loss(p["hidden"], p["weight"], p["teacher_ids"], p["teacher_logprobs"], **options)
    return (loss.detach(),) + _grads(loss, p["hidden"], p["weight"], p["bias"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("online", [False, True], ids=["topk", "online"])
def test_deterministic_mode_gives_bit_identical_gradients(impl, online, monkeypatch):
    monkeypatch.setattr(fastkd.config, "deterministic", True)
    first = _gradients_of_one_run(impl, online)
    second = _gradients_of_one_run(impl, online)
    for a, b in zip(first, second):
        assert torch.equal(a, b), f"{impl}: runs differ by {(a - b).abs().max().item():.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_deterministic_mode_on_gpu(impl, monkeypatch):
    monkeypatch.setattr(fastkd.config, "deterministic", True)
    p = make_problem(1000, 256, 4099, 16, dtype=torch.bfloat16, with_bias=True, seed=9)
    tensors = {name: p[name].detach().cuda().requires_grad_(p[name].requires_grad) if p[name] is not None else None
               for name in ("hidden", "weight", "bias", "teacher_ids", "teacher_logprobs", "labels")}

    def run():
        loss = fastkd.topk_kd_loss(tensors["hidden"], tensors["weight"], tensors["teacher_ids"],
                                   tensors["teacher_logprobs"], bias=tensors["bias"], labels=tensors["labels"],
                                   ce_weight=0.1, impl=impl)
        return _grads(loss, tensors["hidden"], tensors["weight"], tensors["bias"])

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)
