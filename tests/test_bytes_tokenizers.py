"""``fastkd.ByteVocab.from_tokenizer`` on tokenizers trained here, on text built here (no downloads).

Two tokenizers of different kinds and sizes are trained with the ``tokenizers`` library: a
byte-level BPE (GPT-2/Llama-3/Qwen style) and a SentencePiece-style Unigram (``▁`` for spaces,
dummy prefix, ``<0xNN>`` byte fallback). The texts mix ASCII, accented Latin, CJK, emoji (with
ZWJ sequences and flags) and combining marks; the test texts also hold characters neither
tokenizer saw in training. The other ``test_bytes_*`` modules import the builders from here.
"""
from __future__ import annotations

import functools
import json
import random

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from fastkd.bytes import NO_BYTES, ByteVocab, char_to_byte_offsets

WORDS = ["the", "cat", "sat", "on", "mat", "fox", "naïve", "café", "über", "straße", "ñandú",
         "Ωmega", "日本", "東京", "寿司", "😀", "🎉", "👩‍💻", "🇫🇷", "e\u0301", "déjà", "vu", "ok",
         "12", "345", "—", "«", "»", "tab\tbed", "new\nline"]
# Characters no training text has: byte fallback on the Unigram side, raw bytes on the BPE side.
UNSEEN = ["ʕ•ᴥ•ʔ", "𝔘𝔫𝔦", "新しい", "🦩", "Ѣ", "\u0000nul", "ﬁ"]


def make_texts(count: int, seed: int, unseen: bool = False) -> list[str]:
    rng = random.Random(seed)
    pool = WORDS + (UNSEEN if unseen else [])
    texts = []
    for _ in range(count):
        words = [rng.choice(pool) for _ in range(rng.randint(1, 14))]
        text = rng.choice(["", " ", "  "]) + rng.choice([" ", "  ", ", "]).join(words)
        texts.append(text + rng.choice(["", ".", "!", " "]))
    return texts


@functools.lru_cache(maxsize=None)
def byte_level_bpe() -> Tokenizer:
    """Byte-level BPE, 400 ids, ``<|endoftext|>`` special."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(make_texts(3000, seed=1), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer


@functools.lru_cache(maxsize=None)
def sentencepiece_unigram() -> Tokenizer:
    """Unigram + Metaspace (dummy prefix) + 256 ``<0xNN>`` byte-fallback pieces; specials first."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(make_texts(3000, seed=2), trainers.UnigramTrainer(
        vocab_size=180, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False))
    spec = json.loads(tokenizer.to_str())
    pieces = {piece for piece, _ in spec["model"]["vocab"]}
    spec["model"]["vocab"] += [[f"<0x{b:02X}>", -30.0] for b in range(256) if f"<0x{b:02X}>" not in pieces]
    spec["model"]["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec))


TOKENIZERS = {"byte_level_bpe": byte_level_bpe, "sentencepiece_unigram": sentencepiece_unigram}


@pytest.fixture(params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


def test_two_different_tokenizers():
    bpe, unigram = ByteVocab.from_tokenizer(byte_level_bpe()), ByteVocab.from_tokenizer(sentencepiece_unigram())
    assert (bpe.kind, unigram.kind) == ("byte_level", "sentencepiece")
    assert len(bpe) != len(unigram)
    assert not bpe.prefix_space and unigram.prefix_space
    text = "naïve café 🎉 東京"
    assert byte_level_bpe().encode(text).ids != sentencepiece_unigram().encode(text).ids


def test_token_bytes_reconstruct_text_exactly(tokenizer):
    vocab = ByteVocab.from_tokenizer(tokenizer)
    texts = make_texts(300, seed=3, unseen=True) + UNSEEN + ["", "🇫🇷👩‍💻", " leading", "e\u0301\u0301"]
    for text in texts:
        ids = tokenizer.encode(text).ids
        spelled = vocab.decode(ids)
        data = text.encode("utf-8")
        if vocab.prefix_space and data and not data.startswith(b" "):
            assert spelled == b" " + data, text
        else:
            assert spelled == data, text
        offsets = vocab.byte_offsets(ids, text)
        # Contiguous exact spans ending at the text's last byte; the phantom space starts at -1.
        assert offsets[1:, 0].tolist() == offsets[:-1, 1].tolist()
        if len(ids):
            assert offsets[-1, 1] == len(data)
            assert offsets[0, 0] == len(data) - len(spelled)
        assert all(spelled[max(s - offsets[0, 0], 0):e - offsets[0, 0]] == vocab.token_bytes[i]
                   for i, (s, e) in zip(ids, offsets.tolist()))


def test_bucket_tables(tokenizer):
    vocab = ByteVocab.from_tokenizer(tokenizer)
    first = [piece[0] if piece else NO_BYTES for piece in vocab.token_bytes]
    assert vocab.first_byte.tolist() == first
    assert vocab.lengths.tolist() == [len(piece) for piece in vocab.token_bytes]
    assert sorted(vocab.sorted_ids.tolist()) == list(range(len(vocab)))
    sorted_buckets = vocab.first_byte[vocab.sorted_ids]
    assert (sorted_buckets[1:] >= sorted_buckets[:-1]).all()
    offsets = vocab.bucket_offsets.tolist()
    assert offsets[0] == 0 and offsets[-1] == len(vocab) and len(offsets) == 258
    for bucket in range(257):
        ids = vocab.sorted_ids[offsets[bucket]:offsets[bucket + 1]]
        assert (vocab.first_byte[ids] == bucket).all()
        assert len(ids) == first.count(bucket)
    # Stable: ids of one bucket stay in increasing order.
    for bucket in range(257):
        ids = vocab.sorted_ids[offsets[bucket]:offsets[bucket + 1]]
        assert (ids[1:] > ids[:-1]).all()


def test_byte_level_pieces():
    tokenizer = byte_level_bpe()
    vocab = ByteVocab.from_tokenizer(tokenizer)
    assert vocab.token_bytes[tokenizer.token_to_id("<|endoftext|>")] == b""
    assert vocab.first_byte[tokenizer.token_to_id("<|endoftext|>")] == NO_BYTES
    # All 256 single bytes are in the alphabet: every byte bucket is reachable.
    assert vocab.bucket_sizes[:256].min() >= 1
    assert vocab.token_bytes[tokenizer.token_to_id("Ġ")] == b" "
    assert vocab.token_bytes[tokenizer.token_to_id("Ċ")] == b"\n"
    assert vocab.token_bytes[tokenizer.token_to_id("Ã")] == b"\xc3"


def test_sentencepiece_pieces():
    tokenizer = sentencepiece_unigram()
    vocab = ByteVocab.from_tokenizer(tokenizer)
    for special in ("<unk>", "<s>", "</s>"):
        assert vocab.token_bytes[tokenizer.token_to_id(special)] == b""
    for byte in (0x00, 0x41, 0xE6, 0xFF):
        assert vocab.token_bytes[tokenizer.token_to_id(f"<0x{byte:02X}>")] == bytes([byte])
    assert vocab.token_bytes[tokenizer.token_to_id("▁")] == b" "
    with_space = [p for p in tokenizer.get_vocab() if p.startswith("▁") and len(p) > 1]
    assert with_space
    piece = with_space[0]
    assert vocab.token_bytes[tokenizer.token_to_id(piece)] == (" " + piece[1:]).encode("utf-8")
    # The never-seen "新" is spelled through byte fallback pieces.
    ids = tokenizer.encode("新").ids
    assert [vocab.token_bytes[i] for i in ids][-3:] == [b"\xe6", b"\x96", b"\xb0"]


def test_hugging_face_wrapper_and_fingerprint():
    from transformers import PreTrainedTokenizerFast

    raw = sentencepiece_unigram()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    a, b = ByteVocab.from_tokenizer(raw), ByteVocab.from_tokenizer(wrapped)
    assert a.token_bytes == b.token_bytes and a.fingerprint == b.fingerprint
    assert ByteVocab.from_tokenizer(byte_level_bpe()).fingerprint != a.fingerprint
    changed = list(a.token_bytes)
    changed[10] = changed[10] + b"!"
    assert ByteVocab.from_bytes(changed).fingerprint != ByteVocab.from_bytes(a.token_bytes).fingerprint
    assert ByteVocab.from_bytes(a.token_bytes).fingerprint == ByteVocab.from_bytes(list(a.token_bytes)).fingerprint


def test_added_tokens_and_padded_head():
    tokenizer = Tokenizer.from_str(byte_level_bpe().to_str())
    tokenizer.add_special_tokens([AddedToken("<|im_start|>", special=True)])
    tokenizer.add_tokens([AddedToken("<tool>", special=False)])
    vocab = ByteVocab.from_tokenizer(tokenizer)
    assert vocab.token_bytes[tokenizer.token_to_id("<|im_start|>")] == b""
    assert vocab.token_bytes[tokenizer.token_to_id("<tool>")] == b"<tool>"
    text = "call <tool> now ü"
    assert vocab.decode(tokenizer.encode(text).ids) == text.encode()
    padded = ByteVocab.from_tokenizer(tokenizer, vocab_size=len(vocab) + 13)
    assert len(padded) == len(vocab) + 13
    assert padded.token_bytes[:len(vocab)] == vocab.token_bytes
    assert (padded.first_byte[len(vocab):] == NO_BYTES).all()
    with pytest.raises(ValueError, match="vocab_size"):
        ByteVocab.from_tokenizer(tokenizer, vocab_size=len(vocab) - 1)


def test_rejects_tokenizers_without_exact_bytes():
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer()
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(make_texts(200, seed=4), trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[UNK]"], show_progress=False))
    with pytest.raises(ValueError, match="WordPiece"):
        ByteVocab.from_tokenizer(wordpiece)
    whitespace_bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    whitespace_bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="Whitespace"):
        ByteVocab.from_tokenizer(whitespace_bpe)
    suffix_bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    with pytest.raises(ValueError, match="end_of_word_suffix"):
        ByteVocab.from_tokenizer(suffix_bpe)
    with pytest.raises(TypeError, match="tokenizer must be"):
        ByteVocab.from_tokenizer("gpt2")


def test_prefix_space_needs_the_text_and_pickling():
    import pickle

    tokenizer = sentencepiece_unigram()
    vocab = ByteVocab.from_tokenizer(tokenizer)
    ids = tokenizer.encode("café").ids
    with pytest.raises(ValueError, match="text is needed"):
        vocab.byte_offsets(ids)
    assert vocab.byte_offsets(ids, "café")[0, 0] == -1
    vocab.device_tensors("cpu")
    copy = pickle.loads(pickle.dumps(vocab))
    assert copy.token_bytes == vocab.token_bytes and copy.fingerprint == vocab.fingerprint
    assert copy._device_cache == {} and torch.equal(copy.sorted_ids, vocab.sorted_ids)


def test_byte_offsets_checks():
    tokenizer = byte_level_bpe()
    vocab = ByteVocab.from_tokenizer(tokenizer)
    ids = tokenizer.encode("über café").ids
    with pytest.raises(ValueError, match="do not spell text"):
        vocab.byte_offsets(ids, "uber cafe")
    with pytest.raises(ValueError, match=r"ids must be in \[0, 400\)"):
        vocab.byte_offsets([0, 400])
    with pytest.raises(TypeError, match="integer token ids"):
        vocab.byte_offsets(torch.tensor([1.0, 2.0]))
    # Without text: offsets of the token byte stream; specials are empty spans where they stand.
    eot = tokenizer.token_to_id("<|endoftext|>")
    offsets = vocab.byte_offsets([eot] + ids + [eot])
    n = len(vocab.decode(ids))
    assert offsets[0].tolist() == [0, 0] and offsets[-1].tolist() == [n, n]


def test_char_to_byte_offsets_exact_for_non_ascii(tokenizer):
    for text in make_texts(100, seed=5, unseen=True):
        encoding = tokenizer.encode(text)
        converted = char_to_byte_offsets(text, encoding.offsets)
        expected = [[len(text[:s].encode()), len(text[:e].encode())] for s, e in encoding.offsets]
        assert converted.tolist() == expected


def test_char_to_byte_offsets_places_specials():
    text = "añb"
    converted = char_to_byte_offsets(text, [(0, 0), (0, 1), (1, 2), (0, 0), (2, 3), (0, 0)])
    assert converted.tolist() == [[0, 0], [0, 1], [1, 3], [3, 3], [3, 4], [4, 4]]
    with pytest.raises(ValueError, match="char_offsets must lie"):
        char_to_byte_offsets(text, [(0, 9)])
    with pytest.raises(TypeError, match="text must be a str"):
        char_to_byte_offsets(b"abc", [(0, 1)])
