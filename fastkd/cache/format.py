"""On-disk format of a teacher cache (DESIGN.md §4, docs/cache.md): manifest, shards, checksums.

A cache is a directory::

    manifest.json            format version, teacher, tokenizer fingerprint, K, temperature, ...
    shard-00000.safetensors  sequences [0, s1)
    shard-00001.safetensors  sequences [s1, s2)
    ...

Every shard is a safetensors file (read back memory-mapped, see :func:`open_shard`) with

    ``input_ids``    ``(T,)`` int32: the tokens of its sequences, concatenated;
    ``seq_offsets``  ``(S + 1,)`` int64: sequence i is ``input_ids[seq_offsets[i]:seq_offsets[i+1]]``;

and, for a top-k cache, ``topk`` ``(T, K)`` uint32: one packed word per (id, log-prob) entry
(4 bytes, see :func:`pack_topk`). Row t is the teacher's distribution of token t+1 (aligned with
the model's logits; the last row of a sequence is the distribution after its last token). A
byte-level cache has ``byte_logprobs`` ``(T, 257)`` float16, ``token_logprobs`` ``(T,)`` float32
(``log q(token t+1)``, 0 on the last row), ``byte_offsets`` ``(T, 2)`` int64 and the UTF-8 text
``text`` ``(B,)`` uint8 with ``text_offsets`` ``(S + 1,)`` int64.

Shards and the manifest are written to ``NAME.tmp``, fsynced and renamed (:func:`atomic_write`):
a killed writer leaves complete files or ``*.tmp`` leftovers, never half a file under its name.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("topk", "bytes")
# 16-bit log-prob formats a top-k cache packs (both fit a 4-byte entry; float32 does not).
LOGPROB_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Mantissa bits of each 16-bit format (its magnitude is 15 bits: exponent + mantissa).
_MANTISSA_BITS = {"fp16": 10, "bf16": 7}
# At least this many bits stay for the log-prob: 5 exponent + 7 mantissa bits of fp16 (bf16's
# precision) or 8 + 4 of bf16. Caps the id width at 20 bits, V < 2^20.
_MIN_LOGPROB_BITS = 12
_SAFETENSORS_DTYPES = {"U8": np.uint8, "I32": np.int32, "I64": np.int64, "U32": np.uint32,
                       "F16": np.float16, "F32": np.float32}


class CacheError(ValueError):
    """A cache directory that is not what its manifest says (missing shard, checksum mismatch)."""


# ----------------------------------------------------------------------------------------------
# packing of (id, log-prob) entries into 4 bytes
# ----------------------------------------------------------------------------------------------

def id_bits(vocab_size: int) -> int:
    """Bits of the id field for a vocabulary of ``vocab_size``: ids are stored as ``id + 1`` (0 is
    an unused slot, ``-1``), so values ``0..V`` need ``V.bit_length()`` bits."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    bits = max(1, int(vocab_size).bit_length())
    if 32 - bits < _MIN_LOGPROB_BITS:
        raise ValueError(
            f"vocab_size={vocab_size} needs {bits} id bits, leaving {32 - bits} < {_MIN_LOGPROB_BITS} "
            f"bits for the log-prob in a 4-byte entry; vocabularies up to {2**20 - 1} ids are supported")
    return bits


def logprob_error_bound(vocab_size: int, dtype: str) -> tuple[float, float]:
    """``(relative, absolute)``: a stored log-prob x decodes to y with ``|y − x| ≤ relative·|x| +
    absolute``. ``relative`` is one unit in the last kept mantissa bit (rounding gives half of
    it); ``absolute`` is the spacing of the kept subnormals (fp16: ``2⁻²⁴`` times 2 per dropped
    bit; bf16: ``2⁻¹³³``, i.e. none in practice)."""
    lp_bits = 32 - id_bits(vocab_size)
    dropped = max(0, 15 - lp_bits)
    mantissa = _MANTISSA_BITS[_check_dtype(dtype)] - dropped
    smallest = 2.0 ** -24 if dtype == "fp16" else 2.0 ** -133
    return 2.0 ** -mantissa, smallest * 2.0 ** dropped


def _check_dtype(dtype: str) -> str:
    if dtype not in LOGPROB_DTYPES:
        raise ValueError(
            f"dtype must be one of {sorted(LOGPROB_DTYPES)} (a 4-byte (id, log-prob) entry has room "
            f"for a 16-bit log-prob at most), got {dtype!r}")
    return dtype


def pack_topk(ids: torch.Tensor, logprobs: torch.Tensor, vocab_size: int, dtype: str) -> np.ndarray:
    """``(..., K)`` ids and log-probs → ``(..., K)`` uint32 words ``(id + 1) << L | code``.

    ``L = 32 − id_bits(V)``. ``code`` is the log-prob rounded to ``dtype`` (fp16/bf16) with its
    sign bit dropped (log-probs are ≤ 0): all 16 bits when ``L = 16`` (the sign then kept), the 15
    magnitude bits when ``L = 15`` (both exact ``dtype``), else the magnitude rounded to nearest
    on its ``L`` top bits (``15 − L`` mantissa bits fewer). Ids are exact. ``-1`` ids (unused
    slots) are stored as 0 with log-prob ``-inf``. Positive log-probs (rounding of a teacher
    that sums above 1) are clamped to 0.

    Raises:
        ValueError: ids outside ``[-1, V)``, NaN log-probs, shapes that differ.
    """
    dtype = _check_dtype(dtype)
    if ids.shape != logprobs.shape:
        raise ValueError(f"teacher ids {tuple(ids.shape)} and log-probs {tuple(logprobs.shape)} must "
                         "have the same shape")
    bits = id_bits(vocab_size)
    lp_bits = 32 - bits
    ids = ids.detach().to("cpu", torch.int64)
    logprobs = logprobs.detach().to("cpu", torch.float32)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= vocab_size):
        raise ValueError(f"teacher ids must be in [-1, {vocab_size}) (vocab_size={vocab_size}), got "
                         f"values in [{int(ids.min())}, {int(ids.max())}]")
    if torch.isnan(logprobs).any():
        raise ValueError("teacher log-probs contain NaN")
    unused = ids < 0
    logprobs = torch.where(unused, float("-inf"), logprobs.clamp(max=0.0))
    raw = logprobs.to(LOGPROB_DTYPES[dtype]).view(torch.int16).to(torch.int64) & 0xFFFF
    if lp_bits >= 16:
        code = raw
    else:
        magnitude = raw & 0x7FFF
        drop = 15 - lp_bits
        if drop:
            # round to nearest; a carry into the exponent is the correct rounding, capped at +inf's
            rounded = (magnitude + (1 << (drop - 1))) >> drop
            magnitude = torch.minimum(rounded, torch.full_like(rounded, 0x7FFF >> drop))
        code = magnitude
    words = ((ids + 1) << lp_bits) | code
    return words.numpy().astype(np.uint32)


def unpack_topk(words, vocab_size: int, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_topk`: ``(ids int64 (-1 unused), log-probs float32)`` tensors."""
    dtype = _check_dtype(dtype)
    lp_bits = 32 - id_bits(vocab_size)
    words = torch.from_numpy(np.asarray(words, dtype=np.uint32).astype(np.int64))
    ids = (words >> lp_bits) - 1
    code = words & ((1 << lp_bits) - 1)
    if lp_bits >= 16:
        raw = code & 0xFFFF
    else:
        raw = 0x8000 | (code << (15 - lp_bits))
    raw = torch.where(raw >= 0x8000, raw - 0x10000, raw).to(torch.int16)
    logprobs = raw.view(LOGPROB_DTYPES[dtype]).to(torch.float32)
    logprobs = torch.where(ids < 0, 0.0, logprobs)
    return ids, logprobs


# ----------------------------------------------------------------------------------------------
# fingerprints
# ----------------------------------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 hex digest of a Hugging Face tokenizer's id → token table and its special tokens.

    Hashes ``"fastkd-tokenizer-v1"``, then every id ``0..len(tokenizer)-1`` with its token string
    (``convert_ids_to_tokens``, added tokens included), then the sorted special-token map. Two
    tokenizers with the same fingerprint map text to the same ids as far as a cache cares.
    """
    if not callable(getattr(tokenizer, "convert_ids_to_tokens", None)):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    size = len(tokenizer)
    digest = hashlib.sha256(b"fastkd-tokenizer-v1")
    digest.update(size.to_bytes(8, "little"))
    for token in tokenizer.convert_ids_to_tokens(list(range(size))):
        piece = ("" if token is None else str(token)).encode("utf-8")
        digest.update(len(piece).to_bytes(4, "little"))
        digest.update(piece)
    special = getattr(tokenizer, "special_tokens_map", {}) or {}
    digest.update(json.dumps({k: str(v) for k, v in special.items()}, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------

def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path, data: bytes) -> None:
    """Writes ``data`` to ``path.tmp``, fsyncs it, renames it to ``path`` and fsyncs the directory."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms: the rename still happened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


_NUMPY_TO_SAFETENSORS = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A safetensors file, byte-for-byte deterministic: tensors in name order, header JSON with
    sorted keys, padded with spaces to 8 bytes (the library's writer orders metadata by hash, so
    two runs could differ in their bytes and checksums)."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        code = _NUMPY_TO_SAFETENSORS.get(array.dtype)
        if code is None:
            raise TypeError(f"shard tensor {name!r}: dtype {array.dtype} is not stored by fastkd caches")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def write_shard(directory, index: int, tensors: dict[str, np.ndarray]) -> dict:
    """Writes shard ``index`` atomically; returns its manifest entry (file, counts, sha256, bytes)."""
    data = safetensors_bytes(tensors, {"format": "fastkd-cache", "format_version": str(FORMAT_VERSION)})
    name = shard_name(index)
    atomic_write(Path(directory) / name, data)
    offsets = tensors["seq_offsets"]
    return {"file": name, "sequences": int(len(offsets) - 1), "tokens": int(offsets[-1]),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def open_shard(path) -> dict[str, np.ndarray]:
    """The tensors of a shard as read-only ``numpy.memmap`` views (no copy; pages load on access).

    The header is checked before anything is mapped: a JSON object whose entries have a known
    dtype, a shape of non-negative ints and ``data_offsets`` ``[start, end]`` with
    ``0 <= start <= end``, ``end - start`` equal to the shape's byte size and ``end`` inside the
    file. Raises :class:`CacheError` naming the file and the tensor otherwise.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise CacheError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        length = int.from_bytes(head, "little")
        if length > 100_000_000:
            raise CacheError(f"{path}: not a safetensors file (header length {length})")
        raw = handle.read(length)
    if len(raw) != length:
        raise CacheError(f"{path}: header length {length} runs past the end of the file")
    try:
        header = json.loads(raw)
    except ValueError as error:
        raise CacheError(f"{path}: unreadable safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise CacheError(f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}")
    size = path.stat().st_size
    base = 8 + length
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape, dtype, start, end = _tensor_entry(path, name, info)
        if base + end > size:
            raise CacheError(f"{path}: tensor {name!r} (data_offsets {start}..{end}) does not fit the "
                             f"{size - base} data bytes of the file")
        if end == start:
            out[name] = np.zeros(shape, dtype=dtype)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=base + start, shape=shape)
    return out


def _tensor_entry(path: Path, name: str, info) -> tuple[tuple, type, int, int]:
    """``(shape, numpy dtype, start, end)`` of one header entry, checked (see :func:`open_shard`)."""
    def bad(field: str, detail: str) -> CacheError:
        return CacheError(f"{path}: tensor {name!r}: header field {field!r} {detail}")

    if not isinstance(info, dict):
        raise bad("(entry)", f"must be an object, got {type(info).__name__}")
    dtype = _SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise bad("dtype", f"is {info.get('dtype')!r}, expected one of {sorted(_SAFETENSORS_DTYPES)}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise bad("shape", f"must be a list of ints >= 0, got {shape!r}")
    offsets = info.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(n) for n in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad("data_offsets", f"must be [start, end] with 0 <= start <= end, got {offsets!r}")
    start, end = offsets
    nbytes = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize if shape else np.dtype(dtype).itemsize
    if end - start != nbytes:
        raise bad("data_offsets", f"{offsets} span {end - start} bytes, but shape {shape} of "
                                  f"{info['dtype']} needs {nbytes}")
    return tuple(shape), dtype, start, end


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def write_manifest(directory, manifest: dict) -> None:
    atomic_write(Path(directory) / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def read_manifest(directory) -> dict:
    """``manifest.json`` of a cache, checked field by field (:func:`check_manifest`)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{directory}: no {MANIFEST}; not a fastkd teacher cache (or its capture "
                         "never finished a shard)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CacheError(f"{path}: not valid JSON ({error})") from None
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest, path) -> None:
    """Raises :class:`CacheError` naming ``path`` and the field when a manifest is malformed.

    A manifest may come from elsewhere: every field the readers use is checked for its type and
    range (object, ``format_version``, ``kind``, ``vocab_size``, ``topk`` (top-k caches),
    ``logprob_dtype``, ``temperature``, ``complete``, ``shards``: a list of objects with a
    plain ``file`` name, ``sequences``/``tokens`` ints >= 0 and a 64-hex ``sha256``; no file listed
    twice; the totals ``sequences``/``tokens`` equal to the shards' sums).
    """
    def bad(field: str, detail: str) -> CacheError:
        return CacheError(f"{path}: field {field!r} {detail}")

    if not isinstance(manifest, dict):
        raise CacheError(f"{path}: must be a JSON object, got a JSON {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(f"{path}: field 'format_version' is {version!r}, this fastkd reads {FORMAT_VERSION}")
    if not isinstance(manifest.get("kind"), str) or manifest["kind"] not in KINDS:
        raise CacheError(f"{path}: field 'kind' is {manifest.get('kind')!r}, expected one of {KINDS}")
    for field in ("vocab_size",) + (("topk",) if manifest["kind"] == "topk" else ()):
        value = manifest.get(field)
        if not _is_int(value) or value < 1:
            raise bad(field, f"must be an int >= 1, got {value!r}" + (" (missing)" if field not in manifest else ""))
    if manifest["kind"] == "topk":
        try:
            id_bits(manifest["vocab_size"])
        except ValueError as error:
            raise bad("vocab_size", str(error)) from None
    if not isinstance(manifest.get("logprob_dtype"), str) or manifest["logprob_dtype"] not in LOGPROB_DTYPES:
        raise bad("logprob_dtype", f"must be one of {sorted(LOGPROB_DTYPES)}, got {manifest.get('logprob_dtype')!r}")
    temperature = manifest.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise bad("temperature", f"must be a number > 0, got {temperature!r}")
    if not isinstance(manifest.get("complete"), bool):
        raise bad("complete", f"must be true or false, got {manifest.get('complete')!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise bad("shards", f"must be a list of shard entries, got {shards!r}" if "shards" in manifest
                  else "is missing (the list of shard entries)")
    seen = set()
    for index, entry in enumerate(shards):
        where = f"shards[{index}]"
        if not isinstance(entry, dict):
            raise bad(where, f"must be an object, got {type(entry).__name__}")
        if "file" not in entry:
            raise bad(f"{where}.file", "is missing")
        _contained(Path(path).parent, entry["file"], f"{path}: field '{where}.file'")
        if entry["file"] in seen:
            raise bad(f"{where}.file", f"{entry['file']!r} is listed twice")
        seen.add(entry["file"])
        for field in ("sequences", "tokens"):
            value = entry.get(field)
            if not _is_int(value) or value < 0:
                raise bad(f"{where}.{field}", f"must be an int >= 0, got {value!r}")
        digest = entry.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise bad(f"{where}.sha256", f"must be 64 lowercase hex digits, got {digest!r}")
    for field in ("sequences", "tokens"):
        total = sum(entry[field] for entry in shards)
        if manifest.get(field) != total:
            raise bad(field, f"is {manifest.get(field)!r}, but the shards hold {total}")


def _contained(directory: Path, name, where: str) -> Path:
    from .._paths import contained_file

    return contained_file(directory, name, where=where, error=CacheError)


def verify_shard(directory, entry: dict) -> None:
    """Raises :class:`CacheError` naming the shard when it is missing or its sha256 differs.

    ``entry["file"]`` must be a plain name that stays inside ``directory`` (no ``..``, no
    absolute path, no symlink out); nothing outside is ever hashed or reported."""
    path = _contained(Path(directory), entry.get("file"), f"{MANIFEST} shard entry")
    if not path.is_file():
        raise CacheError(f"shard {entry['file']} listed in {MANIFEST} is missing from {directory}")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise CacheError(
            f"shard {entry['file']} is corrupted: sha256 {actual} != {entry['sha256']} recorded in "
            f"{MANIFEST} (re-run the capture with --resume after deleting it and its manifest entry, "
            "or re-import)")


def new_manifest(kind: str, *, teacher: str, fingerprint: Optional[str], fingerprint_kind: str,
                 vocab_size: int, topk: Optional[int], temperature: float, dtype: str,
                 source: dict[str, Any]) -> dict:
    manifest = {
        "format": "fastkd-cache", "format_version": FORMAT_VERSION, "kind": kind,
        "teacher": teacher, "tokenizer_fingerprint": fingerprint, "fingerprint_kind": fingerprint_kind,
        "vocab_size": int(vocab_size), "topk": topk, "temperature": float(temperature),
        "logprob_dtype": dtype, "source": source, "complete": False,
        "shards": [], "sequences": 0, "tokens": 0,
    }
    if kind == "topk":
        manifest["id_bits"] = id_bits(vocab_size)
        manifest["bytes_per_entry"] = 4
        manifest["logprob_error"] = dict(zip(("relative", "absolute"), logprob_error_bound(vocab_size, dtype)))
    return manifest


def add_shard(manifest: dict, entry: dict) -> None:
    manifest["shards"].append(entry)
    manifest["sequences"] = sum(s["sequences"] for s in manifest["shards"])
    manifest["tokens"] = sum(s["tokens"] for s in manifest["shards"])
