"""pytest-benchmark suite: every loss x impl x divergence, forward and forward+backward.

    python -m pytest bench/test_benchmarks.py --benchmark-only -k cpu        # runs anywhere
    python -m pytest bench/test_benchmarks.py --benchmark-only -m gpu        # real-model shapes

Not part of the test suite (CI runs ``tests/`` only). An implementation that cannot run here
(a peer not installed, a backend not in this version) is skipped with its reason.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from bench.cases import IMPLEMENTATIONS, LOSSES, MODELS, Case, Missing, gemm_floor, make_inputs
from bench.__main__ import model_plan
from bench.harness import no_value_checks, run_step
from bench.model import GPUS

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
MODES = ("fwd", "fwd_bwd")

CPU_CASES = [Case("cpu-small", 1024, 256, 16384, loss, div, tail, 64, None, "float32")
             for loss, div, tail in itertools.product(LOSSES, DIVERGENCES, ("bucket", "renormalize"))
             if loss == "topk" or tail == "bucket"]
GPU_CASES = [Case(model, tokens, dim, vocab, loss, div, "bucket", topk, softcap, "bfloat16")
             for (model, (dim, vocab, softcap)), tokens, loss, div, topk in itertools.product(
                 MODELS.items(), (4096, 16384, 32768), LOSSES, DIVERGENCES, (16, 64, 128))
             if (loss == "topk" or topk == 64) and (loss != "ce" or div == "reverse_kl")]


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bench(benchmark, case, impl, mode):
    device = _device()
    inputs = make_inputs(case, device)
    if impl == "gemm-floor":
        step = gemm_floor(inputs, case)
        fn = step
    else:
        try:
            step = IMPLEMENTATIONS[impl](inputs, case)
        except Missing as why:
            pytest.skip(f"{impl}: {why}")

        def fn():
            run_step(step, inputs, backward=(mode == "fwd_bwd"))
            if device == "cuda":
                torch.cuda.synchronize()
    benchmark.extra_info.update(case=case.label, impl=impl, mode=mode, gemm_flops=case.gemm_flops)
    plan = model_plan(impl, case, device) if impl != "gemm-floor" else None
    if plan is not None:   # the cost model's bound at datasheet rates, to set beside the time
        benchmark.extra_info.update({f"model_bound_s_{key}": plan.bound(gpu) for key, gpu in GPUS.items()})
    with no_value_checks():  # its host sync has no place in a timed region
        benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["gemm-floor", *IMPLEMENTATIONS])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"cpu-{c.loss}-{c.divergence}-{c.tail}")
def test_cpu(benchmark, case, impl, mode):
    if impl == "gemm-floor" and mode == "fwd":
        pytest.skip("the GEMM floor is the forward+backward floor")
    _bench(benchmark, case, impl, mode)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["gemm-floor", *IMPLEMENTATIONS])
@pytest.mark.parametrize("case", GPU_CASES,
                         ids=lambda c: f"{c.model}-N{c.tokens}-{c.loss}-{c.divergence}-K{c.topk}")
def test_gpu(benchmark, case, impl, mode):
    if impl == "gemm-floor" and mode == "fwd":
        pytest.skip("the GEMM floor is the forward+backward floor")
    _bench(benchmark, case, impl, mode)
