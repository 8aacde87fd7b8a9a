"""End-to-end step benchmark: one training step of a student, fused vs naive distillation loss.

A student with the shape of Qwen2.5-1.5B (random weights, built from a config: no download) takes
forward, backward and an AdamW step on sequences of 4096 tokens, with top-k reverse KL (K=64, tail
bucket) against a random teacher's top-k, under a memory cap of 24 GB
(``torch.cuda.set_per_process_memory_fraction``) standing for a consumer GPU. For each loss it
reports tokens/s and peak memory at each batch size, and the largest batch that fits.

    python bench/step.py                 # GPU: Qwen2.5-1.5B shape, bf16, seq 4096, cap 24 GB
    python bench/step.py --tiny          # CPU-sized model, to check the harness anywhere
    python bench/step.py --token-selection   # CPU: loss FLOPs and step time per token_select

``--token-selection`` runs the trainer's loss path (:func:`fastkd.train.selection.selected_kd_loss`)
for one training step of a tiny student (forward, loss, backward, AdamW) at ``token_fraction`` 1.0
and 0.5 for each ``token_select`` criterion, against a top-k teacher (cache/server) and an online
teacher model, and prints the LM-head FLOPs counted on the aten matmuls (:class:`HeadGemms`) as a
fraction of those at 1.0, with the median step time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from pathlib import Path

import torch

import fastkd
from fastkd.reference import topk_kd_loss_reference


def build_student(tiny: bool, dtype: torch.dtype, device: str, checkpointing: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if tiny:
        config = Qwen2Config(vocab_size=32768, hidden_size=256, intermediate_size=688,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=False)
    else:  # Qwen2.5-1.5B
        config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                             num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                             tie_word_embeddings=True, rope_theta=1e6)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    return model


def distillation_loss(model, input_ids, teacher_ids, teacher_logprobs, fused: bool):
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]  # after the final norm
    weight = model.lm_head.weight
    if fused:
        return fastkd.topk_kd_loss(hidden, weight, teacher_ids, teacher_logprobs)
    return topk_kd_loss_reference(hidden, weight, teacher_ids, teacher_logprobs, compute_dtype=torch.float32)


def run(model, batch: int, seq: int, topk: int, fused: bool, steps: int, device: str) -> dict:
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    start = torch.randint(0, vocab, (batch, seq - 1, 1), generator=gen)
    teacher_ids = ((start + torch.arange(topk) * (vocab // topk)) % vocab).to(device)
    teacher_logprobs = torch.log_softmax(torch.randn(batch, seq - 1, topk + 1, generator=gen) * 2, -1)[..., :topk].to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        loss = distillation_loss(model, input_ids, teacher_ids, teacher_logprobs, fused)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up (and optimizer state allocation)
    if device == "cuda":
        torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - begin
    row = {"loss": "fused" if fused else "naive", "batch": batch, "seq": seq,
           "tokens_per_s": batch * seq * steps / elapsed, "final_loss": loss.item()}
    if device == "cuda":
        row["peak_bytes"] = torch.cuda.max_memory_allocated()
    del optimizer
    return row


_GEMMS = {"mm": 0, "bmm": 0, "matmul": 0, "addmm": 1, "baddbmm": 1}  # index of the first factor
_PATCHED = [(torch, name) for name in _GEMMS] + [(torch.Tensor, name) for name in
                                                  ("mm", "bmm", "matmul", "addmm", "addmm_", "baddbmm", "__matmul__")]


class HeadGemms:
    """Counts the matrix products with a dimension of size ``vocab`` (the LM-head GEMMs: logits,
    ``dh``, ``dW``, a teacher's logits) while active: ``flops`` (2·m·k·n each), ``calls`` and
    ``most_rows``, the most rows one of them saw (its dimension that is neither ``vocab`` nor one of
    ``hidden_sizes``). It wraps ``torch.mm``/``addmm``/``bmm``/``matmul``/``@`` (also inside
    fastkd's custom ops, which a dispatch mode cannot see into): the torch backend and the chunked
    plan's torch epilogue make every GEMM that way; Triton/CUDA kernels are not counted."""

    def __init__(self, vocab: int, hidden_sizes: tuple = ()):
        self.vocab, self.hidden_sizes = vocab, hidden_sizes
        self.flops, self.calls, self.most_rows = 0, 0, 0
        self._saved = []

    def _count(self, name: str, args) -> None:
        first = _GEMMS.get(name.rstrip("_").strip("_"), 0)
        a, b = args[first], args[first + 1]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() < 2 or b.dim() < 2:
            return
        dims = [a.shape[-2], a.shape[-1], b.shape[-1]]
        if self.vocab not in dims or 1 in dims:  # not a head GEMM, or a batch of row dot products
            return
        batch = max(a.shape[:-2].numel(), b.shape[:-2].numel())
        self.flops += 2 * batch * dims[0] * dims[1] * dims[2]
        self.calls += 1
        dims.remove(self.vocab)
        for size in self.hidden_sizes:
            if size in dims:
                dims.remove(size)
                break
        if len(dims) == 1:
            self.most_rows = max(self.most_rows, dims[0])

    def __enter__(self) -> "HeadGemms":
        for owner, name in _PATCHED:
            original = getattr(owner, name)
            self._saved.append((owner, name, original))

            def counted(*args, _original=original, _name=name, **kwargs):
                self._count(_name, args)
                return _original(*args, **kwargs)

            setattr(owner, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


def token_selection(args) -> None:
    """One training step per (teacher kind, token_select, token_fraction): head FLOPs and time."""
    from fastkd.integrations import hidden_and_head
    from fastkd.train.selection import CRITERIA, selected_kd_loss

    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(args.threads)
    vocab, batch, seq, topk = 32768, 2, args.seq or 256, args.topk
    student = build_student(True, torch.float32, "cpu", checkpointing=False)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        teacher = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=384, intermediate_size=1024,
                                               num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                               tie_word_embeddings=False)).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = input_ids[:, 1:].clone()
    if args.padding:  # rows that are not counted (they still reach the loss at token_fraction 1.0)
        labels[:, -int(args.padding * (seq - 1)):] = -100
    counted = int((labels != -100).sum())
    start = torch.randint(0, vocab, (batch, seq - 1, 1), generator=gen)
    cached = {"ids": (start + torch.arange(topk) * (vocab // topk)) % vocab,
              "logprobs": torch.log_softmax(torch.randn(batch, seq - 1, topk + 1, generator=gen) * 3, -1)[..., :topk]}
    options = dict(divergence="reverse_kl", beta=0.5, tail="bucket", temperature=1.0, ce_weight=0.0, kd_weight=1.0,
                   impl="torch")
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)

    def step(kind: str, fraction: float, criterion: str):
        s = hidden_and_head(student, input_ids=input_ids)
        if kind == "top-k":
            teacher_rows = cached
        else:
            with torch.no_grad():
                t = hidden_and_head(teacher, input_ids=input_ids)
            teacher_rows = dict(t, hidden=t["hidden"][:, :-1])
        begin = time.process_time()  # the loss alone: scoring, gathering, its three GEMMs (grads in forward)
        loss, _ = selected_kd_loss(dict(s, hidden=s["hidden"][:, :-1]), labels, teacher_rows, options=options,
                                   token_fraction=fraction, token_select=criterion)
        loss_seconds = time.process_time() - begin
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_seconds

    print(f"one training step, CPU fp32, {args.threads} thread(s): student D 256, teacher D 384, V {vocab}, "
          f"{batch}x{seq - 1} rows ({counted} counted), top-k K {topk}, reverse KL, impl torch")
    print(f"{'teacher':<8} {'token_select':<16} {'fraction':>8} {'kept':>6} {'head GFLOP':>11} "
          f"{'of f=1.0':>9} {'loss s':>8} {'of f=1.0':>9} {'step s':>8} {'of f=1.0':>9}")
    print(f"(seconds: CPU time of this process, median of {args.steps} interleaved rounds; loss: selection and "
          "the loss with its gradients; step: forward, loss, backward, AdamW)")
    rows = []
    settings = [(1.0, "-")] + [(0.5, c) for c in CRITERIA]
    for kind in ("top-k", "online"):
        flops, times, loss_times = [], [[] for _ in settings], [[] for _ in settings]
        for fraction, criterion in settings:
            select = criterion if fraction < 1 else "teacher_entropy"  # (not used at 1.0)
            step(kind, fraction, select)  # warm-up
            with HeadGemms(vocab) as gemms:
                step(kind, fraction, select)
            flops.append(gemms.flops)
        for _ in range(args.steps):  # interleaved rounds: a drifting machine load hits every setting alike
            for i, (fraction, criterion) in enumerate(settings):
                begin = time.process_time()  # this process's CPU time: other processes' load does not count
                loss_times[i].append(step(kind, fraction, criterion if fraction < 1 else "teacher_entropy"))
                times[i].append(time.process_time() - begin)
        medians = [sorted(t)[len(t) // 2] for t in times]
        loss_medians = [sorted(t)[len(t) // 2] for t in loss_times]
        for i, (fraction, criterion) in enumerate(settings):
            kept = counted if fraction == 1 else math.ceil(fraction * counted)
            rows.append({"teacher": kind, "token_select": criterion, "token_fraction": fraction, "kept_rows": kept,
                         "head_flops": flops[i], "loss_s": loss_medians[i], "step_s": medians[i],
                         "loss_s_all": loss_times[i], "step_s_all": times[i]})
            print(f"{kind:<8} {criterion:<16} {fraction:>8.1f} {kept:>6} {flops[i] / 1e9:>11.2f} "
                  f"{flops[i] / flops[0]:>8.0%} {loss_medians[i]:>8.3f} {loss_medians[i] / loss_medians[0]:>8.0%} "
                  f"{medians[i]:>8.3f} {medians[i] / medians[0]:>8.0%}")
    record = {"benchmark": "step-token-selection", "date": datetime.date.today().isoformat(), "device": "cpu",
              "threads": args.threads, "torch": torch.__version__, "fastkd": fastkd.__version__, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"step-token-selection-cpu-{record['date']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized student (checks the harness)")
    parser.add_argument("--seq", type=int, default=None, help="default 4096 (512 with --tiny)")
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--cap-gb", type=float, default=24.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--token-selection", action="store_true",
                        help="CPU: head FLOPs and step time at token_fraction 1.0 and 0.5 per token_select")
    parser.add_argument("--threads", type=int, default=1,
                        help="--token-selection: CPU threads (1: CPU time is the work, not the waiting)")
    parser.add_argument("--padding", type=float, default=0.0,
                        help="--token-selection: fraction of each sequence's rows that are not counted")
    args = parser.parse_args()
    if args.token_selection:
        fastkd.config.check_values = False
        return token_selection(args)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fastkd.config.check_values = False  # no host sync inside the timed steps
    if device == "cpu" and not args.tiny:
        raise SystemExit("the full-size step benchmark needs a GPU; use --tiny on the CPU")
    seq = args.seq or (512 if args.tiny else 4096)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 2**30 / total))
    model = build_student(args.tiny, dtype, device, checkpointing=not args.no_checkpointing)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"student: {n_params / 1e6:.1f}M parameters, {dtype}, seq {seq}, {device}"
          + (f", memory cap {args.cap_gb:g} GB" if device == "cuda" else ""))
    rows, largest = [], {}
    for fused in (True, False):
        name = "fused" if fused else "naive"
        for batch in args.batches:
            try:
                row = run(model, batch, seq, args.topk, fused, args.steps, device)
            except torch.OutOfMemoryError:
                print(f"{name:<6} batch {batch:>3}: out of memory")
                break
            rows.append(row)
            largest[name] = batch
            peak = f", peak {row['peak_bytes'] / 2**30:.2f} GiB" if "peak_bytes" in row else ""
            print(f"{name:<6} batch {batch:>3}: {row['tokens_per_s']:>10.0f} tokens/s{peak}")
        model.zero_grad(set_to_none=True)
    print("largest batch that fits: " + ", ".join(f"{k} {v}" for k, v in largest.items()))
    record = {"benchmark": "step", "date": datetime.date.today().isoformat(), "device": device,
              "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "fastkd": fastkd.__version__, "params": n_params,
              "tiny": args.tiny, "cap_gb": args.cap_gb if device == "cuda" else None,
              "rows": rows, "largest_batch": largest}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"step-{'tiny' if args.tiny else 'qwen2.5-1.5b'}-{device}-{record['date']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
