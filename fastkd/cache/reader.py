"""Reading a teacher cache: a map-style ``Dataset`` over its sequences and a padding collator.

``TeacherCache(path, tokenizer=student_tokenizer, verify=True)`` checks the manifest, the
tokenizer fingerprint (same-tokenizer top-k caches) and every shard's sha256, then memory-maps
the shards: items are read from the page cache on access, never loaded whole. Batches from
:class:`CacheCollator` are what :func:`fastkd.integrations.compute_kd_loss` takes::

    cache = TeacherCache("cache/", tokenizer=tok)
    loader = torch.utils.data.DataLoader(cache, batch_size=8, collate_fn=CacheCollator(tok.pad_token_id))
    for batch in loader:
        loss = compute_kd_loss(student, batch)
"""
from __future__ import annotations

import bisect
import numbers
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from . import format as fmt


class TeacherCache(Dataset):
    """The sequences of a cache directory; ``cache[i]`` is a dict of CPU tensors.

    Top-k cache items: ``input_ids`` ``(T,)`` int64, ``teacher_ids`` ``(T, K)`` int64 (``-1``
    unused), ``teacher_logprobs`` ``(T, K)`` float32 (row t: the teacher's distribution of token
    t+1). Byte-level cache items: ``input_ids``, ``teacher_byte_logprobs`` ``(T, 257)`` float32,
    ``teacher_token_logprobs`` ``(T,)`` float32, ``teacher_byte_offsets`` ``(T, 2)`` int64 and
    ``text`` (str, the bytes the teacher's tokens spell).

    Args:
        path: the cache directory.
        tokenizer: None (default: no check) or the student's tokenizer: a top-k cache must have
            been captured with the same tokenizer (same :func:`fastkd.cache.tokenizer_fingerprint`).
        byte_vocab: None (default) or the :class:`fastkd.ByteVocab` a byte-level cache must match.
        verify: check every shard's sha256 against the manifest (default True; reads every byte
            once).
        allow_incomplete: read the shards of a capture that has not finished (default False).

    Raises:
        fastkd.cache.CacheError (a ValueError): no manifest, unknown format version, missing or
            corrupted shard (named), incomplete capture.
        ValueError: fingerprint mismatch.
    """

    def __init__(self, path, *, tokenizer=None, byte_vocab=None, verify: bool = True,
                 allow_incomplete: bool = False):
        self.path = Path(path)
        self.manifest = manifest = fmt.read_manifest(self.path)
        if not manifest.get("complete") and not allow_incomplete:
            raise fmt.CacheError(
                f"{self.path}: the capture is incomplete ({manifest['sequences']} sequences in "
                f"{len(manifest['shards'])} shards so far); resume it, or pass allow_incomplete=True")
        self.kind = manifest["kind"]
        if tokenizer is not None:
            if self.kind != "topk":
                raise ValueError("tokenizer: a byte-level cache is independent of the student's "
                                 "tokenizer; pass byte_vocab= to check the teacher's instead")
            self._check_fingerprint("tokenizer", fmt.tokenizer_fingerprint(tokenizer))
        if byte_vocab is not None:
            if self.kind != "bytes":
                raise ValueError("byte_vocab: only byte-level caches are keyed by a ByteVocab")
            self._check_fingerprint("byte_vocab", byte_vocab.fingerprint)
        if verify:
            for entry in manifest["shards"]:
                fmt.verify_shard(self.path, entry)
        self._starts = []
        total = 0
        for entry in manifest["shards"]:
            self._starts.append(total)
            total += entry["sequences"]
        self._length = total
        self._shards: dict[int, dict] = {}
        if verify:  # checksums prove nothing against a crafted cache: check every shard's layout
            for index in range(len(manifest["shards"])):
                self._shard(index)
            self._shards = {}

    def __getstate__(self) -> dict:
        # DataLoader workers get the manifest, not opened memory maps (pickling one would copy the
        # whole shard into every worker); each worker maps the shards it reads itself.
        state = self.__dict__.copy()
        state["_shards"] = {}
        return state

    def _check_fingerprint(self, name: str, fingerprint: str) -> None:
        recorded = self.manifest.get("tokenizer_fingerprint")
        if recorded is None:
            raise ValueError(f"{name}: the cache in {self.path} records no tokenizer fingerprint "
                             "(imported without a tokenizer); cannot check it, pass None to skip")
        if recorded != fingerprint:
            raise ValueError(
                f"{name}: fingerprint {fingerprint[:16]}… does not match the cache's "
                f"{recorded[:16]}… (teacher {self.manifest.get('teacher')!r}): the student's "
                "tokenizer is not the one the teacher cache was captured with; use the same "
                "tokenizer, or a byte-level cache for cross-tokenizer distillation")

    def __len__(self) -> int:
        return self._length

    @property
    def topk(self) -> Optional[int]:
        return self.manifest.get("topk")

    def _shard(self, index: int) -> dict:
        shard = self._shards.get(index)
        if shard is None:
            entry = self.manifest["shards"][index]
            path = fmt._contained(self.path, entry["file"], f"{fmt.MANIFEST} shards[{index}].file")
            if not path.is_file():
                raise fmt.CacheError(f"shard {entry['file']} listed in {fmt.MANIFEST} is missing from {self.path}")
            shard = fmt.open_shard(path)
            _check_shard(shard, self.manifest, entry, path)
            self._shards[index] = shard
        return shard

    def __getitem__(self, index: int) -> dict:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for a cache of {self._length} sequences")
        which = bisect.bisect_right(self._starts, index) - 1
        shard = self._shard(which)
        local = index - self._starts[which]
        start, end = int(shard["seq_offsets"][local]), int(shard["seq_offsets"][local + 1])
        item = {"input_ids": torch.from_numpy(np.array(shard["input_ids"][start:end], dtype=np.int64))}
        if self.kind == "topk":
            ids, logprobs = fmt.unpack_topk(shard["topk"][start:end], self.manifest["vocab_size"],
                                            self.manifest["logprob_dtype"])
            item["teacher_ids"], item["teacher_logprobs"] = ids, logprobs
        else:
            item["teacher_byte_logprobs"] = torch.from_numpy(np.array(shard["byte_logprobs"][start:end], dtype=np.float32))
            item["teacher_token_logprobs"] = torch.from_numpy(np.array(shard["token_logprobs"][start:end], dtype=np.float32))
            item["teacher_byte_offsets"] = torch.from_numpy(np.array(shard["byte_offsets"][start:end], dtype=np.int64))
            t0, t1 = int(shard["text_offsets"][local]), int(shard["text_offsets"][local + 1])
            item["text"] = bytes(shard["text"][t0:t1]).decode("utf-8", errors="replace")
            text_bytes = t1 - t0
        self._check_item(item, which, local, None if self.kind == "topk" else text_bytes)
        return item

    def _check_item(self, item: dict, shard: int, local: int, text_bytes: Optional[int]) -> None:
        """Values a crafted shard could hold and a model would index with (a CUDA device assert,
        or a silently wrong alignment): token ids outside ``[0, vocab_size)``, teacher ids past
        V, byte offsets outside the sequence's text or reversed. O(T·K) on the host per item."""
        vocab = self.manifest["vocab_size"]
        where = f"{self.path / self.manifest['shards'][shard]['file']}: sequence {local}"
        ids = item["input_ids"]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise fmt.CacheError(f"{where}: tensor 'input_ids' holds ids in [{int(ids.min())}, {int(ids.max())}], "
                                 f"outside [0, vocab_size={vocab})")
        if text_bytes is None:
            teacher = item["teacher_ids"]
            if teacher.numel() and int(teacher.max()) >= vocab:
                raise fmt.CacheError(f"{where}: tensor 'topk' packs teacher id {int(teacher.max())}, outside "
                                     f"[0, vocab_size={vocab})")
            return
        offsets = item["teacher_byte_offsets"]
        if offsets.numel() and (int(offsets.min()) < 0 or int(offsets.max()) > text_bytes
                                or bool((offsets[:, 0] > offsets[:, 1]).any())):
            raise fmt.CacheError(f"{where}: tensor 'byte_offsets' holds spans outside the sequence's "
                                 f"{text_bytes} text bytes or reversed")

    def batches(self, batch_size: int, collator: Optional["CacheCollator"] = None) -> Iterator[dict]:
        """Padded batches of ``batch_size`` consecutive sequences (the last may be smaller)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        collator = collator or CacheCollator()
        for start in range(0, len(self), batch_size):
            yield collator([self[i] for i in range(start, min(start + batch_size, len(self)))])


def _check_shard(shard: dict, manifest: dict, entry: dict, path: Path) -> None:
    """Raises :class:`fastkd.cache.CacheError` naming ``path`` and the tensor when a shard's
    tensors do not have the layout of its kind (docs/cache.md): missing tensors, other dtypes or
    shapes, K other than the manifest's, offsets that do not start at 0, decrease, or end anywhere
    but at the end of the tokens (or text), counts other than the manifest entry's."""
    def bad(name: str, detail: str) -> fmt.CacheError:
        return fmt.CacheError(f"{path}: tensor {name!r} {detail}")

    sequences, tokens = entry["sequences"], entry["tokens"]
    expect = {"input_ids": (np.int32, (tokens,)), "seq_offsets": (np.int64, (sequences + 1,))}
    if manifest["kind"] == "topk":
        expect["topk"] = (np.uint32, (tokens, manifest["topk"]))
    else:
        expect.update(byte_logprobs=(np.float16, (tokens, 257)), token_logprobs=(np.float32, (tokens,)),
                      byte_offsets=(np.int64, (tokens, 2)), text=(np.uint8, None),
                      text_offsets=(np.int64, (sequences + 1,)))
    for name, (dtype, shape) in expect.items():
        if name not in shard:
            raise bad(name, f"is missing (a {manifest['kind']} shard holds {sorted(expect)})")
        array = shard[name]
        if array.dtype != dtype:
            raise bad(name, f"has dtype {array.dtype}, expected {np.dtype(dtype)}")
        if shape is not None and array.shape != shape:
            what = ("K differs from the manifest's topk" if name == "topk" and array.ndim == 2
                    and array.shape[0] == tokens else f"{fmt.MANIFEST} entry: {sequences} sequences, {tokens} tokens")
            raise bad(name, f"has shape {array.shape}, expected {shape} ({what})")
        if shape is None and array.ndim != 1:
            raise bad(name, f"must be 1-D, got shape {array.shape}")
    for name, end in (("seq_offsets", tokens), ("text_offsets", None)):
        if name not in expect:
            continue
        offsets = np.asarray(shard[name])
        end = len(shard["text"]) if end is None else end
        if offsets[0] != 0 or offsets[-1] != end:
            raise bad(name, f"must run from 0 to {end}, got {int(offsets[0])}..{int(offsets[-1])}")
        if len(offsets) > 1 and (np.diff(offsets) < 0).any():
            at = int(np.nonzero(np.diff(offsets) < 0)[0][0])
            raise bad(name, f"must not decrease; [{at}] = {int(offsets[at])} > [{at + 1}] = {int(offsets[at + 1])}")


class CacheCollator:
    """Pads a list of :class:`TeacherCache` top-k items to a ``(B, T)`` / ``(B, T, K)`` batch.

    Returns ``input_ids`` ``(B, T)`` int64 (right-padded with ``pad_token_id``),
    ``attention_mask`` ``(B, T)`` int64, ``labels`` ``(B, T)`` int64 (``input_ids``, and
    ``ignore_index`` at padding), ``teacher_ids`` ``(B, T, K)`` int64 (``-1`` at padding) and
    ``teacher_logprobs`` ``(B, T, K)`` float32 (0 at padding), aligned with ``input_ids`` as
    :func:`fastkd.integrations.compute_kd_loss` expects.

    Args:
        pad_token_id: default 0.
        ignore_index: default -100.
        max_length: None (default) or truncate sequences to this many tokens.
    """

    def __init__(self, pad_token_id: int = 0, ignore_index: int = -100, max_length: Optional[int] = None):
        for name, value in (("pad_token_id", pad_token_id), ("ignore_index", ignore_index)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral)
                                       or max_length < 2):
            raise ValueError(f"max_length must be None or an int >= 2, got {max_length!r}")
        self.pad_token_id, self.ignore_index, self.max_length = int(pad_token_id), int(ignore_index), max_length

    def __call__(self, items) -> dict:
        if not items:
            raise ValueError("items must hold at least one cache item")
        if "teacher_ids" not in items[0]:
            raise ValueError("items: CacheCollator pads top-k cache items; byte-level items need the "
                             "student's tokenisation and alignment (fastkd.align_batch)")
        cut = self.max_length
        seqs = [item["input_ids"][:cut] for item in items]
        rows, longest, k = len(items), max(len(s) for s in seqs), items[0]["teacher_ids"].shape[-1]
        input_ids = torch.full((rows, longest), self.pad_token_id, dtype=torch.int64)
        mask = torch.zeros((rows, longest), dtype=torch.int64)
        labels = torch.full((rows, longest), self.ignore_index, dtype=torch.int64)
        teacher_ids = torch.full((rows, longest, k), -1, dtype=torch.int64)
        teacher_logprobs = torch.zeros((rows, longest, k), dtype=torch.float32)
        for row, (item, seq) in enumerate(zip(items, seqs)):
            n = len(seq)
            input_ids[row, :n] = seq
            mask[row, :n] = 1
            labels[row, :n] = seq
            teacher_ids[row, :n] = item["teacher_ids"][:n]
            teacher_logprobs[row, :n] = item["teacher_logprobs"][:n]
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                "teacher_ids": teacher_ids, "teacher_logprobs": teacher_logprobs}
