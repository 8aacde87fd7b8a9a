"""``fastkd.align_tokenizations`` / ``fastkd.align_batch`` against a slow, obvious implementation.

The obvious implementation walks every row and applies the definition of DESIGN.md §1 literally:
row t predicts from byte e when it ends at e and the next token starts at e; its position counts
the byte-less tokens that end at e up to it; two rows align when positions and the kind of the
next token agree.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import fastkd
from fastkd.bytes import ByteAlignment, ByteVocab, align_batch, align_tokenizations
from test_bytes_tokenizers import byte_level_bpe, make_texts, sentencepiece_unigram


def slow_positions(offsets):
    positions = {}
    for t in range(len(offsets) - 1):
        start, end = offsets[t]
        if offsets[t + 1][0] != end:
            continue
        k = 0
        for u in range(t, -1, -1):  # the byte-less tokens just before t (and t) that end at `end`
            if offsets[u][1] != end:
                break
            k += offsets[u][0] == offsets[u][1]
        next_is_special = offsets[t + 1][0] == offsets[t + 1][1]
        positions[(end, k, next_is_special)] = t
    return positions


def slow_align(student_offsets, teacher_offsets):
    student, teacher = slow_positions(student_offsets), slow_positions(teacher_offsets)
    return sorted((row, teacher[key]) for key, row in student.items() if key in teacher)


def random_tokenization(rng: random.Random, cuts: list[int], n_bytes: int, specials: dict):
    """Offsets of a tokenization cutting ``n_bytes`` at ``cuts``, with byte-less tokens inserted."""
    bounds = [0] + sorted(cuts) + [n_bytes]
    offsets = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        offsets += [[start, start]] * specials.get(start, 0)
        offsets.append([start, end])
        if rng.random() < 0.08:  # a byte-fallback-like overlap: the same span twice
            offsets.append([start, end])
    offsets += [[n_bytes, n_bytes]] * specials.get(n_bytes, 0)
    if offsets and rng.random() < 0.2 and offsets[0][1] > 0 and offsets[0][0] == 0:
        offsets[0][0] = -1  # a phantom leading space
    return offsets


@pytest.mark.parametrize("seed", range(40))
def test_random_tokenizations_match_slow(seed):
    rng = random.Random(seed)
    n_bytes = rng.randint(0, 60)
    common = set(rng.sample(range(1, n_bytes), k=min(n_bytes - 1, rng.randint(0, 12)))) if n_bytes > 1 else set()
    def cuts():
        own = set(rng.sample(range(1, n_bytes), k=min(n_bytes - 1, rng.randint(0, 20)))) if n_bytes > 1 else set()
        return sorted(common | own)
    special_at = {0: 1} if rng.random() < 0.7 else {}
    for _ in range(rng.randint(0, 3)):
        special_at[rng.randint(0, n_bytes)] = rng.randint(1, 2)
    student = random_tokenization(rng, cuts(), n_bytes, dict(special_at))
    other = dict(special_at) if rng.random() < 0.6 else {rng.randint(0, n_bytes): 1}
    teacher = random_tokenization(rng, cuts(), n_bytes, other)
    pairs = align_tokenizations(student, teacher)
    assert pairs.dtype == torch.int64 and pairs.shape[1] == 2
    assert pairs.tolist() == [list(p) for p in slow_align(student, teacher)]


def _pairs_by_text(tok_a, tok_b, texts, bos=None):
    vocab_a, vocab_b = ByteVocab.from_tokenizer(tok_a), ByteVocab.from_tokenizer(tok_b)
    result = []
    for text in texts:
        ids_a = ([tok_a.token_to_id(bos[0])] if bos else []) + tok_a.encode(text).ids
        ids_b = ([tok_b.token_to_id(bos[1])] if bos else []) + tok_b.encode(text).ids
        offsets_a, offsets_b = vocab_a.byte_offsets(ids_a, text), vocab_b.byte_offsets(ids_b, text)
        result.append((text, ids_a, ids_b, offsets_a, offsets_b, vocab_a, vocab_b))
    return result


def test_real_tokenizers_align_where_the_bytes_agree():
    texts = make_texts(120, seed=11, unseen=True)
    for text, ids_s, ids_t, off_s, off_t, voc_s, voc_t in _pairs_by_text(
            sentencepiece_unigram(), byte_level_bpe(), texts, bos=("<s>", "<|endoftext|>")):
        pairs = align_tokenizations(off_s, off_t)
        assert pairs.tolist() == [list(p) for p in slow_align(off_s.tolist(), off_t.tolist())]
        data = text.encode()
        for i, j in pairs.tolist():
            # Both rows have read the same text bytes (the phantom space aside) ...
            end = off_s[i, 1]
            assert end == off_t[j, 1]
            assert voc_s.decode(ids_s[:i + 1]).endswith(data[:end]) or end == 0
            assert voc_t.decode(ids_t[:j + 1]) == data[:end]
            # ... and both next tokens start with the text's byte `end`.
            assert voc_s.token_bytes[ids_s[i + 1]][:1] == voc_t.token_bytes[ids_t[j + 1]][:1] == data[end:end + 1]
        # Every shared interior boundary is aligned (no specials inside these texts).
        shared = set(off_s[1:-1, 1].tolist()) & set(off_t[1:-1, 1].tolist())
        shared.discard(0)
        assert {off_s[i, 1] for i, _ in pairs.tolist()} >= shared


def test_same_tokenizer_aligns_every_row():
    tok = byte_level_bpe()
    data = _pairs_by_text(tok, tok, make_texts(30, seed=12), bos=("<|endoftext|>",) * 2)
    for text, ids, _, offsets, _, _, _ in data:
        pairs = align_tokenizations(offsets, offsets)
        assert pairs.tolist() == [[t, t] for t in range(len(ids) - 1)]


def test_batch_matches_per_sequence():
    data = _pairs_by_text(sentencepiece_unigram(), byte_level_bpe(), make_texts(9, seed=13) + [""],
                          bos=("<s>", "<|endoftext|>"))
    students, teachers = [d[3] for d in data], [d[4] for d in data]
    alignment = align_batch(students, teachers)
    assert isinstance(alignment, ByteAlignment)
    stride_s, stride_t = max(len(s) for s in students), max(len(t) for t in teachers)
    assert (alignment.student_stride, alignment.teacher_stride) == (stride_s, stride_t)
    expected, sequence, chunk = [], [], []
    for b, (s, t) in enumerate(zip(students, teachers)):
        local = align_tokenizations(s, t).tolist()
        expected += [[i + b * stride_s, j + b * stride_t] for i, j in local]
        sequence += [b] * len(local)
        chunk += [False] + [True] * (len(local) - 1) if local else []
    assert alignment.pairs.tolist() == expected
    assert alignment.sequence.tolist() == sequence
    assert alignment.chunk_mask.tolist() == chunk
    assert alignment.offset.tolist() == [int(students[b][i - b * stride_s, 1])
                                         for b, (i, _) in zip(sequence, expected)]
    # Hidden states cut to T-1 rows per sequence: the last token never predicts inside the text.
    cut = align_batch(students, teachers, student_stride=stride_s - 1, teacher_stride=stride_t - 1)
    assert cut.pairs[:, 0].tolist() == [i - b * 1 for b, (i, _) in zip(sequence, expected)]
    assert len(alignment.to("cpu")) == len(alignment)


def test_chunks_spell_the_same_bytes():
    data = _pairs_by_text(sentencepiece_unigram(), byte_level_bpe(), make_texts(20, seed=14, unseen=True),
                          bos=("<s>", "<|endoftext|>"))
    for text, ids_s, ids_t, off_s, off_t, voc_s, voc_t in data:
        pairs = align_tokenizations(off_s, off_t).tolist()
        for (i0, j0), (i1, j1) in zip(pairs[:-1], pairs[1:]):
            assert voc_s.decode(ids_s[i0 + 1:i1 + 1]) == voc_t.decode(ids_t[j0 + 1:j1 + 1])


def test_bad_offsets_are_rejected():
    with pytest.raises(ValueError, match="student_offsets must have shape"):
        align_tokenizations([[0, 1, 2]], [[0, 1]])
    with pytest.raises(ValueError, match="teacher_offsets must have 0 <= end and start <= end"):
        align_tokenizations([[0, 1]], [[2, 1]])
    with pytest.raises(ValueError, match="student_offsets must list tokens in text order"):
        align_tokenizations([[0, 3], [0, 0]], [[0, 1]])
    with pytest.raises(TypeError, match="teacher_offsets must hold integer offsets"):
        align_tokenizations([[0, 1]], np.array([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="sequences"):
        align_batch([[[0, 1]]], [[[0, 1]], [[0, 1]]])
    with pytest.raises(TypeError, match="sequence of per-text"):
        align_batch(np.array([[0, 1]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match=r"student_offsets\[1\] must have shape"):
        align_batch([[[0, 1]], [[0]]], [[[0, 1]], [[0, 1]]])
    with pytest.raises(ValueError, match="student_stride=1 is too small"):
        align_batch([[[0, 1], [1, 2], [2, 3]]], [[[0, 3]]], student_stride=1)


def test_empty_inputs():
    assert align_tokenizations(np.zeros((0, 2), np.int64), [[0, 1]]).shape == (0, 2)
    alignment = align_batch([], [])
    assert alignment.pairs.shape == (0, 2) and alignment.chunk_mask.shape == (0,)
    assert fastkd.align_batch is align_batch
