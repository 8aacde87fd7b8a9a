"""Alignment of two tokenizations of the same text at shared byte boundaries (DESIGN.md §1).

Token t of a sequence covers the bytes ``[start_t, end_t)`` of the UTF-8 text; its hidden state
(row t) predicts token t+1. Row t *predicts from byte boundary e* when ``end_t = e`` and the next
token starts there (``start_{t+1} = e``): the first byte of token t+1 is then the text's byte e,
and the model's first-byte marginal is a next-byte distribution at e.

Tokens without bytes (BOS, EOS, other specials) take no room: several rows can sit at the same
byte e. A row's *position* is therefore ``(e, k)`` with k the number of byte-less tokens at e up
to and including it (0 for the byte-bearing token that ends at e). A student row i and a teacher
row j are **aligned** when both predict from a boundary, their positions are equal, and their next
tokens are of the same kind (both byte-less or both byte-bearing): both models have read the same
bytes and the same number of specials, and predict the same next event.

Between consecutive aligned pairs m-1 and m of one sequence, the student's tokens
``i_{m-1}+1 .. i_m`` and the teacher's ``j_{m-1}+1 .. j_m`` spell the same bytes: a *chunk*. Its
log-likelihood under each model is the sum of the rows ``[i_{m-1}, i_m)`` (student) and
``[j_{m-1}, j_m)`` (teacher) of that model's token log-probabilities (ALM's chunk likelihood).

The work is a handful of vectorised NumPy passes over the concatenated batch and one
``searchsorted``; ``bench/bytes_align.py`` measures it against tokenising the same batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class ByteAlignment:
    """Aligned rows of a batch, for :func:`fastkd.byte_kd_loss`.

    Rows are flattened: the row of token i of sequence b is ``b * stride + i`` (the hidden states
    of a ``(B, T, D)`` batch reshaped to ``(B*T, D)`` with ``stride = T``).

    Attributes:
        pairs: ``(M, 2)`` int64, (student row, teacher row) of each aligned pair, sorted by
            sequence then byte offset (both columns increase within a sequence).
        sequence: ``(M,)`` int64, the batch index of each pair.
        offset: ``(M,)`` int64, the byte offset e of the boundary both rows predict from.
        chunk_mask: ``(M,)`` bool, True when pair m closes a chunk that opens at pair m-1 (the
            previous pair is in the same sequence).
        student_stride, teacher_stride: rows per sequence in the flattened hidden states.
    """

    pairs: torch.Tensor
    sequence: torch.Tensor
    offset: torch.Tensor
    chunk_mask: torch.Tensor
    student_stride: int
    teacher_stride: int

    def __len__(self) -> int:
        return self.pairs.shape[0]

    def to(self, device) -> "ByteAlignment":
        """The same alignment with its tensors on ``device`` (non-blocking copies)."""
        pairs, sequence, offset, chunk_mask = (
            t.to(device, non_blocking=True) for t in (self.pairs, self.sequence, self.offset, self.chunk_mask))
        return ByteAlignment(pairs, sequence, offset, chunk_mask, self.student_stride, self.teacher_stride)


def align_tokenizations(student_offsets, teacher_offsets) -> torch.Tensor:
    """Aligned (student token i, teacher token j) pairs of one text, ``(M, 2)`` int64.

    Args:
        student_offsets: ``(n_s, 2)`` int byte offsets ``[start, end)`` of the student's tokens
            in the UTF-8 text (numpy, torch or nested lists): ``start <= end``, ends
            non-decreasing, ``end >= 0``. :meth:`fastkd.ByteVocab.byte_offsets` computes them
            exactly from token ids; :func:`fastkd.bytes.char_to_byte_offsets` converts a
            tokenizer's character ``offset_mapping``.
        teacher_offsets: ``(n_t, 2)`` likewise for the teacher's tokens.

    Returns:
        ``(M, 2)`` int64 CPU tensor, sorted by byte offset; row i of the student and row j of the
        teacher predict the next token from the same byte boundary (see the module docstring).
    """
    student = _offsets_array(student_offsets, "student_offsets")
    teacher = _offsets_array(teacher_offsets, "teacher_offsets")
    result = _align_flat([student], [teacher], None, None)
    return torch.from_numpy(np.stack([result[0], result[1]], axis=1))


def align_batch(
    student_offsets: Sequence,
    teacher_offsets: Sequence,
    *,
    student_stride: Optional[int] = None,
    teacher_stride: Optional[int] = None,
) -> ByteAlignment:
    """Aligned rows of a batch of texts, each tokenised by both tokenizers (the collator form).

    Args:
        student_offsets: a sequence of B arrays ``(n_s[b], 2)``: the student's byte offsets of
            each text (as in :func:`align_tokenizations`).
        teacher_offsets: B arrays ``(n_t[b], 2)``: the teacher's byte offsets of the same texts.
        student_stride: rows per sequence in the student's flattened hidden states, default
            ``max(n_s)`` (hidden states of a padded ``(B, T, D)`` batch with ``T = max(n_s)``).
            Pass ``T - 1`` when the last position was cut off; a pair never uses a sequence's
            last token (it predicts nothing inside the text).
        teacher_stride: likewise for the teacher, default ``max(n_t)``.

    Returns:
        a :class:`ByteAlignment` with CPU tensors (``.to(device)`` moves them).
    """
    for name, value in (("student_offsets", student_offsets), ("teacher_offsets", teacher_offsets)):
        if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 2:
            raise TypeError(f"{name} must be a sequence of per-text (n, 2) offset arrays, got one "
                            f"2-D array (use align_tokenizations for a single text)")
        if not isinstance(value, (Sequence, np.ndarray, torch.Tensor)):
            raise TypeError(f"{name} must be a sequence of (n, 2) offset arrays, got {type(value).__name__}")
    if len(student_offsets) != len(teacher_offsets):
        raise ValueError(f"student_offsets has {len(student_offsets)} sequences but teacher_offsets "
                         f"has {len(teacher_offsets)}; they must tokenise the same texts")
    students = [_offsets_array(o, f"student_offsets[{b}]") for b, o in enumerate(student_offsets)]
    teachers = [_offsets_array(o, f"teacher_offsets[{b}]") for b, o in enumerate(teacher_offsets)]
    student_stride = _stride("student_stride", student_stride, students)
    teacher_stride = _stride("teacher_stride", teacher_stride, teachers)
    s_rows, t_rows, seq, offset = _align_flat(students, teachers, student_stride, teacher_stride)
    chunk = np.zeros(seq.shape[0], dtype=bool)
    chunk[1:] = seq[1:] == seq[:-1]
    pairs = np.stack([s_rows + seq * student_stride, t_rows + seq * teacher_stride], axis=1)
    return ByteAlignment(torch.from_numpy(pairs), torch.from_numpy(seq), torch.from_numpy(offset),
                         torch.from_numpy(chunk), student_stride, teacher_stride)


def char_to_byte_offsets(text: str, char_offsets) -> np.ndarray:
    """A tokenizer's character offsets (``return_offsets_mapping``) as byte offsets, ``(n, 2)``.

    Hugging Face fast tokenizers report offsets in characters (code points) of ``text``; this
    maps them to offsets in ``text.encode("utf-8")``, exactly for any non-ASCII text. Tokens with
    an empty span (special tokens, which report ``(0, 0)`` wherever they stand) are placed at the
    end of the token before them. Byte-fallback pieces of one character all report that
    character's span; they then overlap, and only the last of them predicts from a boundary.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    offsets = _offsets_array(char_offsets, "char_offsets", check_order=False)
    if offsets.size and (offsets.min() < 0 or offsets.max() > len(text)):
        raise ValueError(f"char_offsets must lie in [0, {len(text)}] (len(text)), got values in "
                         f"[{offsets.min()}, {offsets.max()}]")
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    position = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(widths, out=position[1:])
    result = position[offsets]
    empty = result[:, 0] == result[:, 1]
    if empty.any():
        ends = np.where(empty, -1, result[:, 1])
        previous_end = np.maximum.accumulate(np.concatenate([[0], ends[:-1]]))
        result[empty] = previous_end[empty, None]
    return result


# ------------------------------------------------------------------------------------------------
# implementation
# ------------------------------------------------------------------------------------------------

def _offsets_array(offsets, name: str, check_order: bool = True) -> np.ndarray:
    if isinstance(offsets, torch.Tensor):
        if offsets.dtype.is_floating_point or offsets.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer offsets, got dtype {offsets.dtype}")
        array = offsets.detach().cpu().numpy()
    else:
        array = np.asarray(offsets)
        if array.size == 0:
            array = array.reshape(0, 2).astype(np.int64)
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"{name} must hold integer offsets, got dtype {array.dtype}")
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must have shape (n, 2) of [start, end) byte offsets, got {array.shape}")
    array = array.astype(np.int64, copy=False)
    if not check_order or not array.shape[0]:
        return array
    starts, ends = array[:, 0], array[:, 1]
    bad = np.flatnonzero((starts > ends) | (ends < 0))
    if bad.size:
        t = int(bad[0])
        raise ValueError(f"{name} must have 0 <= end and start <= end for every token; token {t} "
                         f"has [{starts[t]}, {ends[t]})")
    back = np.flatnonzero(ends[1:] < ends[:-1])
    if back.size:
        t = int(back[0]) + 1
        raise ValueError(
            f"{name} must list tokens in text order (ends non-decreasing); token {t} ends at "
            f"{ends[t]} after token {t - 1} ended at {ends[t - 1]} (special tokens reported at "
            "(0, 0): convert with fastkd.bytes.char_to_byte_offsets or use ByteVocab.byte_offsets)")
    return array


def _stride(name: str, stride, sequences) -> int:
    longest = max((s.shape[0] for s in sequences), default=0)
    if stride is None:
        return max(longest, 1)
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"{name} must be a positive int, got {stride!r}")
    if stride < longest - 1:
        raise ValueError(f"{name}={stride} is too small for a sequence of {longest} tokens "
                         f"(its rows up to {longest - 2} can be aligned)")
    return int(stride)


def _positions(sequences: list) -> tuple:
    """Predictive rows of concatenated sequences: ``(local row, seq, end, k, next_kind)``."""
    lengths = np.fromiter((s.shape[0] for s in sequences), dtype=np.int64, count=len(sequences))
    flat = np.concatenate(sequences, axis=0) if sequences else np.zeros((0, 2), np.int64)
    n = flat.shape[0]
    seq = np.repeat(np.arange(len(sequences), dtype=np.int64), lengths)
    first = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=first[1:])
    starts, ends = flat[:, 0], flat[:, 1]
    zero_width = starts == ends
    # Row t predicts from end_t when token t+1 exists in the same text and starts there.
    predictive = np.zeros(n, dtype=bool)
    if n > 1:
        predictive[:-1] = (seq[1:] == seq[:-1]) & (starts[1:] == ends[:-1])
    # k: byte-less tokens at this end so far, counted within runs of equal ends of one text.
    new_run = np.ones(n, dtype=bool)
    if n > 1:
        new_run[1:] = (seq[1:] != seq[:-1]) | (ends[1:] != ends[:-1])
    zeros_so_far = np.cumsum(zero_width)
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(n), 0))
    k = zeros_so_far - zeros_so_far[run_start] + zero_width[run_start]
    rows = np.flatnonzero(predictive)
    next_kind = zero_width[rows + 1] if rows.size else np.zeros(0, dtype=bool)
    return rows - first[seq[rows]], seq[rows], ends[rows], k[rows], next_kind


def _align_flat(students, teachers, student_stride, teacher_stride):
    """``(student rows, teacher rows, seq, offset)`` of the aligned pairs, as int64 numpy."""
    s_row, s_seq, s_end, s_k, s_kind = _positions(students)
    t_row, t_seq, t_end, t_k, t_kind = _positions(teachers)
    n_seq = max(len(students), 1)
    max_end = int(max(s_end.max(initial=0), t_end.max(initial=0))) + 1
    max_k = int(max(s_k.max(initial=0), t_k.max(initial=0))) + 1
    if n_seq * max_end * max_k * 2 >= 2**62:
        raise ValueError(f"offsets too large to align: {n_seq} sequences, byte offsets up to "
                         f"{max_end}, {max_k} special tokens at one offset")
    # One int64 key per predictive row; keys increase along each side, so matching is a search.
    s_key = ((s_seq * max_end + s_end) * max_k + s_k) * 2 + s_kind
    t_key = ((t_seq * max_end + t_end) * max_k + t_k) * 2 + t_kind
    at = np.searchsorted(t_key, s_key)
    found = at < t_key.shape[0]
    found[found] = t_key[at[found]] == s_key[found]
    return s_row[found], t_row[at[found]], s_seq[found], s_end[found]
