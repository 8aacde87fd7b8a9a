"""Benchmark runner: ``python -m bench [--set cpu|gpu|gpu-main] [--loss topk dense ce] ...`` (repo root).

Per case: each implementation's loss and gradients are first checked against the naive float32
result at the benchmark shape (a wrong implementation is reported as WRONG and not timed); then
all of them, with the three bare GEMMs of the shape, are timed in interleaved rounds. One table
per case: forward and forward+backward median (and interquartile range), the cost model's lower
bound for that implementation's path beside it, peak extra memory, the ratio to the bare GEMMs
measured in the same run, to the naive loss, and the errors of the check. Records go to
``bench/results/`` as JSON and CSV keyed by device, versions and date, with PNG plots.
``python -m bench --model`` prints the cost model alone (no measurement).

Exit status 3 when any implementation was wrong (after writing the results).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

import fastkd
import fastkd.backends.chunked

from . import model as cost_model
from .cases import CPU_MODELS, IMPLEMENTATIONS, LOSSES, MODELS, SETS, Case
from .harness import measure

RESULTS = Path(__file__).parent / "results"
WRONG_EXIT = 3


def environment(device: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    return {"date": datetime.date.today().isoformat(), "device": device, "device_name": name,
            "torch": torch.__version__, "triton": triton_version, "fastkd": fastkd.__version__,
            "threads": torch.get_num_threads()}


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large tensor copy (read + write), median of 5: the memory rate of this machine."""
    x = torch.empty(2**26, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    samples = []
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        y.copy_(x)
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return 2 * x.numel() * 4 / sorted(samples[1:])[2]


def rates_for(env: dict, floor_tflops: float, bandwidth: float) -> cost_model.Gpu:
    """The cost model's rates for this run: the datasheet on an H100/H200; elsewhere the GEMM rate
    of the bare GEMMs and the copy bandwidth measured in this run (other resources unbounded)."""
    for key, gpu in cost_model.GPUS.items():
        if env["device"] == "cuda" and key in env["device_name"]:
            return gpu
    rate = floor_tflops * 1e12
    fp32 = rate if env["device"] == "cpu" else rate / 15
    return cost_model.Gpu(name=f"{env['device_name']} (rates measured in this run)", tc_flops=rate,
                          fp32_flops=fp32, hbm_bytes=bandwidth, l2_bytes=float("inf"),
                          sfu_ops=float("inf"), sms=1, l2_size=2**40, link_bytes=float("inf"),
                          source="the three bare GEMMs and a tensor copy measured in this run")


def model_plan(impl: str, case: Case, device: str):
    """The cost-model path of an implementation on a case, or None when it has none."""
    shape = cost_model.Shape(case.model, case.tokens, case.dim, case.vocab, topk=case.topk,
                             teacher_dim=case.teacher_dim,
                             softcap=case.softcap, element_bytes=torch.finfo(getattr(torch, case.dtype)).bits // 8)
    teacher = "dense" if case.loss == "dense" else None
    engine = importlib.util.find_spec("fastkd.backends.chunked") is not None   # the chunked plan is in
    # the chunk budget the run uses: the configured one, else the default of this device
    budget = fastkd.config.chunk_bytes or cost_model.CHUNK_BYTES
    if device == "cuda" and not fastkd.config.chunk_bytes:
        budget = fastkd.backends.chunked.budget_bytes(None, 1, torch.device(device))
    if impl == "fastkd-auto":
        impl = "fastkd-torch" if device == "cpu" else "fastkd-chunked"
    if impl == "fastkd-torch":
        return cost_model.torch_chunked(shape) if engine else cost_model.torch_backend(shape)
    if impl == "fastkd-triton":
        return cost_model.streaming(shape, teacher=teacher)
    if impl == "fastkd-cuda":   # with the engine, impl="cuda" is the chunked plan with csrc epilogues
        return cost_model.cuda(shape, teacher=teacher, budget_bytes=budget)
    if impl == "fastkd-chunked":   # 16-bit operands: the fused head (chunked_epilogue="auto"),
        if shape.element_bytes == 2:  # with the scaled tile for the top-k loss in bfloat16
            return cost_model.fused_head(shape, teacher=teacher, budget_bytes=budget,
                                         scaled=teacher is None and case.dtype == "bfloat16")
        return cost_model.chunked(shape, teacher=teacher, budget_bytes=budget)
    if impl == "fastkd-chunked-triton":
        return cost_model.chunked(shape, teacher=teacher, budget_bytes=budget)
    if impl == "fastkd-chunked-gradpass" and teacher is None and shape.element_bytes == 2:
        return cost_model.fused_head(shape, budget_bytes=budget, scaled=False)
    if impl == "naive-hf":
        return cost_model.naive(shape)
    if impl == "naive-fp32":   # on the CPU every GEMM is fp32 work at the measured rate either way
        return cost_model.naive(shape, fp32=device == "cuda")
    return None


def print_table(case: Case, rows: list[dict], realism: dict, gpu: cost_model.Gpu, device: str) -> None:
    floor = rows[0]["fwd_bwd"]["median_s"]
    by_impl = {r["impl"]: r for r in rows}
    naive = next((by_impl[n]["fwd_bwd"]["median_s"] for n in ("naive-hf", "naive-fp32")
                  if by_impl.get(n, {}).get("status") == "ok"), None)
    shown = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in realism.items())
    floor_name = "3 bare GEMMs + the teacher's" if case.teacher_dim else "3 bare GEMMs"
    print(f"\n{case.label}   ({floor_name} {floor * 1e3:.2f} ms, {rows[0]['tflops']:.2f} TFLOP/s; "
          f"inputs: {shown})")
    print(f"{'impl':<16}{'fwd ms':>10}{'fwd+bwd':>11}{'IQR':>10}{'bound':>10}{'x bound':>8}{'x GEMMs':>8}"
          f"{'x naive':>8}{'peak MiB':>10}  errors loss / dh / dW")
    for row in rows[1:]:
        status = row["status"]
        if status in ("missing", "n/a"):
            continue
        plan = model_plan(row["impl"], case, device)
        if status != "ok":
            print(f"{row['impl']:<16}  {status.upper()}: {row['reason']}")
            continue
        t = row["fwd_bwd"]["median_s"]
        bound = plan.bound(gpu) if plan is not None else None
        row["bound_s"] = bound
        mem = row.get("peak_extra_bytes")
        errors = row.get("errors")
        print(f"{row['impl']:<16}{row['fwd']['median_s'] * 1e3:>10.2f}{t * 1e3:>11.2f}"
              f"{(row['fwd_bwd']['q75_s'] - row['fwd_bwd']['q25_s']) * 1e3:>10.2f}"
              + (f"{bound * 1e3:>10.2f}{t / bound:>8.2f}" if bound else f"{'-':>10}{'':>8}")
              + f"{t / floor:>8.2f}" + (f"{t / naive:>8.2f}" if naive else f"{'':>8}")
              + (f"{mem / 2**20:>10.1f}" if mem is not None else f"{'':>10}")
              + ("  " + " / ".join(f"{errors[k]:.1e}" for k in ("loss", "hidden", "weight")) if errors else ""))


def flatten(env, case, row) -> dict:
    flat = {**env, **{f"case_{k}": v for k, v in case.__dict__.items()}, "impl": row["impl"],
            "status": row["status"], "reason": row.get("reason", ""), "bound_s": row.get("bound_s")}
    for mode in ("fwd", "fwd_bwd"):
        for key, value in row.get(mode, {}).items():
            flat[f"{mode}_{key}"] = value
    for key, value in row.get("errors", {}).items():
        flat[f"error_{key}"] = value
    flat["peak_extra_bytes"] = row.get("peak_extra_bytes")
    return flat


def impl_colours(names) -> dict:
    """One colour per implementation, the same in every panel and every plot of a run."""
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf", "#000000"]
    order = ["gemm-floor", *IMPLEMENTATIONS]
    return {name: palette[order.index(name) % len(palette)] if name in order else "#444444" for name in names}


def plot(records: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return False
    ok = [r for r in records if r["status"] == "ok" and r.get("fwd_bwd_median_s") is not None]
    if not ok:
        return False
    colours = impl_colours({r["impl"] for r in ok})
    first = ok[0]
    what = (f"{first['case_loss']} {first['case_divergence']}"
            + (f" K={first['case_topk']} tail={first['case_tail']}" if first["case_loss"] == "topk" else "")
            + f", {first['case_dtype']}")
    models = sorted({r["case_model"] for r in ok})
    figure, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        for impl in sorted({r["impl"] for r in ok}, key=list(colours).index):
            pts = sorted((r["case_tokens"], r["fwd_bwd_median_s"], r["peak_extra_bytes"], r.get("bound_s"))
                         for r in ok if r["impl"] == impl and r["case_model"] == model)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            axes[0][col].plot(xs, [p[1] * 1e3 for p in pts], marker="o", color=colours[impl], label=impl)
            if all(p[3] for p in pts):
                axes[0][col].plot(xs, [p[3] * 1e3 for p in pts], linestyle=":", marker="x", color=colours[impl])
            if all(p[2] is not None for p in pts):
                axes[1][col].plot(xs, [p[2] / 2**20 for p in pts], marker="o", color=colours[impl], label=impl)
        shape = next(r for r in ok if r["case_model"] == model)
        axes[0][col].set(title=f"{model} D={shape['case_dim']} V={shape['case_vocab']}\n{what}: fwd+bwd "
                               "(x: bound)", xlabel="tokens", ylabel="ms", xscale="log", yscale="log")
        axes[1][col].set(title=f"{model}: peak extra memory\n{what}", xlabel="tokens", ylabel="MiB",
                         xscale="log", yscale="log")
        for ax in (axes[0][col], axes[1][col]):
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def save(stem: Path, env: dict, not_here: dict, records: list[dict]) -> None:
    stem.with_suffix(".json").write_text(json.dumps(
        {"environment": env, "not_here": not_here, "records": records}, indent=1) + "\n")
    fields = sorted({key for r in records for key in r})
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=f"models: {', '.join(f'{m} (D {d}, V {v}' + (f', softcap {c:g})' if c else ')') for m, (d, v, c) in MODELS.items())}; "
               f"CPU set: {', '.join(f'{m} (N {n}, D {d}, V {v}' + (f', softcap {c:g})' if c else ')') for m, (n, d, v, c) in CPU_MODELS.items())}. "
               f"implementations: {', '.join(IMPLEMENTATIONS)}. "
               "python -m bench --model [--help]: the cost model alone.")
    p.add_argument("--set", choices=list(SETS), default=None,
                   help="shape set: cpu (2 small shapes, float32), gpu (every model at 4k-32k tokens, "
                        "bf16), gpu-main (N=8192, the targets' shapes); default gpu when CUDA is available, else cpu")
    p.add_argument("--loss", nargs="+", choices=LOSSES, default=list(LOSSES),
                   help="topk: offline top-k teacher; dense: online full-vocabulary teacher; ce: CE only")
    p.add_argument("--divergence", default="reverse_kl", choices=("forward_kl", "reverse_kl", "jsd"),
                   help="divergence of the KD losses")
    p.add_argument("--tail", default="bucket", choices=("bucket", "renormalize"), help="top-k tail mode")
    p.add_argument("--topk", type=int, default=64, help="K of the top-k loss")
    p.add_argument("--impl", nargs="+", choices=list(IMPLEMENTATIONS), default=list(IMPLEMENTATIONS),
                   help="implementations to run")
    p.add_argument("--models", nargs="+", choices=[*MODELS, *CPU_MODELS], default=None,
                   help="only these models (default: every model of the set)")
    p.add_argument("--max-tokens", type=int, default=None, help="skip cases with more tokens")
    p.add_argument("--reps", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check (not recommended)")
    p.add_argument("--stop-on-wrong", action="store_true", help="stop after the first case with a wrong result")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for JSON, CSV and PNG")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" in argv:  # the cost model: no measurement, no GPU needed
        argv.remove("--model")
        cost_model.main(argv)
        return 0
    args = parser().parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape_set = args.set or ("gpu" if device == "cuda" else "cpu")
    env = environment(device)
    bandwidth = copy_bandwidth(device)
    env["copy_bytes_per_s"] = bandwidth
    impls = list(args.impl)
    records, not_here, not_applicable, wrong = [], {}, {}, []
    args.out.mkdir(parents=True, exist_ok=True)
    device_tag = env["device_name"].replace(" ", "-").replace("/", "-") or device
    stem = args.out / f"bench-{shape_set}-{device_tag}-{env['date']}"
    for loss in args.loss:
        for case in SETS[shape_set](loss, args.divergence, args.tail, args.topk):
            if args.models and case.model not in args.models:
                continue
            if args.max_tokens and case.tokens > args.max_tokens:
                continue
            rows, realism = measure(case, impls, device, args.reps, memory=not args.no_memory,
                                    check_first=not args.no_check)
            for row in rows[1:]:
                if row["status"] == "missing":   # this environment lacks it: say so once, then skip it
                    not_here[row["impl"]] = row["reason"]
                    impls.remove(row["impl"])
                    print(f"\n{row['impl']}: not run here ({row['reason']})")
                elif row["status"] == "n/a":
                    not_applicable.setdefault((row["impl"], row["reason"]), set()).add(loss)
                elif row["status"] == "wrong":
                    wrong.append(f"{row['impl']} on {case.label}: {row['reason']}")
            gpu = rates_for(env, rows[0]["tflops"], bandwidth)
            print_table(case, rows, realism, gpu, device)
            records += [{**flatten(env, case, row), **{f"input_{k}": v for k, v in realism.items()}}
                        for row in rows]
            save(stem, env, not_here, records)   # after every case: a run cut short keeps what it measured
            if wrong and args.stop_on_wrong:
                print("\nWRONG RESULT, stopping (--stop-on-wrong):\n  " + "\n  ".join(wrong))
                return WRONG_EXIT

    print("\nbound: the cost model's lower bound for the row's path (bench/model.py, python -m bench "
          "--model), at datasheet rates on an H100/H200, elsewhere at the GEMM and copy rates measured "
          "in this run; '-' where the row has no modelled path")
    for (impl, reason), losses in not_applicable.items():
        print(f"not applicable: {impl} for {', '.join(sorted(losses))} ({reason})")
    print(f"wrote {stem}.json and {stem}.csv")
    for loss in args.loss:
        subset = [r for r in records if r["case_loss"] == loss]
        if subset and plot(subset, Path(f"{stem}-{loss}.png")):
            print(f"wrote {stem}-{loss}.png")
    if wrong:
        print("\nWRONG RESULTS (not timed):\n  " + "\n  ".join(wrong))
        return WRONG_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
