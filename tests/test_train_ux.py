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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
