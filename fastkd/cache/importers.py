"""Importers: teacher top-k produced elsewhere, written as a fastkd top-k cache.

- :func:`import_vllm`: JSON lines from vLLM with ``prompt_logprobs``: offline ``LLM.generate`` with
  ``SamplingParams(prompt_logprobs=K, max_tokens=1)``, one ``RequestOutput`` per line::

      {"prompt_token_ids": [5, 17, 9],
       "prompt_logprobs": [null,
                           {"17": {"logprob": -0.3, "rank": 1, "decoded_token": "a"}, "4": {...}},
                           {"9": {...}, ...}]}

  Entry t of ``prompt_logprobs`` is the distribution of token t (``null`` for the first token);
  the cache row t is the distribution of token t+1, so row t takes entry t+1 and the last row is
  empty (all slots unused). vLLM adds the prompt token itself when it is not in the top-K, so a
  dict may hold K+1 ids: the K most likely are kept (sorted by log-prob, ties by id). A log-prob
  that is a bare number instead of ``{"logprob": x, ...}`` is accepted too. The OpenAI-compatible
  server's answers (``/v1/completions`` with ``"prompt_logprobs": K, "return_token_ids": true``)
  are accepted as they come, one answer per line: each ``choices[i]`` is a sequence with its own
  ``prompt_logprobs`` and ``prompt_token_ids`` (absent without ``return_token_ids``: an error
  says so); ``-9999.0``, the server's stand-in for ``-inf``, is kept as a log-prob. Log-probs above
  0, non-finite ones, an id listed twice (``"2"`` and ``"02"``) and a top-k mass above
  ``1 + TOPK_MASS_SLACK`` are errors naming the line.
- :func:`import_dataset`: rows with ``input_ids`` (T ints), ``target_token_ids`` (T lists of ids)
  and ``target_logprobs`` (T lists of log-probs), axolotl's KD dataset columns, from ``.jsonl`` or,
  when ``pyarrow`` is installed, ``.parquet``. ``alignment="logits"`` (default): entry t is the
  distribution of token t+1 (as fastkd stores it); ``"tokens"``: entry t is that of token t (like
  vLLM), shifted by one. Shorter or ragged lists fill unused slots.

Both read their input in one streaming pass and write shards as they fill; they are not
resumable (re-run them into an empty directory).
"""
from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from ..divergences import TOPK_MASS_SLACK
from . import format as fmt
from .capture import _positive_int

# a single log-prob may exceed 0 by rounding only as much as a top-k mass may exceed 1
_MAX_LOGPROB = math.log1p(TOPK_MASS_SLACK)


class _ShardWriter:
    """Accumulates top-k sequences; writes a shard each time ``shard_tokens`` are held."""

    def __init__(self, out, manifest: dict, shard_tokens: int):
        self.out, self.manifest, self.shard_tokens = Path(out), manifest, shard_tokens
        self.pending: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
        self.tokens = 0
        self.out.mkdir(parents=True, exist_ok=True)
        if (self.out / fmt.MANIFEST).exists():
            raise ValueError(f"out: {self.out} already holds a cache ({fmt.MANIFEST}); choose an empty directory")

    def add(self, input_ids: list[int], ids: torch.Tensor, logprobs: torch.Tensor) -> None:
        self.pending.append((input_ids, ids, logprobs))
        self.tokens += len(input_ids)
        if self.tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        lengths = np.array([len(s[0]) for s in self.pending], dtype=np.int64)
        words = fmt.pack_topk(torch.cat([s[1] for s in self.pending]), torch.cat([s[2] for s in self.pending]),
                              self.manifest["vocab_size"], self.manifest["logprob_dtype"])
        tensors = {"input_ids": np.concatenate([np.asarray(s[0], dtype=np.int32) for s in self.pending]),
                   "seq_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   "topk": words}
        entry = fmt.write_shard(self.out, len(self.manifest["shards"]), tensors)
        entry["first_sequence"] = self.manifest["sequences"]
        fmt.add_shard(self.manifest, entry)
        fmt.write_manifest(self.out, self.manifest)
        self.pending, self.tokens = [], 0

    def close(self) -> dict:
        self.flush()
        if not self.manifest["shards"]:
            raise ValueError("the input holds no sequences")
        self.manifest["complete"] = True
        fmt.write_manifest(self.out, self.manifest)
        return self.manifest


def _common(topk, dtype, vocab_size, tokenizer, shard_tokens):
    topk = _positive_int("topk", topk)
    shard_tokens = _positive_int("shard_tokens", shard_tokens)
    fmt._check_dtype(dtype)
    fingerprint = None
    if tokenizer is not None:
        fingerprint = fmt.tokenizer_fingerprint(tokenizer)
        if vocab_size is None:
            vocab_size = len(tokenizer)
    if vocab_size is None:
        raise ValueError("vocab_size: pass the teacher's vocabulary size or its tokenizer (ids are "
                         "packed into id_bits(vocab_size) bits)")
    vocab_size = _positive_int("vocab_size", vocab_size)
    fmt.id_bits(vocab_size)
    return topk, shard_tokens, fingerprint, vocab_size


def _int_list(value, what: str, vocab_size: Optional[int] = None) -> list[int]:
    """``value`` when it is a list of ints (in ``[0, vocab_size)`` when given)."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{what} must be a list of ints")
    if vocab_size is not None and value and not 0 <= min(value) <= max(value) < vocab_size:
        bad = next(v for v in value if not 0 <= v < vocab_size)
        raise ValueError(f"{what}: token id {bad} outside [0, vocab_size={vocab_size})")
    return value


def _top_entries(pairs: list[tuple[int, float]], k: int, vocab_size: int, where: str):
    """The ``k`` most likely of ``(id, log-prob)`` pairs (ties by smaller id), checked.

    Rejected, naming ``where``: ids outside ``[0, vocab_size)`` or listed twice (``"2"`` and
    ``"02"`` are the same id), log-probs that are not finite numbers (NaN, ``±Infinity``; vLLM's
    server writes ``-9999.0`` for ``-inf``, which is kept), log-probs above 0 (beyond the rounding
    slack ``log(1 + TOPK_MASS_SLACK)``) and entries whose probabilities sum above
    ``1 + TOPK_MASS_SLACK``: what the losses would reject mid-training is rejected at import.
    """
    seen = set()
    for token, logprob in pairs:
        if not 0 <= token < vocab_size:
            raise ValueError(f"{where}: token id {token} outside [0, vocab_size={vocab_size})")
        if token in seen:
            raise ValueError(f"{where}: token id {token} is listed twice")
        seen.add(token)
        if isinstance(logprob, bool) or not isinstance(logprob, numbers.Real) or not math.isfinite(logprob):
            raise ValueError(f"{where}: log-prob {logprob!r} of id {token} is not a finite number "
                             "(use -9999.0 for a token of probability 0, as vLLM does)")
        if logprob > _MAX_LOGPROB:
            raise ValueError(f"{where}: log-prob {logprob!r} of id {token} is above 0: not a log-probability")
    if pairs:
        top = max(p[1] for p in pairs)
        mass = math.exp(top) * math.fsum(math.exp(p[1] - top) for p in pairs)
        if mass > 1.0 + TOPK_MASS_SLACK:
            raise ValueError(f"{where}: the probabilities sum to {mass:.6g}, above 1 + {TOPK_MASS_SLACK} "
                             "(log-probs of another temperature, or not normalised)")
    pairs = sorted(pairs, key=lambda p: (-p[1], p[0]))[:k]
    ids = [p[0] for p in pairs] + [-1] * (k - len(pairs))
    logprobs = [float(p[1]) for p in pairs] + [0.0] * (k - len(pairs))
    return ids, logprobs


def _lines(path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: each line must be a JSON object")
            yield number, record


def _temperature(temperature) -> float:
    """The recorded temperature: a real number > 0 (it is what the log-probs were computed at)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature must be a real number > 0, got {temperature!r}")
    return float(temperature)


def prompt_logprobs_topk(entries, length: int, topk: int, vocab_size: int,
                         where: str) -> tuple[list[list[int]], list[list[float]]]:
    """vLLM ``prompt_logprobs`` of a prompt of ``length`` tokens → per-position top-k rows.

    ``entries[t]`` (a dict ``"id" -> logprob`` or ``-> {"logprob": ...}``, null for t = 0) is the
    teacher's distribution of token t given the tokens before it; row t of the result is
    ``entries[t + 1]`` (the distribution of the next token, as the cache stores it), the last row
    unused (ids ``-1``). The top ``topk`` entries are kept (vLLM adds the prompt token itself).
    """
    if not isinstance(entries, list) or len(entries) != length:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise ValueError(f"{where}: prompt_logprobs must be a list with one entry per prompt token "
                         f"({length}), got {got}")
    ids, logprobs = [], []
    for t in range(length):
        entry = entries[t + 1] if t + 1 < length else None
        if entry is None:
            if t + 1 < length:
                raise ValueError(f"{where}: prompt_logprobs[{t + 1}] is null (only entry 0 may be)")
            row = ([-1] * topk, [0.0] * topk)
        else:
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: prompt_logprobs[{t + 1}] must be an object id -> logprob")
            pairs = []
            for key, value in entry.items():
                logprob = value.get("logprob") if isinstance(value, dict) else value
                try:
                    token = int(key)
                except ValueError:
                    raise ValueError(f"{where}: prompt_logprobs[{t + 1}] key {key!r} is not a token id") from None
                pairs.append((token, logprob))
            row = _top_entries(pairs, topk, vocab_size, f"{where}: prompt_logprobs[{t + 1}]")
        ids.append(row[0])
        logprobs.append(row[1])
    return ids, logprobs


def import_vllm(path, out, *, topk: int, vocab_size: Optional[int] = None, tokenizer=None,
                dtype: str = "fp16", temperature: float = 1.0, teacher: str = "vllm",
                shard_tokens: int = 1 << 20) -> dict:
    """vLLM ``prompt_logprobs`` JSON lines (module docstring) → top-k cache in ``out``.

    Args:
        path: the ``.jsonl`` file.
        out: the cache directory (must hold no manifest).
        topk: K kept per position (extra ids dropped, missing ones unused slots).
        vocab_size: the teacher's V (default: ``len(tokenizer)``); one of the two is required.
        tokenizer: None or the teacher's tokenizer, for the fingerprint (without it the cache has
            none and readers cannot check the student's tokenizer).
        dtype: ``"fp16"`` (default) or ``"bf16"``.
        temperature: the temperature vLLM's log-probs were computed at (recorded), default 1.0.
        teacher: teacher name recorded in the manifest.
        shard_tokens: tokens per shard (at least), default 2^20.
    """
    topk, shard_tokens, fingerprint, vocab_size = _common(topk, dtype, vocab_size, tokenizer, shard_tokens)
    temperature = _temperature(temperature)
    manifest = fmt.new_manifest("topk", teacher=teacher, fingerprint=fingerprint, fingerprint_kind="tokenizer",
                                vocab_size=vocab_size, topk=topk, temperature=temperature, dtype=dtype,
                                source={"importer": "vllm", "file": Path(path).name})
    writer = _ShardWriter(out, manifest, shard_tokens)
    for number, record in _lines(path):
        for where, prompt, entries in _vllm_sequences(record, f"{path}:{number}"):
            _int_list(prompt, f"{where}: prompt_token_ids", vocab_size)
            ids, logprobs = prompt_logprobs_topk(entries, len(prompt), topk, vocab_size, where)
            writer.add(prompt, torch.tensor(ids, dtype=torch.int64).reshape(-1, topk),
                       torch.tensor(logprobs, dtype=torch.float32).reshape(-1, topk))
    return writer.close()


_NO_TOKEN_IDS = ("has prompt_logprobs but no prompt_token_ids: vLLM's OpenAI-compatible server returns "
                 "the prompt's ids only when the request sets \"return_token_ids\": true (or send the "
                 "prompt as token ids and save them with the answer); re-run the requests with it")


def _vllm_sequences(record: dict, where: str) -> Iterator[tuple[str, list[int], list]]:
    """``(where, prompt_token_ids, prompt_logprobs)`` of each sequence of one JSON line.

    Shapes: the offline ``RequestOutput`` (and the chat endpoint's answer), with top-level
    ``prompt_token_ids``/``prompt_logprobs``; the completions endpoint's answer, one sequence per
    ``choices[i]`` with its own ``prompt_logprobs`` and (with ``return_token_ids``)
    ``prompt_token_ids``; either of them wrapped as a batch-API line ``{"response": {"body": ...}}``.
    """
    response = record.get("response")
    if isinstance(response, dict) and isinstance(response.get("body"), dict) and "choices" not in record:
        record, where = response["body"], f"{where}: response.body"
    if "prompt_logprobs" in record or "prompt_token_ids" in record or "choices" not in record:
        if record.get("prompt_token_ids") is None and record.get("prompt_logprobs") is not None:
            raise ValueError(f"{where}: {_NO_TOKEN_IDS}")
        prompt = _int_list(record.get("prompt_token_ids"), f"{where}: prompt_token_ids")
        yield where, prompt, record.get("prompt_logprobs")
        return
    choices = record["choices"]
    if not isinstance(choices, list) or not choices:
        raise ValueError(f"{where}: choices must be a non-empty list (one per prompt)")
    for index, choice in enumerate(choices):
        at = f"{where}: choices[{index}]"
        if not isinstance(choice, dict):
            raise ValueError(f"{at} must be an object")
        if choice.get("prompt_logprobs") is None:
            raise ValueError(f"{at} has no prompt_logprobs: request them with \"prompt_logprobs\": K "
                             "(and \"return_token_ids\": true)")
        if choice.get("prompt_token_ids") is None:
            raise ValueError(f"{at} {_NO_TOKEN_IDS}")
        yield at, _int_list(choice["prompt_token_ids"], f"{at}: prompt_token_ids"), choice["prompt_logprobs"]


def _dataset_rows(path) -> Iterable[tuple[str, dict]]:
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        for number, record in _lines(path):
            yield f"{path}:{number}", record
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"path: reading {path} needs pyarrow (pip install pyarrow); or convert "
                             "it to .jsonl") from None
        table = pq.ParquetFile(path)
        number = 0
        for batch in table.iter_batches(columns=["input_ids", "target_token_ids", "target_logprobs"]):
            for record in batch.to_pylist():
                number += 1
                yield f"{path} row {number}", record
    else:
        raise ValueError(f"path: {path} must be .jsonl or .parquet, got suffix {path.suffix!r}")


def import_dataset(path, out, *, topk: int, vocab_size: Optional[int] = None, tokenizer=None,
                   dtype: str = "fp16", temperature: float = 1.0, teacher: str = "dataset",
                   alignment: str = "logits", shard_tokens: int = 1 << 20) -> dict:
    """A dataset with ``input_ids``/``target_token_ids``/``target_logprobs`` → top-k cache in ``out``.

    Args as in :func:`import_vllm`, plus ``alignment``: ``"logits"`` (default; entry t is the
    distribution of token t+1) or ``"tokens"`` (entry t is that of token t; entry 0 ignored).
    ``target_*`` lists may be shorter than ``input_ids`` (missing rows are unused).
    """
    if alignment not in ("logits", "tokens"):
        raise ValueError(f"alignment must be 'logits' or 'tokens', got {alignment!r}")
    topk, shard_tokens, fingerprint, vocab_size = _common(topk, dtype, vocab_size, tokenizer, shard_tokens)
    temperature = _temperature(temperature)
    manifest = fmt.new_manifest("topk", teacher=teacher, fingerprint=fingerprint, fingerprint_kind="tokenizer",
                                vocab_size=vocab_size, topk=topk, temperature=temperature, dtype=dtype,
                                source={"importer": "dataset", "file": Path(path).name, "alignment": alignment})
    writer = _ShardWriter(out, manifest, shard_tokens)
    for where, record in _dataset_rows(path):
        input_ids = _int_list(record.get("input_ids"), f"{where}: input_ids", vocab_size)
        targets, values = record.get("target_token_ids"), record.get("target_logprobs")
        if not isinstance(targets, list) or not isinstance(values, list) or len(targets) != len(values):
            raise ValueError(f"{where}: target_token_ids and target_logprobs must be lists of the same length")
        if alignment == "tokens":
            targets, values = targets[1:], values[1:]
        if len(targets) > len(input_ids):
            raise ValueError(f"{where}: {len(targets)} target rows for {len(input_ids)} input_ids")
        ids, logprobs = [], []
        for t in range(len(input_ids)):
            if t < len(targets):
                row_ids, row_lps = targets[t], values[t]
                if not isinstance(row_ids, list) or not isinstance(row_lps, list) or len(row_ids) != len(row_lps):
                    raise ValueError(f"{where}: target_token_ids[{t}] and target_logprobs[{t}] must be "
                                     "lists of the same length")
                _int_list(row_ids, f"{where}: target_token_ids[{t}]")
                row = _top_entries(list(zip(row_ids, row_lps)), topk, vocab_size, f"{where}: row {t}")
            else:
                row = ([-1] * topk, [0.0] * topk)
            ids.append(row[0])
            logprobs.append(row[1])
        writer.add(input_ids, torch.tensor(ids, dtype=torch.int64).reshape(-1, topk),
                   torch.tensor(logprobs, dtype=torch.float32).reshape(-1, topk))
    return writer.close()
