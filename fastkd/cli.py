"""The ``fastkd`` command.

``fastkd demo``: one forward+backward of the fused top-k reverse-KL loss and of the naive
``log_softmax(h @ Wᵀ)`` loss on the same random tensors, each in a fresh process, printing both
losses and their peak extra memory. (The end-to-end distillation demo of DESIGN.md §5 replaces it
when the trainer lands; ``cache``, ``train``, ``bench`` and ``eval`` come with their issues.)
"""
from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
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
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
