"""Benchmark runner: ``python -m bench [--set cpu|gpu] [--loss topk dense ce] ...`` (from the repo root).

Prints one table per case — impl, forward and forward+backward time (median and interquartile
range), peak extra memory, ratio to the three bare GEMMs of the same shape measured in the same run
(the floor no fused loss can beat), ratio to the naive loss and to each peer — and writes the
records as JSON and CSV under ``bench/results/`` keyed by device, versions and date, with PNG plots
of time and memory against tokens and vocabulary.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
from pathlib import Path

import torch

import fastkd

from .cases import IMPLEMENTATIONS, LOSSES, cpu_cases, gpu_cases
from .harness import measure

RESULTS = Path(__file__).parent / "results"


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


def print_table(case, rows) -> None:
    floor = rows[0]["fwd_bwd"]["median_s"]
    by_impl = {r["impl"]: r for r in rows}
    naive = by_impl.get("naive", {}).get("fwd_bwd", {}).get("median_s")
    print(f"\n{case.label}   (GEMM floor {floor * 1e3:.2f} ms, {rows[0]['tflops']:.2f} TFLOP/s)")
    print(f"{'impl':<18}{'fwd ms':>10}{'fwd+bwd ms':>12}{'IQR ms':>9}{'peak MiB':>10}{'x floor':>9}{'x naive':>9}")
    for row in rows[1:]:
        if row["status"] != "ok":
            print(f"{row['impl']:<18}  {row['status']}: {row['reason']}")
            continue
        t = row["fwd_bwd"]
        mem = row.get("peak_extra_bytes")
        mem_text = "" if mem is None else f"{mem / 2**20:.1f}"
        naive_text = "" if naive is None else f"{t['median_s'] / naive:.3f}"
        print(f"{row['impl']:<18}{row['fwd']['median_s'] * 1e3:>10.2f}{t['median_s'] * 1e3:>12.2f}"
              f"{(t['q75_s'] - t['q25_s']) * 1e3:>9.2f}{mem_text:>10}"
              f"{t['median_s'] / floor:>9.2f}{naive_text:>9}")
    fastkd_rows = [r for r in rows if r["impl"].startswith("fastkd") and r["status"] == "ok"]
    peers = [r for r in rows[1:] if not r["impl"].startswith("fastkd") and r["status"] == "ok"]
    for mine in fastkd_rows:
        for peer in peers:
            print(f"  {mine['impl']} / {peer['impl']}: time "
                  f"{mine['fwd_bwd']['median_s'] / peer['fwd_bwd']['median_s']:.3f}"
                  + (f", memory {mine['peak_extra_bytes'] / max(peer['peak_extra_bytes'], 1):.4f}"
                     if "peak_extra_bytes" in mine and "peak_extra_bytes" in peer else ""))


def flatten(env, case, row) -> dict:
    flat = {**env, **{f"case_{k}": v for k, v in case.__dict__.items()}, "impl": row["impl"],
            "status": row["status"], "reason": row.get("reason", "")}
    for mode in ("fwd", "fwd_bwd"):
        for key, value in row.get(mode, {}).items():
            flat[f"{mode}_{key}"] = value
    flat["peak_extra_bytes"] = row.get("peak_extra_bytes")
    return flat


def plot(records: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return False
    ok = [r for r in records if r["status"] == "ok"]
    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    for col, (axis_key, fixed_key) in enumerate((("case_tokens", "case_vocab"), ("case_vocab", "case_tokens"))):
        # The sweep along one axis is the largest group of cases sharing the other axis's value.
        groups: dict = {}
        for r in ok:
            groups.setdefault((r["case_model"], r[fixed_key]), set()).add(r[axis_key])
        (model, fixed), values = max(groups.items(), key=lambda item: len(item[1]))
        for impl in sorted({r["impl"] for r in ok}):
            pts = sorted((r[axis_key], r["fwd_bwd_median_s"], r["peak_extra_bytes"]) for r in ok
                         if r["impl"] == impl and r["case_model"] == model and r[fixed_key] == fixed)
            if len(pts) < 2:
                continue
            xs = [p[0] for p in pts]
            axes[0][col].plot(xs, [p[1] * 1e3 for p in pts], marker="o", label=impl)
            if all(p[2] is not None for p in pts):
                axes[1][col].plot(xs, [p[2] / 2**20 for p in pts], marker="o", label=impl)
        name = axis_key.removeprefix("case_")
        fixed_name = fixed_key.removeprefix("case_")
        axes[0][col].set(title=f"{model}, {fixed_name}={fixed}: fwd+bwd time", xlabel=name, ylabel="ms",
                         xscale="log", yscale="log")
        axes[1][col].set(title=f"{model}, {fixed_name}={fixed}: peak extra memory", xlabel=name,
                         ylabel="MiB", xscale="log", yscale="log")
        for ax in (axes[0][col], axes[1][col]):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main(argv=None) -> None:
    argv = list(__import__("sys").argv[1:] if argv is None else argv)
    if "--model" in argv:  # the cost model: no measurement, no GPU needed
        argv.remove("--model")
        from .model import main as model_main
        model_main(argv)
        return
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=("cpu", "gpu"), default=None,
                        help="shape set (default: gpu when CUDA is available)")
    parser.add_argument("--loss", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--divergence", default="reverse_kl")
    parser.add_argument("--tail", default="bucket")
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--impl", nargs="+", choices=list(IMPLEMENTATIONS), default=list(IMPLEMENTATIONS))
    parser.add_argument("--models", nargs="+", default=None, help="only these models (case names)")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape_set = args.set or ("gpu" if device == "cuda" else "cpu")
    env = environment(device)
    records = []
    for loss in args.loss:
        cases = (gpu_cases if shape_set == "gpu" else cpu_cases)(loss, args.divergence, args.tail, args.topk)
        for case in cases:
            if args.models and case.model not in args.models:
                continue
            if args.max_tokens and case.tokens > args.max_tokens:
                continue
            rows = measure(case, args.impl, device, args.reps, memory=not args.no_memory)
            print_table(case, rows)
            records += [flatten(env, case, row) for row in rows]

    args.out.mkdir(parents=True, exist_ok=True)
    device_tag = env["device_name"].replace(" ", "-").replace("/", "-") or device
    stem = args.out / f"bench-{shape_set}-{device_tag}-{env['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "records": records}, indent=1) + "\n")
    fields = sorted({key for r in records for key in r})
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
    print(f"\nwrote {stem}.json and {stem}.csv")
    for loss in args.loss:
        subset = [r for r in records if r["case_loss"] == loss]
        if subset and plot(subset, Path(f"{stem}-{loss}.png")):
            print(f"wrote {stem}-{loss}.png")


if __name__ == "__main__":
    main()
