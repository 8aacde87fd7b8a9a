"""Byte-level cross-tokenizer distillation (DESIGN.md §1 and §3, layer 4).

- :class:`ByteVocab` — the exact bytes of every token id, bucketed by first byte (``vocab``).
- :func:`align_tokenizations`, :func:`align_batch`, :func:`char_to_byte_offsets` — aligned rows
  of two tokenizations of the same text, and chunk boundaries (``align``).
- :func:`byte_logprobs`, :func:`byte_targets`, :func:`byte_kd_loss`, :class:`ByteKDLoss` —
  next-byte distributions from hidden states and the byte KD loss (``loss``).

See ``docs/bytes.md``.
"""
from .align import ByteAlignment, align_batch, align_tokenizations, char_to_byte_offsets
from .loss import ByteKDLoss, byte_kd_loss, byte_logprobs, byte_targets, resolve_byte_impl
from .vocab import N_BUCKETS, NO_BYTES, ByteVocab, bytes_to_unicode

__all__ = [
    "N_BUCKETS", "NO_BYTES", "ByteAlignment", "ByteKDLoss", "ByteVocab", "align_batch",
    "align_tokenizations", "byte_kd_loss", "byte_logprobs", "byte_targets", "bytes_to_unicode",
    "char_to_byte_offsets", "resolve_byte_impl",
]
