"""The benchmark's inputs and its check before timing (bench/cases.py, bench/harness.py), tiny shapes."""
from __future__ import annotations

import pytest
import torch

from bench.cases import IMPLEMENTATIONS, STUDENT_ENTROPY, TEACHER_ENTROPY, Case, Missing, make_inputs
from bench.harness import check, reference_result

# V = 2000: not a power of two; D = 48; N = 96 rows (the entropy probe uses all of them).
CASES = [Case("tiny", 96, 48, 2000, loss, "reverse_kl", "bucket", 8, cap, "float32")
         for loss in ("topk", "dense", "ce") for cap in (None, 30.0)]


@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: f"softcap={c.softcap}")
def test_inputs_are_peaked_at_the_stated_entropy(case):
    x = make_inputs(case, "cpu")
    logits = (x["hidden"] @ x["weight"].T).detach()
    if case.softcap:
        logits = case.softcap * torch.tanh(logits / case.softcap)
    p = torch.softmax(logits, -1)
    entropy = -(p * torch.log_softmax(logits, -1)).sum(-1)
    assert entropy.mean().item() == pytest.approx(STUDENT_ENTROPY, rel=0.02)
    assert x["realism"]["teacher_entropy"] == pytest.approx(TEACHER_ENTROPY, rel=0.02)
    # far from uniform (log 2000 = 7.6 nats), and rows differ in confidence
    assert entropy.max() > 4 * entropy.min() + 0.5
    # the teacher's ids are its real top-K, its log-probs exact and sorted
    assert (x["teacher_logprobs"].diff(dim=-1) <= 0).all()
    assert 0.5 < x["realism"]["teacher_topk_mass"] < 1.0


def test_inputs_are_reproducible():
    a, b = make_inputs(CASES[2], "cpu"), make_inputs(CASES[2], "cpu")
    assert torch.equal(a["hidden"], b["hidden"]) and torch.equal(a["teacher_weight"], b["teacher_weight"])


@pytest.mark.parametrize("case", CASES[::2][:2] + CASES[5:], ids=lambda c: f"{c.loss}-softcap={c.softcap}")
def test_fastkd_passes_the_check(case):
    x = make_inputs(case, "cpu")
    result = check(IMPLEMENTATIONS["fastkd-torch"](x, case), x, reference_result(case, x), case)
    assert result["wrong"] == [], result


def test_a_wrong_gradient_is_reported_wrong():
    case = CASES[0]
    x = make_inputs(case, "cpu")
    right = IMPLEMENTATIONS["fastkd-torch"](x, case)

    def filtered():   # the right loss value, but the gradient of hidden dropped (a skipping filter)
        loss = right()
        return loss.detach() + 0.0 * loss + (x["weight"] * 0).sum()

    result = check(filtered, x, reference_result(case, x), case)
    assert any(w.startswith("hidden") for w in result["wrong"]), result
    assert not any(w.startswith("loss") for w in result["wrong"])


def test_peers_that_do_not_apply_say_so():
    x = make_inputs(CASES[0], "cpu")
    with pytest.raises(Missing) as why:
        IMPLEMENTATIONS["liger"](x, CASES[0])
    assert not why.value.applies


def test_fastkd_bench_outside_a_checkout_says_how_to_get_the_suite(monkeypatch, capsys):
    import sys

    from fastkd import cli

    for name in [m for m in sys.modules if m == "bench" or m.startswith("bench.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bench", None)      # as if no checkout were on the path
    assert cli.main(["bench", "--help"]) == 2
    err = capsys.readouterr().err
    assert "bench/ folder of a fastkd source checkout" in err and "pip install -e '.[bench]'" in err
