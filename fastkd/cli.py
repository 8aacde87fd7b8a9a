"""The ``fastkd`` command.

``fastkd demo [--out DIR]``: distillation end to end, offline, on the CPU (fastkd/demo.py): a local
corpus and teacher, three students distilled against their CE-only twins, the comparison table.

``fastkd train CONFIG.yaml [--key value ...]``: the trainer (docs/train.md); ``fastkd eval`` with
the same arguments reports the held-out CE and KL to the teacher of the config's student.

``fastkd bench [ARGS]``: the benchmark runner of a checkout (``python -m bench ARGS``).

``fastkd cache capture|import-vllm|import-dataset|verify ...``: offline teacher caches
(docs/cache.md); ``fastkd cache --teacher ...`` is short for ``fastkd cache capture --teacher ...``.
"""
from __future__ import annotations

import argparse
import os
import sys


def demo(args: argparse.Namespace) -> int:
    from .demo import DemoPlan, run_demo

    run_demo(out=args.out, workdir=args.workdir, plan=DemoPlan(seed=args.seed))
    return 0


def train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .train import Trainer, TrainConfig
    from .train.config import config_help
    from .train.metrics import summary_table
    from .train.trainer import Interrupted

    if args.help_config:
        print("fastkd train CONFIG.yaml [--key value ...]; the keys:\n" + config_help())
        return 0
    if args.config is None:
        print("fastkd train: give a CONFIG.yaml (fastkd train --help-config lists the keys)", file=sys.stderr)
        return 2
    # a bad config, set-up or resume is one line, not a traceback (FASTKD_TRACEBACK=1 shows it)
    try:
        config = TrainConfig.load(args.config, overrides)
        if args.command == "eval":
            return _evaluate(config, overrides)
        trainer = Trainer(config)
        summary = trainer.train()
    except Interrupted as stop:
        if stop.checkpoint is not None:
            print(f"fastkd train: interrupted after step {stop.step}; checkpoint saved in {stop.checkpoint}; "
                  "run the same command again to resume from it", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"fastkd {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FloatingPointError) as error:  # FloatingPointError: NonFiniteError
        if os.environ.get("FASTKD_TRACEBACK"):
            raise
        print(f"fastkd {args.command}: {error}", file=sys.stderr)
        return 2
    if trainer.acc.is_main_process:
        print(f"fastkd train: {summary['step']} steps done\n{summary_table(summary)}")
    return 0


def _evaluate(config, overrides: list[str]) -> int:
    """``fastkd eval``: the trained student of the config (``output_dir/final``, a LoRA adapter
    included) when it exists and ``--student`` is not given, else ``student``."""
    import dataclasses
    import json
    from pathlib import Path

    from .train import Trainer

    final = Path(config.output_dir) / "final"
    if final.is_dir() and not any(arg.split("=")[0] == "--student" for arg in overrides):
        # the saved model (an adapter included) is evaluated as it is: no new LoRA on top
        lora_keys = ("lora", "merge_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets")
        defaults = {f.name: f.default for f in dataclasses.fields(config) if f.name in lora_keys}
        config = dataclasses.replace(config, student=str(final), **defaults)
    trainer = Trainer(config)
    metrics = trainer.evaluate()
    if trainer.acc.is_main_process:
        print(f"fastkd eval: {config.student}", file=sys.stderr)
        print(json.dumps(metrics, indent=2))
    return 0


def bench(bench_args: list[str]) -> int:
    sys.path.insert(0, os.getcwd())  # bench/ lives in the checkout, not in the installed package
    try:
        from bench.__main__ import main as bench_main
        from bench.cases import IMPLEMENTATIONS  # noqa: F401  (fastkd's suite, not another "bench")
    except ImportError:
        print("fastkd bench runs the benchmark suite, which is not part of the installed package: it "
              "is the bench/ folder of a fastkd source checkout. Get the source of this version "
              f"(fastkd {_version()}), then from its root: pip install -e '.[bench]' && fastkd bench "
              "--help (or python -m bench --help; python -m bench --model prints the cost model)",
              file=sys.stderr)
        return 2
    return bench_main(bench_args) or 0


def _version() -> str:
    from . import __version__
    return __version__


_CACHE_ACTIONS = ("capture", "import-vllm", "import-dataset", "verify")


def cache(args: argparse.Namespace) -> int:
    """``fastkd cache ACTION``: one line on stderr for an error (exit 2) or Ctrl-C (exit 130),
    like ``fastkd train``, never a traceback."""
    try:
        return _cache(args)
    except KeyboardInterrupt:
        hint = "; rerun with --resume to continue" if args.action == "capture" else ""
        print(f"fastkd cache {args.action}: interrupted{hint}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError, NotImplementedError) as error:
        # CacheError is a ValueError; OSError covers missing files and models; a hub name that
        # is not one is transformers' HFValidationError, a ValueError
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"fastkd cache {args.action}: {message}", file=sys.stderr)
        return 2


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or os.sep + os.sep in name


def _check_local(flag: str, name: str) -> None:
    """A model/tokenizer argument that looks like a path must exist (not a hub lookup and a
    traceback about huggingface.co)."""
    if name and _looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        raise ValueError(f"{flag}: {name} does not exist (a local path; hub names look like org/model)")


def _cache(args: argparse.Namespace) -> int:
    from . import cache as kd_cache

    for flag in ("teacher", "tokenizer"):
        if args.action == "capture" or flag == "tokenizer":
            _check_local(f"--{flag}", getattr(args, flag, None) or "")
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


def _version() -> str:
    from . import __version__

    return __version__


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after it belongs to the benchmark runner
        return bench(argv[1:])
    if argv[:1] == ["cache"] and len(argv) > 1 and argv[1].startswith("--") and argv[1] != "--help":
        argv = ["cache", "capture"] + argv[1:]  # fastkd cache --teacher ... = fastkd cache capture ...
    parser = argparse.ArgumentParser(prog="fastkd", description="fused knowledge-distillation losses")
    parser.add_argument("--version", action="version", version=f"fastkd {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="distil a small local teacher into three students, offline, on the "
                                         "CPU: held-out CE and KL against CE-only twins, loss peak memory")
    p.add_argument("--out", default=None, help="also write the table to OUT/results.json")
    p.add_argument("--workdir", default=None, help="keep the corpus, models, caches and runs here "
                                                   "(default: a temporary directory, removed)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=demo)
    for name, what in (("train", "train a student (docs/train.md)"),
                       ("eval", "held-out CE and KL to the teacher of a config's student")):
        t = commands.add_parser(name, help=what, description=f"fastkd {name} CONFIG.yaml [--key value ...]: "
                                "any key of the config can be overridden on the command line")
        t.add_argument("config", nargs="?", help="YAML file of TrainConfig keys")
        t.add_argument("--help-config", action="store_true", help="list the config keys and exit")
        t.set_defaults(run=train)
    commands.add_parser("bench", help="the benchmark runner of a checkout (python -m bench); "
                                      "its arguments follow, see fastkd bench --help")
    _add_cache_parser(commands)
    args, rest = parser.parse_known_args(argv)
    if args.command in ("train", "eval"):
        return args.run(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
