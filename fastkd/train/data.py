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


_READERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_records(spec: str, key: str = "data"):
    """The rows of ``spec`` as a ``datasets.Dataset``, read by ``datasets.load_dataset``: a local
    ``.txt`` (a row ``{"text": line}`` per line), ``.jsonl``/``.json`` or ``.parquet`` file, or
    ``hf:NAME[:SPLIT]`` (a Hub dataset or a local directory of data files; split ``train`` by
    default).
    Errors name ``key`` (``data``, ``eval_data``)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{key}: reading {spec!r} needs the `datasets` package (pip install datasets)") from None
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        source, options = name, {"split": split or "train"}
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"{key}: {spec} is not a file" + ("" if path.parent.is_dir() else
                                                                 f" (no directory {path.parent})"))
        if path.suffix not in _READERS:
            raise ValueError(f"{key}: {spec} must be a .txt, .jsonl, .json or .parquet file (or hf:NAME), "
                             f"got suffix {path.suffix!r}")
        source, options = _READERS[path.suffix], {"data_files": str(path), "split": "train"}
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(source, **options)
    except Exception as error:  # noqa: BLE001 - datasets raises many types; the key matters most
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{key}: cannot read {spec}: {reason}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        datasets.enable_progress_bars()


def load_texts(spec: str, text_field: str = "text", key: str = "data") -> list[str]:
    """The non-empty strings of column ``text_field`` of :func:`load_records` ``(spec)``."""
    table = load_records(spec, key)
    return _column(table[text_field] if text_field in table.column_names else None, spec, text_field, key)


def _column(values, spec: str, text_field: str, key: str = "data") -> list[str]:
    if values is None:
        raise ValueError(f"{key}: {spec} has no column {text_field!r} (set text_field)")
    texts = [v for v in values if isinstance(v, str) and v.strip()]
    if not texts:
        raise ValueError(f"{key}: {spec} holds no non-empty strings in column {text_field!r}")
    return texts


def data_format(columns, config) -> str:
    """``text``, ``chat`` or ``prompt_completion`` (``prompt`` alone: ``prompt_only``): the
    config's ``data_format``, or with ``auto`` the first whose columns the data has (messages,
    then prompt [+ completion], then the text field)."""
    fmt = config.data_format
    if fmt == "auto":
        if config.messages_field in columns:
            return "chat"
        if config.prompt_field in columns:
            return "prompt_completion" if config.completion_field in columns else "prompt_only"
        return "text"
    if fmt == "prompt_completion" and config.completion_field not in columns:
        return "prompt_only"
    return fmt


def example_items(tokenizer, spec: str, config, key: str = "data") -> tuple[list[dict], str]:
    """Tokenised items of the data at ``spec`` and its format (:func:`data_format`).

    - ``text``: the ``text_field`` string; EOS appended (``append_eos``) when the text fits.
    - ``chat``: ``messages_field`` rendered by the tokenizer's chat template (no second BOS).
    - ``prompt_completion``: prompt ids + completion ids + EOS; the loss covers the completion
      (``prompt_length`` masks the prompt); ``prompt_only``: the prompt (on-policy rollouts).
    """
    table = load_records(spec, key)
    fmt = data_format(table.column_names, config)
    need = {"text": [config.text_field], "chat": [config.messages_field],
            "prompt_completion": [config.prompt_field, config.completion_field],
            "prompt_only": [config.prompt_field]}[fmt]
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise ValueError(f"{key}: {spec} has no column {missing[0]!r} for {fmt} data (its columns: "
                         f"{', '.join(table.column_names)}; set text_field, messages_field or prompt_field)")
    eos = tokenizer.eos_token_id if config.append_eos else None
    items: list[dict] = []
    if fmt == "text":
        for text in _column(table[config.text_field], spec, config.text_field, key):
            items.append(_text_item(tokenizer, text, config.max_length, eos, True))
    elif fmt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{key}: {spec} holds chat data ({config.messages_field!r}) but the tokenizer has no "
                             "chat template (set tokenizer to one that has, or give text data)")
        for messages in table[config.messages_field]:
            if not messages:
                continue
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            items.append(_text_item(tokenizer, text, config.max_length, eos, False))
    else:
        prompts = table[config.prompt_field]
        completions = table[config.completion_field] if fmt == "prompt_completion" else [None] * len(prompts)
        for prompt, completion in zip(prompts, completions):
            if not isinstance(prompt, str) or not prompt.strip():
                continue
            items.append(_prompt_item(tokenizer, prompt, completion, config.max_length, eos))
    items = [item for item in items if item is not None]
    if not items:
        raise ValueError(f"{key}: {spec} holds no example of at least 2 tokens (and, for prompt/completion "
                         f"data, a completion token within max_length {config.max_length})")
    return items, fmt


def _text_item(tokenizer, text: str, max_length: int, eos: Optional[int], special: bool) -> Optional[dict]:
    ids, n_bytes = encode(tokenizer, text, max_length, add_special_tokens=special)
    if eos is not None and len(ids) < max_length and (not ids or ids[-1] != eos):
        ids = ids + [eos]  # the text ended inside max_length: the model learns to stop
    if len(ids) < 2:
        return None
    return {"input_ids": torch.tensor(ids, dtype=torch.int64), "n_bytes": n_bytes}


def _prompt_item(tokenizer, prompt: str, completion: Optional[str], max_length: int,
                 eos: Optional[int]) -> Optional[dict]:
    prompt_ids = tokenizer(prompt)["input_ids"]
    if completion is None:  # a prompt alone: on-policy rollouts continue it
        prompt_ids = prompt_ids[:max_length - 1]
        return {"input_ids": torch.tensor(prompt_ids, dtype=torch.int64), "prompt_length": len(prompt_ids),
                "prompt_only": True} if prompt_ids else None
    room = max_length - len(prompt_ids)
    if room < 1 or not isinstance(completion, str):
        return None
    ids, n_bytes = encode(tokenizer, completion, room, add_special_tokens=False, first_predicted=True)
    if eos is not None and len(ids) < room and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    if not ids:
        return None
    return {"input_ids": torch.tensor(prompt_ids + ids, dtype=torch.int64), "prompt_length": len(prompt_ids),
            "n_bytes": n_bytes}


def pack_items(items: Sequence[dict], max_length: int) -> list[dict]:
    """The items' tokens end to end (each with its EOS), cut into blocks of ``max_length`` with
    explicit ``labels`` (the prompts of prompt/completion items stay out of the loss)."""
    ids = torch.cat([item["input_ids"] for item in items])
    labels = torch.cat([torch.cat([torch.full((item.get("prompt_length", 0),), IGNORE, dtype=torch.int64),
                                   item["input_ids"][item.get("prompt_length", 0):]]) for item in items])
    blocks = [{"input_ids": ids[start:start + max_length], "labels": labels[start:start + max_length]}
              for start in range(0, len(ids), max_length)]
    return [block for block in blocks if len(block["input_ids"]) >= 2 and (block["labels"][1:] != IGNORE).any()]


def pad_token_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


# ------------------------------------------------------------------------------------------------
# items and collators
# ------------------------------------------------------------------------------------------------

def encode(tokenizer, text: str, max_length: int, *, add_special_tokens: bool = True,
           first_predicted: bool = False) -> tuple[list[int], Optional[int]]:
    """Token ids of ``text`` (truncated) and the UTF-8 bytes its predicted tokens (all but the
    first, or all with ``first_predicted``: a completion after its prompt) cover, for CE per
    byte: a truncated text counts only what was kept, and a tokenizer without BOS does not count
    its unpredicted first token. Fast tokenizers give the bytes from their offsets; a slow one
    gives the whole text's bytes when nothing was cut, else None."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True,
                            add_special_tokens=add_special_tokens)
        ids = encoded["input_ids"]
        spans = [(a, b) for a, b in encoded["offset_mapping"][0 if first_predicted else 1:] if b > a]
        if not spans:
            return ids, 0
        first, last = min(a for a, _ in spans), max(b for _, b in spans)
        return ids, len(text[:last].encode("utf-8")) - len(text[:first].encode("utf-8"))
    ids = tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=add_special_tokens)["input_ids"]
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
            if "labels" in item:  # packed blocks carry their own
                labels[row, :len(seq)] = item["labels"]
            else:
                labels[row, item.get("prompt_length", 0):len(seq)] = seq[item.get("prompt_length", 0):]
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if any("prompt_length" in item for item in items):  # on-policy rollouts continue the prompts
            batch["prompt_lengths"] = torch.tensor([item.get("prompt_length", 0) for item in items])
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

