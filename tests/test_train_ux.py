"""The trainer as a new user meets it (issue #18): one-line errors, no silently ignored settings,
data formats, config names, logging, Ctrl-C, merged LoRA, the CLI.

Tiny random Llama models on the demo tokenizers (no teacher training): every run is a few steps."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from fastkd import cli  # noqa: E402
from fastkd import demo_assets as da  # noqa: E402
from fastkd.train import TrainConfig, Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


class Assets:
    pass


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("ux_assets")
    setup = da.build_demo_setup(root, n_teacher=40, n_student=24, n_heldout=8)
    a = Assets()
    a.root = root
    a.tt, a.st = str(setup.teacher_tokenizer), str(setup.student_tokenizer)
    t_tok, s_tok = AutoTokenizer.from_pretrained(a.tt), AutoTokenizer.from_pretrained(a.st)
    a.teacher = str(da.build_model(root / "teacher", len(t_tok), hidden=32, layers=1, seed=1))
    t_tok.save_pretrained(a.teacher)
    a.student = str(da.build_model(root / "student", len(t_tok), hidden=32, layers=1, seed=2))
    t_tok.save_pretrained(a.student)
    a.xstudent = str(da.build_model(root / "xstudent", len(s_tok), hidden=32, layers=1, seed=3))
    s_tok.save_pretrained(a.xstudent)
    a.data, a.heldout = str(setup.student_data), str(setup.heldout_data)
    return a


def config(a, out, **values) -> dict:
    cfg = dict(mode="online", student=a.student, teacher=a.teacher, data=a.data, eval_data=a.heldout,
               output_dir=str(out), max_steps=2, batch_size=4, lr=1e-3, lr_schedule="constant", impl="torch",
               progress=False, seed=0)
    cfg.update(values)
    return cfg


def write_yaml(path: Path, values: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({k: v for k, v in values.items() if v is not None}), encoding="utf-8")
    return path


def read_metrics(out) -> list[dict]:
    with open(Path(out) / "metrics.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ----------------------------------------------------------------------------------------------
# bug 1: cross_tokenizer with texts longer than max_length
# ----------------------------------------------------------------------------------------------
def test_cross_tokenizer_truncates_long_texts(assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastkd.cache import capture

    a = assets
    texts = da.read_texts(a.data)
    tok = AutoTokenizer.from_pretrained(a.st)
    assert max(len(tok(t)["input_ids"]) for t in texts) > 12  # the texts are longer than max_length
    cfg = config(a, tmp_path / "online", mode="cross_tokenizer", student=a.xstudent, max_length=12)
    summary = Trainer(TrainConfig(**cfg)).train()
    assert math.isfinite(summary["loss"]) and math.isfinite(summary["eval"]["eval_byte_kl"])
    # a byte-level cache captured at one max_length, the student truncating at a shorter one
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher).eval()
    capture(teacher, AutoTokenizer.from_pretrained(a.teacher), texts, tmp_path / "bytes", byte_level=True,
            max_length=16)
    cfg = config(a, tmp_path / "cached", mode="cross_tokenizer", student=a.xstudent, teacher=None,
                 data=None, cache=str(tmp_path / "bytes"), max_length=8)
    summary = Trainer(TrainConfig(**cfg)).train()
    assert math.isfinite(summary["loss"]) and math.isfinite(summary["eval"]["eval_ce"])


# ----------------------------------------------------------------------------------------------
# bug 2: fastkd eval on a LoRA run; item 10: merged LoRA, the adapter's base path
# ----------------------------------------------------------------------------------------------
def test_eval_of_a_lora_run_and_merged_model(assets, tmp_path, capsys, monkeypatch):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    a = assets
    out = tmp_path / "lora"
    values = config(a, out, lora=True, lora_r=4, lr=1e-2, merge_lora=True)
    path = write_yaml(tmp_path / "lora.yaml", values)
    assert cli.main(["train", str(path)]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(path)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert math.isfinite(metrics["eval_ce"]) and math.isfinite(metrics["eval_kl"])
    # the adapter names its base model by an absolute path: it loads from any directory
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).is_absolute()
    assert Path(adapter["base_model_name_or_path"]) == Path(a.student).resolve()
    monkeypatch.chdir(tmp_path)
    # the merged model loads without peft and computes what base + adapter compute
    merged = AutoModelForCausalLM.from_pretrained(out / "final-merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with_adapter = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    ids = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits
    assert (got - want).norm() / want.norm() < 1e-5
    base = AutoModelForCausalLM.from_pretrained(a.student).eval()
    with torch.no_grad():
        assert (base(input_ids=ids).logits - want).norm() / want.norm() > 1e-4  # the adapter did something


# ----------------------------------------------------------------------------------------------
# bug 3: one-line errors naming the key, quickly (no Hub retries for a path that looks local)
# ----------------------------------------------------------------------------------------------
def one_line_error(args, capsys) -> str:
    started = time.perf_counter()
    code = cli.main(args)
    # (transformers' own "Loading weights" bars may come first, on lines ending in \r)
    err = [line for line in capsys.readouterr().err.strip().split("\n") if "\r" not in line]
    assert code == 2, err
    assert time.perf_counter() - started < 30  # no Hub retries
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_setup_errors_are_one_line_naming_the_key(assets, tmp_path, capsys, monkeypatch):
    import shutil

    a = assets
    no_tokenizer = tmp_path / "bare-model"
    no_tokenizer.mkdir()
    for name in os.listdir(a.student):
        if name.startswith(("config", "model", "generation")):
            shutil.copy(Path(a.student) / name, no_tokenizer / name)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    cases = [
        (dict(student=str(tmp_path / "nowhere" / "student")), "student: "),
        (dict(teacher=a.teacher + "-typo"), "teacher: "),
        (dict(student="models/stuednt"), "student: models/stuednt does not exist"),
        (dict(student=str(no_tokenizer)), "student: "),
        (dict(output_dir=str(tmp_path / "a-file" / "run")), "output_dir: "),
        (dict(eval_data=str(tmp_path / "heldout-typo.jsonl")), "eval_data: "),
        (dict(data=str(tmp_path / "train-typo.jsonl")), "data: "),
        (dict(learning_rat=0.1), "did you mean 'learning_rate'"),
    ]
    for index, (values, expected) in enumerate(cases):
        path = write_yaml(tmp_path / f"bad{index}.yaml", config(a, tmp_path / f"run{index}", **values))
        err = one_line_error(["train", str(path)], capsys)
        assert err.startswith("fastkd train: ") and expected in err, (values, err)
        assert "huggingface.co" not in err and "sentencepiece" not in err.lower(), err
    assert "holds no tokenizer" in one_line_error(["train", str(tmp_path / "bad3.yaml")], capsys)


def test_resume_with_changed_settings_is_one_line(assets, tmp_path, capsys):
    a = assets
    path = write_yaml(tmp_path / "run.yaml", config(a, tmp_path / "run", eval_data=None))
    assert cli.main(["train", str(path)]) == 0
    capsys.readouterr()
    err = one_line_error(["train", str(path), "--max_steps", "3", "--lr", "0.01"], capsys)
    assert "resume:" in err and "lr" in err


# ----------------------------------------------------------------------------------------------
# bug 4: the progress bar shows this step's loss; elapsed_s continues after a resume
# ----------------------------------------------------------------------------------------------
def test_progress_bar_shows_the_current_loss(tmp_path, capsys):
    from fastkd.train.metrics import MetricsLog

    log = MetricsLog(tmp_path, enabled=True, resume_step=0, progress=True, total=3)
    for step, loss in ((1, 1.5), (2, 0.25)):
        time.sleep(0.15)  # past tqdm's minimum redraw interval
        log.advance({"step": step, "loss": loss, "lr": 1e-3})
    log.close()
    shown = [part for part in capsys.readouterr().err.split("\r") if "2/3" in part]
    assert shown and all("loss=0.2500" in part for part in shown), shown


def test_elapsed_time_continues_after_resume(assets, tmp_path):
    a = assets
    cfg = config(a, tmp_path / "run", eval_data=None)
    Trainer(TrainConfig(**cfg), on_step=lambda trainer, record: time.sleep(0.3)).train()
    Trainer(TrainConfig(**dict(cfg, max_steps=3))).train()
    elapsed = [r["elapsed_s"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(elapsed) == 3 and elapsed[0] < elapsed[1] < elapsed[2] and elapsed[1] >= 0.3


# ----------------------------------------------------------------------------------------------
# bug 5: no silently ignored settings
# ----------------------------------------------------------------------------------------------
def test_settings_a_run_would_ignore_are_errors(monkeypatch):
    from fastkd.train import config as config_module

    good = dict(mode="online", student="s", teacher="t", data="d.jsonl")
    sft = dict(mode="sft", student="s", data="d.jsonl")
    for values, key in [(dict(sft, kd_weight=0.5), "kd_weight"), (dict(sft, divergence="jsd"), "divergence"),
                        (dict(sft, temperature=2.0), "temperature"), (dict(good, lmbda=0.3), "lmbda"),
                        (dict(good, lora_r=4), "lora_r"), (dict(good, eval_every=5), "eval_every"),
                        (dict(good, chunk_weight=0.5), "chunk_weight"), (dict(good, merge_lora=True), "merge_lora")]:
        with pytest.raises(ValueError, match=f"^{key}: "):
            TrainConfig.load(None, [], **values)
    monkeypatch.setattr(config_module, "_tracker_installed", lambda name: False)
    for values in (dict(good, report_to="tensorboard"), dict(good, tensorboard=True),
                   dict(good, report_to=["wandb", "mlflow"])):
        with pytest.raises(ValueError, match=r"^report_to: \w+ is not installed \(pip install"):
            TrainConfig.load(None, [], **values)
    assert TrainConfig.load(None, [], **good).trackers == []  # the default: no tracker, nothing asked


# ----------------------------------------------------------------------------------------------
# item 10: Ctrl-C saves a checkpoint, exits cleanly, and the run resumes exactly
# ----------------------------------------------------------------------------------------------
def run_cli(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "fastkd", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT), **kwargs)


def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(assets, tmp_path):
    from fastkd.train.checkpoint import checkpoint_step, latest_checkpoint

    a = assets
    values = config(a, tmp_path / "stopped", eval_data=None, max_steps=400, progress=True)
    stopped = run_cli(["train", str(write_yaml(tmp_path / "stopped.yaml", values))])
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    stopped.send_signal(signal.SIGINT)
    out, err = stopped.communicate(timeout=240)
    assert stopped.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted after step" in err, err[-2000:]
    step = checkpoint_step(latest_checkpoint(tmp_path / "stopped"))
    assert 3 <= step < 400
    # resume to step + 2 (a constant schedule lets max_steps change) and compare with a straight run
    done = run_cli(["train", str(tmp_path / "stopped.yaml"), "--max_steps", str(step + 2), "--progress", "false"])
    _, err = done.communicate(timeout=240)
    assert done.returncode == 0, err[-2000:]
    Trainer(TrainConfig(**dict(values, output_dir=str(tmp_path / "straight"), max_steps=step + 2,
                               progress=False))).train()  # in this process, also on one thread
    resumed = [r["loss"] for r in read_metrics(tmp_path / "stopped") if "loss" in r]
    assert resumed == [r["loss"] for r in read_metrics(tmp_path / "straight") if "loss" in r]
    assert len(resumed) == step + 2


# ----------------------------------------------------------------------------------------------
# item 7: data formats through datasets.load_dataset
# ----------------------------------------------------------------------------------------------
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"


def chat_model(a, tmp_path) -> str:
    """The student with a chat template on its tokenizer."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path / "chat-student"
    shutil.copytree(a.student, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return str(path)


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def pairs(n: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    return [{"prompt": f"Question {i}: what is {x} + {y}?", "completion": f" It is {x + y}."}
            for i, (x, y) in enumerate((rng.randint(1, 50), rng.randint(1, 50)) for _ in range(n))]


def chats(n: int, seed: int = 0):
    return [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["completion"]}]}
            for p in pairs(n, seed)]


def test_data_formats_tokenise_as_documented(assets, tmp_path):
    from transformers import AutoTokenizer

    from fastkd.train.data import CausalCollator, example_items, load_texts, pack_items

    a = assets
    tok = AutoTokenizer.from_pretrained(chat_model(a, tmp_path))
    eos = tok.eos_token_id
    cfg = TrainConfig(mode="sft", student="s", data="d", max_length=64)
    # text: EOS appended when the text fits, not when it was cut
    texts = da.read_texts(a.data)[:4]
    write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    items, fmt = example_items(tok, str(tmp_path / "t.jsonl"), cfg)
    assert fmt == "text" and [i["input_ids"].tolist() for i in items] == [tok(t)["input_ids"] + [eos] for t in texts]
    short = TrainConfig(mode="sft", student="s", data="d", max_length=5)
    assert all(len(i["input_ids"]) == 5 and i["input_ids"][-1] != eos
               for i in example_items(tok, str(tmp_path / "t.jsonl"), short)[0])
    # chat: the template's rendering, no second BOS, EOS
    items, fmt = example_items(tok, write_jsonl(tmp_path / "c.jsonl", chats(3)), cfg)
    assert fmt == "chat"
    for item, row in zip(items, chats(3)):
        rendered = tok.apply_chat_template(row["messages"], tokenize=False)
        assert item["input_ids"].tolist() == tok(rendered, add_special_tokens=False)["input_ids"] + [eos]
    # prompt/completion: the loss covers the completion and EOS only
    items, fmt = example_items(tok, write_jsonl(tmp_path / "p.jsonl", pairs(3)), cfg)
    assert fmt == "prompt_completion"
    batch = CausalCollator(0)(items)
    for row, (item, pair) in enumerate(zip(items, pairs(3))):
        prompt = tok(pair["prompt"])["input_ids"]
        completion = tok(pair["completion"], add_special_tokens=False)["input_ids"] + [eos]
        assert item["input_ids"].tolist() == prompt + completion and item["prompt_length"] == len(prompt)
        assert batch["labels"][row, :len(prompt)].eq(-100).all()
        assert batch["labels"][row, len(prompt):len(prompt) + len(completion)].tolist() == completion
        assert item["n_bytes"] == len(pair["completion"].encode("utf-8"))
    assert batch["prompt_lengths"].tolist() == [i["prompt_length"] for i in items]
    # packing: the token stream cut into blocks of max_length (a block of prompt only is dropped),
    # prompts still out of the loss
    stream = torch.cat([i["input_ids"] for i in items])
    blocks = [stream[start:start + 16] for start in range(0, len(stream), 16)]
    packed = pack_items(items, 16)
    kept = [b for b in blocks if any(torch.equal(b, p["input_ids"]) for p in packed)]
    assert len(kept) == len(packed) >= len(blocks) - 1 and all(len(b["input_ids"]) <= 16 for b in packed)
    assert sum(int((b["labels"] != -100).sum()) for b in packed) == sum(len(i["input_ids"]) - i["prompt_length"]
                                                                         for i in items)
    # the same rows from .txt, .jsonl and .parquet; a Hub-style dataset directory via hf:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n\n", encoding="utf-8")
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet")
    assert load_texts(str(tmp_path / "t.txt")) == load_texts(str(tmp_path / "t.parquet")) == texts
    assert load_texts(str(tmp_path / "t.jsonl")) == texts
    with pytest.raises(ValueError, match="^eval_data: .* has no column 'messages' for chat data"):
        example_items(tok, str(tmp_path / "t.jsonl"), TrainConfig(mode="sft", student="s", data="d",
                                                                  data_format="chat"), "eval_data")


def manual_ce(model_dir: str, items) -> float:
    """Mean next-token CE of the counted labels, plain PyTorch in float64."""
    from transformers import AutoModelForCausalLM

    from fastkd.train.data import CausalCollator

    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    batch = CausalCollator(0)(items)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   batch["labels"][:, 1:].reshape(-1), ignore_index=-100))


@pytest.mark.parametrize("kind", ["prompt_completion", "chat"])
def test_first_step_loss_is_the_ce_on_the_right_tokens(assets, tmp_path, kind):
    from fastkd.train.data import example_items

    a = assets
    student = chat_model(a, tmp_path)
    rows = pairs(4) if kind == "prompt_completion" else chats(4)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = TrainConfig(**config(a, tmp_path / "run", mode="sft", teacher=None, student=student, data=data,
                               eval_data=None, max_steps=1, batch_size=4))
    trainer = Trainer(cfg)
    items = [trainer.items[i] for i in trainer.sampler.take(4)]
    trainer.sampler.load_state_dict({"epoch": 0, "position": 0, "n": 4, "seed": 0})
    want = manual_ce(student, items)
    trainer.train()
    got = trainer.history[0]["loss"]
    assert abs(got - want) / want < 1e-5, (got, want)
    assert example_items(trainer.tokenizer, data, cfg)[1] == kind


def test_on_policy_rollouts_continue_the_prompt_field(assets, tmp_path):
    a = assets
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in pairs(8)])
    cfg = TrainConfig(**config(a, tmp_path / "run", mode="on_policy", lmbda=1.0, data=data, eval_data=None,
                               max_new_tokens=5))
    trainer = Trainer(cfg)
    batch = trainer._next_batch()
    rolled = trainer._rollout(batch)
    for row, n in enumerate(batch["prompt_lengths"].tolist()):
        assert rolled["input_ids"][row, :n].tolist() == batch["input_ids"][row, :n].tolist()
        assert rolled["labels"][row, :n].eq(-100).all() and rolled["labels"][row, n:].ne(-100).any()
    summary = trainer.train()
    assert math.isfinite(summary["loss"]) and all(r["rollout_batches"] == 1 for r in trainer.history)
    with pytest.raises(ValueError, match="^data: .* prompts without completions"):
        Trainer(TrainConfig(**config(a, tmp_path / "run2", mode="on_policy", lmbda=0.5, data=data, eval_data=None)))


# ----------------------------------------------------------------------------------------------
# item 8: Hugging Face names, did-you-mean, YAML lists, schedules from transformers
# ----------------------------------------------------------------------------------------------
def test_hugging_face_names_lists_and_schedules(assets, tmp_path):
    import yaml
    from transformers import get_scheduler

    path = tmp_path / "hf.yaml"
    path.write_text(yaml.safe_dump({
        "mode": "online", "model_name_or_path": "s", "teacher": "t", "data": "d.jsonl", "learning_rate": 3e-4,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "lr_scheduler_type": "cosine_with_restarts",
        "warmup_ratio": 0.1, "max_steps": 50, "logging_steps": 5, "save_steps": 10, "save_total_limit": 3,
        "adam_beta1": 0.8, "disable_tqdm": True, "report_to": "none", "max_seq_length": 64,
        "lora_targets": ["q_proj", "v_proj"], "lora": True}), encoding="utf-8")
    cfg = TrainConfig.load(path)
    assert (cfg.student, cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.lr_schedule) == ("s", 3e-4, 2, 4,
                                                                                    "cosine_with_restarts")
    assert (cfg.log_every, cfg.save_every, cfg.keep_checkpoints, cfg.progress, cfg.max_length) == (5, 10, 3, False, 64)
    assert cfg.betas == (0.8, 0.999) and cfg.lora_targets == "q_proj,v_proj" and cfg.trackers == []
    assert TrainConfig.load(None, [], **dict(GOOD_ONLINE, adam_betas=[0.9, 0.95])).betas == (0.9, 0.95)
    with pytest.raises(ValueError, match="lr: given twice"):
        TrainConfig.load(None, [], **dict(GOOD_ONLINE, lr=1e-3, learning_rate=1e-3))
    with pytest.raises(ValueError, match="did you mean 'grad_accum'"):
        TrainConfig.load(None, [], **dict(GOOD_ONLINE, grad_acum=2))
    with pytest.raises(ValueError, match="did you mean 'warmup_steps'"):
        TrainConfig.load(None, ["--warmup-step", "3"], **GOOD_ONLINE)
    with pytest.raises(ValueError, match="^lr_schedule must be one of"):
        TrainConfig.load(None, [], **dict(GOOD_ONLINE, lr_schedule="reduce_lr_on_plateau"))
    # the schedule is transformers.get_scheduler's; warmup_ratio and num_train_epochs set the steps
    a = assets
    trainer = Trainer(TrainConfig(**config(a, tmp_path / "run", eval_data=None, max_steps=None, num_train_epochs=2,
                                           batch_size=4, grad_accum=2, lr_schedule="cosine_with_restarts",
                                           warmup_ratio=0.25)))
    n = len(trainer.items)
    assert trainer.config.max_steps == math.ceil(2 * n / 8) and trainer.config.warmup_steps == math.ceil(
        0.25 * trainer.config.max_steps)
    reference = get_scheduler("cosine_with_restarts", torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3),
                              num_warmup_steps=trainer.config.warmup_steps,
                              num_training_steps=trainer.config.max_steps)
    want = []
    for _ in range(trainer.config.max_steps):
        want.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    trainer.train()
    assert [r["lr"] for r in trainer.history] == pytest.approx(want, rel=1e-12)


GOOD_ONLINE = dict(mode="online", student="s", teacher="t", data="d.jsonl")


# ----------------------------------------------------------------------------------------------
# item 9: trackers with train/ and eval/ groups, evaluations printed, a summary table, panels
# ----------------------------------------------------------------------------------------------
def read_events(directory: Path) -> dict:
    """tag -> [(step, value)] of the TensorBoard event files under ``directory`` (TFRecord framing)."""
    import struct

    from tensorboardX.proto import event_pb2

    tags: dict = {}
    for path in directory.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append((event.step, value.simple_value))
    return tags


def test_report_to_tensorboard_eval_lines_and_summary(assets, tmp_path, capsys):
    pytest.importorskip("tensorboardX")  # accelerate's TensorBoard tracker: tensorboard or tensorboardX
    a = assets
    out = tmp_path / "run"
    path = write_yaml(tmp_path / "run.yaml", config(a, out, max_steps=3, eval_every=1, report_to="tensorboard",
                                                    ce_weight=0.5))
    assert cli.main(["train", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "step 1 | eval ce " in printed and "step 2 | eval ce " in printed and "kl to teacher" in printed
    table = printed[printed.index("fastkd train: 3 steps done"):]
    for row in ("final training loss", "its KD term", "its CE term", "held-out CE (nats/token)",
                "KL to teacher (nats/token)"):
        assert row in table, table
    assert len(table.splitlines()) < 15
    tags = read_events(out / "tb")
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    assert [s for s, _ in tags["train/loss"]] == [1, 2, 3]
    assert [v for _, v in tags["train/loss"]] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [v for _, v in tags["eval/kl"]] == pytest.approx([r["eval_kl"] for r in records if "eval_kl" in r],
                                                            rel=1e-6)
    assert "train/kd" in tags and "train/ce" in tags and "eval/ce" in tags
    # the loss is exactly its two terms: ce_weight·CE + kd_weight·KD (τ = 1)
    for r in train:
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + r["kd"], rel=1e-6)


def test_loss_curve_has_a_panel_per_quantity(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from fastkd.train.metrics import plot_curves

    records = [{"step": s, "loss": 1.0 / s, "kd": 0.5 / s, "ce": 2.0 / s} for s in range(1, 6)]
    records += [{"step": 5, "eval_ce": 6.6, "eval_ce_per_byte": 1.9, "eval_kl": 0.3}]
    shown = []
    real = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *args, **kw: shown.append(args) or real(*args, **kw))
    assert plot_curves(records, tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert shown == [(1, 4)]  # loss | KD and CE | held-out CE | KL to the teacher
    plot_curves(records[:5], tmp_path / "train-only.png")
    assert shown[-1] == (1, 2)


# ----------------------------------------------------------------------------------------------
# item 11: a CPU install without Triton; scripts/install.sh adds the gpu extra on GPU machines
# ----------------------------------------------------------------------------------------------
def test_triton_is_an_extra_and_the_cpu_path_never_imports_it():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not any(dep.startswith("triton") for dep in project["dependencies"])
    assert "datasets" in " ".join(project["dependencies"])
    for extra in ("gpu", "test"):
        assert any(dep.startswith("triton") for dep in project["optional-dependencies"][extra]), extra
    # a Python where `import triton` fails: fastkd, the trainer and the losses work on the CPU
    script = """
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError("No module named 'triton'")
sys.meta_path.insert(0, NoTriton())
import torch, fastkd, fastkd.cli, fastkd.train, fastkd.integrations
h = torch.randn(6, 8, requires_grad=True); w = torch.randn(50, 8, requires_grad=True)
ids = torch.stack([torch.randperm(50)[:4] for _ in range(6)]); lp = torch.log_softmax(torch.randn(6, 4), -1)
fastkd.topk_kd_loss(h, w, ids, lp).backward()
fastkd.kd_loss(h, w, torch.randn(6, 8), torch.randn(50, 8), topk=8).backward()
assert not [m for m in sys.modules if m.split(".")[0] == "triton"]
print("cpu ok")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "cpu ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("gpu", [False, True])
def test_install_script_adds_the_gpu_extra_only_with_a_gpu(tmp_path, gpu):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    fake_python = bin_dir / "fake-python"
    fake_python.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 0\n')  # every pip call recorded
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit 0\n" if gpu else "#!/bin/sh\nexit 1\n")
    for path in (fake_python, smi):
        path.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(fake_python)}
    for args, want in (([], ".[gpu]" if gpu else "."), (["test"], ".[gpu,test]" if gpu else ".[test]")):
        log.write_text("")
        done = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), *args], capture_output=True,
                              text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        installs = [line.split() for line in log.read_text().splitlines() if " -e " in f" {line} "]
        assert [line[-1] for line in installs] == [want], log.read_text()


def test_version_flag(capsys):
    from fastkd import __version__

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"fastkd {__version__}"
