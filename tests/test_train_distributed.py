"""The trainer across processes: a run SIGKILLed at a random moment resumes exactly, and the trainer
runs under ``accelerate launch`` with 2 CPU processes (DDP on gloo), including an exact resume.

Every run is a fresh ``python`` subprocess of a small script written by the tests; per-step losses
are read from ``metrics.jsonl``. One intra-op thread per process: the models are tiny, and 2
processes on 2 cores must not oversubscribe them.

``accelerate launch --cpu --num_processes 2`` does *not* start 2 processes: with ``--cpu``,
accelerate 1.x uses its "simple" launcher, which only multiplies processes through ``mpirun``
(``--mpirun_hostfile``) and otherwise runs one. The torchrun-based launcher (``--multi_gpu``) with
``ACCELERATE_USE_CPU=1`` starts the 2 processes and gives ``DistributedType.MULTI_CPU`` (gloo).
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from fastkd import demo_assets as da  # noqa: E402
from fastkd.train.checkpoint import checkpoint_step, latest_checkpoint, list_checkpoints  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, os, sys, time
import torch
torch.set_num_threads(1)
from fastkd.train import TrainConfig, Trainer

cfg = TrainConfig(**json.loads(open(sys.argv[1], encoding="utf-8").read()))
crash_at = int(os.environ.get("FASTKD_TEST_CRASH_AT", "0"))
sleep = float(os.environ.get("FASTKD_TEST_STEP_SLEEP", "0"))

class Crash(RuntimeError):
    pass

def on_step(trainer, record):
    if sleep:
        time.sleep(sleep)
    if record["step"] == crash_at:
        raise Crash(f"simulated crash after step {crash_at}")

trainer = Trainer(cfg, on_step=on_step)
print(f"process {trainer.acc.process_index}/{trainer.acc.num_processes} "
      f"{trainer.acc.distributed_type}", flush=True)
try:
    summary = trainer.train()
except Crash as exc:
    print(exc, flush=True)
    sys.exit(3)
print("done", json.dumps({"step": summary["step"], "eval": summary["eval"]}), flush=True)
'''


def env() -> dict:
    out = dict(os.environ)
    out.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + out.get("PYTHONPATH", ""))
    out.pop("FASTKD_TEST_CRASH_AT", None)
    out.pop("FASTKD_TEST_STEP_SLEEP", None)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("dist_assets")
    setup = da.build_demo_setup(root, n_teacher=200, n_student=48, n_heldout=18)  # 5 eval batches of 4
    vocab = len(AutoTokenizer.from_pretrained(setup.teacher_tokenizer))
    script = root / "train_script.py"
    script.write_text(SCRIPT, encoding="utf-8")
    return dict(root=root, script=script, tokenizer=str(setup.teacher_tokenizer), data=str(setup.student_data),
                heldout=str(setup.heldout_data),
                teacher=str(da.build_model(root / "teacher", vocab, hidden=48, layers=2, seed=1)),
                student=str(da.build_model(root / "student", vocab, hidden=32, layers=2, seed=2)))


def write_config(assets, out: Path, **values) -> Path:
    cfg = dict(mode="online", student=assets["student"], tokenizer=assets["tokenizer"], teacher=assets["teacher"],
               data=assets["data"], output_dir=str(out), batch_size=4, lr=3e-3, lr_schedule="constant",
               topk=16, token_fraction=0.5, token_select="entropy", impl="torch", progress=False,
               tensorboard=False, keep_checkpoints=None, seed=0)
    cfg.update(values)
    if cfg["token_fraction"] >= 1 and "token_select" not in values:
        del cfg["token_select"]  # nothing is selected: the setting would be refused as ignored
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def run_script(assets, config: Path, *, crash_at=0, timeout=120) -> subprocess.CompletedProcess:
    e = env()
    if crash_at:
        e["FASTKD_TEST_CRASH_AT"] = str(crash_at)
    return subprocess.run([sys.executable, str(assets["script"]), str(config)], env=e, capture_output=True,
                          text=True, timeout=timeout)


def losses(out: Path) -> dict[int, float]:
    """``{step: loss}`` of metrics.jsonl; fails on a duplicated step."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"duplicated steps in {out / 'metrics.jsonl'}: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"final weights differ: {different[:5]}"


def resumed_step(stdout: str) -> int:
    match = re.search(r"fastkd train: resumed from (\S+) at step (\d+)", stdout)
    assert match, f"no resume line in:\n{stdout}"
    return int(match.group(2))


# ----------------------------------------------------------------------------------------------
# (a) SIGKILL at a random moment, resume in a fresh process
# ----------------------------------------------------------------------------------------------
KILL_STEPS = 40


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    """The reference: the same run in one go, in a fresh process."""
    ref_out = tmp_path_factory.mktemp("uninterrupted") / "run"
    ref = run_script(assets, write_config(assets, ref_out, max_steps=KILL_STEPS, save_every=2))
    assert ref.returncode == 0, ref.stdout + ref.stderr
    reference = losses(ref_out)
    assert sorted(reference) == list(range(1, KILL_STEPS + 1))
    return ref_out, reference


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="no SIGKILL on this platform")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_and_resume_is_exact(assets, uninterrupted, tmp_path, seed):
    steps = KILL_STEPS
    ref_out, reference = uninterrupted
    out = tmp_path / "killed"
    cfg = write_config(assets, out, max_steps=steps, save_every=2)

    rng = random.Random(seed)
    e = env()
    e["FASTKD_TEST_STEP_SLEEP"] = "0.03"  # a run long enough to be killed in the middle
    proc = subprocess.Popen([sys.executable, str(assets["script"]), str(cfg)], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while latest_checkpoint(out) is None:
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "no checkpoint within 90 s"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))
        assert proc.poll() is None, "the run finished before it was killed: make it longer"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    last = latest_checkpoint(out)
    assert last is not None and 2 <= checkpoint_step(last) < steps
    killed_at = checkpoint_step(last)

    resumed = run_script(assets, cfg)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed_step(resumed.stdout) == killed_at  # continued from the last complete checkpoint
    assert losses(out) == reference  # every step, bit for bit, one record each
    assert_same_weights(ref_out, out)
    assert not list(out.glob(".checkpoint-*"))  # leftovers of an interrupted save are cleaned up


# ----------------------------------------------------------------------------------------------
# (b) accelerate launch, 2 CPU processes (gloo)
# ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(assets, config: Path, *, crash_at=0, timeout=150) -> subprocess.CompletedProcess:
    e = env()
    e["ACCELERATE_USE_CPU"] = "1"  # with --multi_gpu: torchrun starts 2 processes, MULTI_CPU on gloo
    e["MASTER_ADDR"] = "127.0.0.1"
    if crash_at:
        e["FASTKD_TEST_CRASH_AT"] = str(crash_at)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(assets["script"]), str(config)]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)


def test_accelerate_two_processes_train_and_resume(assets, tmp_path):
    steps = 8
    ref_out, out = tmp_path / "ref", tmp_path / "crashed"
    extra = dict(max_steps=steps, save_every=4, eval_data=assets["heldout"])
    ref_cfg, cfg = write_config(assets, ref_out, **extra), write_config(assets, out, **extra)

    ref = launch(assets, ref_cfg)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    assert "process 0/2 DistributedType.MULTI_CPU" in ref.stdout, ref.stdout + ref.stderr
    assert "process 1/2 DistributedType.MULTI_CPU" in ref.stdout, ref.stdout + ref.stderr
    reference = losses(ref_out)
    assert sorted(reference) == list(range(1, steps + 1))
    values = [reference[s] for s in sorted(reference)]
    assert sum(values[-3:]) < sum(values[:3]), values
    assert [checkpoint_step(p) for p in list_checkpoints(ref_out)] == [4, 8]
    state = json.loads((ref_out / "checkpoint-00000008" / "state.json").read_text(encoding="utf-8"))
    assert '"processes"' in json.dumps(state["parts"]["trainer"])
    evals = [json.loads(line) for line in (ref_out / "metrics.jsonl").read_text().splitlines() if "eval_ce" in line]
    assert len(evals) == 1 and evals[0]["eval_kl"] > 0 and evals[0]["eval_tokens"] > 0
    # 5 eval batches on 2 processes (3 + 2, one repeated with weight 0): the same figures as one
    # process evaluating the final weights
    from fastkd.train import TrainConfig, Trainer

    values = json.loads(ref_cfg.read_text(encoding="utf-8"))
    values.update(student=str(ref_out / "final"), output_dir=str(tmp_path / "eval-one"))
    single = Trainer(TrainConfig(**values)).evaluate()
    assert single["eval_tokens"] == evals[0]["eval_tokens"]
    for key in ("eval_ce", "eval_ce_per_byte", "eval_kl"):
        assert abs(single[key] - evals[0][key]) <= 1e-5 * abs(single[key]), (key, single, evals[0])
    assert (ref_out / "final" / "model.safetensors").is_file() and (ref_out / "loss_curve.png").stat().st_size > 0

    crashed = launch(assets, cfg, crash_at=6)
    assert crashed.returncode != 0, crashed.stdout + crashed.stderr
    assert "simulated crash after step 6" in crashed.stdout, crashed.stdout + crashed.stderr
    assert [checkpoint_step(p) for p in list_checkpoints(out)] == [4]

    resumed = launch(assets, cfg)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed_step(resumed.stdout) == 4
    assert losses(out) == reference
    assert_same_weights(ref_out, out)

    # the same checkpoint cannot be resumed by a different number of processes
    single = run_script(assets, write_config(assets, out, max_steps=steps + 2, save_every=4))
    assert single.returncode != 0 and "processes" in single.stderr, single.stdout + single.stderr


def test_accelerate_two_processes_on_policy_resume(assets, tmp_path):
    """on_policy under DDP: rollouts (per-process RNG, restored from the checkpoint) resume exactly."""
    ref_out, out = tmp_path / "ref", tmp_path / "crashed"
    extra = dict(mode="on_policy", lmbda=0.5, topk=None, token_fraction=1.0, max_steps=4, save_every=2,
                 prompt_tokens=4, max_new_tokens=6)
    ref_cfg, cfg = write_config(assets, ref_out, **extra), write_config(assets, out, **extra)
    ref = launch(assets, ref_cfg)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    records = [json.loads(line) for line in (ref_out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert sum(r.get("rollout_batches", 0) for r in records[2:]) > 0  # a rollout after the checkpoint

    crashed = launch(assets, cfg, crash_at=3)
    assert crashed.returncode != 0 and "simulated crash after step 3" in crashed.stdout, crashed.stdout + crashed.stderr
    resumed = launch(assets, cfg)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed_step(resumed.stdout) == 2
    assert losses(out) == losses(ref_out)
    assert_same_weights(ref_out, out)
