"""``ByteVocab``: the exact UTF-8 bytes of every token id of a tokenizer (DESIGN.md §1, bytes).

Byte-level cross-tokenizer distillation compares two models' distributions over the *next byte*.
A model's next-byte distribution at a token boundary is the first-byte marginal of its next-token
distribution, so each token id is put in a bucket by its first byte:

    bucket(v) = token_bytes[v][0]   in 0..255,    or NO_BYTES = 256 for a token without bytes

(special and unused ids). ``sorted_ids`` lists the ids sorted (stably) by bucket, so each bucket is
a contiguous run ``sorted_ids[bucket_offsets[b] : bucket_offsets[b + 1]]``: a kernel can take the
per-bucket log-sum-exp as a segmented reduction over contiguous vocabulary tiles, gathering the
LM-head rows through ``sorted_ids`` (the weight itself is never permuted or copied).

Supported tokenizers (Hugging Face ``tokenizers`` backends, i.e. every "fast" tokenizer):
- byte-level BPE (GPT-2, Llama-3, Qwen): token strings are in the GPT-2 byte-to-unicode alphabet;
- SentencePiece style (Llama-2, Mistral, T5, Gemma; ``Metaspace`` or ``Replace(" ", "▁")``):
  ``▁`` stands for a space and, with byte fallback, ``<0xNN>`` for the single byte NN;
- plain text pieces (no pre-tokenizer, no decoder): the token string is the text.
WordPiece/WordLevel models and pre-tokenizers that drop characters (whitespace splitting) are
rejected: their tokens do not say which bytes of the text they cover.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

NO_BYTES = 256
N_BUCKETS = 257
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_FINGERPRINT_VERSION = b"fastkd-bytevocab-v1"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, 0x7F–0xA0, 0xAD)
    map, in increasing byte order, to the characters from U+0100 on.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
                 + list(range(0xAE, 0xFF + 1)))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


# ``str.translate`` table taking a byte-level token string to the Latin-1 string of its bytes.
_BYTE_LEVEL_DECODE = {ord(char): byte for byte, char in bytes_to_unicode().items()}


@dataclass(frozen=True, eq=False)
class ByteVocab:
    """The bytes of every token id of one tokenizer, bucketed by first byte.

    Attributes:
        token_bytes: ``list[bytes]`` of length V; ``b""`` for ids without bytes.
        first_byte: ``(V,)`` int64 CPU tensor, the bucket of each id (0–255, or 256 = no bytes).
        lengths: ``(V,)`` int64 numpy array, ``len(token_bytes[v])``.
        sorted_ids: ``(V,)`` int64 CPU tensor, the ids sorted stably by ``first_byte``.
        bucket_offsets: ``(258,)`` int64 CPU tensor; bucket b is
            ``sorted_ids[bucket_offsets[b]:bucket_offsets[b + 1]]`` (empty when they are equal).
        kind: ``"byte_level"``, ``"sentencepiece"``, ``"text"`` or ``"bytes"`` (built directly).
        prefix_space: the tokenizer prepends a space (``▁``) to the text (SentencePiece's dummy
            prefix); :meth:`byte_offsets` then needs the text to place the tokens exactly.
        fingerprint: sha256 hex digest of the id → bytes table (for caches).
    """

    token_bytes: list
    first_byte: torch.Tensor
    lengths: np.ndarray
    sorted_ids: torch.Tensor
    bucket_offsets: torch.Tensor
    kind: str
    prefix_space: bool
    fingerprint: str
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_bytes(cls, token_bytes: Sequence[bytes], *, kind: str = "bytes",
                   prefix_space: bool = False) -> "ByteVocab":
        """A vocabulary from the byte string of every id (``b""`` for an id without bytes)."""
        if isinstance(token_bytes, (bytes, str)) or not isinstance(token_bytes, Sequence):
            raise TypeError(f"token_bytes must be a sequence of bytes, got {type(token_bytes).__name__}")
        table = []
        for i, piece in enumerate(token_bytes):
            if not isinstance(piece, (bytes, bytearray)):
                raise TypeError(f"token_bytes[{i}] must be bytes, got {type(piece).__name__}")
            table.append(bytes(piece))
        if not table:
            raise ValueError("token_bytes must hold at least one token")
        lengths = np.fromiter((len(p) for p in table), dtype=np.int64, count=len(table))
        first = np.fromiter((p[0] if p else NO_BYTES for p in table), dtype=np.int64, count=len(table))
        order = np.argsort(first, kind="stable")
        offsets = np.zeros(N_BUCKETS + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(np.bincount(first, minlength=N_BUCKETS))
        digest = hashlib.sha256(_FINGERPRINT_VERSION)
        digest.update(len(table).to_bytes(8, "little"))
        for piece in table:
            digest.update(len(piece).to_bytes(4, "little"))
            digest.update(piece)
        return cls(token_bytes=table, first_byte=torch.from_numpy(first), lengths=lengths,
                   sorted_ids=torch.from_numpy(order.astype(np.int64)),
                   bucket_offsets=torch.from_numpy(offsets), kind=kind,
                   prefix_space=bool(prefix_space), fingerprint=digest.hexdigest())

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: Optional[int] = None) -> "ByteVocab":
        """The byte table of a Hugging Face tokenizer.

        Args:
            tokenizer: a ``transformers`` fast tokenizer (anything with ``.backend_tokenizer``)
                or a ``tokenizers.Tokenizer``.
            vocab_size: the LM head's number of rows V, default None (the tokenizer's size,
                added tokens included). Larger heads (vocabularies padded to a multiple of 64)
                give the extra ids no bytes.

        Added tokens marked special get no bytes (bucket 256). Added tokens that are not special
        match their literal content in the text, so they get its UTF-8 bytes. Byte tokens
        ``<0xNN>`` of a byte-fallback tokenizer stand for the byte NN however they are registered
        (in the model's vocabulary, or also or only as added/special tokens, as tokenizers trained
        with the ``tokenizers`` library often list them): they get that one byte, while true
        control tokens (``<s>``, ``<|im_start|>``, ...) keep none.

        Raises:
            TypeError: ``tokenizer`` is not backed by the ``tokenizers`` library.
            ValueError: a WordPiece/WordLevel model, or a pre-tokenizer/decoder that drops or
                rewrites characters, so tokens do not give exact bytes.
        """
        backend = _backend(tokenizer)
        spec = json.loads(backend.to_str())
        kind, replacement, byte_fallback, prefix_space = _tokenizer_kind(spec)
        size = backend.get_vocab_size(with_added_tokens=True)
        added = {int(i): token for i, token in backend.get_added_tokens_decoder().items()}
        size = max([size] + [i + 1 for i in added])
        if vocab_size is not None:
            if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < size:
                raise ValueError(
                    f"vocab_size must be an int >= the tokenizer's size {size} (the LM head's rows), "
                    f"got {vocab_size!r}")
            size = vocab_size
        table = []
        for token_id in range(size):
            if token_id in added:
                token = added[token_id]
                byte = _BYTE_PIECE.match(token.content) if byte_fallback else None
                if byte:  # a byte-fallback token registered as an added/special token: its byte
                    table.append(bytes([int(byte.group(1), 16)]))
                else:
                    table.append(b"" if token.special else token.content.encode("utf-8"))
                continue
            piece = backend.id_to_token(token_id)
            table.append(b"" if piece is None else _piece_bytes(piece, kind, replacement, byte_fallback))
        return cls.from_bytes(table, kind=kind, prefix_space=prefix_space)

    def __getstate__(self) -> dict:
        # Picklable for DataLoader workers without the per-device copies (CUDA tensors among them).
        return {**self.__dict__, "_device_cache": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------------------------------
    # queries
    # ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.token_bytes)

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    def __repr__(self) -> str:
        empty = int((self.bucket_offsets[1:] == self.bucket_offsets[:-1]).sum())
        return (f"ByteVocab(V={len(self)}, kind={self.kind!r}, prefix_space={self.prefix_space}, "
                f"no_bytes={int(self.bucket_sizes[NO_BYTES])}, empty_buckets={empty}, "
                f"fingerprint={self.fingerprint[:12]}…)")

    @property
    def bucket_sizes(self) -> torch.Tensor:
        """``(257,)`` int64: the number of ids in each bucket."""
        return self.bucket_offsets[1:] - self.bucket_offsets[:-1]

    def decode(self, ids) -> bytes:
        """The concatenated bytes of ``ids`` (special tokens contribute nothing)."""
        table = self.token_bytes
        return b"".join([table[i] for i in _as_numpy_ids(ids, len(self), "ids").tolist()])

    def byte_offsets(self, ids, text: Optional[str | bytes] = None) -> np.ndarray:
        """Exact ``[start, end)`` byte offsets of each token, ``(n, 2)`` int64 numpy.

        Offsets are the running sums of the tokens' byte lengths; a token without bytes gets an
        empty span where it stands. With ``text`` they are checked against the text's UTF-8 bytes:
        the tokens must spell the text exactly, or the text with one space in front when the
        tokenizer prepends one (SentencePiece's dummy prefix). In that case the offsets are
        shifted so that 0 is the text's first byte and the first byte-bearing token starts at -1
        (its space is not in the text): the row before it then predicts a byte the other
        tokenizer never sees, and :func:`fastkd.align_tokenizations` does not align it.

        Raises:
            ValueError: ids out of range; ``text`` missing for a tokenizer with ``prefix_space``;
                or the tokens do not spell ``text`` (a normaliser that rewrites text, ``<unk>``
                pieces): use :func:`fastkd.bytes.char_to_byte_offsets` on the tokenizer's
                ``offset_mapping`` instead.
        """
        ids = _as_numpy_ids(ids, len(self), "ids")
        if text is None and self.prefix_space:
            raise ValueError(
                "text is needed: this tokenizer prepends a space to the text (prefix_space=True), "
                "and only the text tells whether the first token's space is in it; offsets of the "
                "token bytes alone would be one byte off the other tokenizer's")
        lengths = self.lengths[ids]
        ends = np.cumsum(lengths)
        shift = 0
        if text is not None:
            data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
            table = self.token_bytes
            spelled = b"".join([table[i] for i in ids.tolist()])
            if spelled == data:
                shift = 0
            elif spelled == b" " + data:
                shift = 1
            else:
                at = next((k for k, (a, b) in enumerate(zip(spelled, data)) if a != b),
                          min(len(spelled), len(data)))
                raise ValueError(
                    f"ids do not spell text: they give {len(spelled)} bytes, the text has "
                    f"{len(data)}, first difference at byte {at} ({spelled[at:at + 12]!r} vs "
                    f"{data[at:at + 12]!r}); the tokenizer may normalise the text or emit <unk>: "
                    "use fastkd.bytes.char_to_byte_offsets on its offset_mapping instead")
        ends = ends - shift
        starts = ends - lengths
        empty = lengths == 0
        starts = np.where(empty, np.maximum(starts, 0), starts)
        ends = np.where(empty, np.maximum(ends, 0), ends)
        return np.stack([starts, ends], axis=1).astype(np.int64)

    def device_tensors(self, device: torch.device) -> dict:
        """``first_byte``, ``sorted_ids`` (int32) and ``bucket_of_sorted`` (int32) on ``device``,
        copied once per device and cached."""
        device = torch.device(device)
        key = (device.type, device.index)
        cached = self._device_cache.get(key)
        if cached is None:
            sorted_buckets = self.first_byte[self.sorted_ids]
            cached = {
                "first_byte": self.first_byte.to(device),
                "sorted_ids": self.sorted_ids.to(torch.int32).to(device),
                "bucket_of_sorted": sorted_buckets.to(torch.int32).to(device),
            }
            self._device_cache[key] = cached
        return cached

    def range_plan(self, block: int, n_ranges: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Split of the sorted vocabulary into ``n_ranges`` runs of whole ``block``-wide tiles.

        Returns ``range_start (G+1,)`` int32 (sorted positions) and ``part_bucket (G, 2)`` int64:
        the first and the last bucket of each range (the last is ``N_BUCKETS`` when the range
        holds a single bucket). A bucket cut by a range boundary is summed from the partial
        log-sum-exps of the ranges that share it; the others are complete inside one range.
        """
        device = torch.device(device)
        key = ("plan", block, n_ranges, device.type, device.index)
        cached = self._device_cache.get(key)
        if cached is None:
            vocab = len(self)
            n_tiles = -(-vocab // block)
            n_ranges = max(1, min(n_ranges, n_tiles))
            tiles = np.linspace(0, n_tiles, n_ranges + 1).round().astype(np.int64)
            starts = np.minimum(tiles * block, vocab)
            sorted_buckets = self.first_byte[self.sorted_ids].numpy()
            head = sorted_buckets[starts[:-1]]
            tail = sorted_buckets[starts[1:] - 1]
            parts = np.stack([head, np.where(tail == head, N_BUCKETS, tail)], axis=1)
            cached = (torch.from_numpy(starts.astype(np.int32)).to(device),
                      torch.from_numpy(parts.astype(np.int64)).to(device))
            self._device_cache[key] = cached
        return cached


# ------------------------------------------------------------------------------------------------
# tokenizer inspection
# ------------------------------------------------------------------------------------------------

def _backend(tokenizer):
    try:
        from tokenizers import Tokenizer
    except ImportError as err:  # pragma: no cover - transformers depends on tokenizers
        raise TypeError("ByteVocab.from_tokenizer needs the `tokenizers` library") from err
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise TypeError(
        "tokenizer must be a Hugging Face fast tokenizer (with .backend_tokenizer) or a "
        f"tokenizers.Tokenizer, got {type(tokenizer).__name__}; for another tokenizer build the "
        "table yourself with ByteVocab.from_bytes(list_of_token_bytes)")


def _components(node) -> list[dict]:
    """A normaliser/pre-tokenizer/decoder spec flattened through ``Sequence`` nodes."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        children = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders") or []
        return [leaf for child in children for leaf in _components(child)]
    return [node]


def _pattern(node) -> Optional[str]:
    pattern = node.get("pattern")
    if isinstance(pattern, dict):
        return pattern.get("String")
    return pattern


def _tokenizer_kind(spec: dict) -> tuple[str, str, bool, bool]:
    """``(kind, replacement, byte_fallback, prefix_space)`` of a ``tokenizer.json`` spec."""
    model = spec.get("model") or {}
    model_type = model.get("type")
    if model_type in ("WordPiece", "WordLevel"):
        raise ValueError(
            f"tokenizer has a {model_type} model: it drops the whitespace between words and marks "
            "word pieces with a prefix, so a token does not say which bytes of the text it covers; "
            "byte-level alignment needs a byte-level BPE, SentencePiece-style or plain-text tokenizer")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(
            "tokenizer's model marks word boundaries with a continuing_subword_prefix/"
            "end_of_word_suffix, so its tokens are not the text's bytes; byte-level alignment "
            "needs a byte-level BPE, SentencePiece-style or plain-text tokenizer")
    normalizers = _components(spec.get("normalizer"))
    pre_tokenizers = _components(spec.get("pre_tokenizer"))
    decoders = _components(spec.get("decoder"))
    types = {node.get("type") for node in normalizers + pre_tokenizers + decoders}
    byte_fallback = bool(model.get("byte_fallback")) or "ByteFallback" in types
    if "ByteLevel" in types:
        return "byte_level", "", False, False
    replacement = None
    prefix_space = False
    for node in pre_tokenizers:
        if node.get("type") == "Metaspace":
            replacement = node.get("replacement", "\u2581")
            prefix_space = node.get("prepend_scheme", "always") in ("always", "first")
    for node in decoders:
        if node.get("type") == "Metaspace":
            replacement = replacement or node.get("replacement", "\u2581")
    for node in normalizers:
        if node.get("type") == "Replace" and _pattern(node) == " " and len(node.get("content", "")) == 1:
            replacement = node["content"]
        if node.get("type") == "Prepend":
            prefix_space = True
    for node in decoders:
        if node.get("type") == "Replace" and len(_pattern(node) or "") == 1 and node.get("content") == " ":
            replacement = replacement or _pattern(node)
    if replacement is not None:
        dropping = {"Whitespace", "WhitespaceSplit", "BertPreTokenizer"} & {n.get("type") for n in pre_tokenizers}
        if dropping:
            raise ValueError(f"tokenizer's pre-tokenizer {sorted(dropping)} drops whitespace: its "
                             "tokens do not give the text's exact bytes")
        return "sentencepiece", replacement, byte_fallback, prefix_space
    if not pre_tokenizers and not decoders:
        return "text", "", byte_fallback, False
    names = sorted({node.get("type") for node in pre_tokenizers + decoders})
    raise ValueError(
        f"tokenizer's pre-tokenizer/decoder {names} is not byte-level (ByteLevel) nor "
        "SentencePiece-style (Metaspace / Replace(' ', '▁')): fastkd cannot tell which bytes its "
        "tokens cover; build the table with ByteVocab.from_bytes if you know them")


def _piece_bytes(piece: str, kind: str, replacement: str, byte_fallback: bool) -> bytes:
    if kind == "byte_level":
        try:
            return piece.translate(_BYTE_LEVEL_DECODE).encode("latin-1")
        except UnicodeEncodeError as err:
            raise ValueError(f"byte-level token {piece!r} has a character outside the "
                             "byte-to-unicode alphabet") from err
    if byte_fallback:
        match = _BYTE_PIECE.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
    if kind == "sentencepiece":
        piece = piece.replace(replacement, " ")
    return piece.encode("utf-8")


def _as_numpy_ids(ids, vocab: int, name: str) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        array = ids.detach().cpu().numpy()
    else:
        array = np.asarray(ids)
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"{name} must hold integer token ids, got dtype {array.dtype}")
    array = array.astype(np.int64).reshape(-1) if array.ndim <= 1 else None
    if array is None:
        raise ValueError(f"{name} must be one sequence of ids (1-D), got shape {np.shape(ids)}")
    if array.size and (array.min() < 0 or array.max() >= vocab):
        raise ValueError(f"{name} must be in [0, {vocab}), got values in [{array.min()}, {array.max()}]")
    return array
