"""End-to-end step benchmark: one training step of a student, fused vs naive distillation loss.

A student with the shape of Qwen2.5-1.5B (random weights, built from a config: no download) takes
forward, backward and an AdamW step on sequences of 4096 tokens, with top-k reverse KL (K=64, tail
bucket) against a random teacher's top-k, under a memory cap of 24 GB
(``torch.cuda.set_per_process_memory_fraction``) standing for a consumer GPU. For each loss it
reports tokens/s and peak memory at each batch size, and the largest batch that fits.

    python bench/step.py                 # GPU: Qwen2.5-1.5B shape, bf16, seq 4096, cap 24 GB
    python bench/step.py --tiny          # CPU-sized model, to check the harness anywhere
"""
from __future__ import annotations

import argparse
import datetime
import json
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
    args = parser.parse_args()

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
