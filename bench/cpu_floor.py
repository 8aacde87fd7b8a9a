"""The torch backend on the CPU against the GEMM floor and the naive loss, side by side (issue #14 item 8).

    python -m bench.cpu_floor [--tokens 2048 --dim 512 --vocab 32768 --topk 64 --rounds 5]

One process, float32, forward + backward. Per round every implementation runs once, in turn
(interleaved, so a noisy neighbour on a shared machine hits them alike); the table gives the median
over the rounds, the spread (min–max) and the ratio of the medians to the floor: the three bare
GEMMs of the student's head (logits, d hidden, d weight: 6·N·D·V FLOPs) timed as three
``torch.mm`` of those shapes in the same run. Cases:

- ``topk``: top-k reverse KL with the tail bucket against an offline teacher's top-K;
- ``dense``: the full-vocabulary JSD(β=0.5) against an online teacher of the student's width
  (``--teacher-dim``; its one GEMM is part of the loss, not of the floor);
- ``select`` (``--losses select``): the top-k loss on all rows, and with token selection keeping
  50 % of the rows by entropy, the rows gathered before the head (the trainer's way: a scoring
  forward without gradients, 2·N·D·V, then 3 GEMMs on the kept rows, 3·N·D·V: 5/6 of the all-rows
  FLOPs) and masked after it (every row's loss with ``reduction="none"``: 8/6).

The naive loss is ``log_softmax(h·Wᵀ)`` over all rows in float32 with autograd
(``fastkd.reference`` at float32).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastkd
from fastkd.reference import kd_loss_reference, topk_kd_loss_reference


def _inputs(n, d, v, k, teacher_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) / d**0.5).requires_grad_()
    start = torch.randint(0, v, (n, 1), generator=gen)
    ids = (start + torch.arange(k) * max(1, v // k)) % v
    logprobs = torch.log_softmax(torch.randn(n, k + 1, generator=gen) * 2.0, dim=-1)[:, :k]
    teacher_hidden = torch.randn(n, teacher_dim, generator=gen)
    teacher_weight = torch.randn(v, teacher_dim, generator=gen) / teacher_dim**0.5
    return dict(hidden=hidden, weight=weight, ids=ids, logprobs=logprobs,
                teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)


def _steps(x):
    h, w = x["hidden"], x["weight"]
    logits = torch.empty(h.shape[0], w.shape[0])
    dh, dw = torch.empty_like(h), torch.empty_like(w)

    def floor():
        torch.mm(h.detach(), w.detach().T, out=logits)
        torch.mm(logits, w.detach(), out=dh)
        torch.mm(logits.T, h.detach(), out=dw)

    def backward(make):
        def step():
            h.grad = w.grad = None
            make().backward()
        return step

    def selected(fraction):
        """Token selection as the trainer does it: score every row without gradients, gather the
        kept rows before the head, the loss (summed) on them alone."""
        def make():
            with torch.no_grad():
                _, stats = fastkd.topk_kd_loss(h, w, x["ids"], x["logprobs"], impl="torch",
                                               reduction="none", return_stats=True, **topk)
            keep = stats.entropy.topk(max(1, int(fraction * h.shape[0])), sorted=False).indices
            return fastkd.topk_kd_loss(h[keep], w, x["ids"][keep], x["logprobs"][keep], impl="torch",
                                       reduction="sum", **topk)
        return make

    def masked(fraction):
        """Token selection after the head (before this change): every row's loss, then a mask."""
        def make():
            rows, stats = fastkd.topk_kd_loss(h, w, x["ids"], x["logprobs"], impl="torch",
                                              reduction="none", return_stats=True, **topk)
            keep = torch.zeros_like(rows)
            keep[stats.entropy.topk(max(1, int(fraction * h.shape[0])), sorted=False).indices] = 1
            return (rows * keep).sum()
        return make

    topk = dict(divergence="reverse_kl", tail="bucket")
    dense = dict(divergence="jsd", beta=0.5)
    teacher = (x["teacher_hidden"], x["teacher_weight"])
    return {
        "topk": {
            "gemm floor": floor,
            "fastkd torch": backward(lambda: fastkd.topk_kd_loss(h, w, x["ids"], x["logprobs"], impl="torch", **topk)),
            "naive": backward(lambda: topk_kd_loss_reference(h, w, x["ids"], x["logprobs"],
                                                             compute_dtype=torch.float32, **topk)),
        },
        "select": {
            "gemm floor": floor,
            "all rows": backward(lambda: fastkd.topk_kd_loss(h, w, x["ids"], x["logprobs"], impl="torch",
                                                             reduction="sum", **topk)),
            "50% gathered": backward(selected(0.5)),
            "50% masked": backward(masked(0.5)),
        },
        "dense": {
            "gemm floor": floor,
            "fastkd torch": backward(lambda: fastkd.kd_loss(h, w, *teacher, impl="torch", **dense)),
            "naive": backward(lambda: kd_loss_reference(h, w, *teacher, compute_dtype=torch.float32, **dense)),
        },
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--teacher-dim", type=int, default=None, help="default: --dim")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--losses", default="topk,dense")
    args = parser.parse_args(argv)
    x = _inputs(args.tokens, args.dim, args.vocab, args.topk, args.teacher_dim or args.dim)
    steps = _steps(x)
    print(f"N={args.tokens} D={args.dim} V={args.vocab} K={args.topk} teacher D="
          f"{args.teacher_dim or args.dim}, float32, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds (+1 warm-up)")
    for loss in args.losses.split(","):
        impls = steps[loss]
        times = {name: [] for name in impls}
        for round_ in range(args.rounds + 1):
            for name, step in impls.items():
                start = time.perf_counter()
                step()
                if round_:  # round 0 warms up (allocator, thread pool)
                    times[name].append(time.perf_counter() - start)
        floor = statistics.median(times["gemm floor"])
        print(f"\n{loss}: {'impl':14s} {'median s':>9s} {'min–max s':>13s} {'× floor':>8s}")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"{loss}: {name:14s} {med:9.3f} {min(ts):6.3f}–{max(ts):6.3f} {med / floor:8.2f}")


if __name__ == "__main__":
    main()
