"""Bad input gets a ValueError/TypeError naming the argument, before any kernel runs."""
from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd.backends import chunked, torch_backend
from conftest import make_problem

N, D, V, K = 6, 4, 23, 3


@pytest.fixture
def good():
    p = make_problem(N, D, V, K, with_bias=True, seed=1)
    return dict(hidden=p["hidden"], weight=p["weight"], teacher_ids=p["teacher_ids"],
                teacher_logprobs=p["teacher_logprobs"], labels=p["labels"], bias=p["bias"])


def _call(args):
    args = dict(args)
    return fastkd.topk_kd_loss(args.pop("hidden"), args.pop("weight"), args.pop("teacher_ids"),
                               args.pop("teacher_logprobs"), **args)


def _with(**changes):
    return changes


def _set(tensor, index, value):
    out = tensor.detach().clone()
    out[index] = value
    return out


BAD = [
    # (name, change to the good arguments, exception, words the message must contain)
    ("hidden not a tensor", lambda g: _with(hidden=g["hidden"].tolist()), TypeError, "hidden must be a torch.Tensor"),
    ("hidden 1-D", lambda g: _with(hidden=g["hidden"][0]), ValueError, "hidden must have at least 2"),
    ("hidden int", lambda g: _with(hidden=g["hidden"].long()), TypeError, "hidden must have dtype"),
    ("weight D mismatch", lambda g: _with(weight=g["weight"][:, :-1]), ValueError, "weight must have shape (V, 4)"),
    ("weight 3-D", lambda g: _with(weight=g["weight"][None]), ValueError, "weight must have 2"),
    ("bias wrong V", lambda g: _with(bias=g["bias"][:-1]), ValueError, "bias must have shape (23,)"),
    ("ids float", lambda g: _with(teacher_ids=g["teacher_ids"].float()), TypeError, "teacher_ids must have an integer dtype"),
    ("ids bool", lambda g: _with(teacher_ids=g["teacher_ids"] > 0), TypeError, "teacher_ids must have an integer dtype"),
    ("ids uint8", lambda g: _with(teacher_ids=g["teacher_ids"].to(torch.uint8)), TypeError, "(int32 or int64), got torch.uint8"),
    ("ids N mismatch", lambda g: _with(teacher_ids=g["teacher_ids"][:-1]), ValueError, "teacher_ids must have shape (6,) + (K,)"),
    ("ids K=0", lambda g: _with(teacher_ids=g["teacher_ids"][:, :0], teacher_logprobs=g["teacher_logprobs"][:, :0]),
     ValueError, "K >= 1"),
    ("logprobs shape", lambda g: _with(teacher_logprobs=g["teacher_logprobs"][:, :-1]), ValueError, "teacher_logprobs must have the shape"),
    ("logprobs int", lambda g: _with(teacher_logprobs=g["teacher_logprobs"].long()), TypeError, "teacher_logprobs must have dtype"),
    ("labels shape", lambda g: _with(labels=g["labels"][:-1]), ValueError, "labels must have shape (6,)"),
    ("labels float", lambda g: _with(labels=g["labels"].float()), TypeError, "labels must have an integer dtype"),
    ("id too large", lambda g: _with(teacher_ids=_set(g["teacher_ids"], (2, 1), V)), ValueError, "teacher_ids must be in [0, 23)"),
    ("id below -1", lambda g: _with(teacher_ids=_set(g["teacher_ids"], (0, 0), -2)), ValueError, "row 0"),
    ("repeated id", lambda g: _with(teacher_ids=_set(g["teacher_ids"], (3, 1), int(g["teacher_ids"][3, 0]))),
     ValueError, "must not repeat an id within a row; row 3"),
    ("logprob NaN", lambda g: _with(teacher_logprobs=_set(g["teacher_logprobs"], (1, 2), float("nan"))), ValueError, "finite"),
    ("logprob -inf", lambda g: _with(teacher_logprobs=_set(g["teacher_logprobs"], (1, 2), float("-inf"))), ValueError, "finite"),
    ("logprob positive", lambda g: _with(teacher_logprobs=_set(g["teacher_logprobs"], (4, 0), 0.5)), ValueError, "(<= 0); row 4"),
    ("mass above 1+slack", lambda g: _with(teacher_logprobs=torch.full((N, K), -0.9)), ValueError, "sum to at most 1 + 0.02; row 0"),
    ("label out of range", lambda g: _with(labels=_set(g["labels"], 5, V)), ValueError, "labels must be in [0, 23) or ignore_index; row 5"),
    ("divergence", lambda g: _with(divergence="kl"), ValueError, "divergence must be one of"),
    ("tail", lambda g: _with(tail="truncate"), ValueError, "tail must be one of"),
    ("reduction", lambda g: _with(reduction="avg"), ValueError, "reduction must be one of"),
    ("impl", lambda g: _with(impl="jax"), ValueError, "impl must be one of"),
    ("beta > 1", lambda g: _with(beta=1.5), ValueError, "beta must be <= 1"),
    ("beta < 0", lambda g: _with(beta=-0.1), ValueError, "beta must be >= 0"),
    ("beta NaN", lambda g: _with(beta=float("nan")), TypeError, "beta must be a finite real"),
    ("temperature 0", lambda g: _with(temperature=0.0), ValueError, "temperature must be > 0"),
    ("temperature str", lambda g: _with(temperature="1"), TypeError, "temperature must be a finite real"),
    ("softcap negative", lambda g: _with(softcap=-3.0), ValueError, "softcap must be > 0"),
    ("ce_weight negative", lambda g: _with(ce_weight=-1.0), ValueError, "ce_weight must be >= 0"),
    ("ce without labels", lambda g: _with(labels=None, ce_weight=0.5), ValueError, "ce_weight > 0 needs labels"),
    ("ignore_index float", lambda g: _with(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
    ("return_stats int", lambda g: _with(return_stats=1), TypeError, "return_stats must be a bool"),
    ("device mismatch", lambda g: _with(teacher_ids=g["teacher_ids"].to("meta")), ValueError, "teacher_ids is on meta"),
]


@pytest.mark.parametrize("name,change,error,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_rejected_before_any_kernel(name, change, error, words, good, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was rejected")

    monkeypatch.setattr(torch_backend, "topk_kd_forward", must_not_run)
    monkeypatch.setattr(chunked, "topk_forward", must_not_run)
    args = {**good, **change(good)}
    with pytest.raises(error) as info:
        _call(args)
    assert words in str(info.value), str(info.value)


def test_unavailable_backends_say_so(good, monkeypatch):
    from fastkd.backends import cuda_build
    monkeypatch.setattr(cuda_build, "unavailable_reason", lambda: "torch 0.0+cpu is a CPU-only build")
    with pytest.raises(RuntimeError, match="CPU-only build.*pip install --no-build-isolation -e ."):
        _call({**good, "impl": "cuda"})


def test_masses_slightly_above_one_are_tolerated(good):
    # Rounded top-k log-probs that sum to 1.01 (within the 0.02 slack) are rescaled, not rejected.
    logprobs = torch.log(torch.tensor([0.7, 0.31, 0.0]).clamp(min=1e-30)).expand(N, K).clone()
    ids = torch.tensor([0, 5, -1]).expand(N, K).clone()
    loss = _call({**good, "teacher_ids": ids, "teacher_logprobs": logprobs})
    assert torch.isfinite(loss) and loss.item() > 0


def test_value_checks_skip_ignored_rows_and_can_be_disabled(good, monkeypatch):
    ids = _set(good["teacher_ids"], (2, 0), 10_000)
    labels = _set(good["labels"], 2, -100)
    loss = _call({**good, "teacher_ids": ids, "labels": labels})  # row 2 is ignored: not checked
    assert torch.isfinite(loss)
    monkeypatch.setattr(fastkd.config, "check_values", False)
    bad_logprob = _set(good["teacher_logprobs"], (0, 0), 0.5)
    assert torch.isfinite(_call({**good, "teacher_logprobs": bad_logprob}))  # no check, no sync


KD_BAD = [
    ("teacher rows", lambda g: _with(teacher_hidden=g["teacher_hidden"][:-1]), ValueError, "teacher_hidden must have hidden's leading"),
    ("teacher D", lambda g: _with(teacher_weight=g["teacher_weight"][:, :-1]), ValueError, "teacher_weight must have shape (V, 5)"),
    ("teacher V", lambda g: _with(teacher_weight=g["teacher_weight"][:-1]), ValueError, "teacher_weight must cover the student's vocabulary V=23"),
    ("teacher bias", lambda g: _with(teacher_bias=torch.zeros(3)), ValueError, "teacher_bias must have shape (23,)"),
    ("topk 0", lambda g: _with(topk=0), ValueError, "topk must be None or an int in [1, 23]"),
    ("topk > V", lambda g: _with(topk=V + 1), ValueError, "topk must be None or an int in [1, 23]"),
    ("topk float", lambda g: _with(topk=2.0), ValueError, "topk must be None or an int"),
    ("topk_from", lambda g: _with(topk_from="both"), ValueError, "topk_from must be one of"),
    ("teacher_softcap 0", lambda g: _with(teacher_softcap=0.0), ValueError, "teacher_softcap must be > 0"),
]


@pytest.mark.parametrize("name,change,error,words", KD_BAD, ids=[b[0] for b in KD_BAD])
def test_kd_loss_bad_input(name, change, error, words, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    good = dict(hidden=torch.randn(N, D, generator=gen), weight=torch.randn(V, D, generator=gen),
                teacher_hidden=torch.randn(N, 5, generator=gen), teacher_weight=torch.randn(V, 5, generator=gen))
    for op in ("dense_kd_forward", "select_topk", "topk_kd_forward"):
        monkeypatch.setattr(torch_backend, op, lambda *a, **k: pytest.fail("a kernel ran"))
    for op in ("dense_forward", "topk_forward"):
        monkeypatch.setattr(chunked, op, lambda *a, **k: pytest.fail("a kernel ran"))
    args = {**good, **change(good)}
    with pytest.raises(error) as info:
        fastkd.kd_loss(args.pop("hidden"), args.pop("weight"), args.pop("teacher_hidden"),
                       args.pop("teacher_weight"), **args)
    assert words in str(info.value), str(info.value)


def test_module_options_are_checked_at_construction():
    with pytest.raises(ValueError, match="divergence must be one of"):
        fastkd.TopKKDLoss(divergence="fkl")
    with pytest.raises(ValueError, match="topk must be None or a positive int"):
        fastkd.KDLoss(topk=-1)


@pytest.mark.parametrize("budget", [0, -1, 1.5, "512MiB", True])
def test_a_bad_chunk_budget_is_named(good, budget, monkeypatch):
    monkeypatch.setattr(fastkd.config, "chunk_bytes", budget)
    with pytest.raises(ValueError, match=r"fastkd\.config\.chunk_bytes must be None .* or a positive number"):
        _call({**good, "impl": "torch"})


def test_the_default_cpu_budget_holds_256_rows_of_the_blocks(monkeypatch):
    """config.chunk_bytes None: on the CPU at least 256 rows of the path's blocks (here the
    reverse-KL dense path: 2 logits buffers and the torch epilogue's one scratch block); the
    128 MiB floor is lowered so that a small vocabulary shows the row rule."""
    monkeypatch.setattr(chunked, "CPU_BUDGET", 1)
    seen = []
    real = chunked.chunk_rows
    monkeypatch.setattr(chunked, "chunk_rows", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    gen = torch.Generator().manual_seed(0)
    n, d, v = 600, 8, 64
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    weight = torch.randn(v, d, generator=gen, requires_grad=True)
    fastkd.kd_loss(hidden, weight, torch.randn(n, d, generator=gen), torch.randn(v, d, generator=gen),
                   divergence="reverse_kl", impl="torch").backward()
    assert fastkd.config.chunk_bytes is None
    assert seen and all(rows == chunked.CPU_CHUNK_ROWS for rows in seen), seen
