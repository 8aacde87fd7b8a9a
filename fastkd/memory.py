"""Peak extra memory of one forward+backward of a loss: fused (fastkd) against naive.

"Extra" is what the loss needs beyond its inputs: on CUDA, the peak of
``torch.cuda.max_memory_allocated`` above what was allocated before the call; on the CPU, the
peak resident set size above the resident size before the call, measured in a fresh process
(``/proc/self/clear_refs`` resets the kernel's high-water mark ``VmHWM`` where Linux allows it,
else the process-lifetime ``ru_maxrss`` is used). Each measurement runs in its own subprocess so
one impl's cached blocks cannot hide the next one's.

``python -m fastkd.memory --impl fused --tokens 4096 --dim 256 --vocab 65536`` prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

IMPLS = ("fused", "naive")


def make_inputs(tokens: int, dim: int, vocab: int, topk: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Random student hidden/weight and a random teacher's top-k, as a trainer would hold them."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).to(device, dtype).requires_grad_()
    # A teacher's top-k: K distinct ids per row (a random start, strided), log-probs of a peaked
    # distribution whose top-k mass is below 1.
    start = torch.randint(0, vocab, (tokens, 1), generator=gen)
    ids = (start + torch.arange(topk) * max(1, vocab // topk)) % vocab
    logprobs = torch.log_softmax(torch.randn(tokens, topk + 1, generator=gen) * 2, dim=1)[:, :topk]
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    return hidden, weight, ids.to(device), logprobs.to(device), labels.to(device)


def run_once(impl: str, tokens: int, dim: int, vocab: int, topk: int, device: str, dtype_name: str) -> dict:
    """One forward+backward of reverse-KL top-k (tail bucket) in this process; returns figures."""
    import fastkd
    from fastkd.reference import topk_kd_loss_reference

    dtype = getattr(torch, dtype_name)

    def loss_of(hidden, weight, ids, logprobs):
        if impl == "fused":
            return fastkd.topk_kd_loss(hidden, weight, ids, logprobs, impl="torch")
        return topk_kd_loss_reference(hidden, weight, ids, logprobs, compute_dtype=torch.float32)

    # One tiny call first: one-time costs (lazy imports, dispatcher and thread-pool set-up) are
    # not memory the loss needs.
    loss_of(*make_inputs(8, dim, min(vocab, 256), min(topk, 8), device, dtype)[:4]).backward()
    hidden, weight, ids, logprobs, _ = make_inputs(tokens, dim, vocab, topk, device, dtype)

    def step():
        return loss_of(hidden, weight, ids, logprobs)

    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = step()
        loss.backward()
        loss = loss.detach()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        method = "torch.cuda.max_memory_allocated"
    else:
        reset = reset_high_water_mark()
        before = rss_bytes()
        loss = step()
        loss.backward()
        loss = loss.detach()
        peak = (high_water_mark_bytes() if reset else maxrss_bytes()) - before
        method = "VmHWM after clear_refs" if reset else "ru_maxrss"
    return {"impl": impl, "tokens": tokens, "dim": dim, "vocab": vocab, "topk": topk,
            "device": device, "dtype": dtype_name, "loss": loss.item(), "peak_extra_bytes": int(peak),
            "method": method}


def measure(impl: str, tokens: int, dim: int, vocab: int, topk: int = 64, device: str = "cpu",
            dtype: str = "float32") -> dict:
    """``run_once`` in a fresh Python process (so allocations of other runs cannot interfere)."""
    cmd = [sys.executable, "-m", "fastkd.memory", "--impl", impl, "--tokens", str(tokens),
           "--dim", str(dim), "--vocab", str(vocab), "--topk", str(topk), "--device", device,
           "--dtype", dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return high_water_mark_bytes() > 0
    except OSError:
        return False


def high_water_mark_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tokens --dim --vocab --topk --device --dtype`` of a measurement (also bench/memory.py)."""
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=IMPLS, required=True)
    add_shape_arguments(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(json.dumps(run_once(args.impl, args.tokens, args.dim, args.vocab, args.topk, args.device,
                              args.dtype)))


if __name__ == "__main__":
    main()
