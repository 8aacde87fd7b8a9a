"""Timing and memory measurement for the benchmark runner and the pytest-benchmark suite.

Times are medians over repeats after warm-up, with the interquartile range as the spread; on CUDA
they bracket the work with ``torch.cuda.synchronize``. Peak extra memory is measured per
implementation: on CUDA in this process (``max_memory_allocated`` above what was allocated before),
on the CPU in a fresh process (``fastkd.memory``'s resident-set high-water mark), so that one
implementation's cached blocks cannot hide another's.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time

import torch

from fastkd.memory import high_water_mark_bytes, reset_high_water_mark, rss_bytes

from .cases import IMPLEMENTATIONS, Case, Missing, gemm_floor, make_inputs


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_step(step, inputs: dict, backward: bool) -> None:
    """One forward (and backward) of ``step``; gradients are dropped before the next one."""
    loss = step()
    if backward and loss is not None:
        loss.backward()
        for value in inputs.values():
            if isinstance(value, torch.Tensor) and value.grad is not None:
                value.grad = None


def time_it(fn, device: str, warmup: int = 1, reps: int = 5) -> dict:
    """Median and interquartile range of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {"median_s": statistics.median(samples), "q25_s": quartiles[0], "q75_s": quartiles[2],
            "reps": reps}


def peak_extra_bytes(case: Case, impl: str, device: str) -> int:
    """Peak extra memory of one forward+backward of ``impl`` on ``case``."""
    if device == "cuda":
        inputs = make_inputs(case, device)
        step = IMPLEMENTATIONS[impl](inputs, case)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_step(step, inputs, backward=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    cmd = [sys.executable, "-m", "bench.harness", json.dumps(dataclasses.asdict(case)), impl]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def measure(case: Case, impls: list[str], device: str, reps: int, memory: bool = True) -> list[dict]:
    """Times (forward, forward+backward) and memory of each impl, and the GEMM floor, on one case."""
    inputs = make_inputs(case, device)
    floor = time_it(gemm_floor(inputs, case), device, reps=reps)
    rows = [{"impl": "gemm-floor", "status": "ok", "fwd_bwd": floor,
             "tflops": case.gemm_flops / floor["median_s"] / 1e12}]
    for impl in impls:
        row = {"impl": impl}
        try:
            step = IMPLEMENTATIONS[impl](inputs, case)
            row["fwd"] = time_it(lambda: run_step(step, inputs, backward=False), device, reps=reps)
            row["fwd_bwd"] = time_it(lambda: run_step(step, inputs, backward=True), device, reps=reps)
            if memory:
                row["peak_extra_bytes"] = peak_extra_bytes(case, impl, device)
            row["status"] = "ok"
        except Missing as why:
            row.update(status="missing", reason=str(why))
        except torch.OutOfMemoryError:
            row.update(status="oom", reason="out of memory")
        except Exception as error:  # a peer that breaks is reported, not allowed to stop the run
            row.update(status="failed", reason=f"{type(error).__name__}: {error}"[:300])
        rows.append(row)
    return rows


def _probe(case_json: str, impl: str) -> None:
    """Child process of :func:`peak_extra_bytes` on the CPU: prints the peak extra bytes."""
    case = Case(**json.loads(case_json))
    # One tiny call first: one-time costs (lazy imports, dispatcher and thread-pool set-up) are
    # not memory the loss needs.
    tiny = case.with_(tokens=8, vocab=min(case.vocab, 256), topk=min(case.topk, 8))
    tiny_inputs = make_inputs(tiny, "cpu")
    run_step(IMPLEMENTATIONS[impl](tiny_inputs, tiny), tiny_inputs, backward=True)
    del tiny_inputs
    inputs = make_inputs(case, "cpu")
    step = IMPLEMENTATIONS[impl](inputs, case)
    reset = reset_high_water_mark()
    before = rss_bytes()
    run_step(step, inputs, backward=True)
    if not reset:
        raise SystemExit("cannot reset the resident-set high-water mark (/proc/self/clear_refs)")
    print(high_water_mark_bytes() - before)


if __name__ == "__main__":
    _probe(sys.argv[1], sys.argv[2])
