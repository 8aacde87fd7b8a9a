"""Capture a Hugging Face teacher's top-k (or byte-level) log-probs over a dataset into a cache.

Deterministic by construction, so a capture killed at any moment and resumed writes the same
bytes as one that never stopped: the whole dataset is tokenised first, sequences are assigned to
shards greedily in order (a shard closes once it holds ``shard_tokens`` tokens or more; sequences
are never split), and each shard is computed in batches of ``batch_size`` consecutive sequences
starting at its first sequence. A resumed capture checks that its settings and its tokenised data
match the manifest, keeps the shards the manifest lists (checksums verified), deletes the
``*.tmp`` leftovers it may have written itself (``manifest.json.tmp``, ``shard-NNNNN.safetensors.tmp``;
any other file in the directory is left alone), and continues with the first sequence no listed shard holds.
"""
from __future__ import annotations

import hashlib
import json
import numbers
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from . import format as fmt

# Leftovers of a killed writer (fmt.atomic_write): the manifest's and the shards' temporary names.
_OWN_TMP = re.compile(r"^(manifest\.json|shard-\d{5,}\.safetensors)\.tmp$")
# Settings a resumed capture must share with the manifest it continues.
_RESUME_KEYS = ("kind", "teacher", "tokenizer_fingerprint", "vocab_size", "topk", "temperature",
                "logprob_dtype", "source")


def load_texts(path, text_field: str = "text") -> list[str]:
    """Texts of a data file: ``.txt`` (one sequence per non-empty line) or ``.jsonl`` (the
    ``text_field`` string of each line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data: {path} is not a file")
    texts = []
    if path.suffix == ".txt":
        with open(path, encoding="utf-8") as handle:
            texts = [line.rstrip("\n") for line in handle if line.strip()]
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"data: {path}:{number} has no string field {text_field!r}")
                texts.append(text)
    else:
        raise ValueError(f"data: {path} must be a .txt or .jsonl file, got suffix {path.suffix!r}")
    if not texts:
        raise ValueError(f"data: {path} holds no sequences")
    return texts


def plan_shards(lengths: Sequence[int], shard_tokens: int) -> list[tuple[int, int]]:
    """``[(first, end), ...]`` sequence ranges: each shard closes once it holds ≥ ``shard_tokens``."""
    plan, start, tokens = [], 0, 0
    for index, length in enumerate(lengths):
        tokens += int(length)
        if tokens >= shard_tokens:
            plan.append((start, index + 1))
            start, tokens = index + 1, 0
    if start < len(lengths):
        plan.append((start, len(lengths)))
    return plan


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    sequences = []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] must be a str, got {type(text).__name__}")
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if not ids:
            raise ValueError(f"texts[{index}] tokenises to no tokens")
        sequences.append([int(i) for i in ids])
    return sequences


def _ids_digest(sequences: Sequence[Sequence[int]]) -> str:
    digest = hashlib.sha256()
    for ids in sequences:
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


@torch.no_grad()
def topk_logprobs(hidden: Tensor, weight: Tensor, k: int, *, temperature: float = 1.0,
                  bias: Optional[Tensor] = None, softcap: Optional[float] = None,
                  chunk_rows: int = 1024) -> tuple[Tensor, Tensor]:
    """The top-``k`` ids and log-probs of ``softmax(softcap(hidden·weightᵀ + bias) / temperature)``.

    ``hidden`` ``(N, D)``, ``weight`` ``(V, D)``; returns ``(ids (N, k) int64, logprobs (N, k)
    float32)``, sorted by decreasing log-prob. At most ``chunk_rows x V`` float32 logits exist at a
    time.
    """
    ids, logprobs = [], []
    # logits in the head's dtype (float32 accumulation inside the GEMM), then float32: no float32
    # copy of a 16-bit (V, D) head
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = (hidden[start:start + chunk_rows].to(weight.dtype) @ weight.T).float()
        if bias is not None:
            logits = logits + bias.float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logp = torch.log_softmax(logits / temperature, dim=-1)
        top = logp.topk(k, dim=-1)
        ids.append(top.indices)
        logprobs.append(top.values)
    if not ids:
        return (torch.zeros(0, k, dtype=torch.int64), torch.zeros(0, k))
    return torch.cat(ids).cpu(), torch.cat(logprobs).cpu()


def capture(
    teacher: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    out,
    *,
    topk: int = 64,
    dtype: str = "fp16",
    temperature: float = 1.0,
    max_length: int = 512,
    shard_tokens: int = 1 << 20,
    batch_size: int = 8,
    resume: bool = False,
    teacher_name: Optional[str] = None,
    byte_level: bool = False,
    chunk_rows: int = 1024,
    on_shard: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Runs ``teacher`` over ``texts`` and writes a cache to directory ``out``; returns the manifest.

    Args:
        teacher: a ``transformers`` causal LM (in eval mode; any device, inputs follow it).
        tokenizer: its tokenizer (``__call__`` with truncation, ``len``); pads with its
            ``pad_token_id`` (else 0; padded positions are never stored).
        texts: the sequences, in order.
        out: the cache directory (created).
        topk: K, default 64 (top-k caches).
        dtype: ``"fp16"`` (default) or ``"bf16"``, the log-prob format packed into 4-byte entries.
        temperature: τ > 0, default 1.0: the teacher's log-probs are of ``softmax(z / τ)``.
        max_length: tokens per sequence at most, default 512 (longer ones are truncated).
        shard_tokens: a shard closes once it holds this many tokens, default 2^20.
        batch_size: sequences per teacher forward, default 8.
        resume: continue the capture in ``out`` (default False: ``out`` must hold no manifest).
        teacher_name: recorded in the manifest, default the model's ``name_or_path``.
        byte_level: write a byte-level cache (``(T, 257)`` byte log-probs keyed by the teacher's
            :class:`fastkd.ByteVocab` fingerprint) instead of top-k; default False.
        chunk_rows: rows of logits computed at a time, default 1024.
        on_shard: called with each new shard's manifest entry after it is recorded.
    """
    from ..integrations import hidden_and_head

    topk = _positive_int("topk", topk)
    max_length = _positive_int("max_length", max_length)
    shard_tokens = _positive_int("shard_tokens", shard_tokens)
    batch_size = _positive_int("batch_size", batch_size)
    chunk_rows = _positive_int("chunk_rows", chunk_rows)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature must be a real number > 0, got {temperature!r}")
    if not byte_level:
        fmt._check_dtype(dtype)
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence) or not texts:
        raise TypeError(f"texts must be a non-empty sequence of str, got {type(texts).__name__}")

    vocab_size = teacher.get_output_embeddings().weight.shape[0]
    if byte_level:
        from ..bytes import ByteVocab

        byte_vocab = ByteVocab.from_tokenizer(tokenizer, vocab_size=vocab_size)
        fingerprint, fingerprint_kind = byte_vocab.fingerprint, "byte_vocab"
    else:
        byte_vocab = None
        fingerprint, fingerprint_kind = fmt.tokenizer_fingerprint(tokenizer), "tokenizer"
        if topk > vocab_size:
            raise ValueError(f"topk must be <= the teacher's vocabulary {vocab_size}, got {topk}")

    sequences = _tokenize(tokenizer, texts, max_length)
    source = {"data_sha256": _ids_digest(sequences), "sequences": len(sequences),
              "max_length": max_length, "shard_tokens": shard_tokens, "batch_size": batch_size}
    name = teacher_name or getattr(getattr(teacher, "config", None), "name_or_path", "") or type(teacher).__name__
    manifest = fmt.new_manifest("bytes" if byte_level else "topk", teacher=str(name),
                                fingerprint=fingerprint, fingerprint_kind=fingerprint_kind,
                                vocab_size=vocab_size, topk=None if byte_level else topk,
                                temperature=float(temperature),
                                dtype="fp16" if byte_level else dtype, source=source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _start_or_resume(out, manifest, resume)

    plan = plan_shards([len(s) for s in sequences], shard_tokens)
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    device = next(teacher.parameters()).device
    for index in range(len(manifest["shards"]), len(plan)):
        first, end = plan[index]
        batches = [sequences[b:min(b + batch_size, end)] for b in range(first, end, batch_size)]
        pieces = [_run_batch(teacher, batch, pad_id, device, hidden_and_head, topk, temperature,
                             chunk_rows, byte_vocab) for batch in batches]
        tensors = _shard_tensors(sequences[first:end], pieces, vocab_size, dtype, byte_vocab, tokenizer)
        entry = fmt.write_shard(out, index, tensors)
        entry["first_sequence"] = first
        fmt.add_shard(manifest, entry)
        manifest["complete"] = index + 1 == len(plan)
        fmt.write_manifest(out, manifest)
        if on_shard is not None:
            on_shard(entry)
    if not manifest["complete"]:  # resumed a capture whose last shard was already written
        manifest["complete"] = True
        fmt.write_manifest(out, manifest)
    return manifest


def _start_or_resume(out: Path, manifest: dict, resume: bool) -> dict:
    existing = out / fmt.MANIFEST
    if not resume:
        if existing.exists():
            raise ValueError(f"out: {out} already holds a cache ({fmt.MANIFEST}); pass resume=True "
                             "(--resume) to continue it, or choose another directory")
        return manifest
    for leftover in out.glob("*.tmp"):  # only what a capture writes: a user's own *.tmp stays
        if _OWN_TMP.match(leftover.name) and leftover.is_file() and not leftover.is_symlink():
            leftover.unlink()
    if not existing.exists():
        return manifest  # killed before its first shard: start over
    old = fmt.read_manifest(out)
    differ = [key for key in _RESUME_KEYS if old.get(key) != manifest.get(key)]
    if differ:
        detail = "; ".join(f"{key}: cache {old.get(key)!r} vs now {manifest.get(key)!r}" for key in differ)
        raise ValueError(f"resume: the cache in {out} was captured with other settings or data ({detail})")
    for entry in old["shards"]:
        fmt.verify_shard(out, entry)
    return old


def _run_batch(teacher, batch, pad_id, device, hidden_and_head, topk, temperature, chunk_rows, byte_vocab):
    longest = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
    out = hidden_and_head(teacher, input_ids=input_ids.to(device), attention_mask=mask.to(device))
    rows = out["hidden"][mask.to(device).bool()]  # (tokens, D), sequence by sequence
    if byte_vocab is None:
        return topk_logprobs(rows, out["weight"], topk, temperature=temperature, bias=out["bias"],
                             softcap=out["softcap"], chunk_rows=chunk_rows)
    from ..bytes import byte_targets

    nxt = torch.full_like(input_ids, -100)
    nxt[:, :-1] = input_ids[:, 1:]
    nxt = torch.where(torch.roll(mask, -1, dims=1).bool() & mask.bool(), nxt, -100)
    nxt[:, -1] = -100
    labels = nxt[mask.bool()].to(device)
    byte_lp, token_lp = byte_targets(rows, out["weight"], byte_vocab, labels, temperature=temperature,
                                     softcap=out["softcap"], bias=out["bias"], impl="torch")
    return byte_lp.cpu(), token_lp.cpu()


def _shard_tensors(sequences, pieces, vocab_size, dtype, byte_vocab, tokenizer) -> dict:
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    tensors = {"input_ids": np.concatenate([np.asarray(s, dtype=np.int32) for s in sequences]),
               "seq_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}
    if byte_vocab is None:
        ids = torch.cat([p[0] for p in pieces])
        logprobs = torch.cat([p[1] for p in pieces])
        tensors["topk"] = fmt.pack_topk(ids, logprobs, vocab_size, dtype)
        return tensors
    tensors["byte_logprobs"] = torch.cat([p[0] for p in pieces]).to(torch.float16).numpy()
    tensors["token_logprobs"] = torch.cat([p[1] for p in pieces]).numpy().astype(np.float32)
    texts, offsets = [], []
    for ids in sequences:
        text = byte_vocab.decode(ids)
        texts.append(text)
        offsets.append(byte_vocab.byte_offsets(ids, text if byte_vocab.prefix_space else None))
    tensors["byte_offsets"] = np.concatenate(offsets).astype(np.int64)
    tensors["text"] = np.frombuffer(b"".join(texts), dtype=np.uint8).copy()
    tensors["text_offsets"] = np.concatenate([[0], np.cumsum([len(t) for t in texts])]).astype(np.int64)
    return tensors
