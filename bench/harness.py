"""Correctness check, timing and memory measurement for the benchmark runner and the pytest suite.

Per case, in this order:

1. **Check before timing.** Every implementation runs one forward+backward at the benchmark
   shape; its loss and its gradients of ``hidden`` and ``weight`` are compared, as
   ``‖out − ref‖/‖ref‖``, with the naive loss in float64 (computed in row chunks so that it fits
   at every shape). An implementation above the tolerance of its dtype (:data:`TOLERANCE`, or
   twice what the Hugging Face-style naive loss achieves in that dtype, whichever is larger) is
   reported as ``wrong`` with its errors and is not timed. The check run is also the warm-up
   (compilation, autotuning, lazy imports).
2. **Interleaved timing.** Round after round, each implementation (and the three bare GEMMs) runs
   once forward and once forward+backward, in an order that rotates every round, so that load
   from other processes falls on all of them alike; medians and interquartile ranges over the
   rounds. Value checks (``fastkd.config.check_values``, a host sync) are off while timing; on
   CUDA the work is bracketed by ``torch.cuda.synchronize``.
3. **Memory**, per implementation: on CUDA in this process (``max_memory_allocated`` above what
   was allocated before), on the CPU in a fresh process (``fastkd.memory``'s resident-set
   high-water mark), so that one implementation's cached blocks cannot hide another's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import subprocess
import sys
import time

import torch

import fastkd
from fastkd.memory import high_water_mark_bytes, reset_high_water_mark, rss_bytes

from .cases import IMPLEMENTATIONS, Case, Missing, gemm_floor, make_inputs, naive_loss

# Largest relative error (loss, gradients) accepted against the float32 naive result, per input
# dtype. bfloat16 gradients carry 2^-9 rounding on their own; the loss is float32 everywhere.
TOLERANCE = {"float32": (1e-4, 1e-3), "float16": (5e-3, 2e-2), "bfloat16": (1e-2, 5e-2)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def no_value_checks():
    """``fastkd.config.check_values`` off (its host sync must not sit in a timed region)."""
    saved = fastkd.config.check_values
    fastkd.config.check_values = False
    try:
        yield
    finally:
        fastkd.config.check_values = saved


def _clear_grads(inputs: dict) -> None:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.grad is not None:
            value.grad = None


def run_step(step, inputs: dict, backward: bool) -> None:
    """One forward (and backward) of ``step``; gradients are dropped before the next one."""
    loss = step()
    if backward and loss is not None:
        loss.backward()
        _clear_grads(inputs)


def _summary(samples: list[float]) -> dict:
    quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {"median_s": statistics.median(samples), "q25_s": quartiles[0], "q75_s": quartiles[2],
            "reps": len(samples)}


def time_it(fn, device: str, warmup: int = 1, reps: int = 5) -> dict:
    """Median and interquartile range of ``fn()`` in seconds (one function on its own)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return _summary(samples)


def _rel(out, ref) -> float:
    if out is None:
        return float("inf")
    out, ref = out.detach().double(), ref.detach().double()
    norm = ref.norm().item()
    return (out - ref).norm().item() / (norm if norm else 1.0)


def reference_result(case: Case, inputs: dict) -> dict:
    """The naive loss in float64 and its gradients of ``hidden`` and ``weight``, row chunk by row
    chunk (the same numbers as one unchunked call, in bounded memory). float64, not float32: on
    the CPU, float32 ``log_softmax`` uses a faster exp whose log-sum-exp is off by up to ~3e-5, so
    a float32 reference would rate a more exact float32 implementation as less exact."""
    hidden = inputs["hidden"].detach().double().requires_grad_()
    weight = inputs["weight"].detach().double().requires_grad_()
    leaves = {**inputs, "hidden": hidden, "weight": weight}
    if case.loss == "dense":
        leaves.update(teacher_hidden=inputs["teacher_hidden"].detach().double(),
                      teacher_weight=inputs["teacher_weight"].detach().double())
    n, vocab = hidden.shape[0], weight.shape[0]
    step = max(1, 2**30 // (vocab * 8 * 8))
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, n, step):
        loss = naive_loss(leaves, case, torch.float64, slice(start, start + step), torch.float64) / n
        loss.backward()
        total += loss.detach().double()
    return {"loss": total, "hidden": hidden.grad, "weight": weight.grad}


def check(step, inputs: dict, reference: dict, case: Case, yardstick: tuple[float, float] = (0.0, 0.0)) -> dict:
    """One forward+backward of ``step`` against ``reference``: errors and the verdict."""
    _clear_grads(inputs)
    loss = step()
    loss.backward()
    errors = {"loss": _rel(loss.double().reshape(()), reference["loss"]),
              "hidden": _rel(inputs["hidden"].grad, reference["hidden"]),
              "weight": _rel(inputs["weight"].grad, reference["weight"])}
    _clear_grads(inputs)
    loss_tol, grad_tol = TOLERANCE[case.dtype]
    loss_tol, grad_tol = max(loss_tol, 2 * yardstick[0]), max(grad_tol, 2 * yardstick[1])
    bad = [f"{name} {value:.2e} > {tol:.0e}" for (name, value), tol in
           zip(errors.items(), (loss_tol, grad_tol, grad_tol)) if not value <= tol]
    return {"errors": errors, "tolerance": [loss_tol, grad_tol], "wrong": bad}


def peak_extra_bytes(case: Case, impl: str, device: str) -> int:
    """Peak extra memory of one forward+backward of ``impl`` on ``case``."""
    if device == "cuda":
        inputs = make_inputs(case, device)
        step = IMPLEMENTATIONS[impl](inputs, case)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with no_value_checks():
            run_step(step, inputs, backward=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    cmd = [sys.executable, "-m", "bench.harness", json.dumps(dataclasses.asdict(case)), impl]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def measure(case: Case, impls: list[str], device: str, reps: int, memory: bool = True,
            check_first: bool = True) -> tuple[list[dict], dict]:
    """Check, then time (interleaved) and measure each impl and the GEMM floor on one case.

    Returns the rows (the floor first) and the inputs' realism record."""
    inputs = make_inputs(case, device)
    rows, steps = {}, {}
    for impl in impls:
        try:
            steps[impl] = IMPLEMENTATIONS[impl](inputs, case)
            rows[impl] = {"impl": impl, "status": "ok"}
        except Missing as why:
            rows[impl] = {"impl": impl, "status": "missing" if why.applies else "n/a", "reason": str(why)}
    if check_first:
        reference = reference_result(case, inputs)
        yardstick = (0.0, 0.0)
        if "naive-hf" in steps:   # what plain PyTorch achieves in this dtype
            errors = check(steps["naive-hf"], inputs, reference, case)["errors"]
            yardstick = (errors["loss"], max(errors["hidden"], errors["weight"]))
        for impl in list(steps):
            try:
                result = check(steps[impl], inputs, reference, case, yardstick)
            except torch.OutOfMemoryError:
                rows[impl].update(status="oom", reason="out of memory")
                del steps[impl]
                continue
            except Exception as error:  # a peer that breaks is reported, not allowed to stop the run
                rows[impl].update(status="failed", reason=f"{type(error).__name__}: {error}"[:300])
                del steps[impl]
                continue
            rows[impl].update(errors=result["errors"], tolerance=result["tolerance"])
            if result["wrong"]:
                rows[impl].update(status="wrong", reason="; ".join(result["wrong"]))
                del steps[impl]
        del reference
    floor = gemm_floor(inputs, case)
    timed = {"gemm-floor": (floor, None), **{impl: (step, step) for impl, step in steps.items()}}
    samples = {name: {"fwd": [], "fwd_bwd": []} for name in timed}
    order = list(timed)
    with no_value_checks():
        floor()
        if not check_first:
            for impl, step in steps.items():
                run_step(step, inputs, backward=True)
        _sync(device)
        for round_ in range(reps):
            for name in order[round_ % len(order):] + order[:round_ % len(order)]:
                fn, step = timed[name]
                try:
                    if step is not None:
                        start = time.perf_counter()
                        run_step(step, inputs, backward=False)
                        _sync(device)
                        samples[name]["fwd"].append(time.perf_counter() - start)
                        start = time.perf_counter()
                        run_step(step, inputs, backward=True)
                    else:
                        start = time.perf_counter()
                        fn()
                    _sync(device)
                    samples[name]["fwd_bwd"].append(time.perf_counter() - start)
                except Exception as error:
                    rows[name].update(status="failed", reason=f"{type(error).__name__}: {error}"[:300])
                    order.remove(name)
                    break
    floor_row = {"impl": "gemm-floor", "status": "ok", "fwd_bwd": _summary(samples["gemm-floor"]["fwd_bwd"])}
    floor_row["tflops"] = case.gemm_flops / floor_row["fwd_bwd"]["median_s"] / 1e12
    for impl in steps:
        row = rows[impl]
        if row["status"] != "ok":
            continue
        row["fwd"] = _summary(samples[impl]["fwd"])
        row["fwd_bwd"] = _summary(samples[impl]["fwd_bwd"])
        if memory:
            try:
                row["peak_extra_bytes"] = peak_extra_bytes(case, impl, device)
            except (subprocess.CalledProcessError, torch.OutOfMemoryError) as error:
                row["memory_error"] = str(error)[:200]
    return [floor_row, *(rows[impl] for impl in impls)], inputs["realism"]


def _probe(case_json: str, impl: str) -> None:
    """Child process of :func:`peak_extra_bytes` on the CPU: prints the peak extra bytes."""
    case = Case(**json.loads(case_json))
    fastkd.config.check_values = False
    # One smaller call first: one-time costs (lazy imports, dispatcher and thread-pool set-up,
    # torch.compile of a peer's chunk function, which sees the same chunk shapes at up to 1024
    # rows) are not memory the loss needs.
    tiny = case.with_(tokens=min(case.tokens, 1024))
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
