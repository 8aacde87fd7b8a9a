"""A small subset for ``compute-sanitizer``: every fastkd backend once, forward+backward, small shapes.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 bench/sanitize_case.py
    python3 bench/sanitize_case.py --dry-run      # the CPU stand-in (torch backend), anywhere

On CUDA it runs each backend that can run (``triton``, ``cuda``, ``auto``) on bf16 inputs with
shapes chosen to hit the edges (V = 5003 not a multiple of any tile, D = 200 not a power of two,
N = 257 one row past a block, ignored rows, K = 16 with an unused ``-1`` slot): top-k reverse KL with
the tail bucket and CE, the dense online teacher (JSD) with softcap, and the byte-level loss. Each
result is compared with the float32 reference (a sanitizer run must also be a correct run); the
script exits non-zero on the first wrong result. Under the sanitizer the kernels run 10–100x
slower, hence the small shapes.
"""
from __future__ import annotations

import argparse
import sys

import torch

import fastkd
from fastkd.bytes.reference import byte_logprobs_reference
from fastkd.reference import kd_loss_reference, topk_kd_loss_reference

N, D, V, K = 257, 200, 5003, 16


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def inputs(device: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(N, D, generator=gen) * 2).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=gen) / D**0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::7] = -100                                             # ignored rows
    ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(N)])
    ids[:, -1] = -1                                                # an unused slot
    logprobs = torch.log_softmax(torch.randn(N, K + 1, generator=gen) * 3, -1)[:, :K]
    teacher_hidden = torch.randn(N, 2 * D, generator=gen).to(device, dtype)
    teacher_weight = (torch.randn(V, 2 * D, generator=gen) / (2 * D) ** 0.5).to(device, dtype)
    return hidden, weight, labels.to(device), ids.to(device), logprobs.to(device), teacher_hidden, teacher_weight


def run(impl: str, device: str, dtype: torch.dtype, tolerance: float) -> list[str]:
    hidden, weight, labels, ids, logprobs, teacher_hidden, teacher_weight = inputs(device, dtype)
    cases = {
        "top-k reverse KL + CE": (
            lambda h, w, i: fastkd.topk_kd_loss(h, w, ids, logprobs, labels=labels, ce_weight=0.5, impl=i),
            lambda h, w: topk_kd_loss_reference(h, w, ids, logprobs, labels=labels, ce_weight=0.5,
                                                compute_dtype=torch.float32)),
        "dense JSD, softcap": (
            lambda h, w, i: fastkd.kd_loss(h, w, teacher_hidden, teacher_weight, divergence="jsd", softcap=30.0,
                                           teacher_softcap=30.0, labels=labels, impl=i),
            lambda h, w: kd_loss_reference(h, w, teacher_hidden, teacher_weight, divergence="jsd", softcap=30.0,
                                           teacher_softcap=30.0, labels=labels, compute_dtype=torch.float32)),
    }
    # Every id its own bytes (random lengths 0-3: ids without bytes land in bucket 256).
    gen = torch.Generator().manual_seed(1)
    token_bytes = [bytes(torch.randint(0, 256, (int(n),), generator=gen).tolist())
                   for n in torch.randint(0, 4, (V,), generator=gen)]
    vocab = fastkd.ByteVocab.from_bytes(token_bytes)
    probe = torch.randn(N, 257, generator=gen).to(device)          # a random projection of the (N, 257) output
    cases["byte log-probs"] = (
        lambda h, w, i: (fastkd.byte_logprobs(h, w, vocab, impl=i).clamp_min(-60) * probe).sum(),
        lambda h, w: (byte_logprobs_reference(h, w, vocab, compute_dtype=torch.float32).clamp_min(-60) * probe).sum())
    failures = []
    for name, (loss_fn, ref_fn) in cases.items():
        try:
            loss = loss_fn(hidden, weight, impl)
        except (NotImplementedError, ValueError) as why:   # raised before any kernel: not offered
            print(f"{impl:<7} {name:<24} not offered by this impl ({why})")
            continue
        grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
        ref = ref_fn(hidden, weight)
        ref_hidden, ref_weight = torch.autograd.grad(ref, (hidden, weight))
        errors = [rel(loss, ref), rel(grad_hidden, ref_hidden), rel(grad_weight, ref_weight)]
        verdict = "ok" if max(errors) <= tolerance else "WRONG"
        print(f"{impl:<7} {name:<24} errors loss / dh / dW: " + " / ".join(f"{e:.1e}" for e in errors)
              + f"  {verdict}")
        if verdict != "ok":
            failures.append(f"{impl} {name}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the CPU stand-in: impl='torch', float32")
    args = parser.parse_args()
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            print("no CUDA device: running the CPU stand-in (impl='torch', float32)")
        failures = run("torch", "cpu", torch.float32, 1e-4)
    else:
        failures = []
        for impl in ("triton", "cuda", "auto"):
            try:
                fastkd.resolve_impl(impl, torch.device("cuda"), torch.bfloat16)
            except (RuntimeError, TypeError, ValueError, NotImplementedError) as why:
                print(f"{impl}: not available ({why})")
                continue
            failures += run(impl, "cuda", torch.bfloat16, 5e-2)
    if failures:
        print("WRONG: " + ", ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
