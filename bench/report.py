"""The table of RESULTS.md: per path and shape, the cost model's bound, the measured figure where one
exists, and the goal (``python -m bench.report [--results JSON ...] [--write RESULTS.md]``).

Rows: every path of the cost model at N = 8192 (bf16, top-k K = 64, online teacher twice as wide)
on the three models of DESIGN.md §6, and the dense online loss at Liger's benchmark shape; bound
in ms and as a ratio to the floor on H100 and H200 (datasheet rates). Measured columns come from
``python -m bench`` JSON records of a GPU run (the fwd+bwd median of the implementation that runs
that path, at the same shape), or "–" when none was measured. ``--write FILE`` replaces the part
of FILE between the markers ``<!-- results-table -->`` and ``<!-- /results-table -->``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import model as cm

BEGIN, END = "<!-- results-table -->", "<!-- /results-table -->"

# Which benchmark implementation runs which cost-model path (loss "topk": no teacher; "dense":
# online dense teacher of width 2·D).
PATH_OF_IMPL = {
    ("fastkd-auto", "topk"): "chunked", ("fastkd-auto", "dense"): "chunked online dense",
    ("fastkd-chunked", "topk"): "chunked", ("fastkd-chunked", "dense"): "chunked online dense",
    ("fastkd-chunked-triton", "topk"): "chunked, Triton epilogues",
    ("fastkd-chunked-gradpass", "topk"): "chunked, gradient pass",
    ("fastkd-chunked-triton", "dense"): "chunked online dense, Triton epilogues",
    ("fastkd-triton", "topk"): "streaming", ("fastkd-triton", "dense"): "streaming online dense",
    ("fastkd-cuda", "topk"): "cuda", ("fastkd-cuda", "dense"): "cuda online dense",
    ("fastkd-torch", "topk"): "torch", ("naive-hf", "topk"): "naive (bf16 logits, HF)",
    ("naive-hf", "dense"): "naive (bf16 logits, HF)",
}
PEER_ROWS = ("liger", "cut-cross-entropy", "naive-fp32")


def goal(plan: cm.Plan) -> str:
    target = cm.TARGETS.get(plan.path)
    if target and plan.shape.model in target.models:
        return cm.verdict(plan, cm.GPUS["H100"]).replace("meets", "bound meets").replace("MISSES", "bound MISSES")
    return ""


def measured_index(paths: list[Path]) -> dict:
    """``(model, tokens, loss, impl) -> (device name, fwd+bwd seconds, status)`` from bench JSON files."""
    index = {}
    for path in paths:
        data = json.loads(path.read_text())
        for r in data["records"]:
            if r["impl"] == "gemm-floor":
                continue
            index[(r["case_model"], r["case_tokens"], r["case_loss"], r["impl"])] = (
                r["device_name"], r.get("fwd_bwd_median_s"), r["status"])
    return index


def table(results: list[Path] = ()) -> str:
    measured = measured_index(list(results))
    h100, h200 = cm.GPUS["H100"], cm.GPUS["H200"]
    lines = ["| shape | path | H100 bound ms (x floor) | H200 bound ms (x floor) | measured fwd+bwd | goal (issue #14 item 7) |",
             "|---|---|---|---|---|---|"]

    def add(shape_label, plan, key, plan_h200=None):
        plan_h200 = plan_h200 or plan  # the same path with the H200's default budget
        found = [f"{v[0]}: {v[1] * 1e3:.1f} ms" if v[2] == "ok" and v[1] else f"{v[0]}: {v[2]}"
                 for (model, tokens, loss, impl), v in measured.items()
                 if (model, tokens) == key[:2] and PATH_OF_IMPL.get((impl, loss)) == plan.path
                 and loss == key[2]]
        lines.append(f"| {shape_label} | {plan.path} | {plan.bound(h100) * 1e3:.1f} ({plan.ratio(h100):.2f}) "
                     f"| {plan_h200.bound(h200) * 1e3:.1f} ({plan_h200.ratio(h200):.2f}) | {'; '.join(found) or '–'} "
                     f"| {goal(plan)} |")

    for model, (d, v, cap) in cm.MODELS.items():
        shape = cm.Shape(model, 8192, d, v, softcap=cap)
        label = f"{model} N=8192 D={d} V={v}" + (f" cap {cap:g}" if cap else "")
        for plan, plan_h200 in zip(cm.plans_for(shape, h100), cm.plans_for(shape, h200)):
            loss = "dense" if plan.shape.teacher_dim else "topk"
            add(label + (" +teacher" if loss == "dense" else ""), plan, (model, 8192, loss), plan_h200)
    s = cm.LIGER_JSD_SHAPE
    label = f"Liger JSD shape: N=8192 D=2048 teacher 4096 V={s.vocab}"

    def liger_plans(gpu):
        b = cm.default_budget(gpu)
        return (cm.fused_head(s, teacher="dense", budget_bytes=b), cm.chunked(s, teacher="dense", budget_bytes=b),
                cm.streaming(s, teacher="dense", gpu=gpu), cm.cuda(s, teacher="dense", budget_bytes=b),
                cm.torch_backend(s), cm.naive(s))

    for plan, plan_h200 in zip(liger_plans(h100), liger_plans(h200)):
        add(label, plan, ("liger-jsd", 8192, "dense"), plan_h200)
    peers = [f"{impl} on {model} N={tokens} {loss}: " + (f"{v[1] * 1e3:.1f} ms ({v[0]})" if v[2] == "ok" else v[2])
             for (model, tokens, loss, impl), v in measured.items() if impl in PEER_ROWS]
    lines.append("")
    lines.append(f"Liger publishes {cm.LIGER_JSD_MS} ms fwd+bwd for its chunked JSD at the Liger JSD shape on an "
                 "H100 (linkedin/Liger-Kernel, benchmark/data/all_benchmark_data.csv, distill_jsd_loss, BT 8192).")
    if peers:
        lines.append("Peers and baselines measured: " + "; ".join(peers) + ".")
    return "\n".join(lines)


def write(path: Path, text: str) -> None:
    body = path.read_text()
    if BEGIN not in body or END not in body:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers")
    head, rest = body.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--results", nargs="*", type=Path, default=[], help="bench JSON files of GPU runs")
    parser.add_argument("--write", type=Path, default=None, help="splice the table into this file")
    args = parser.parse_args(argv)
    text = table(args.results)
    if args.write:
        write(args.write, text)
        print(f"wrote the table into {args.write}")
    else:
        print(text)


if __name__ == "__main__":
    main()
