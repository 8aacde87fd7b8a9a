"""Is byte alignment a bottleneck? Time ``fastkd.align_batch`` against the rest of a step.

Builds a realistic batch locally (multilingual text with emoji; a byte-level BPE and a
SentencePiece-style Unigram tokenizer trained here, no downloads), then times, per batch:

- ``align``: ``fastkd.align_batch`` on both tokenizations' byte offsets (what the collator adds);
- ``offsets``: ``ByteVocab.byte_offsets`` for both sides (exact byte offsets from token ids);
- ``tokenize``: ``encode_batch`` of the same texts by both fast tokenizers (what a collator
  already does for cross-tokenizer distillation);
- ``byte loss``: one forward+backward of ``fastkd.byte_kd_loss`` (``impl="torch"``, float32) on the
  aligned rows at a small LM-head shape, on this machine, for scale.

Medians over repetitions with the interquartile range; results appended as JSON under
``bench/results/``.

    python bench/bytes_align.py                        # 8 x 4096 and 64 x 512 student tokens
    python bench/bytes_align.py --batch 16 --tokens 2048 --reps 20
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import fastkd

WORDS = ["the", "model", "learns", "from", "its", "teacher", "naïve", "café", "über", "straße",
         "日本語", "東京", "寿司", "😀", "🎉", "👩‍💻", "données", "año", "Ωmega", "déjà", "vu", "x = 3;",
         "def f(x):", "return", "1234", "\n", "—", "«quote»"]


def make_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def tokenizers_for(corpus: list[str]) -> tuple[Tokenizer, Tokenizer]:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    unigram.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False))
    spec = json.loads(unigram.to_str())
    pieces = {piece for piece, _ in spec["model"]["vocab"]}
    spec["model"]["vocab"] += [[f"<0x{b:02X}>", -30.0] for b in range(256) if f"<0x{b:02X}>" not in pieces]
    spec["model"]["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec)), bpe


def timed(fn, reps: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": 1e3 * statistics.median(times), "iqr_ms": 1e3 * (quartiles[2] - quartiles[0])}


def run_case(student_tok, teacher_tok, batch: int, tokens: int, reps: int, seed: int) -> dict:
    rng = random.Random(seed)
    student_vocab = fastkd.ByteVocab.from_tokenizer(student_tok)
    teacher_vocab = fastkd.ByteVocab.from_tokenizer(teacher_tok)
    # Texts long enough for `tokens` student tokens each.
    texts = []
    for _ in range(batch):
        text = make_text(rng, tokens // 2)
        while len(student_tok.encode(text).ids) < tokens:
            text += " " + make_text(rng, tokens // 4)
        texts.append(text)
    student_ids = [e.ids[:tokens] for e in student_tok.encode_batch(texts)]
    texts = [student_vocab.decode(ids).decode("utf-8", errors="ignore").lstrip(" ") for ids in student_ids]
    student_ids = [e.ids for e in student_tok.encode_batch(texts)]
    teacher_ids = [e.ids for e in teacher_tok.encode_batch(texts)]
    student_offsets = [student_vocab.byte_offsets(ids, text) for ids, text in zip(student_ids, texts)]
    teacher_offsets = [teacher_vocab.byte_offsets(ids, text) for ids, text in zip(teacher_ids, texts)]
    alignment = fastkd.align_batch(student_offsets, teacher_offsets)
    n_student = sum(len(ids) for ids in student_ids)

    result = {"batch": batch, "student_tokens": n_student, "teacher_tokens": sum(map(len, teacher_ids)),
              "bytes": sum(len(t.encode()) for t in texts), "aligned_pairs": len(alignment)}
    result["align"] = timed(lambda: fastkd.align_batch(student_offsets, teacher_offsets), reps)
    result["offsets"] = timed(lambda: ([student_vocab.byte_offsets(i, t) for i, t in zip(student_ids, texts)],
                                       [teacher_vocab.byte_offsets(i, t) for i, t in zip(teacher_ids, texts)]), reps)
    result["tokenize"] = timed(lambda: (student_tok.encode_batch(texts), teacher_tok.encode_batch(texts)), reps)

    # The loss on the aligned rows at a small head (D=256, V=len(vocab)), for scale on this machine.
    gen = torch.Generator().manual_seed(0)
    rows = alignment.student_stride * batch
    hidden = torch.randn(rows, 256, generator=gen, requires_grad=True)
    weight = torch.randn(len(student_vocab), 256, generator=gen).div_(16).requires_grad_()
    teacher_lp = torch.log_softmax(torch.randn(alignment.teacher_stride * batch, 257, generator=gen), dim=-1)

    def loss_step():
        loss = fastkd.byte_kd_loss(hidden, weight, student_vocab, alignment,
                                   teacher_byte_logprobs=teacher_lp, impl="torch")
        loss.backward()

    result["byte_loss_fwd_bwd"] = timed(loss_step, max(3, reps // 4))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="*", default=[8, 64])
    parser.add_argument("--tokens", type=int, nargs="*", default=[4096, 512])
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if len(args.batch) != len(args.tokens):
        parser.error("--batch and --tokens take the same number of values")

    rng = random.Random(0)
    student_tok, teacher_tok = tokenizers_for([make_text(rng, 40) for _ in range(4000)])
    cases = [run_case(student_tok, teacher_tok, b, t, args.reps, seed=i)
             for i, (b, t) in enumerate(zip(args.batch, args.tokens))]

    print("byte alignment per batch, CPU, median ms (IQR)")
    print(f"{'batch x tokens':<16}{'pairs':>8}{'align':>16}{'byte offsets':>16}{'tokenize':>18}{'byte loss f+b':>18}")
    for case in cases:
        cell = lambda key: f"{case[key]['median_ms']:.1f} ({case[key]['iqr_ms']:.1f})"  # noqa: E731
        shape = f"{case['batch']} x {case['student_tokens'] // case['batch']}"
        print(f"{shape:<16}{case['aligned_pairs']:>8}{cell('align'):>16}{cell('offsets'):>16}"
              f"{cell('tokenize'):>18}{cell('byte_loss_fwd_bwd'):>18}")

    record = {"benchmark": "bytes_align", "date": datetime.date.today().isoformat(),
              "device": "cpu", "device_name": platform.processor() or platform.machine(),
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "fastkd": fastkd.__version__, "cases": cases}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bytes-align-cpu-{record['date']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
