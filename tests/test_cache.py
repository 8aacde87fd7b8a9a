"""Teacher caches (DESIGN.md §4, docs/cache.md): packing, capture, resume, checksums, importers, reader.

Everything is built here: a byte-level BPE tokenizer trained on generated text and tiny Llama
teachers/students saved with ``save_pretrained`` (no downloads). CPU only, a few seconds each.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from fastkd.cache import (CacheCollator, CacheError, TeacherCache, capture, id_bits,  # noqa: E402
                          import_dataset, import_vllm, logprob_error_bound, pack_topk,
                          tokenizer_fingerprint, unpack_topk)
from fastkd.cache import format as fmt  # noqa: E402
from fastkd.cache.format import open_shard  # noqa: E402

WORDS = ("the cat dog sat on a mat and ran far away into green fields where birds sing loud "
         "songs of old kings who ruled lands by rivers wide").split()
REPO = Path(__file__).resolve().parents[1]


def make_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(count)]


def train_tokenizer(vocab_size: int, seed: int):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(make_texts(300, seed), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def tiny_llama(vocab_size: int, seed: int, hidden: int = 32):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharper teacher distributions than a fresh init gives
    return model


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    tokenizer = train_tokenizer(300, seed=1)
    tiny_llama(len(tokenizer), seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def captured(teacher, tmp_path_factory):
    model, tokenizer = teacher
    out = tmp_path_factory.mktemp("cache") / "c"
    manifest = capture(model, tokenizer, make_texts(20, seed=5), out, topk=8, temperature=2.0,
                       max_length=32, shard_tokens=60, batch_size=3)
    return out, manifest


# ----------------------------------------------------------------------------------------------
# packing: ids exact, log-probs within the documented bound, stored words bit-exact
# ----------------------------------------------------------------------------------------------

# Vocabularies chosen for each id width: tiny, GPT-2 (16 bits: full fp16 kept), Llama-3 (17 bits:
# sign-dropped fp16, still exact), Qwen2.5 (18 bits: one mantissa bit fewer), 2^20 - 1 (the limit).
@pytest.mark.parametrize("vocab_size", [300, 50257, 128256, 151936, 2**20 - 1])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_pack_round_trip(vocab_size, dtype):
    gen = torch.Generator().manual_seed(vocab_size)
    ids = torch.randint(0, vocab_size, (64, 16), generator=gen)
    ids[0, :2] = torch.tensor([0, vocab_size - 1])
    ids[1, 3:] = -1  # ragged rows: unused slots
    logprobs = -torch.rand(64, 16, generator=gen, dtype=torch.float64).float() * 40
    logprobs[2, 0], logprobs[2, 1], logprobs[2, 2] = 0.0, -1e-6, float("-inf")
    words = pack_topk(ids, logprobs, vocab_size, dtype)
    assert words.dtype == np.uint32 and words.itemsize == 4  # 4 bytes per (id, log-prob) entry
    got_ids, got_lp = unpack_topk(words, vocab_size, dtype)
    assert torch.equal(got_ids, ids), "ids must round-trip exactly"
    used = ids >= 0
    assert (got_lp[~used] == 0).all()
    bound, absolute = logprob_error_bound(vocab_size, dtype)
    finite = used & torch.isfinite(logprobs)
    err = (got_lp - logprobs).abs()[finite]
    limit = bound * logprobs.abs()[finite] + absolute
    assert (err <= limit).all(), f"worst error {(err - limit).max():.3g} above the bound {bound}"
    assert got_lp[2, 2] == float("-inf")
    # the stored representation is a fixed point: decoding and re-encoding gives the same words
    assert np.array_equal(pack_topk(got_ids, torch.where(used, got_lp, 0.0), vocab_size, dtype), words)
    if id_bits(vocab_size) <= 17 and dtype == "fp16":  # exact fp16 storage
        assert torch.equal(got_lp[finite], logprobs.half().float()[finite])


def test_pack_rejects_bad_values():
    with pytest.raises(ValueError, match="teacher ids"):
        pack_topk(torch.tensor([[300]]), torch.tensor([[-1.0]]), 300, "fp16")
    with pytest.raises(ValueError, match="NaN"):
        pack_topk(torch.tensor([[1]]), torch.tensor([[float("nan")]]), 300, "fp16")
    with pytest.raises(ValueError, match="dtype"):
        pack_topk(torch.tensor([[1]]), torch.tensor([[-1.0]]), 300, "fp32")
    with pytest.raises(ValueError, match="vocab_size"):
        id_bits(2**20)


# ----------------------------------------------------------------------------------------------
# capture and reader
# ----------------------------------------------------------------------------------------------

def test_capture_matches_direct_topk(teacher, captured):
    model, tokenizer = teacher
    out, manifest = captured
    assert manifest["complete"] and len(manifest["shards"]) > 2 and manifest["sequences"] == 20
    cache = TeacherCache(out, tokenizer=tokenizer, verify=True)
    assert len(cache) == 20 and cache.topk == 8
    bound, _ = logprob_error_bound(manifest["vocab_size"], "fp16")
    for index, text in enumerate(make_texts(20, seed=5)):
        item = cache[index]
        ids = tokenizer(text, truncation=True, max_length=32)["input_ids"]
        assert item["input_ids"].tolist() == ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits / 2.0, dim=-1)
        expected = logp.gather(1, item["teacher_ids"])
        assert torch.equal(item["teacher_ids"][:, 0], logp.argmax(-1))
        # the stored ids are a top-8 of the direct log-probs (up to float32 ties)
        assert (expected[:, -1] >= logp.topk(8).values[:, -1] - 1e-5).all()
        err = (item["teacher_logprobs"].double() - expected).abs()
        assert (err <= bound * expected.abs() + 1e-5).all(), f"sequence {index}: error {err.max():.3g}"


def test_round_trip_bit_exact(captured):
    out, manifest = captured
    cache = TeacherCache(out, verify=True)
    for entry in manifest["shards"]:
        shard = open_shard(out / entry["file"])
        assert isinstance(shard["topk"], np.memmap)  # memory-mapped, not loaded
        start = entry["first_sequence"]
        items = [cache[start + i] for i in range(entry["sequences"])]
        ids = torch.cat([it["teacher_ids"] for it in items])
        logprobs = torch.cat([it["teacher_logprobs"] for it in items])
        assert np.array_equal(pack_topk(ids, logprobs, manifest["vocab_size"], "fp16"), np.asarray(shard["topk"]))
        assert np.array_equal(np.concatenate([it["input_ids"].numpy() for it in items]), shard["input_ids"])
        assert fmt.sha256_file(out / entry["file"]) == entry["sha256"]
        with safe_open(out / entry["file"], framework="numpy") as handle:  # a standard safetensors file
            assert np.array_equal(handle.get_tensor("topk"), shard["topk"])


def test_pickled_cache_does_not_carry_mapped_shards(captured):
    # A DataLoader worker receives the manifest and maps shards itself, never a copied shard.
    import pickle
    out, manifest = captured
    cache = TeacherCache(out)
    first = cache[0]
    assert cache._shards  # a shard is mapped now
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._shards == {}
    again = clone[0]
    for key in ("input_ids", "teacher_ids", "teacher_logprobs"):
        assert torch.equal(again[key], first[key])


def test_corrupted_and_missing_shards(captured, tmp_path):
    out, manifest = captured
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    victim = manifest["shards"][1]["file"]
    data = bytearray((copy / victim).read_bytes())
    data[-3] ^= 0x40
    (copy / victim).write_bytes(bytes(data))
    TeacherCache(copy, verify=False)  # only verification reads the bytes
    with pytest.raises(CacheError, match=f"shard {victim} is corrupted: sha256"):
        TeacherCache(copy, verify=True)
    (copy / victim).unlink()
    with pytest.raises(CacheError, match=f"shard {victim} .*missing"):
        TeacherCache(copy, verify=True)


def test_fingerprint_mismatch(captured, teacher):
    out, _ = captured
    other = train_tokenizer(280, seed=9)
    with pytest.raises(ValueError, match="tokenizer: fingerprint"):
        TeacherCache(out, tokenizer=other)
    assert tokenizer_fingerprint(teacher[1]) == TeacherCache(out, tokenizer=teacher[1]).manifest["tokenizer_fingerprint"]


def test_collator_batches_train_a_student(captured, teacher):
    from fastkd.integrations import compute_kd_loss

    out, _ = captured
    tokenizer = teacher[1]
    cache = TeacherCache(out, tokenizer=tokenizer)
    collator = CacheCollator(pad_token_id=tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(cache, batch_size=4, collate_fn=collator)
    batch = next(iter(loader))
    rows, longest = batch["input_ids"].shape
    assert batch["teacher_ids"].shape == (rows, longest, 8) and batch["teacher_logprobs"].dtype == torch.float32
    assert ((batch["labels"] == -100) == (batch["attention_mask"] == 0)).all()
    assert (batch["teacher_ids"][batch["attention_mask"] == 0] == -1).all()
    student = tiny_llama(len(tokenizer), seed=3, hidden=48).train()
    loss = compute_kd_loss(student, batch, temperature=2.0, ce_weight=0.5, impl="torch")
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grad = student.lm_head.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert len(list(cache.batches(8, collator))) == 3


# ----------------------------------------------------------------------------------------------
# kill and resume
# ----------------------------------------------------------------------------------------------

_DRIVER = """
import sys, time, torch, transformers
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
from fastkd.cache import capture, format as fmt
sys.path.insert(0, {tests!r})
from test_cache import make_texts
write = fmt.write_shard
def slow_write(*args, **kwargs):  # slows the capture down so that the test can kill it midway
    time.sleep(0.12)
    return write(*args, **kwargs)
fmt.write_shard = slow_write
model = transformers.AutoModelForCausalLM.from_pretrained({teacher!r}).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained({teacher!r})
print("started", flush=True)
capture(model, tokenizer, make_texts(30, seed=7), {out!r}, **{options!r})
"""
_RESUME_OPTIONS = dict(topk=6, max_length=24, shard_tokens=25, batch_size=2, teacher_name="tiny")


def _capture_in_process(teacher_dir, out, **extra):
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed run used one thread: same arithmetic, same bytes
    try:
        return capture(model, tokenizer, make_texts(30, seed=7), out, **_RESUME_OPTIONS, **extra)
    finally:
        torch.set_num_threads(threads)


def test_killed_capture_resumes_to_identical_shards(teacher_dir, tmp_path):
    killed = tmp_path / "killed"
    script = _DRIVER.format(repo=str(REPO), tests=str(REPO / "tests"), teacher=str(teacher_dir),
                            out=str(killed), options=_RESUME_OPTIONS)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    try:
        while True:  # wait for the first shard to be recorded
            manifest = killed / "manifest.json"
            if manifest.exists() and json.loads(manifest.read_text())["shards"]:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"capture ended before its first shard: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.01)
        time.sleep(random.uniform(0.0, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    partial = json.loads((killed / "manifest.json").read_text())
    assert not partial["complete"], "the capture finished before the kill: nothing was resumed"
    (killed / "shard-09999.safetensors.tmp").write_bytes(b"half a shard")  # as a kill mid-write leaves

    with pytest.raises(ValueError, match="resume: .*topk"):  # other settings: refused
        model = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
        capture(model, tokenizer, make_texts(30, seed=7), killed, resume=True,
                **{**_RESUME_OPTIONS, "topk": 5})
    with pytest.raises(ValueError, match="out: .*already holds a cache"):
        _capture_in_process(teacher_dir, killed)
    resumed = _capture_in_process(teacher_dir, killed, resume=True)
    straight = _capture_in_process(teacher_dir, tmp_path / "straight")
    assert not list(killed.glob("*.tmp"))
    assert len(resumed["shards"]) == len(straight["shards"]) > len(partial["shards"]) >= 1
    assert (killed / "manifest.json").read_bytes() == (tmp_path / "straight" / "manifest.json").read_bytes()
    for entry in straight["shards"]:
        assert (killed / entry["file"]).read_bytes() == (tmp_path / "straight" / entry["file"]).read_bytes(), entry["file"]


# ----------------------------------------------------------------------------------------------
# importers
# ----------------------------------------------------------------------------------------------

def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_import_vllm(tmp_path):
    records = [
        {"prompt_token_ids": [5, 17, 9],
         "prompt_logprobs": [None,
                             {"17": {"logprob": -1.0, "rank": 2, "decoded_token": "a"},
                              "4": {"logprob": -0.75, "rank": 1, "decoded_token": "b"},
                              "8": {"logprob": -3.0, "rank": 3, "decoded_token": "c"}},
                             {"9": {"logprob": -1.5, "rank": 1, "decoded_token": "d"}}]},
        {"prompt_token_ids": [1, 2], "prompt_logprobs": [None, {"2": -0.125, "3": -2.5}]},
    ]
    out = tmp_path / "v"
    manifest = import_vllm(_write_jsonl(tmp_path / "v.jsonl", records), out, topk=2, vocab_size=20,
                           temperature=0.7, shard_tokens=10)
    assert len(manifest["shards"]) == 1 and manifest["temperature"] == 0.7 and manifest["tokenizer_fingerprint"] is None
    for bad in (0.0, -1.0, True):
        with pytest.raises(ValueError, match="temperature"):
            import_vllm(_write_jsonl(tmp_path / "v.jsonl", records), tmp_path / "bad", topk=2, vocab_size=20,
                        temperature=bad)
    manifest = import_vllm(_write_jsonl(tmp_path / "v.jsonl", records), tmp_path / "v2", topk=2,
                           vocab_size=20, shard_tokens=2)
    assert len(manifest["shards"]) == 2
    cache = TeacherCache(out)
    first = cache[0]
    assert first["input_ids"].tolist() == [5, 17, 9]
    assert first["teacher_ids"].tolist() == [[4, 17], [9, -1], [-1, -1]]  # K kept, shifted by one
    assert first["teacher_logprobs"].tolist() == [[-0.75, -1.0], [-1.5, 0.0], [0.0, 0.0]]
    assert cache[1]["teacher_ids"].tolist() == [[2, 3], [-1, -1]]
    with pytest.raises(ValueError, match="prompt_logprobs must be a list"):
        import_vllm(_write_jsonl(tmp_path / "bad.jsonl", [{"prompt_token_ids": [1, 2], "prompt_logprobs": [None]}]),
                    tmp_path / "bad", topk=2, vocab_size=20)
    with pytest.raises(ValueError, match="token id 25 outside"):
        import_vllm(_write_jsonl(tmp_path / "bad2.jsonl", [{"prompt_token_ids": [1, 2],
                                                            "prompt_logprobs": [None, {"25": -1.0}]}]),
                    tmp_path / "bad2", topk=2, vocab_size=20)
    with pytest.raises(ValueError, match="vocab_size"):
        import_vllm(tmp_path / "v.jsonl", tmp_path / "bad3", topk=2)


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_import_dataset(tmp_path, suffix):
    rows = [{"input_ids": [3, 4, 5], "target_token_ids": [[4, 1, 2], [5, 9, 0], [7, 1, 2]],
             "target_logprobs": [[-0.25, -2.0, -3.0], [-0.3, -1.5, -6.0], [-0.75, -1.0, -2.0]]},
            {"input_ids": [6, 7], "target_token_ids": [[7, 3]], "target_logprobs": [[-0.25, -1.5]]}]
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        _write_jsonl(path, rows)
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    manifest = import_dataset(path, tmp_path / "d", topk=2, vocab_size=10)
    cache = TeacherCache(tmp_path / "d")
    assert manifest["sequences"] == 2
    assert cache[0]["teacher_ids"].tolist() == [[4, 1], [5, 9], [7, 1]]
    assert cache[0]["teacher_logprobs"][1].tolist() == [-0.300048828125, -1.5]  # fp16 of -0.3
    assert cache[1]["teacher_ids"].tolist() == [[7, 3], [-1, -1]]
    shifted = import_dataset(path, tmp_path / "t", topk=2, vocab_size=10, alignment="tokens")
    assert shifted["source"]["alignment"] == "tokens"
    assert TeacherCache(tmp_path / "t")[0]["teacher_ids"].tolist() == [[5, 9], [7, 1], [-1, -1]]
    with pytest.raises(ValueError, match="alignment"):
        import_dataset(path, tmp_path / "x", topk=2, vocab_size=10, alignment="next")


# ----------------------------------------------------------------------------------------------
# byte-level caches, bad inputs, CLI
# ----------------------------------------------------------------------------------------------

def test_byte_level_capture(teacher, tmp_path):
    from fastkd.bytes import ByteVocab, byte_targets
    from fastkd.integrations import hidden_and_head

    model, tokenizer = teacher
    texts = make_texts(5, seed=11)
    manifest = capture(model, tokenizer, texts, tmp_path / "b", byte_level=True, temperature=1.5,
                       shard_tokens=40, batch_size=2)
    vocab = ByteVocab.from_tokenizer(tokenizer, vocab_size=len(tokenizer))
    assert manifest["kind"] == "bytes" and manifest["tokenizer_fingerprint"] == vocab.fingerprint
    cache = TeacherCache(tmp_path / "b", byte_vocab=vocab)
    with pytest.raises(ValueError, match="tokenizer"):
        TeacherCache(tmp_path / "b", tokenizer=tokenizer)
    for index, text in enumerate(texts):
        item = cache[index]
        assert item["text"] == text
        ids = item["input_ids"]
        out = hidden_and_head(model, input_ids=ids[None])
        labels = torch.cat([ids[1:], torch.tensor([-100])])
        byte_lp, token_lp = byte_targets(out["hidden"][0], out["weight"], vocab, labels, temperature=1.5, impl="torch")
        finite = torch.isfinite(byte_lp)
        assert torch.equal(finite, torch.isfinite(item["teacher_byte_logprobs"]))
        assert torch.allclose(item["teacher_byte_logprobs"][finite], byte_lp[finite], rtol=2e-3, atol=1e-3)
        assert torch.allclose(item["teacher_token_logprobs"], token_lp, atol=1e-5)
        assert item["teacher_byte_offsets"].tolist() == vocab.byte_offsets(ids.numpy(), text).tolist()


def test_bad_inputs(teacher, tmp_path):
    model, tokenizer = teacher
    texts = make_texts(2, seed=1)
    with pytest.raises(ValueError, match="topk"):
        capture(model, tokenizer, texts, tmp_path / "a", topk=0)
    with pytest.raises(TypeError, match="topk"):
        capture(model, tokenizer, texts, tmp_path / "a", topk=2.5)
    with pytest.raises(ValueError, match="dtype"):
        capture(model, tokenizer, texts, tmp_path / "a", dtype="fp32")
    with pytest.raises(ValueError, match="temperature"):
        capture(model, tokenizer, texts, tmp_path / "a", temperature=0.0)
    with pytest.raises(TypeError, match="texts"):
        capture(model, tokenizer, "one string", tmp_path / "a")
    with pytest.raises(ValueError, match="topk must be <="):
        capture(model, tokenizer, texts, tmp_path / "a", topk=10_000)
    with pytest.raises(CacheError, match="no manifest.json"):
        TeacherCache(tmp_path / "nothing")
    with pytest.raises(TypeError, match="pad_token_id"):
        CacheCollator(pad_token_id="0")


def test_cli(teacher_dir, tmp_path, capsys):
    from fastkd.cli import main

    data = tmp_path / "data.txt"
    data.write_text("\n".join(make_texts(6, seed=2)) + "\n")
    out = tmp_path / "cli"
    assert main(["cache", "--teacher", str(teacher_dir), "--data", str(data), "--out", str(out),
                 "--topk", "4", "--shard-tokens", "30", "--max-length", "16"]) == 0
    assert main(["cache", "verify", str(out)]) == 0
    assert "every sha256 matches" in capsys.readouterr().out
    records = [{"prompt_token_ids": [1, 2], "prompt_logprobs": [None, {"2": -0.5}]}]
    assert main(["cache", "import-vllm", str(_write_jsonl(tmp_path / "v.jsonl", records)), "--out",
                 str(tmp_path / "v"), "--topk", "3", "--tokenizer", str(teacher_dir)]) == 0
    cache = TeacherCache(tmp_path / "v", tokenizer=transformers.AutoTokenizer.from_pretrained(teacher_dir))
    assert cache[0]["teacher_ids"].tolist() == [[2, -1, -1], [-1, -1, -1]]
