"""The ``fastkd`` command.

``fastkd demo``: one forward+backward of the fused top-k reverse-KL loss and of the naive
``log_softmax(h @ Wᵀ)`` loss on the same random tensors, each in a fresh process, printing both
losses and their peak extra memory. (The end-to-end distillation demo of DESIGN.md §5 replaces it
when the trainer lands; ``cache``, ``train`` and ``eval`` come with their issues.)

``fastkd bench [ARGS]``: the benchmark runner of a checkout (``python -m bench ARGS``).

``fastkd cache capture|import-vllm|import-dataset|verify ...``: offline teacher caches
(docs/cache.md); ``fastkd cache --teacher ...`` is short for ``fastkd cache capture --teacher ...``.
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


_CACHE_ACTIONS = ("capture", "import-vllm", "import-dataset", "verify")


def cache(args: argparse.Namespace) -> int:
    from . import cache as kd_cache

    if args.action == "verify":
        reader = kd_cache.TeacherCache(args.dir, verify=True, allow_incomplete=True)
        manifest = reader.manifest
        state = "complete" if manifest["complete"] else "INCOMPLETE"
        print(f"{args.dir}: {manifest['kind']} cache of {manifest['teacher']!r}, {len(manifest['shards'])} "
              f"shards, {manifest['sequences']} sequences, {manifest['tokens']} tokens, {state}; "
              "every sha256 matches")
        return 0
    tokenizer = None
    if getattr(args, "tokenizer", None):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.action == "import-vllm":
        manifest = kd_cache.import_vllm(args.input, args.out, topk=args.topk, vocab_size=args.vocab_size,
                                        tokenizer=tokenizer, dtype=args.dtype, temperature=args.temperature,
                                        teacher=args.teacher, shard_tokens=args.shard_tokens)
    elif args.action == "import-dataset":
        manifest = kd_cache.import_dataset(args.input, args.out, topk=args.topk, vocab_size=args.vocab_size,
                                           tokenizer=tokenizer, dtype=args.dtype,
                                           temperature=args.temperature, teacher=args.teacher,
                                           alignment=args.alignment, shard_tokens=args.shard_tokens)
    else:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.model_dtype]
        model = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.teacher)
        texts = kd_cache.load_texts(args.data, text_field=args.text_field)

        def report(entry):
            print(f"wrote {entry['file']}: {entry['sequences']} sequences, {entry['tokens']} tokens", flush=True)

        manifest = kd_cache.capture(model, tokenizer, texts, args.out, topk=args.topk, dtype=args.dtype,
                                    temperature=args.temperature, max_length=args.max_length,
                                    shard_tokens=args.shard_tokens, batch_size=args.batch_size,
                                    resume=args.resume, teacher_name=args.teacher,
                                    byte_level=args.byte_level, on_shard=report)
    print(f"{args.out}: {len(manifest['shards'])} shards, {manifest['sequences']} sequences, "
          f"{manifest['tokens']} tokens")
    return 0


def _add_cache_parser(commands) -> None:
    p = commands.add_parser("cache", help="teacher caches: capture, import-vllm, import-dataset, verify "
                                          "(docs/cache.md)")
    actions = p.add_subparsers(dest="action", required=True)
    c = actions.add_parser("capture", help="run a Hugging Face teacher over a dataset")
    c.add_argument("--teacher", required=True, help="local path or hub name of the teacher causal LM")
    c.add_argument("--tokenizer", default=None, help="tokenizer path (default: the teacher's)")
    c.add_argument("--data", required=True, help=".txt (one sequence per line) or .jsonl (--text-field)")
    c.add_argument("--text-field", default="text")
    c.add_argument("--out", required=True, help="cache directory")
    c.add_argument("--topk", type=int, default=64)
    c.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="stored log-prob format")
    c.add_argument("--temperature", type=float, default=1.0)
    c.add_argument("--max-length", type=int, default=512)
    c.add_argument("--shard-tokens", type=int, default=1 << 20)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--byte-level", action="store_true", help="byte-level cache (cross-tokenizer)")
    c.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted capture in --out")
    for name, source in (("import-vllm", "vLLM prompt_logprobs JSON lines"),
                         ("import-dataset", ".jsonl/.parquet with input_ids, target_token_ids, target_logprobs")):
        i = actions.add_parser(name, help=f"import {source}")
        i.add_argument("input", help=source)
        i.add_argument("--out", required=True)
        i.add_argument("--topk", type=int, required=True)
        i.add_argument("--vocab-size", type=int, default=None, help="teacher V (default: len(--tokenizer))")
        i.add_argument("--tokenizer", default=None, help="teacher tokenizer, for the fingerprint")
        i.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
        i.add_argument("--temperature", type=float, default=1.0, help="temperature of the log-probs (recorded)")
        i.add_argument("--teacher", default=name.split("-")[1], help="teacher name (recorded)")
        i.add_argument("--shard-tokens", type=int, default=1 << 20)
        if name == "import-dataset":
            i.add_argument("--alignment", default="logits", choices=["logits", "tokens"],
                           help="entry t predicts token t+1 (logits) or token t (tokens)")
    v = actions.add_parser("verify", help="check a cache's manifest and every shard's sha256")
    v.add_argument("dir")
    p.set_defaults(run=cache)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after it belongs to the benchmark runner
        return bench(argv[1:])
    if argv[:1] == ["cache"] and len(argv) > 1 and argv[1].startswith("--") and argv[1] != "--help":
        argv = ["cache", "capture"] + argv[1:]  # fastkd cache --teacher ... = fastkd cache capture ...
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
    _add_cache_parser(commands)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
