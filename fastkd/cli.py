"""The ``fastkd`` command.

``fastkd demo``: one forward+backward of the fused top-k reverse-KL loss and of the naive
``log_softmax(h @ Wᵀ)`` loss on the same random tensors, each in a fresh process, printing both
losses and their peak extra memory. (The end-to-end distillation demo of DESIGN.md §5 replaces it
when the trainer lands; ``cache``, ``train`` and ``eval`` come with their issues.)

``fastkd bench [ARGS]``: the benchmark runner of a checkout (``python -m bench ARGS``).
"""
from __future__ import annotations

import argparse
import os
import sys


def demo(args: argparse.Namespace) -> int:
    import torch

    from .memory import measure

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"fastkd demo: top-k reverse KL (K={args.topk}, tail bucket), forward+backward on {device}, "
          f"N={args.tokens} tokens, D={args.dim}, V={args.vocab}, {args.dtype}")
    rows = [measure(impl, args.tokens, args.dim, args.vocab, args.topk, device, args.dtype)
            for impl in ("fused", "naive")]
    fused, naive = rows
    print(f"{'loss':<28}{'value':>14}{'peak extra MB':>16}")
    for name, row in (("fastkd.topk_kd_loss (torch)", fused), ("naive log_softmax", naive)):
        print(f"{name:<28}{row['loss']:>14.6f}{row['peak_extra_bytes'] / 2**20:>16.1f}")
    ratio = naive["peak_extra_bytes"] / max(fused["peak_extra_bytes"], 1)
    print(f"same loss to {abs(fused['loss'] - naive['loss']):.1e}; fused needs 1/{ratio:.1f} of the "
          f"naive peak memory (measured by {fused['method']})")
    return 0


def bench(bench_args: list[str]) -> int:
    sys.path.insert(0, os.getcwd())  # bench/ lives in the checkout, not in the installed package
    try:
        from bench.__main__ import main as bench_main
    except ImportError:
        print("fastkd bench runs the benchmark suite of a fastkd checkout: run it from the "
              "repository root (or use python -m bench there)", file=sys.stderr)
        return 2
    bench_main(bench_args)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after it belongs to the benchmark runner
        return bench(argv[1:])
    parser = argparse.ArgumentParser(prog="fastkd", description="fused knowledge-distillation losses")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="fused vs naive loss on random tensors: value and peak memory")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(run=demo)
    commands.add_parser("bench", help="the benchmark runner of a checkout (python -m bench); "
                                      "its arguments follow, see fastkd bench --help")
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
