"""Reliability, second round (issue #16): crafted checkpoints, the byte loss's bad teachers,
non-finite values in training, metrics.jsonl on resume, capture --resume leftovers, the import and
cache-command errors, bf16 under the Triton interpreter, byte tokens however they are registered.

Each case asserts the error type and that the message names the argument, file or field.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastkd.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# item 1 and 2: checkpoints from elsewhere
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    state = {"model": {"w": torch.randn(3, 2)}, "trainer": {"step": 4}}
    return save_checkpoint(tmp_path / "run", 4, state), state


def _edit_json(file: Path, edit, replace: bool = False) -> None:
    """Applies ``edit`` to the JSON in ``file`` in place (``replace``: writes what it returns)."""
    data = json.loads(file.read_text())
    result = edit(data)
    file.write_text(json.dumps(result if replace else data))


def test_the_untouched_checkpoint_loads(checkpoint):
    path, state = checkpoint
    assert torch.equal(load_checkpoint(path)["model"]["w"], state["model"]["w"])


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink_out", "subdir"])
def test_checkpoint_part_paths_must_stay_inside(checkpoint, tmp_path, kind):
    path, _ = checkpoint
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((path / "model.safetensors").read_bytes())
    name = {"dotdot": "../../elsewhere.safetensors", "absolute": str(outside),
            "symlink_out": "model.safetensors", "subdir": "x/model.safetensors"}[kind]
    if kind == "symlink_out":
        (path / "model.safetensors").unlink()
        os.symlink(outside, path / "model.safetensors")
    else:
        _edit_json(path / "checkpoint.json", lambda d: d["files"].__setitem__(name, d["files"].pop("model.safetensors")))
    for verify in (True, False):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path, verify=verify)
        message = str(info.value)
        assert "checkpoint.json" in message or "state.json" in message, message
        assert str(outside.stat().st_size) not in message.replace(str(tmp_path), "")


@pytest.mark.parametrize("case", ["no_files", "files_list", "part_not_listed", "state_not_listed",
                                  "json_list", "entry_not_object", "part_name_dotdot"])
def test_checkpoint_without_a_full_file_list_never_loads(checkpoint, case):
    path, _ = checkpoint
    edits = {
        "no_files": lambda d: d.pop("files"),
        "files_list": lambda d: d.__setitem__("files", list(d["files"])),
        "part_not_listed": lambda d: d["files"].pop("model.safetensors"),
        "state_not_listed": lambda d: d["files"].pop("state.json"),
        "json_list": lambda d: [d],
        "entry_not_object": lambda d: d["files"].__setitem__("model.safetensors", "abc"),
    }
    if case == "part_name_dotdot":  # state.json (re-listed with its new checksum) names a part outside
        from fastkd.train.checkpoint import _hash

        _edit_json(path / "state.json", lambda d: d["parts"].__setitem__("../x", d["parts"].pop("model")))
        _edit_json(path / "checkpoint.json", lambda d: d["files"].__setitem__("state.json", _hash(path / "state.json")))
        field = "part '../x'"
    else:
        _edit_json(path / "checkpoint.json", edits[case], replace=case == "json_list")
        field = {"part_not_listed": "model.safetensors", "state_not_listed": "state.json",
                 "json_list": "JSON object"}.get(case, "files")
    for verify in (True, False):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path, verify=verify)
        assert field in str(info.value), str(info.value)


# ------------------------------------------------------------------------------------------------
# item 6: capture --resume deletes only its own leftovers; the cache commands print one line
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_cache import tiny_llama, train_tokenizer

    path = tmp_path_factory.mktemp("teacher")
    tokenizer = train_tokenizer(300, seed=1)
    tiny_llama(len(tokenizer), seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_capture_resume_deletes_only_its_own_tmp_files(teacher_dir, tmp_path):
    from test_cache import make_texts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastkd.cache import capture

    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    out = tmp_path / "c"
    out.mkdir()
    mine = {"notes.tmp": b"a user's file", "shard-1.safetensors.tmp": b"not a capture's name",
            "manifest.json.tmp.tmp": b"nor this"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    leftovers = ("manifest.json.tmp", "shard-00000.safetensors.tmp", "shard-00001.safetensors.tmp")
    for name in leftovers:  # what a capture killed mid-write leaves
        (out / name).write_bytes(b"half")
    capture(model, tokenizer, make_texts(4, seed=3), out, topk=2, max_length=8, shard_tokens=8, resume=True)
    for name, data in mine.items():
        assert (out / name).read_bytes() == data, name
    assert not any((out / name).exists() for name in leftovers)


def _cli(argv, capsys) -> tuple[int, str]:
    from fastkd.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    # transformers draws a progress bar on stderr while it loads weights: keep fastkd's lines
    return code, "".join(line for line in err.splitlines(keepends=True) if "Loading weights" not in line
                         and line.strip())


def test_cache_commands_print_one_line_not_a_traceback(teacher_dir, tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("the cat sat\non a mat\n")
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    (crafted / "manifest.json").write_text(json.dumps([1, 2]))
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"prompt_token_ids": [1, 2], "prompt_logprobs": [null, {"1": 5.0}]}\n')
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "manifest.json").write_text("{}")
    capture = ["cache", "capture", "--data", str(data), "--topk", "2", "--max-length", "8"]
    cases = [
        (["cache", "verify", str(tmp_path / "nothing")], "no manifest.json"),
        (["cache", "verify", str(crafted)], "must be a JSON object"),
        (["cache", "import-vllm", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o1"), "--topk", "2",
          "--vocab-size", "10"], "missing.jsonl"),
        (["cache", "import-vllm", str(bad_line), "--out", str(tmp_path / "o2"), "--topk", "2", "--vocab-size", "10"],
         "bad.jsonl:1: prompt_logprobs[1]: log-prob 5.0"),
        (["cache", "import-vllm", str(bad_line), "--out", str(tmp_path / "o3"), "--topk", "2"], "vocab_size"),
        (["cache", "import-dataset", str(data), "--out", str(tmp_path / "o4"), "--topk", "2", "--vocab-size", "10"],
         "must be .jsonl or .parquet"),
        (["cache", "import-vllm", str(bad_line), "--out", str(tmp_path / "o5"), "--topk", "2",
          "--tokenizer", "./no/such/tokenizer"], "--tokenizer: ./no/such/tokenizer does not exist"),
        (capture + ["--teacher", "./no/such/model", "--out", str(tmp_path / "o6")], "--teacher: ./no/such/model"),
        (capture[:3] + [str(tmp_path / "none.txt")] + capture[4:] + ["--teacher", str(teacher_dir), "--out",
                                                                      str(tmp_path / "o7")], "none.txt is not a file"),
        (capture + ["--teacher", str(teacher_dir), "--out", str(existing)], "already holds a cache"),
        (capture + ["--teacher", str(teacher_dir), "--out", str(tmp_path / "o8"), "--topk", "0"], "topk must be >= 1"),
    ]
    for argv, words in cases:
        code, err = _cli(argv, capsys)
        assert code == 2, (argv, err)
        assert err.startswith(f"fastkd cache {argv[1]}: ") and err.count("\n") == 1, err
        assert "Traceback" not in err and words in err, (words, err)


def test_cache_capture_interrupted_is_one_line(teacher_dir, tmp_path, capsys, monkeypatch):
    import fastkd.cache as kd_cache

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kd_cache, "capture", interrupted)
    data = tmp_path / "d.txt"
    data.write_text("the cat sat\n")
    code, err = _cli(["cache", "capture", "--teacher", str(teacher_dir), "--data", str(data), "--out",
                      str(tmp_path / "o")], capsys)
    assert code == 130 and err == "fastkd cache capture: interrupted; rerun with --resume to continue\n"


# ------------------------------------------------------------------------------------------------
# item 6: metrics.jsonl is rewritten atomically on resume
# ------------------------------------------------------------------------------------------------

def _metrics(tmp_path: Path, steps: int) -> Path:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, steps + 1))
                    + '{"step": 99, "lo')  # a line cut by a kill
    return path


def test_metrics_rewrite_on_resume_keeps_the_earlier_lines(tmp_path):
    from fastkd.train.metrics import MetricsLog

    path = _metrics(tmp_path, 50)
    log = MetricsLog(tmp_path, enabled=True, resume_step=20, progress=False, total=60)
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == list(range(1, 21))
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_a_kill_during_the_metrics_rewrite_loses_nothing(tmp_path, monkeypatch):
    """The rewrite dies just before its rename (as SIGKILL would): metrics.jsonl is the old file,
    whole, and a second resume reads it as before."""
    from fastkd.train import metrics

    path = _metrics(tmp_path, 50)
    before = path.read_bytes()

    def killed(*args):
        raise KeyboardInterrupt("killed before the rename")

    from fastkd.cache import format as cache_format  # metrics.jsonl goes through its atomic_write

    monkeypatch.setattr(cache_format.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        metrics.MetricsLog(tmp_path, enabled=True, resume_step=20, progress=False, total=60)
    assert path.read_bytes() == before
    monkeypatch.undo()
    metrics.MetricsLog(tmp_path, enabled=True, resume_step=20, progress=False, total=60).close()
    assert len(path.read_text().splitlines()) == 20


def test_sigkill_during_the_metrics_rewrite(tmp_path):
    """A real SIGKILL as soon as the rewrite of a 200k-line file starts writing: metrics.jsonl holds
    either every line or the kept ones, never fewer (an in-place rewrite is caught truncated)."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in range(1, 200_001)))
    code = ("import sys; from pathlib import Path; from fastkd.train.metrics import MetricsLog; "
            "print('ready', flush=True); "
            "MetricsLog(Path(sys.argv[1]), enabled=True, resume_step=150000, progress=False, "
            "total=1).close(); print('done', flush=True)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    import time

    assert process.stdout.readline().strip() == "ready"
    size, tmp, deadline = path.stat().st_size, tmp_path / "metrics.jsonl.tmp", time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:  # kill as soon as the rewrite writes
        if tmp.exists() or path.stat().st_size != size:
            break
        time.sleep(0.001)
    process.kill()
    process.wait()
    lines = path.read_text().splitlines()
    assert len(lines) in (150_000, 200_000), len(lines)


# ------------------------------------------------------------------------------------------------
# item 4: byte_kd_loss rejects the teachers topk_kd_loss rejects
# ------------------------------------------------------------------------------------------------

import fastkd  # noqa: E402
from fastkd.bytes import ByteVocab  # noqa: E402


def _byte_problem(n=5, v=40, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vocab = ByteVocab.from_bytes([b""] + [bytes([32 + (i % 90)]) + b"x" for i in range(v - 1)])
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    weight = torch.randn(v, d, generator=gen)
    teacher_hidden, teacher_weight = torch.randn(n, d, generator=gen), torch.randn(v, d, generator=gen)
    teacher = torch.log_softmax(torch.randn(n, 257, generator=gen), dim=-1)
    tokens = -torch.rand(n, generator=gen)
    pairs = torch.stack([torch.arange(n), torch.arange(n)], dim=1)
    labels = torch.randint(1, v, (n,), generator=gen)
    return dict(vocab=vocab, hidden=hidden, weight=weight, teacher_hidden=teacher_hidden,
                teacher_weight=teacher_weight, teacher=teacher, tokens=tokens, pairs=pairs, labels=labels)


def _set_row(t, row, value):
    t = t.clone()
    t[row] = value
    return t


BYTE_TEACHERS = {
    # case: (changes to the call, words the error must hold)
    "nan_teacher_hidden": (lambda p: dict(teacher_hidden=_set_row(p["teacher_hidden"], 2, math.nan)),
                           "teacher_hidden: NaN or inf at aligned pair 2"),
    "inf_teacher_weight": (lambda p: dict(teacher_weight=_set_row(p["teacher_weight"], 3, math.inf)),
                           "teacher_weight: NaN or inf"),
    "row_all_minus_inf": (lambda p: dict(teacher_byte_logprobs=_set_row(p["teacher"], 1, -math.inf)),
                          "teacher_byte_logprobs must be log-probabilities of a distribution over the 257 buckets (<= 0, -inf for an empty bucket, no NaN, summing to 1); aligned pair 1 has no finite bucket"),
    "row_all_zeros": (lambda p: dict(teacher_byte_logprobs=_set_row(p["teacher"], 4, 0.0)),
                      "aligned pair 4 has a mass of 257"),
    "row_of_half_mass": (lambda p: dict(teacher_byte_logprobs=_set_row(p["teacher"], 0, p["teacher"][0] - math.log(2))),
                         "aligned pair 0 has a mass of 0.5"),
    "row_with_nan": (lambda p: dict(teacher_byte_logprobs=_set_row(p["teacher"], 2, math.nan)), "aligned pair 2 has NaN"),
    "token_logprob_plus_5": (lambda p: dict(teacher_byte_logprobs=p["teacher"], chunk_weight=0.5,
                                            teacher_token_logprobs=_set_row(p["tokens"], 3, 5.0)),
                             "teacher_token_logprobs: the teacher's token log-prob at teacher row 3 is 5.0"),
    "token_logprob_nan": (lambda p: dict(teacher_byte_logprobs=p["teacher"], chunk_weight=0.5,
                                         teacher_token_logprobs=_set_row(p["tokens"], 0, math.nan)),
                          "teacher_token_logprobs"),
}


@pytest.mark.parametrize("case", sorted(BYTE_TEACHERS))
def test_byte_loss_rejects_bad_teachers(case):
    p = _byte_problem()
    change, words = BYTE_TEACHERS[case]
    changes = change(p)
    kwargs = dict(labels=p["labels"], impl="torch")
    if "teacher_byte_logprobs" not in changes:
        kwargs.update(teacher_hidden=p["teacher_hidden"], teacher_weight=p["teacher_weight"], teacher_byte_vocab=p["vocab"])
    kwargs.update(changes)
    with pytest.raises(ValueError) as info:
        fastkd.byte_kd_loss(p["hidden"], p["weight"], p["vocab"], p["pairs"], **kwargs)
    assert words in str(info.value), str(info.value)


def test_byte_loss_bad_teacher_rows_that_are_ignored_are_not_read():
    p = _byte_problem()
    teacher = _set_row(_set_row(p["teacher"], 1, -math.inf), 4, 0.0)
    labels = p["labels"].clone()
    labels[[1, 4]] = -100
    loss = fastkd.byte_kd_loss(p["hidden"], p["weight"], p["vocab"], p["pairs"], teacher_byte_logprobs=teacher,
                               labels=labels, impl="torch", reduction="none")
    assert torch.isfinite(loss).all() and loss[1] == 0 and loss[4] == 0


# ------------------------------------------------------------------------------------------------
# item 5: fastkd.config.check_finite, an opt-in check riding on the value checks' one sync
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def check_finite():
    from fastkd.config import config

    config.check_finite = True
    yield config
    config.check_finite = False
    config.check_values = True


def _sync_count(monkeypatch):
    """Counts ``Tensor.tolist`` calls: the one host sync of the value checks is a tolist."""
    calls = []
    original = torch.Tensor.tolist

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    return calls


@pytest.mark.parametrize("loss", ["topk", "kd", "kd_teacher", "byte", "byte_logprobs"])
@pytest.mark.parametrize("where", ["hidden", "weight"])
def test_check_finite_names_the_argument_without_an_extra_sync(check_finite, monkeypatch, loss, where):
    p = _byte_problem()
    hidden, weight = p["hidden"].detach().clone(), p["weight"].clone()
    teacher_hidden = p["teacher_hidden"].clone()
    if loss == "kd_teacher":
        teacher_hidden[3, 1] = math.inf if where == "hidden" else teacher_hidden[3, 1]
        teacher_weight = _set_row(p["teacher_weight"], 7, math.nan) if where == "weight" else p["teacher_weight"]
    else:
        teacher_weight = p["teacher_weight"]
        if where == "hidden":
            hidden[3, 1] = math.nan
        else:
            weight[7, 0] = -math.inf
    ids = torch.topk(torch.randn(5, 40), 3).indices
    logprobs = torch.log_softmax(torch.randn(5, 3), -1) - 1.0
    calls = {
        "topk": lambda: fastkd.topk_kd_loss(hidden, weight, ids, logprobs, impl="torch"),
        "kd": lambda: fastkd.kd_loss(hidden, weight, teacher_hidden, teacher_weight, impl="torch"),
        "kd_teacher": lambda: fastkd.kd_loss(hidden, weight, teacher_hidden, teacher_weight, impl="torch"),
        "byte": lambda: fastkd.byte_kd_loss(hidden, weight, p["vocab"], p["pairs"], teacher_byte_logprobs=p["teacher"],
                                            impl="torch"),
        "byte_logprobs": lambda: fastkd.byte_logprobs(hidden, weight, p["vocab"], impl="torch"),
    }
    syncs = _sync_count(monkeypatch)
    with pytest.raises(ValueError) as info:
        calls[loss]()
    name = ("teacher_" if loss == "kd_teacher" else "") + where
    row = 3 if where == "hidden" else 7
    assert f"{name} holds non-finite values" in str(info.value) and f"row {row}" in str(info.value), str(info.value)
    assert len(syncs) == 1, f"{len(syncs)} host syncs"  # the value checks' one sync, no other
    check_finite.check_values = False  # then the finiteness check is one sync of its own
    syncs.clear()
    with pytest.raises(ValueError, match=f"{name} holds non-finite values"):
        calls[loss]()
    assert len(syncs) == 1


def test_check_finite_is_off_by_default_and_passes_finite_inputs(monkeypatch):
    from fastkd.config import config

    assert config.check_finite is False
    p = _byte_problem()
    hidden = p["hidden"].detach().clone()
    hidden[0, 0] = math.nan
    ids = torch.topk(torch.randn(5, 40), 3).indices
    logprobs = torch.log_softmax(torch.randn(5, 3), -1) - 1.0
    assert torch.isnan(fastkd.topk_kd_loss(hidden, p["weight"], ids, logprobs, impl="torch"))  # as in PyTorch
    config.check_finite = True
    try:
        good = fastkd.topk_kd_loss(p["hidden"], p["weight"], ids, logprobs, impl="torch")
        assert torch.isfinite(good)
    finally:
        config.check_finite = False


# ------------------------------------------------------------------------------------------------
# item 5: non-finite values in training
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_assets(tmp_path_factory):
    pytest.importorskip("accelerate")
    from transformers import AutoTokenizer

    from fastkd import demo_assets as da

    root = tmp_path_factory.mktemp("guard_assets")
    setup = da.build_demo_setup(root, n_teacher=64, n_student=32, n_heldout=8)
    tok = AutoTokenizer.from_pretrained(setup.teacher_tokenizer)
    student = da.build_model(root / "student", len(tok), hidden=16, layers=1, seed=2)
    return dict(student=str(student), tokenizer=str(setup.teacher_tokenizer), data=str(setup.student_data))


def _guard_config(a, out, **values):
    from fastkd.train import TrainConfig

    cfg = dict(mode="sft", student=a["student"], tokenizer=a["tokenizer"], data=a["data"], output_dir=str(out),
               max_steps=6, batch_size=4, lr=1e-3, lr_schedule="constant", impl="torch", progress=False,
               tensorboard=False, save_final=False, save_every=2, keep_checkpoints=None)
    cfg.update(values)
    return TrainConfig(**cfg)


def _poison_loss_at(trainer, steps):
    """The loss rows of the given (1-based) steps become NaN, as a NaN hidden state would make them."""
    original = trainer._loss_rows

    def poisoned(model, batch, on_policy=False):
        rows, stats, counted = original(model, batch, on_policy)
        if trainer.step + 1 in steps:
            rows = rows * math.nan
        return rows, stats, counted

    trainer._loss_rows = poisoned


def test_a_nan_loss_stops_the_run_naming_step_and_batch(train_assets, tmp_path, one_thread):
    from fastkd.train import Trainer
    from fastkd.train.checkpoint import list_checkpoints
    from fastkd.train.guard import NonFiniteError

    trainer = Trainer(_guard_config(train_assets, tmp_path))
    _poison_loss_at(trainer, {4})
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    with pytest.raises(NonFiniteError) as info:
        trainer.train()
    message = str(info.value)
    assert message.startswith("step 4: loss nan and gradient norm nan on the batch of data epoch 0, positions 12..15")
    assert "(items " in message and "on_nonfinite: skip" in message
    assert trainer.step == 3 and [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000002"]
    after = trainer.student.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())  # step 4 updated nothing
    assert any(not torch.equal(before[k], after[k]) for k in before)  # steps 1..3 did


def test_skip_drops_the_update_and_counts_it(train_assets, tmp_path, one_thread):
    from fastkd.train import Trainer

    reference = Trainer(_guard_config(train_assets, tmp_path / "ref", max_steps=2))
    reference.train()
    trainer = Trainer(_guard_config(train_assets, tmp_path / "skip", on_nonfinite="skip", max_steps=3))
    _poison_loss_at(trainer, {3})
    trainer.train()
    weights = trainer.student.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in reference.student.state_dict().items())  # step 3: no update
    assert [r.get("skipped_nonfinite", 0) for r in trainer.history] == [0, 0, 1]
    logged = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["skipped_nonfinite"] == 1 and math.isnan(logged[-1]["loss"])


def test_skip_gives_up_after_many_in_a_row(train_assets, tmp_path, one_thread):
    from fastkd.train import Trainer
    from fastkd.train.guard import MAX_CONSECUTIVE_SKIPS, NonFiniteError

    trainer = Trainer(_guard_config(train_assets, tmp_path, on_nonfinite="skip", max_steps=MAX_CONSECUTIVE_SKIPS + 2,
                                    save_every=0))
    _poison_loss_at(trainer, set(range(2, 100)))
    with pytest.raises(NonFiniteError, match=f"step {MAX_CONSECUTIVE_SKIPS + 1}: .*{MAX_CONSECUTIVE_SKIPS} steps in a row"):
        trainer.train()


def test_non_finite_weights_are_never_checkpointed(train_assets, tmp_path, one_thread):
    from fastkd.train import Trainer
    from fastkd.train.checkpoint import list_checkpoints, load_checkpoint
    from fastkd.train.guard import NonFiniteError

    def poison_weights(trainer, record):
        if trainer.step == 3:
            with torch.no_grad():
                next(trainer.student.parameters())[0, 0] = math.inf

    trainer = Trainer(_guard_config(train_assets, tmp_path, on_nonfinite="skip"), on_step=poison_weights)
    with pytest.raises(NonFiniteError, match=r"step 4: non-finite weights \(model\.embed_tokens\.weight\)"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000002"]
    state = load_checkpoint(tmp_path / "checkpoint-00000002")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_on_nonfinite_is_checked(train_assets, tmp_path):
    with pytest.raises(ValueError, match="on_nonfinite must be one of error, skip"):
        _guard_config(train_assets, tmp_path, on_nonfinite="ignore")


# ------------------------------------------------------------------------------------------------
# item 6: bf16 on impl="triton" under TRITON_INTERPRET=1 is refused (the interpreter's bf16 tl.dot)
# ------------------------------------------------------------------------------------------------

def test_bf16_triton_under_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = _byte_problem()
    hidden, weight = p["hidden"].detach().bfloat16(), p["weight"].bfloat16()
    ids = torch.topk(torch.randn(5, 40), 3).indices
    logprobs = torch.log_softmax(torch.randn(5, 3), -1) - 1.0
    calls = [
        lambda: fastkd.topk_kd_loss(hidden, weight, ids, logprobs, impl="triton"),
        lambda: fastkd.kd_loss(hidden, weight, hidden, weight, impl="triton"),
        lambda: fastkd.byte_logprobs(hidden, weight, p["vocab"], impl="triton"),
        lambda: fastkd.byte_kd_loss(hidden, weight, p["vocab"], p["pairs"], teacher_byte_logprobs=p["teacher"],
                                    impl="triton"),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="impl='triton' with bfloat16 inputs under TRITON_INTERPRET=1"):
            call()
    assert fastkd.resolve_impl("auto", torch.device("cuda"), torch.bfloat16) == "torch"
    assert fastkd.bytes.resolve_byte_impl("auto", torch.device("cuda"), torch.bfloat16) == "torch"
    assert fastkd.resolve_impl("triton", torch.device("cpu"), torch.float16) == "triton"  # fp16 still runs there
    monkeypatch.delenv("TRITON_INTERPRET")  # on a GPU without the interpreter, bf16 goes to Triton
    import importlib.util

    expected = "chunked" if importlib.util.find_spec("triton") is not None else "torch"  # the chunked plan
    assert fastkd.resolve_impl("auto", torch.device("cuda"), torch.bfloat16) == expected


# ------------------------------------------------------------------------------------------------
# item 6: byte tokens <0xNN> map to their byte however they are registered; control tokens to none
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("registered", ["vocab", "special", "added"])
def test_byte_fallback_tokens_however_registered(registered):
    from test_bytes_tokenizers import UNSEEN, sentencepiece_unigram
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_str(sentencepiece_unigram().to_str())
    pieces = [f"<0x{b:02X}>" for b in range(256)]
    if registered == "special":  # the byte pieces also listed as special added tokens
        tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in pieces])
    elif registered == "added":
        tokenizer.add_tokens([AddedToken(p, special=False, normalized=False) for p in pieces])
    if registered != "vocab":
        added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        assert set(pieces) <= added
    vocab = ByteVocab.from_tokenizer(tokenizer)
    for byte in (0x00, 0x0A, 0x41, 0xE6, 0xFF):
        assert vocab.token_bytes[tokenizer.token_to_id(f"<0x{byte:02X}>")] == bytes([byte]), hex(byte)
    for control in ("<s>", "</s>", "<unk>"):
        assert vocab.token_bytes[tokenizer.token_to_id(control)] == b"", control
    for text in UNSEEN[:5]:  # characters only byte fallback can spell
        ids = tokenizer.encode(text).ids
        assert any(tokenizer.id_to_token(i).startswith("<0x") for i in ids)
        assert vocab.decode(ids).removeprefix(b" ") == text.encode(), text


def test_byte_pieces_added_beyond_the_vocabulary_and_without_byte_fallback():
    from test_bytes_tokenizers import byte_level_bpe, sentencepiece_unigram
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_str(sentencepiece_unigram().to_str())
    tokenizer.add_special_tokens([AddedToken("<0x1F>", special=True), AddedToken("<|im_start|>", special=True)])
    vocab = ByteVocab.from_tokenizer(tokenizer)
    assert vocab.token_bytes[tokenizer.token_to_id("<|im_start|>")] == b""
    assert vocab.token_bytes[tokenizer.token_to_id("<0x1F>")] == b"\x1f"
    # a byte-level BPE has no byte fallback: "<0x1F>" there is a control token (special) or text
    plain = Tokenizer.from_str(byte_level_bpe().to_str())
    plain.add_special_tokens([AddedToken("<0x1F>", special=True)])
    plain.add_tokens([AddedToken("<0x2A>", special=False)])
    table = ByteVocab.from_tokenizer(plain).token_bytes
    assert table[plain.token_to_id("<0x1F>")] == b"" and table[plain.token_to_id("<0x2A>")] == b"<0x2A>"


# ------------------------------------------------------------------------------------------------
# fuzz: random structural mutations of checkpoint.json and state.json (checksums kept consistent)
# ------------------------------------------------------------------------------------------------

def _same(a, b) -> bool:
    """Equal nests: same types, keys, tuples/lists, and bit-identical tensors."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def checkpoint_fuzz_outcomes(tmp_path: Path, count: int, seed: int) -> dict:
    """``{"loaded": n, "loaded_differently": [...], "checkpoint_error": n, "other": [...]}``."""
    import numpy as np
    from test_cache_untrusted import _mutate

    from fastkd.train.checkpoint import _hash

    rng = np.random.default_rng(seed)
    state = {"model": {"w": torch.randn(3, 2), "b": torch.arange(4)}, "optimizer": {"state": {0: {"step": 3}}},
             "trainer": {"step": 4, "history": [{"loss": 1.5}], "pair": (1, "a")}}
    clean = save_checkpoint(tmp_path / "clean", 4, state)
    outcomes = {"loaded": 0, "loaded_differently": [], "checkpoint_error": 0, "other": []}
    for case in range(count):
        path = tmp_path / f"f{case}" / clean.name
        path.mkdir(parents=True)
        for file in clean.iterdir():
            (path / file.name).write_bytes(file.read_bytes())
        if case % 2:
            _edit_json(path / "checkpoint.json", lambda d: _mutate(d, rng), replace=True)
        else:
            _edit_json(path / "state.json", lambda d: _mutate(d, rng), replace=True)
            _edit_json(path / "checkpoint.json", lambda d: d["files"].__setitem__("state.json", _hash(path / "state.json")))
        try:
            loaded = load_checkpoint(path)
        except CheckpointError:
            outcomes["checkpoint_error"] += 1
            continue
        except Exception as error:  # noqa: BLE001 - the point is to catch what is not a CheckpointError
            outcomes["other"].append((case, repr(error)))
            continue
        if _same(loaded, state):
            outcomes["loaded"] += 1
        else:
            outcomes["loaded_differently"].append(case)
    return outcomes


def test_fuzzed_checkpoint_indexes_load_or_raise_a_checkpoint_error(tmp_path):
    outcomes = checkpoint_fuzz_outcomes(tmp_path, 40, seed=0)
    assert not outcomes["other"], outcomes["other"][:5]
