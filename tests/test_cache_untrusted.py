"""Caches from elsewhere (issue #16 items 1, 2): crafted manifests and shards give a CacheError naming
the file and the field, never a read outside the cache, a KeyError or a bare numpy error.

Every crafted shard here is checksum-consistent (its sha256 is rewritten into the manifest):
checksums prove nothing against a crafted cache, the layout checks must catch it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastkd.cache import CacheError, TeacherCache, import_vllm
from fastkd.cache import format as fmt


def _build(tmp_path: Path, name: str = "c") -> Path:
    """A 3-sequence top-k cache (K = 2, V = 50) in two shards, imported from vLLM-shaped lines."""
    rng = np.random.default_rng(0)
    lines = []
    for length in (4, 3, 5):
        ids = rng.integers(0, 50, size=length).tolist()
        entries = [None] + [{str(int(i)): float(-rng.uniform(1.0, 3.0)) for i in rng.choice(50, 2, replace=False)}
                            for _ in range(length - 1)]
        lines.append(json.dumps({"prompt_token_ids": ids, "prompt_logprobs": entries}))
    source = tmp_path / f"{name}.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / name
    import_vllm(source, out, topk=2, vocab_size=50, shard_tokens=5)
    return out


def _manifest(cache: Path) -> dict:
    return json.loads((cache / fmt.MANIFEST).read_text())


def _write_manifest(cache: Path, manifest) -> None:
    (cache / fmt.MANIFEST).write_text(json.dumps(manifest))


def _rewrite_shard(cache: Path, index: int, change) -> str:
    """Rewrites shard ``index`` with ``change(tensors)`` applied and its sha256/bytes recorded."""
    manifest = _manifest(cache)
    entry = manifest["shards"][index]
    tensors = {k: np.array(v) for k, v in fmt.open_shard(cache / entry["file"]).items()}
    change(tensors)
    data = fmt.safetensors_bytes(tensors, {})
    (cache / entry["file"]).write_bytes(data)
    entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    _write_manifest(cache, manifest)
    return entry["file"]


def _open(cache: Path, verify: bool = True) -> TeacherCache:
    reader = TeacherCache(cache, verify=verify)
    for i in range(len(reader)):
        reader[i]
    return reader


def test_the_untouched_cache_reads(tmp_path):
    assert len(_open(_build(tmp_path))) == 3


# ------------------------------------------------------------------------------------------------
# item 1: paths from a manifest stay in the cache
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dotdot", "absolute", "subdir", "symlink_out", "empty", "not_str"])
def test_shard_paths_must_stay_inside(tmp_path, kind):
    cache = _build(tmp_path)
    outside = tmp_path / "secret.safetensors"  # a file outside the cache, the same bytes as a shard
    first = _manifest(cache)["shards"][0]
    outside.write_bytes((cache / first["file"]).read_bytes())
    name = {"dotdot": "../secret.safetensors", "absolute": str(outside), "subdir": "sub/x.safetensors",
            "symlink_out": "link.safetensors", "empty": "", "not_str": 7}[kind]
    if kind == "symlink_out":
        os.symlink(outside, cache / "link.safetensors")
    manifest = _manifest(cache)
    manifest["shards"][0]["file"] = name
    _write_manifest(cache, manifest)
    for verify in (True, False):
        with pytest.raises(CacheError) as info:
            _open(cache, verify=verify)
        message = str(info.value)
        assert "manifest.json" in message and "shards[0].file" in message, message
        assert first["sha256"] not in message and str(outside.stat().st_size) not in message.split("manifest")[-1]


def test_a_symlink_inside_the_cache_is_fine(tmp_path):
    cache = _build(tmp_path)
    manifest = _manifest(cache)
    real = manifest["shards"][0]["file"]
    os.symlink(cache / real, cache / "alias.safetensors")
    manifest["shards"][0]["file"] = "alias.safetensors"
    _write_manifest(cache, manifest)
    assert len(_open(cache)) == 3


# ------------------------------------------------------------------------------------------------
# item 2: malformed manifests
# ------------------------------------------------------------------------------------------------

def _drop(key):
    return lambda m: m.pop(key)


def _shard0(key, value=None, drop=False):
    def change(m):
        if drop:
            m["shards"][0].pop(key)
        else:
            m["shards"][0][key] = value
    return change


MANIFEST_CASES = {
    # case: (change to the manifest dict, field the message must name)
    "json_list": (lambda m: [m], "JSON object"),
    "no_topk": (_drop("topk"), "topk"),
    "topk_str": (lambda m: m.update(topk="2"), "topk"),
    "no_shards": (_drop("shards"), "shards"),
    "shards_dict": (lambda m: m.update(shards={"a": 1}), "shards"),
    "shard_entry_list": (lambda m: m["shards"].__setitem__(0, ["x"]), "shards[0]"),
    "no_file": (_shard0("file", drop=True), "shards[0].file"),
    "no_sha256": (_shard0("sha256", drop=True), "shards[0].sha256"),
    "no_sequences": (_shard0("sequences", drop=True), "shards[0].sequences"),
    "negative_tokens": (_shard0("tokens", -3), "shards[0].tokens"),
    "no_vocab_size": (_drop("vocab_size"), "vocab_size"),
    "huge_vocab": (lambda m: m.update(vocab_size=2**24), "vocab_size"),
    "bad_dtype": (lambda m: m.update(logprob_dtype="fp8"), "logprob_dtype"),
    "no_temperature": (_drop("temperature"), "temperature"),
    "no_complete": (_drop("complete"), "complete"),
    "wrong_totals": (lambda m: m.update(sequences=99), "sequences"),
    "listed_twice": (lambda m: m["shards"].append(dict(m["shards"][0])), "listed twice"),
    "no_kind": (_drop("kind"), "kind"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_malformed_manifest_is_a_cache_error_naming_the_field(tmp_path, case):
    cache = _build(tmp_path)
    change, field = MANIFEST_CASES[case]
    manifest = _manifest(cache)
    result = change(manifest)
    _write_manifest(cache, result if case == "json_list" else manifest)
    with pytest.raises(CacheError) as info:
        _open(cache)
    assert "manifest.json" in str(info.value) and field in str(info.value), str(info.value)


def test_manifest_that_is_not_json_or_not_utf8(tmp_path):
    cache = _build(tmp_path)
    (cache / fmt.MANIFEST).write_bytes(b"\xff\xfe{")
    with pytest.raises(CacheError, match="manifest.json: not valid JSON"):
        _open(cache)


# ------------------------------------------------------------------------------------------------
# item 2: malformed shards (checksum-consistent)
# ------------------------------------------------------------------------------------------------

def _set(name, value):
    return lambda t: t.__setitem__(name, value)


SHARD_CASES = {
    # case: (change to the shard's tensors, words the message must hold)
    "seq_offsets_beyond_tokens": (lambda t: t["seq_offsets"].__setitem__(-1, t["seq_offsets"][-1] + 3), "seq_offsets"),
    # shard 0 holds 2 sequences of 7 tokens: [0, 4, 7]
    "seq_offsets_decreasing": (_set("seq_offsets", np.array([0, 8, 7], dtype=np.int64)), "must not decrease"),
    "seq_offsets_inner_beyond": (_set("seq_offsets", np.array([0, 9, 7], dtype=np.int64)), "seq_offsets"),
    "seq_offsets_not_from_zero": (lambda t: t["seq_offsets"].__setitem__(0, 1), "seq_offsets"),
    "topk_other_k": (lambda t: t.__setitem__("topk", np.concatenate([t["topk"], t["topk"][:, :1]], 1)), "topk"),
    "topk_missing": (lambda t: t.pop("topk"), "topk"),
    "input_ids_int64": (lambda t: t.__setitem__("input_ids", t["input_ids"].astype(np.int64)), "input_ids"),
    "input_ids_short": (lambda t: t.__setitem__("input_ids", t["input_ids"][:-1]), "input_ids"),
    "topk_as_float": (lambda t: t.__setitem__("topk", t["topk"].view(np.float32)), "topk"),
}


@pytest.mark.parametrize("case", sorted(SHARD_CASES))
@pytest.mark.parametrize("verify", [True, False])
def test_malformed_shard_is_a_cache_error_naming_file_and_tensor(tmp_path, case, verify):
    cache = _build(tmp_path)
    change, field = SHARD_CASES[case]
    name = _rewrite_shard(cache, 0, change)
    with pytest.raises(CacheError) as info:
        _open(cache, verify=verify)
    assert name in str(info.value) and field in str(info.value), str(info.value)


def test_a_k_that_differs_between_shards(tmp_path):
    cache = _build(tmp_path)
    name = _rewrite_shard(cache, 1, lambda t: t.__setitem__("topk", t["topk"][:, :1].copy()))
    with pytest.raises(CacheError, match=f"{name}: tensor 'topk' .*K differs from the manifest's topk"):
        _open(cache)


def _raw_header(cache: Path, index: int, edit) -> str:
    """Rewrites the JSON header of shard ``index`` with ``edit(header)`` (data bytes untouched)."""
    manifest = _manifest(cache)
    entry = manifest["shards"][index]
    data = (cache / entry["file"]).read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header = edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    new = len(text).to_bytes(8, "little") + text + data[8 + length:]
    (cache / entry["file"]).write_bytes(new)
    entry["sha256"], entry["bytes"] = hashlib.sha256(new).hexdigest(), len(new)
    _write_manifest(cache, manifest)
    return entry["file"]


def _entry(name, field, value):
    def edit(header):
        header[name][field] = value
        return header
    return edit


HEADER_CASES = {
    "header_json_list": (lambda h: [h], "JSON object"),
    "negative_data_offset": (lambda h: _entry("input_ids", "data_offsets",
                                              [-8, h["input_ids"]["data_offsets"][1] - 8])(h), "data_offsets"),
    "offsets_reversed": (lambda h: _entry("input_ids", "data_offsets",
                                          h["input_ids"]["data_offsets"][::-1])(h), "data_offsets"),
    "offsets_vs_shape": (lambda h: _entry("input_ids", "shape", [h["input_ids"]["shape"][0] + 1])(h), "data_offsets"),
    "negative_shape": (lambda h: _entry("input_ids", "shape", [-1])(h), "shape"),
    "shape_not_list": (lambda h: _entry("input_ids", "shape", "4")(h), "shape"),
    "unknown_dtype": (lambda h: _entry("input_ids", "dtype", "Q7")(h), "dtype"),
    "entry_not_object": (lambda h: h.update(input_ids=[1, 2]) or h, "input_ids"),
    "offsets_past_the_end": (lambda h: _entry("topk", "data_offsets",
                                              [x + 4096 for x in h["topk"]["data_offsets"]])(h), "does not fit"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_malformed_shard_header(tmp_path, case):
    cache = _build(tmp_path)
    edit, field = HEADER_CASES[case]
    name = _raw_header(cache, 0, edit)
    with pytest.raises(CacheError) as info:
        _open(cache)
    assert name in str(info.value) and field in str(info.value), str(info.value)


def test_truncated_and_garbage_shards(tmp_path):
    cache = _build(tmp_path)
    manifest = _manifest(cache)
    entry = manifest["shards"][0]
    for data, words in ((b"\x01\x02", "shorter than 8 bytes"), ((64).to_bytes(8, "little") + b"{", "runs past the end"),
                        ((4).to_bytes(8, "little") + b"nope", "unreadable safetensors header")):
        (cache / entry["file"]).write_bytes(data)
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        _write_manifest(cache, manifest)
        with pytest.raises(CacheError, match=words) as info:
            _open(cache)
        assert entry["file"] in str(info.value)


def _byte_cache(tmp_path: Path) -> Path:
    """A byte-level cache of one 3-token sequence, written with the format's own functions."""
    out = tmp_path / "bytes"
    out.mkdir()
    manifest = fmt.new_manifest("bytes", teacher="t", fingerprint=None, fingerprint_kind="byte_vocab",
                                vocab_size=10, topk=None, temperature=1.0, dtype="fp16", source={})
    lp = np.full((3, 257), -np.log(257), dtype=np.float16)
    tensors = {"input_ids": np.array([1, 2, 3], np.int32), "seq_offsets": np.array([0, 3], np.int64),
               "byte_logprobs": lp, "token_logprobs": np.zeros(3, np.float32),
               "byte_offsets": np.array([[0, 1], [1, 2], [2, 3]], np.int64),
               "text": np.frombuffer(b"abc", np.uint8).copy(), "text_offsets": np.array([0, 3], np.int64)}
    entry = fmt.write_shard(out, 0, tensors)
    entry["first_sequence"] = 0
    fmt.add_shard(manifest, entry)
    manifest["complete"] = True
    fmt.write_manifest(out, manifest)
    return out


def test_byte_cache_layout_checks(tmp_path):
    cache = _byte_cache(tmp_path)
    assert _open(cache)[0]["text"] == "abc"
    name = _rewrite_shard(cache, 0, lambda t: t.__setitem__("text_offsets", np.array([0, 7], np.int64)))
    with pytest.raises(CacheError, match=f"{name}: tensor 'text_offsets' must run from 0 to 3"):
        _open(cache)
    name = _rewrite_shard(cache, 0, lambda t: t.__setitem__("text_offsets", np.array([0, 3], np.int64))
                          or t.__setitem__("byte_logprobs", t["byte_logprobs"][:, :256].copy()))
    with pytest.raises(CacheError, match=f"{name}: tensor 'byte_logprobs' has shape"):
        _open(cache)


# ------------------------------------------------------------------------------------------------
# item 6: import-vllm rejects at import what the losses would reject mid-training
# ------------------------------------------------------------------------------------------------

def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


IMPORT_CASES = {
    # case: (the second prompt_logprobs entry, as JSON text, words the error must hold)
    "positive_logprob": ('{"3": {"logprob": 5.0, "rank": 1}}', "log-prob 5.0 of id 3 is above 0"),
    "minus_infinity": ('{"3": {"logprob": -Infinity, "rank": 1}}', "log-prob -inf of id 3 is not a finite"),
    "nan": ('{"3": NaN}', "log-prob nan of id 3 is not a finite"),
    "duplicate_ids": ('{"2": -1.0, "02": -2.0}', "token id 2 is listed twice"),
    "mass_above_one": ('{"2": -0.1, "3": -0.2, "4": -0.3}', "sum to 2.4"),
    "no_logprob_field": ('{"2": {"rank": 1}}', "log-prob None of id 2"),
    "key_not_an_id": ('{"a": -1.0}', "key 'a' is not a token id"),
}


@pytest.mark.parametrize("case", sorted(IMPORT_CASES))
def test_import_vllm_rejects_bad_values_naming_the_line(tmp_path, case):
    entry, words = IMPORT_CASES[case]
    good = '{"prompt_token_ids": [1, 2], "prompt_logprobs": [null, {"2": -0.5}]}'
    bad = '{"prompt_token_ids": [1, 2, 3], "prompt_logprobs": [null, {"2": -0.5}, ' + entry + ']}'
    path = _jsonl(tmp_path / "v.jsonl", [good, bad])
    with pytest.raises(ValueError, match=words) as info:
        import_vllm(path, tmp_path / "out", topk=2, vocab_size=10)
    assert f"{path}:2" in str(info.value) and "prompt_logprobs[2]" in str(info.value)


def test_import_vllm_keeps_the_servers_minus_9999(tmp_path):
    line = '{"prompt_token_ids": [1, 2], "prompt_logprobs": [null, {"2": -0.5, "5": -9999.0}]}'
    import_vllm(_jsonl(tmp_path / "v.jsonl", [line]), tmp_path / "out", topk=2, vocab_size=10)
    item = TeacherCache(tmp_path / "out")[0]
    assert item["teacher_ids"][0].tolist() == [2, 5]
    assert item["teacher_logprobs"][0, 0].item() == -0.5 and item["teacher_logprobs"][0, 1].item() < -9000


# ------------------------------------------------------------------------------------------------
# issue #18 item 6: the OpenAI-compatible server's answers, as they come
# ------------------------------------------------------------------------------------------------

def _server_answer(prompts: list[list[int]], with_ids: bool = True) -> dict:
    """A /v1/completions answer of vLLM's server for prompt token ids, with
    "prompt_logprobs": 2 (top-2 plus the prompt token when outside it, entry 0 null) and
    "return_token_ids": true; the fields and their layout are those of vLLM's
    CompletionResponse / CompletionResponseChoice (vllm/entrypoints/openai protocol)."""
    choices = []
    for index, prompt in enumerate(prompts):
        entries = [None]
        for t in range(1, len(prompt)):
            entry = {str((prompt[t] + 1) % 10): {"logprob": -0.6, "rank": 1, "decoded_token": "x"},
                     str((prompt[t] + 2) % 10): {"logprob": -1.4, "rank": 2, "decoded_token": "y"}}
            entry.setdefault(str(prompt[t]), {"logprob": -9999.0, "rank": 7, "decoded_token": "z"})
            entries.append(entry)
        choice = {"index": index, "text": " a", "logprobs": None, "finish_reason": "length",
                  "stop_reason": None, "token_ids": [4] if with_ids else None,
                  "prompt_logprobs": entries, "prompt_token_ids": prompt if with_ids else None}
        choices.append(choice)
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "teacher", "choices": choices,
            "usage": {"prompt_tokens": sum(map(len, prompts)), "total_tokens": 0, "completion_tokens": len(prompts)},
            "system_fingerprint": None, "service_tier": None, "kv_transfer_params": None}


def test_import_vllm_reads_the_openai_servers_answers(tmp_path):
    answers = [_server_answer([[1, 2, 3], [4, 5]]), _server_answer([[6, 7, 8, 9]])]
    path = _jsonl(tmp_path / "server.jsonl", [json.dumps(a) for a in answers])
    manifest = import_vllm(path, tmp_path / "out", topk=2, vocab_size=10)
    cache = TeacherCache(tmp_path / "out")
    assert manifest["sequences"] == 3 and [cache[i]["input_ids"].tolist() for i in range(3)] == [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    first = cache[0]
    assert first["teacher_ids"].tolist() == [[3, 4], [4, 5], [-1, -1]]  # row t: entry t + 1, the top 2
    assert torch_list(first["teacher_logprobs"][0]) == [-0.6, -1.4]
    batch_line = {"id": "r1", "custom_id": "a", "response": {"status_code": 200, "body": _server_answer([[3, 1]])}}
    import_vllm(_jsonl(tmp_path / "batch.jsonl", [json.dumps(batch_line)]), tmp_path / "out2", topk=2, vocab_size=10)
    assert TeacherCache(tmp_path / "out2")[0]["teacher_ids"][0].tolist() == [2, 3]


def torch_list(tensor) -> list:
    return [round(float(x), 3) for x in tensor]


def test_a_server_answer_without_token_ids_says_what_to_do(tmp_path):
    path = _jsonl(tmp_path / "server.jsonl", [json.dumps(_server_answer([[1, 2, 3]], with_ids=False))])
    with pytest.raises(ValueError, match=r"server.jsonl:1: choices\[0\] has prompt_logprobs but no "
                                         r"prompt_token_ids: .*\"return_token_ids\": true"):
        import_vllm(path, tmp_path / "out", topk=2, vocab_size=10)
    answer = _server_answer([[1, 2, 3]])
    answer["choices"][0]["prompt_logprobs"] = None
    with pytest.raises(ValueError, match=r"choices\[0\] has no prompt_logprobs"):
        import_vllm(_jsonl(tmp_path / "s2.jsonl", [json.dumps(answer)]), tmp_path / "out", topk=2, vocab_size=10)
    top = {"prompt_logprobs": [None, {"2": -0.5}]}
    with pytest.raises(ValueError, match="s3.jsonl:1: has prompt_logprobs but no prompt_token_ids"):
        import_vllm(_jsonl(tmp_path / "s3.jsonl", [json.dumps(top)]), tmp_path / "out", topk=2, vocab_size=10)


# ------------------------------------------------------------------------------------------------
# values a model would index with: checked per item
# ------------------------------------------------------------------------------------------------

def test_token_ids_outside_the_vocabulary(tmp_path):
    cache = _build(tmp_path)
    name = _rewrite_shard(cache, 0, lambda t: t["input_ids"].__setitem__(1, -5))
    with pytest.raises(CacheError, match=f"{name}: sequence 0: tensor 'input_ids' holds ids in \\[-5"):
        _open(cache)
    cache = _build(tmp_path, "c2")
    name = _rewrite_shard(cache, 0, lambda t: t["input_ids"].__setitem__(5, 50))
    with pytest.raises(CacheError, match=f"{name}: sequence 1: tensor 'input_ids' .* outside \\[0, vocab_size=50\\)"):
        _open(cache)


def test_packed_teacher_ids_past_the_vocabulary(tmp_path):
    cache = _build(tmp_path)
    # V = 50: ids take 6 bits, so the packed id field reaches 62; 55 + 1 is stored for id 55
    word = np.uint32((55 + 1) << (32 - fmt.id_bits(50)))
    name = _rewrite_shard(cache, 1, lambda t: t["topk"].__setitem__((0, 0), word))
    with pytest.raises(CacheError, match=f"{name}: sequence 0: tensor 'topk' packs teacher id 55"):
        _open(cache)


def test_byte_offsets_outside_the_text(tmp_path):
    cache = _byte_cache(tmp_path)
    name = _rewrite_shard(cache, 0, lambda t: t["byte_offsets"].__setitem__((2, 1), 9))
    with pytest.raises(CacheError, match=f"{name}: sequence 0: tensor 'byte_offsets' holds spans outside"):
        _open(cache)
    name = _rewrite_shard(cache, 0, lambda t: t.__setitem__("byte_offsets", np.array([[0, 1], [2, 1], [2, 3]], np.int64)))
    with pytest.raises(CacheError, match="reversed"):
        _open(cache)


# ------------------------------------------------------------------------------------------------
# fuzz: random structural mutations of manifests and shard headers (checksums kept consistent)
# ------------------------------------------------------------------------------------------------

_POOL = [None, -1, 0, 1, 3, 2**40, -2**40, 1.5, True, "x", "../x", "/etc/passwd", [], {}, [0, 4], [-8, 8],
         {"file": "shard-00000.safetensors"}, "I32", "U32", "F16"]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, prefix + (index,))


def _mutate(document, rng):
    """One random edit: replace a value, delete a key, or wrap a node in a list."""
    import copy

    document = copy.deepcopy(document)
    paths = [p for p in _paths(document) if p]
    path = paths[int(rng.integers(len(paths)))]
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    kind = int(rng.integers(3))
    if kind == 0 or isinstance(parent, list):
        parent[path[-1]] = _POOL[int(rng.integers(len(_POOL)))]
    elif kind == 1:
        del parent[path[-1]]
    else:
        parent[path[-1]] = [parent[path[-1]]]
    return document


def fuzz_outcomes(tmp_path: Path, count: int, seed: int) -> dict:
    """Mutates a fresh cache ``count`` times (manifest or a shard header, alternately); returns
    ``{"read": n, "read_differently": [case, ...], "cache_error": n, "other": [(case, repr), ...]}``:
    every outcome must be a read of the same items as the clean cache's, or a CacheError."""
    rng = np.random.default_rng(seed)
    clean = _build(tmp_path, "clean")
    reference = TeacherCache(clean)
    expected = [reference[i] for i in range(len(reference))]
    outcomes = {"read": 0, "read_differently": [], "cache_error": 0, "other": []}
    for case in range(count):
        cache = tmp_path / f"f{case}"
        cache.mkdir()
        for file in clean.iterdir():
            (cache / file.name).write_bytes(file.read_bytes())
        if case % 2:
            _write_manifest(cache, _mutate(_manifest(cache), rng))
        else:
            _raw_header(cache, int(rng.integers(2)), lambda header: _mutate(header, rng))
        try:
            reader = _open(cache)
            items = [reader[i] for i in range(len(reader))]
            same = len(items) == len(expected) and all(
                a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(items, expected))
            if same:
                outcomes["read"] += 1
            else:
                outcomes["read_differently"].append(case)
        except CacheError:
            outcomes["cache_error"] += 1
        except Exception as error:  # noqa: BLE001 - the point is to catch what is not a CacheError
            outcomes["other"].append((case, repr(error)))
    return outcomes


def test_fuzzed_manifests_and_headers_read_or_raise_a_cache_error(tmp_path):
    outcomes = fuzz_outcomes(tmp_path, 60, seed=0)
    assert not outcomes["other"], outcomes["other"][:5]
    assert not outcomes["read_differently"], outcomes["read_differently"]
    assert outcomes["cache_error"] > 30  # most mutations break something


def import_fuzz_outcomes(tmp_path: Path, count: int, seed: int) -> dict:
    """Random mutations of vLLM answers (both shapes) fed to import_vllm: ``{"imported": n,
    "error_naming_the_line": n, "other": [(case, repr), ...]}``."""
    rng = np.random.default_rng(seed)
    offline = {"prompt_token_ids": [1, 2, 3], "prompt_logprobs": [None, {"2": {"logprob": -0.5, "rank": 1}},
                                                                  {"3": -1.0, "4": -2.0}]}
    outcomes = {"imported": 0, "error_naming_the_line": 0, "other": []}
    for case in range(count):
        document = _mutate(_server_answer([[1, 2, 3], [4, 5]]) if case % 2 else offline, rng)
        path = tmp_path / f"m{case}.jsonl"
        path.write_text(json.dumps(document) + "\n")
        try:
            import_vllm(path, tmp_path / f"o{case}", topk=2, vocab_size=10)
            outcomes["imported"] += 1
        except ValueError as error:
            if f"{path}:1" in str(error):
                outcomes["error_naming_the_line"] += 1
            else:
                outcomes["other"].append((case, repr(error)))
        except Exception as error:  # noqa: BLE001 - the point is to catch what is not a ValueError
            outcomes["other"].append((case, repr(error)))
    return outcomes


def test_fuzzed_vllm_lines_import_or_name_the_line(tmp_path):
    outcomes = import_fuzz_outcomes(tmp_path, 60, seed=0)
    assert not outcomes["other"], outcomes["other"][:5]


def test_prompt_ids_outside_the_vocabulary_are_rejected_at_import(tmp_path):
    line = '{"prompt_token_ids": [1, -2, 3], "prompt_logprobs": [null, {"2": -0.5}, {"3": -0.5}]}'
    with pytest.raises(ValueError, match=r"v.jsonl:1: prompt_token_ids: token id -2 outside \[0, vocab_size=10\)"):
        import_vllm(_jsonl(tmp_path / "v.jsonl", [line]), tmp_path / "out", topk=2, vocab_size=10)
    row = {"input_ids": [3, 12], "target_token_ids": [[4]], "target_logprobs": [[-0.5]]}
    from fastkd.cache import import_dataset

    with pytest.raises(ValueError, match=r"d.jsonl:1: input_ids: token id 12 outside"):
        import_dataset(_jsonl(tmp_path / "d.jsonl", [json.dumps(row)]), tmp_path / "out2", topk=2, vocab_size=10)
