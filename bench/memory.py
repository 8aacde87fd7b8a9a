"""Peak extra memory of one forward+backward: fastkd's torch backend against the naive loss.

The loss is top-k reverse KL with the tail bucket (K=64); the naive implementation materialises
fp32 logits for every row and takes ``log_softmax`` (fastkd.reference with float32 compute).
Each measurement runs in a fresh process (fastkd.memory). Prints a table and writes JSON to
``bench/results/``, keyed by device, versions and date.

    python bench/memory.py                      # N=4096, D=256, V=65536 on the CPU
    python bench/memory.py --tokens 8192 --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

import fastkd
from fastkd.memory import add_shape_arguments, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    rows = [measure(impl, args.tokens, args.dim, args.vocab, args.topk, args.device, args.dtype)
            for impl in ("fused", "naive")]
    fused, naive = rows
    print(f"top-k reverse KL, K={args.topk}, tail bucket, N={args.tokens}, D={args.dim}, "
          f"V={args.vocab}, {args.dtype}, {args.device}: forward+backward peak extra memory")
    print(f"{'impl':<8}{'loss':>12}{'peak extra MiB':>18}")
    for row in rows:
        print(f"{row['impl']:<8}{row['loss']:>12.6f}{row['peak_extra_bytes'] / 2**20:>18.1f}")
    ratio = fused["peak_extra_bytes"] / naive["peak_extra_bytes"]
    print(f"fused / naive = {ratio:.4f} (1/{1 / ratio:.1f}); measured by {fused['method']}")

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    record = {
        "benchmark": "memory", "date": datetime.date.today().isoformat(), "device": args.device,
        "device_name": device_name, "torch": torch.__version__, "fastkd": fastkd.__version__,
        "cpu_count": torch.get_num_threads(), "rows": rows, "fused_over_naive": ratio,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"memory-{args.device}-N{args.tokens}-D{args.dim}-V{args.vocab}-{record['date']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
