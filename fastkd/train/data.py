"""The trainer's data: texts from files or `datasets`, tokenised items, collators, a resumable order.

Every mode turns its source into a list of items (dicts of CPU tensors) and a collator that pads
a list of items into a batch:

- ``sft``, ``online``, ``on_policy``: texts tokenised by the student's tokenizer; batches in the
  Hugging Face causal-LM form (``input_ids``, ``attention_mask``, unshifted ``labels``).
- ``offline``: the sequences of a :class:`fastkd.cache.TeacherCache` (its collator adds
  ``teacher_ids``/``teacher_logprobs``).
- ``cross_tokenizer``: each text tokenised by both tokenizers (online teacher), or a byte-level
  cache's items re-tokenised by the student; batches carry the byte alignment of the two
  tokenisations (:func:`fastkd.align_batch`) and the teacher's side.

:class:`OrderSampler` draws the items in a seeded order, epoch after epoch; its state (epoch,
position) goes into every checkpoint, so a resumed run reads exactly the batches it would have.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

IGNORE = -100


def load_texts(spec: str, text_field: str = "text") -> list[str]:
    """The texts of ``spec``: a ``.txt`` (one per non-empty line), ``.jsonl``/``.json``,
    ``.parquet`` file, or ``hf:NAME[:SPLIT]`` for ``datasets.load_dataset(NAME, split=SPLIT)``."""
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        try:
            import datasets
        except ImportError:
            raise ValueError(f"data: {spec!r} needs the `datasets` package (pip install datasets)") from None
        table = datasets.load_dataset(name, split=split or "train")
        return _column(table[text_field] if text_field in table.column_names else None, spec, text_field)
    path = Path(spec)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise ValueError(f"data: {path} is not a file")
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"data: reading {path} needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        return _column(table.column(text_field).to_pylist() if text_field in table.column_names else None,
                       spec, text_field)
    from ..cache.capture import load_texts as load_text_file

    return load_text_file(path, text_field)


def _column(values, spec: str, text_field: str) -> list[str]:
    if values is None:
        raise ValueError(f"data: {spec} has no column {text_field!r} (set text_field)")
    texts = [v for v in values if isinstance(v, str) and v.strip()]
    if not texts:
        raise ValueError(f"data: {spec} holds no non-empty strings in column {text_field!r}")
    return texts


def pad_token_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


# ------------------------------------------------------------------------------------------------
# items and collators
# ------------------------------------------------------------------------------------------------

def encode(tokenizer, text: str, max_length: int) -> tuple[list[int], Optional[int]]:
    """Token ids of ``text`` (truncated) and the UTF-8 bytes its predicted tokens (all but the
    first) cover, for CE per byte: a truncated text counts only what was kept, and a tokenizer
    without BOS does not count its unpredicted first token. Fast tokenizers give the bytes from
    their offsets; a slow one gives the whole text's bytes when nothing was cut, else None."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        spans = [(a, b) for a, b in encoded["offset_mapping"][1:] if b > a]
        if not spans:
            return ids, 0
        first, last = min(a for a, _ in spans), max(b for _, b in spans)
        return ids, len(text[:last].encode("utf-8")) - len(text[:first].encode("utf-8"))
    ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    return ids, (len(text.encode("utf-8")) if len(ids) < max_length else None)


def text_items(tokenizer, texts: Sequence[str], max_length: int) -> list[dict]:
    """``{"input_ids", "n_bytes"}`` per text of at least 2 tokens (``n_bytes``: see :func:`encode`)."""
    items = []
    for text in texts:
        ids, n_bytes = encode(tokenizer, text, max_length)
        if len(ids) >= 2:
            items.append({"input_ids": torch.tensor(ids, dtype=torch.int64), "n_bytes": n_bytes})
    if not items:
        raise ValueError("data: no text has at least 2 tokens")
    return items


class CausalCollator:
    """Right-pads ``input_ids`` items into ``input_ids``, ``attention_mask`` and ``labels`` (the ids,
    ``-100`` on padding, unshifted as in Hugging Face); a prompt prefix (``prompt_length``) is
    ignored in ``labels``."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: Sequence[dict]) -> dict:
        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(items), width), dtype=torch.int64)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.int64)
        for row, item in enumerate(items):
            seq = item["input_ids"]
            ids[row, :len(seq)], mask[row, :len(seq)] = seq, 1
            labels[row, item.get("prompt_length", 0):len(seq)] = seq[item.get("prompt_length", 0):]
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if all(item.get("n_bytes") is not None for item in items):
            batch["n_bytes"] = sum(item["n_bytes"] for item in items)
        return batch


def cross_items(student_tok, student_vocab, texts: Sequence[str], max_length: int,
                teacher_tok=None, teacher_vocab=None) -> list[dict]:
    """Both tokenisations of each text with exact byte offsets (online cross-tokenizer teacher)."""
    items = []
    for text in texts:
        item = _student_side(student_tok, student_vocab, text, max_length)
        if item is None:
            continue
        t_ids = teacher_tok(text, truncation=True, max_length=max_length)["input_ids"]
        if len(t_ids) < 2:
            continue
        item["teacher_input_ids"] = torch.tensor(t_ids, dtype=torch.int64)
        item["teacher_offsets"] = teacher_vocab.byte_offsets(t_ids, covered_text(teacher_vocab, t_ids, text))
        items.append(item)
    if not items:
        raise ValueError("data: no text has at least 2 tokens under both tokenizers")
    return items


class CachedCrossItems:
    """A byte-level cache's sequences with the student's tokenisation of each cached text.

    The student side (ids, byte offsets) is computed once; the teacher's arrays stay in the
    memory-mapped cache and are read on access, so the cache is never held in memory whole.
    """

    def __init__(self, student_tok, student_vocab, cache, max_length: int):
        self.cache, self.index, self.student = cache, [], []
        for position in range(len(cache)):
            side = _student_side(student_tok, student_vocab, cache[position]["text"], max_length)
            if side is not None:
                self.index.append(position)
                self.student.append(side)
        if not self.index:
            raise ValueError("cache: no cached text has at least 2 student tokens")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        cached = self.cache[self.index[k]]
        return {**self.student[k], "teacher_byte_logprobs": cached["teacher_byte_logprobs"],
                "teacher_token_logprobs": cached["teacher_token_logprobs"],
                "teacher_offsets": cached["teacher_byte_offsets"].numpy()}


def _student_side(tokenizer, vocab, text: str, max_length: int) -> Optional[dict]:
    ids, n_bytes = encode(tokenizer, text, max_length)
    if len(ids) < 2:
        return None
    return {"input_ids": torch.tensor(ids, dtype=torch.int64),
            "offsets": vocab.byte_offsets(ids, covered_text(vocab, ids, text)), "n_bytes": n_bytes}


def covered_text(vocab, ids, text: str):
    """The part of ``text`` that ``ids`` (a tokenisation of it, possibly truncated) spell: the
    text itself when they spell all of it, else the UTF-8 prefix they cover (bytes: a cut may fall
    inside a character). Both tokenizers' byte offsets then count from the same first byte, and
    only the boundaries both reach are aligned."""
    data = text.encode("utf-8")
    spelled = b"".join(vocab.token_bytes[i] for i in ids)
    if len(spelled) >= len(data):
        return text  # the whole text (or a normalised one: byte_offsets says so)
    if data.startswith(spelled):
        return spelled
    if vocab.prefix_space and spelled.startswith(b" ") and data.startswith(spelled[1:]):
        return spelled[1:]  # SentencePiece's dummy prefix, not in the text
    return text


class CrossCollator:
    """Pads cross-tokenizer items. ``labels[b, t]`` is the student's token t+1 (``-100`` after the
    last token), so row t of the flattened ``(B·T, D)`` hidden states is scored against it, and the
    byte alignment indexes those rows (stride T; teacher stride T_t)."""

    def __init__(self, pad_id: int, teacher_pad_id: int):
        self.pad_id, self.teacher_pad_id = pad_id, teacher_pad_id

    def __call__(self, items: Sequence[dict]) -> dict:
        from ..bytes import align_batch

        ids, mask, labels = _shifted([item["input_ids"] for item in items], self.pad_id)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if all(item.get("n_bytes") is not None for item in items):
            batch["n_bytes"] = sum(item["n_bytes"] for item in items)
        teacher_offsets = [item["teacher_offsets"] for item in items]
        if "teacher_input_ids" in items[0]:
            t_ids, t_mask, t_labels = _shifted([item["teacher_input_ids"] for item in items], self.teacher_pad_id)
            batch.update(teacher_input_ids=t_ids, teacher_attention_mask=t_mask, teacher_labels=t_labels)
            width = t_ids.shape[1]
        else:
            width = max(len(o) for o in teacher_offsets)
            byte_lp = torch.zeros(len(items), width, 257)
            token_lp = torch.zeros(len(items), width)
            for row, item in enumerate(items):
                n = item["teacher_byte_logprobs"].shape[0]
                byte_lp[row, :n], token_lp[row, :n] = item["teacher_byte_logprobs"], item["teacher_token_logprobs"]
            batch.update(teacher_byte_logprobs=byte_lp, teacher_token_logprobs=token_lp)
        batch["alignment"] = align_batch([item["offsets"] for item in items], teacher_offsets,
                                         student_stride=ids.shape[1], teacher_stride=width)
        return batch


def _shifted(sequences: Sequence[torch.Tensor], pad_id: int):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(sequences), width), dtype=torch.int64)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.int64)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)], mask[row, :len(seq)] = seq, 1
        labels[row, :len(seq) - 1] = seq[1:]
    return ids, mask, labels


# ------------------------------------------------------------------------------------------------
# order
# ------------------------------------------------------------------------------------------------

class OrderSampler:
    """Indices of ``n`` items in a seeded random order, a fresh permutation each epoch.

    ``take(count)`` returns the next ``count`` indices (wrapping into the next epoch);
    ``state_dict()``/``load_state_dict()`` hold the epoch and the position in it.
    """

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("data: no training items")
        self.n, self.seed, self.epoch, self.position = n, seed, 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            step = min(count - len(out), self.n - self.position)
            out.extend(int(i) for i in self._order[self.position:self.position + step])
            self.position += step
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise ValueError(f"resume: the checkpoint's data has {state['n']} items (seed {state['seed']}) "
                             f"but this run's has {self.n} (seed {self.seed}); resume with the same data")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)

