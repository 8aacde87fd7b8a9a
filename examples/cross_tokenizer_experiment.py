"""Cross-tokenizer distillation on the CPU: does fastkd's byte loss transfer knowledge?

A teacher with a byte-level BPE tokenizer (GPT-2/Llama-3 style) is trained on plenty of text; a
student with a SentencePiece-style BPE tokenizer (Llama-2 style: ``▁``, dummy prefix, byte
fallback; a different vocabulary) gets only a couple of hundred sentences of the same
distribution. The same student is trained three ways from the same
initialisation, for the same steps:

- ``ce``          cross-entropy only;
- ``ce+byte``     CE + the byte KD loss (forward KL of next-byte distributions at aligned rows);
- ``ce+byte+chunk`` the above plus the chunk-likelihood term (ALM).

The teacher side is captured once, offline, as ``[rows x 257]`` byte log-probs plus token
log-probs (``fastkd.bytes.byte_targets``): a cache that knows nothing of the student's tokenizer.
Everything is built locally (corpus, tokenizers, models from ``LlamaConfig``); nothing is
downloaded. Held-out CE is reported per student token and as bits per UTF-8 byte (comparable
across tokenizers, so the teacher can be listed too).

    python examples/cross_tokenizer_experiment.py              # 3 seeds, 1-2 minutes on 2 CPU cores
    python examples/cross_tokenizer_experiment.py --seeds 0 --json results.json
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

import fastkd
from fastkd.bytes import byte_targets


@dataclass
class Config:
    seed: int = 0
    teacher_texts: int = 8000
    student_texts: int = 192
    heldout_texts: int = 300
    teacher_steps: int = 450
    student_steps: int = 300
    batch: int = 16
    teacher_hidden: int = 96
    student_hidden: int = 96
    teacher_lr: float = 3e-3
    student_lr: float = 2e-3
    divergence: str = "forward_kl"
    kd_weight: float = 1.0
    chunk_weight: float = 0.5
    eval_every: int = 50


# ------------------------------------------------------------------------------------------------
# data: sentences with sums to get right, accented names and emoji
# ------------------------------------------------------------------------------------------------

NAMES = ["Zoë", "José", "Ana", "Björn", "Chloé", "Łukasz", "Mia", "Noé", "Søren", "Yūki", "Ada", "Renée"]
ITEMS = [("apple", "🍎"), ("pear", "🍐"), ("café", "☕"), ("crêpe", "🥞"), ("sushi", "🍣"),
         ("taco", "🌮"), ("book", "📚"), ("tulip", "🌷"), ("pretzel", "🥨"), ("kiwi", "🥝")]


def sentence(rng: random.Random) -> str:
    name, (item, emoji) = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(0, 19), rng.randint(0, 19)
    kind = rng.random()
    if kind < 0.45:
        return f"{name} has {a} {item}s {emoji} and gets {b} more, so {name} has {a + b}."
    if kind < 0.8:
        return f"{a} + {b} = {a + b}; {b} + {a} = {a + b}."
    return f"{name} gives {emoji}×{a} to a friend, who already had {b}: now {a + b} {emoji}."


def train_tokenizers(texts: list[str]) -> tuple[Tokenizer, Tokenizer]:
    """Teacher: byte-level BPE (352 ids, GPT-2/Llama-3 style). Student: SentencePiece-style BPE
    (Llama-2 style: ``▁`` for spaces, a dummy prefix, ``<0xNN>`` byte fallback; 160 + 256 ids).

    Both trainers are deterministic (the Unigram trainer of ``tokenizers`` is not, across runs).
    """
    teacher = Tokenizer(models.BPE())
    teacher.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    teacher.decoder = decoders.ByteLevel()
    teacher.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=352, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    student = Tokenizer(models.BPE(byte_fallback=True))
    student.pre_tokenizer = pre_tokenizers.Metaspace()
    student.decoder = decoders.Metaspace()
    student.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    spec = json.loads(student.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return teacher, Tokenizer.from_str(json.dumps(spec))


class Side:
    """One model's view of the texts: ids with a leading BOS, exact byte offsets."""

    def __init__(self, tokenizer: Tokenizer, bos: str, texts: list[str]):
        self.vocab = fastkd.ByteVocab.from_tokenizer(tokenizer)
        bos_id = tokenizer.token_to_id(bos)
        self.ids, self.offsets = [], []
        for text in texts:
            ids = [bos_id] + tokenizer.encode(text).ids
            self.ids.append(ids)
            self.offsets.append(self.vocab.byte_offsets(ids, text))

    def batch(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids ``(B, T)`` and labels (next id; -100 after the last token and on padding)."""
        width = max(len(self.ids[r]) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for b, r in enumerate(rows):
            seq = torch.tensor(self.ids[r])
            ids[b, :len(seq)] = seq
            labels[b, :len(seq) - 1] = seq[1:]
        return ids, labels


def make_model(vocab: int, hidden: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config)


def hidden_states(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    mask = (ids != 0) | (torch.arange(ids.shape[1]) == 0)
    return model.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


def lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, side: Side, texts: list[str]) -> tuple[float, float]:
    """Held-out ``(nats per token, bits per byte)``."""
    model.eval()
    nats, tokens = 0.0, 0
    for start in range(0, len(texts), 64):
        ids, labels = side.batch(list(range(start, min(start + 64, len(texts)))))
        logits = model.lm_head(hidden_states(model, ids))
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
        nats += loss.item()
        tokens += int((labels != -100).sum())
    model.train()
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return nats / tokens, nats / n_bytes / math.log(2)


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------

def train_teacher(config: Config, side: Side) -> LlamaForCausalLM:
    model = make_model(len(side.vocab), config.teacher_hidden, config.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.teacher_lr, weight_decay=0.01)
    rng = random.Random(config.seed + 2)
    for step in range(config.teacher_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.teacher_steps, config.teacher_lr)
        ids, labels = side.batch(rng.sample(range(len(side.ids)), 2 * config.batch))
        logits = model.lm_head(hidden_states(model, ids))
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def capture_teacher(teacher: LlamaForCausalLM, side: Side) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The offline cache: per text, byte log-probs ``(n, 257)`` and token log-probs ``(n,)``."""
    cache = []
    for r in range(len(side.ids)):
        ids, labels = side.batch([r])
        hidden = hidden_states(teacher, ids)[0]
        cache.append(byte_targets(hidden, teacher.lm_head.weight, side.vocab, labels[0]))
    return cache


def train_student(config: Config, mode: str, student: Side, teacher: Side, cache, heldout: Side,
                  heldout_texts: list[str]) -> dict:
    model = make_model(len(student.vocab), config.student_hidden, config.seed + 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.student_lr, weight_decay=0.01)
    rng = random.Random(config.seed + 4)
    curve = []
    for step in range(config.student_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.student_steps, config.student_lr)
        rows = rng.sample(range(len(student.ids)), config.batch)
        ids, labels = student.batch(rows)
        hidden = hidden_states(model, ids)
        if mode == "ce":
            loss = F.cross_entropy(model.lm_head(hidden).flatten(0, 1), labels.flatten(), ignore_index=-100)
        else:
            alignment = fastkd.align_batch([student.offsets[r] for r in rows],
                                           [teacher.offsets[r] for r in rows],
                                           student_stride=ids.shape[1])
            width = alignment.teacher_stride
            byte_lp = torch.zeros(len(rows), width, 257)
            token_lp = torch.zeros(len(rows), width)
            for b, r in enumerate(rows):
                byte_lp[b, :cache[r][0].shape[0]] = cache[r][0]
                token_lp[b, :cache[r][1].shape[0]] = cache[r][1]
            loss = fastkd.byte_kd_loss(
                hidden, model.lm_head.weight, student.vocab, alignment,
                teacher_byte_logprobs=byte_lp, teacher_token_logprobs=token_lp, labels=labels,
                divergence=config.divergence, ce_weight=1.0, kd_weight=config.kd_weight,
                chunk_weight=config.chunk_weight if mode == "ce+byte+chunk" else 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.student_steps:
            curve.append((step + 1, *evaluate(model, heldout, heldout_texts)))
    best = min(curve, key=lambda point: point[1])
    return {"mode": mode, "final_ce": curve[-1][1], "final_bpb": curve[-1][2], "best_ce": best[1],
            "best_bpb": best[2], "best_step": best[0], "curve": curve}


def run_seed(config: Config) -> dict:
    """Corpus, tokenizers, teacher and the three students for one seed."""
    torch.manual_seed(config.seed)
    started = time.time()
    rng = random.Random(config.seed)
    teacher_texts = [sentence(rng) for _ in range(config.teacher_texts)]
    student_texts = [sentence(rng) for _ in range(config.student_texts)]
    heldout_texts = [sentence(rng) for _ in range(config.heldout_texts)]
    teacher_tok, student_tok = train_tokenizers(teacher_texts)
    teacher_train = Side(teacher_tok, "<|endoftext|>", teacher_texts)
    student_side = Side(student_tok, "<s>", student_texts)
    teacher_view = Side(teacher_tok, "<|endoftext|>", student_texts)  # the same texts, teacher ids
    heldout_student = Side(student_tok, "<s>", heldout_texts)
    heldout_teacher = Side(teacher_tok, "<|endoftext|>", heldout_texts)

    teacher = train_teacher(config, teacher_train)
    teacher_ce, teacher_bpb = evaluate(teacher, heldout_teacher, heldout_texts)
    cache = capture_teacher(teacher, teacher_view)
    aligned = sum(len(fastkd.align_tokenizations(s, t)) for s, t in zip(student_side.offsets, teacher_view.offsets))
    student_rows = sum(len(ids) - 1 for ids in student_side.ids)
    runs = [train_student(config, mode, student_side, teacher_view, cache, heldout_student, heldout_texts)
            for mode in ("ce", "ce+byte", "ce+byte+chunk")]
    print(f"seed {config.seed}: teacher V={len(teacher_train.vocab)} ({teacher_train.vocab.kind}), student "
          f"V={len(student_side.vocab)} ({student_side.vocab.kind}); aligned {aligned}/{student_rows} "
          f"student rows; teacher held-out {teacher_bpb:.3f} bits/byte; {time.time() - started:.0f} s")
    for r in runs:
        print(f"  {r['mode']:<15} final CE {r['final_ce']:.3f} ({r['final_bpb']:.3f} bpb)   "
              f"best CE {r['best_ce']:.3f} ({r['best_bpb']:.3f} bpb) at step {r['best_step']}")
    return {"seed": config.seed, "teacher_ce": teacher_ce, "teacher_bpb": teacher_bpb,
            "aligned_rows": aligned, "student_rows": student_rows,
            "teacher_vocab": teacher_train.vocab.fingerprint, "student_vocab": student_side.vocab.fingerprint,
            "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    started = time.time()
    seeds = [run_seed(Config(seed=seed)) for seed in args.seeds]

    config = Config()
    print(f"\nheld-out CE of the student (nats per student token; bits per byte), mean over seeds "
          f"{args.seeds}: {config.student_texts} training texts, {config.student_steps} steps")
    print(f"{'run':<16}{'final CE':>10}{'final bpb':>11}{'best CE':>10}{'best bpb':>10}   final CE per seed")
    for index, mode in enumerate(("ce", "ce+byte", "ce+byte+chunk")):
        runs = [seed["runs"][index] for seed in seeds]
        mean = lambda key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
        per_seed = " ".join(f"{r['final_ce']:.3f}" for r in runs)
        print(f"{mode:<16}{mean('final_ce'):>10.3f}{mean('final_bpb'):>11.3f}{mean('best_ce'):>10.3f}"
              f"{mean('best_bpb'):>10.3f}   {per_seed}")
    teacher_bpb = sum(seed["teacher_bpb"] for seed in seeds) / len(seeds)
    print(f"{'teacher':<16}{'':>10}{teacher_bpb:>11.3f}")
    print(f"total {time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": asdict(config), "seeds": seeds, "torch": torch.__version__,
                       "fastkd": fastkd.__version__}, handle, indent=2)


if __name__ == "__main__":
    main()
