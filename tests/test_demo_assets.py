"""``fastkd.demo_assets``: the local corpus, tokenizers and models of ``fastkd demo`` (no downloads)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fastkd import ByteVocab
from fastkd.demo_assets import (DemoSetup, build_demo_setup, build_model, count_parameters, make_corpus,
                                read_texts, write_texts)

transformers = pytest.importorskip("transformers")
AutoTokenizer, AutoModelForCausalLM = transformers.AutoTokenizer, transformers.AutoModelForCausalLM

SIZES = dict(n_teacher=600, n_student=40, n_heldout=50)
SAMPLES = ["Łukasz gives 🥨×3 to Yūki: now Yūki has 12 🥨.", "Zoë has 7 crêpes 🥞", " leading space",
           "新しい 🦩 unseen ʕ•ᴥ•ʔ", "", "19 + 19 = 38; double  space\tand tab"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> DemoSetup:
    return build_demo_setup(tmp_path_factory.mktemp("demo"), seed=0, **SIZES)


@pytest.fixture(scope="module")
def tokenizers(setup):
    return tuple(AutoTokenizer.from_pretrained(path) for path in (setup.teacher_tokenizer, setup.student_tokenizer))


def test_corpus_splits(setup):
    texts = {name: read_texts(getattr(setup, f"{name}_data")) for name in ("teacher", "student", "heldout")}
    assert texts == make_corpus(0, SIZES["n_teacher"], SIZES["n_student"], SIZES["n_heldout"])
    assert all(texts.values()) and [len(t) for t in texts.values()] == list(SIZES.values())
    assert not set(texts["heldout"]) <= set(texts["student"])
    assert any(not text.isascii() for text in texts["student"])
    assert make_corpus(1, 5, 5, 5) != make_corpus(0, 5, 5, 5)


def test_write_texts_jsonl(tmp_path):
    path = write_texts(tmp_path / "sub" / "t.jsonl", ["Zoë 🍎", 'quote " and\nnewline'])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == '{"text": "Zoë 🍎"}' and len(lines) == 2
    assert read_texts(path) == ["Zoë 🍎", 'quote " and\nnewline'] == [json.loads(line)["text"] for line in lines]


def test_deterministic(setup, tmp_path):
    again = build_demo_setup(tmp_path, seed=0, **SIZES)
    for name in ("teacher_tokenizer", "student_tokenizer"):
        a, b = getattr(setup, name), getattr(again, name)
        assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert setup.heldout_data.read_bytes() == again.heldout_data.read_bytes()
    kwargs = dict(vocab_size=352, hidden=32, layers=1, heads=2, seed=5, max_positions=64)
    state = torch.random.get_rng_state()
    first, second = (load_file(build_model(tmp_path / name, **kwargs) / "model.safetensors") for name in "ab")
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = load_file(build_model(tmp_path / "c", **{**kwargs, "seed": 6}) / "model.safetensors")
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_tokenizers_special_tokens_and_decode(tokenizers):
    for tok, dummy_prefix in zip(tokenizers, (False, True)):
        assert tok.model_max_length == 256
        ids = tok(SAMPLES[0])["input_ids"]
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
        for text in SAMPLES:
            ids = tok(text)["input_ids"]
            # SentencePiece-style decoding drops one leading space (the dummy prefix), as Llama-2's does.
            expected = text[1:] if dummy_prefix and text.startswith(" ") else text
            assert tok.decode(ids, skip_special_tokens=True) == expected
        encoded = tok(SAMPLES[:2], padding=True, return_offsets_mapping=True)
        assert encoded["offset_mapping"][0][0] == (0, 0)
        short = encoded["input_ids"][1]
        assert short[-1] == tok.pad_token_id and encoded["attention_mask"][1][-1] == 0


def test_tokenizers_differ(tokenizers):
    teacher, student = tokenizers
    assert (len(teacher), len(student)) == (352, 416)
    text = SAMPLES[0]
    assert teacher(text)["input_ids"] != student(text)["input_ids"]
    pieces = [tok.convert_ids_to_tokens(tok(text)["input_ids"]) for tok in tokenizers]
    assert pieces[0] != pieces[1] and len(pieces[0]) != len(pieces[1])


def test_byte_vocab_offsets(setup, tokenizers):
    kinds = []
    for tok in tokenizers:
        vocab = ByteVocab.from_tokenizer(tok)
        kinds.append((vocab.kind, vocab.prefix_space))
        for special in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id):
            assert vocab.token_bytes[special] == b""
        for text in SAMPLES + read_texts(setup.heldout_data)[:20]:
            data = text.encode("utf-8")
            ids = tok(text)["input_ids"]
            offsets = vocab.byte_offsets(ids, text)
            assert offsets[0].tolist() == [0, 0]  # bos: no bytes
            assert b"".join(data[max(s, 0):e] for s, e in offsets.tolist()) == data
            # The tokens spell the text (with the dummy-prefix space for the student).
            spelled = vocab.decode(ids)
            dummy = vocab.prefix_space and data and not data.startswith(b" ")
            assert spelled == (b" " + data if dummy else data)
            padded = ids + [tok.pad_token_id] * 3
            assert vocab.byte_offsets(padded, text)[-3:].tolist() == [[len(data), len(data)]] * 3
    assert kinds == [("byte_level", False), ("sentencepiece", True)]


def test_model_loads_and_runs(setup, tokenizers, tmp_path):
    teacher_tok = tokenizers[0]
    path = build_model(tmp_path / "teacher", len(teacher_tok), hidden=32, layers=2, heads=4, seed=0,
                       max_positions=64, tokenizer_dir=setup.teacher_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert (path / "model.safetensors").exists()
    assert model.config.pad_token_id == teacher_tok.pad_token_id and model.config.bos_token_id == 0
    assert not model.config.tie_word_embeddings and model.config.intermediate_size == 64
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) > 2 * 352 * 32
    batch = teacher_tok(SAMPLES[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (3, batch["input_ids"].shape[1], 352) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(tmp_path / "small", 100, hidden=32, layers=1, seed=0, tokenizer_dir=setup.teacher_tokenizer)
