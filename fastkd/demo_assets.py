"""Tiny, fully local assets for ``fastkd demo`` and the trainer tests (nothing is downloaded).

Everything is written to disk in the formats a real setup has, so the code under test loads it the
way it loads a user's models: ``AutoTokenizer.from_pretrained(dir)``,
``AutoModelForCausalLM.from_pretrained(dir)`` and ``.jsonl`` text files with a ``"text"`` field.

- a synthetic corpus (sums, differences, counting, comparisons; accented names and emoji) split
  into a large teacher set, a small student set and a held-out set, all from one seeded RNG;
- two different tokenizers trained on the teacher texts, deterministically: a byte-level BPE
  (GPT-2/Llama-3 style, 352 ids) and a SentencePiece-style BPE (Llama-2 style: ``▁`` for spaces,
  dummy prefix, ``<0xNN>`` byte fallback; 160 + 256 ids). Both prepend their BOS token through a
  ``TemplateProcessing`` post-processor and have a distinct pad token;
- randomly initialised, seeded ``LlamaForCausalLM`` checkpoints of any (small) size.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

NAMES = ["Zoë", "José", "Ana", "Björn", "Chloé", "Łukasz", "Mia", "Noé", "Søren", "Yūki", "Ada", "Renée"]
THINGS = [("apple", "🍎"), ("pear", "🍐"), ("café", "☕"), ("crêpe", "🥞"), ("sushi", "🍣"),
          ("taco", "🌮"), ("book", "📚"), ("tulip", "🌷"), ("pretzel", "🥨"), ("kiwi", "🥝")]
# Special tokens, ids 0.. in this order: teacher bos, eos, pad; student unk, bos, eos, pad.
TEACHER_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
STUDENT_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def _sentence(rng: random.Random) -> str:
    """One sentence of the demo language: small-number arithmetic told in a few ways."""
    who, other = rng.sample(NAMES, 2)
    thing, icon = rng.choice(THINGS)
    a, b = rng.randint(0, 19), rng.randint(0, 19)
    pick = rng.randrange(6)
    if pick == 0:
        return f"{who} has {a} {thing}s {icon} and gets {b} more, so {who} has {a + b}."
    if pick == 1:
        return f"{a} + {b} = {a + b}; {b} + {a} = {a + b}."
    if pick == 2:
        return f"{who} gives {icon}×{a} to {other}, who already had {b}: now {other} has {a + b} {icon}."
    if pick == 3:
        return f"{who} had {a + b} {thing}s and ate {b}, so {a} are left {icon}."
    if pick == 4:
        return f"{who} counts {icon}: " + ", ".join(str(a + k) for k in range(rng.randint(3, 6))) + "."
    word = "more than" if a > b else "less than" if a < b else "as many as"
    return f"{who} has {a} {icon} and {other} has {b}: {who} has {word} {other}."


def make_corpus(seed: int, n_teacher: int, n_student: int, n_heldout: int) -> dict[str, list[str]]:
    """Three splits drawn one after another from one ``random.Random(seed)``.

    Args:
        seed: seed of the generator; the same arguments give the same texts.
        n_teacher: number of teacher training texts (many: the teacher learns the language).
        n_student: number of student training texts (few: the teacher's knowledge should help).
        n_heldout: number of held-out evaluation texts.

    Returns:
        ``{"teacher": [...], "student": [...], "heldout": [...]}``.
    """
    rng = random.Random(seed)
    return {split: [_sentence(rng) for _ in range(count)]
            for split, count in (("teacher", n_teacher), ("student", n_student), ("heldout", n_heldout))}


def write_texts(path: str | Path, texts: Iterable[str]) -> Path:
    """Write ``texts`` as UTF-8 JSON lines ``{"text": ...}`` (parent folders created); returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def read_texts(path: str | Path) -> list[str]:
    """The ``"text"`` fields of a JSON-lines file written by :func:`write_texts`."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def _bos_template(bos: str, bos_id: int) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                         special_tokens=[(bos, bos_id)])


def _train_teacher_tokenizer(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=352, special_tokens=TEACHER_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.Sequence([  # Llama-3's layout
        processors.ByteLevel(trim_offsets=False), _bos_template(TEACHER_SPECIALS[0], 0)])
    return tokenizer


def _train_student_tokenizer(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=160, special_tokens=STUDENT_SPECIALS, show_progress=False))
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # the <0xNN> byte-fallback pieces, after the learned ones
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.post_processor = _bos_template(STUDENT_SPECIALS[1], 1)
    return tokenizer


def build_tokenizers(texts: list[str], out_dir: str | Path, *, max_length: int = 256) -> tuple[Path, Path]:
    """Train the teacher and the student tokenizer on ``texts`` and save them for ``AutoTokenizer``.

    Both trainers are deterministic: the same texts give byte-identical ``tokenizer.json`` files.

    Args:
        texts: training texts.
        out_dir: parent folder; ``tokenizer-teacher`` and ``tokenizer-student`` are made in it.
        max_length: the tokenizers' ``model_max_length``.

    Returns:
        ``(teacher_dir, student_dir)``.
    """
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    teacher = PreTrainedTokenizerFast(
        tokenizer_object=_train_teacher_tokenizer(texts), bos_token=TEACHER_SPECIALS[0],
        eos_token=TEACHER_SPECIALS[1], pad_token=TEACHER_SPECIALS[2], model_max_length=max_length)
    student = PreTrainedTokenizerFast(
        tokenizer_object=_train_student_tokenizer(texts), unk_token=STUDENT_SPECIALS[0],
        bos_token=STUDENT_SPECIALS[1], eos_token=STUDENT_SPECIALS[2], pad_token=STUDENT_SPECIALS[3],
        model_max_length=max_length)
    dirs = (out_dir / "tokenizer-teacher", out_dir / "tokenizer-student")
    for tokenizer, path in zip((teacher, student), dirs):
        tokenizer.save_pretrained(path)
    return dirs


def build_model(out_dir: str | Path, vocab_size: int, *, hidden: int, layers: int, heads: int = 4,
                seed: int, max_positions: int = 256, tokenizer_dir: Optional[str | Path] = None) -> Path:
    """Save a randomly initialised ``LlamaForCausalLM`` (safetensors) to ``out_dir``.

    Args:
        out_dir: the checkpoint folder (created).
        vocab_size: rows of the embedding and of the (untied) LM head.
        hidden: hidden size (a multiple of ``heads``); the MLP is ``2 * hidden`` wide.
        layers: number of decoder layers.
        heads: attention heads (as many key/value heads).
        seed: initialisation seed; the same arguments give identical weights. The global torch
            RNG state is left as it was.
        max_positions: ``max_position_embeddings``.
        tokenizer_dir: a tokenizer folder whose pad/bos/eos ids go into the config, default None.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    ids = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if len(tokenizer) > vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} ids")
        ids = {key: getattr(tokenizer, key) for key in ids}
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False, **ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameter elements of ``model`` (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass(frozen=True)
class DemoSetup:
    """Paths of a demo setup written by :func:`build_demo_setup`.

    Attributes:
        root: the folder holding everything.
        teacher_data, student_data, heldout_data: JSON-lines corpus splits.
        teacher_tokenizer, student_tokenizer: ``AutoTokenizer`` folders.
    """

    root: Path
    teacher_data: Path
    student_data: Path
    heldout_data: Path
    teacher_tokenizer: Path
    student_tokenizer: Path


def build_demo_setup(root: str | Path, *, seed: int = 0, n_teacher: int = 4000, n_student: int = 192,
                     n_heldout: int = 256) -> DemoSetup:
    """Write the corpus (``root/data/*.jsonl``) and the two tokenizers (trained on the teacher texts).

    The models are left to the caller (:func:`build_model`), which picks their sizes.

    Args:
        root: output folder (created).
        seed: corpus seed.
        n_teacher, n_student, n_heldout: sizes of the splits (see :func:`make_corpus`).

    Returns:
        The :class:`DemoSetup` of paths.
    """
    root = Path(root)
    corpus = make_corpus(seed, n_teacher, n_student, n_heldout)
    data = {split: write_texts(root / "data" / f"{split}.jsonl", texts) for split, texts in corpus.items()}
    teacher_tok, student_tok = build_tokenizers(corpus["teacher"], root)
    return DemoSetup(root=root, teacher_data=data["teacher"], student_data=data["student"],
                     heldout_data=data["heldout"], teacher_tokenizer=teacher_tok, student_tokenizer=student_tok)
