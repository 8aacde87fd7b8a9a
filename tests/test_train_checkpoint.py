"""Trainer checkpoints (fastkd/train/checkpoint.py): exact round trip, resume, RNG, corruption,
atomicity under SIGKILL."""
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
from torch import nn

from fastkd.train.checkpoint import (CheckpointError, checkpoint_step, latest_checkpoint,
                                     list_checkpoints, load_checkpoint, rng_state,
                                     save_checkpoint, set_rng_state)

REPO = Path(__file__).resolve().parents[1]


class TiedNet(nn.Module):
    """Two Linear layers sharing one weight, plus a bf16 buffer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.register_buffer("scale", (torch.rand(6) + 0.5).to(torch.bfloat16))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.scale.float()


def make_training(seed: int = 0):
    torch.manual_seed(seed)
    model = TiedNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)
    return model, opt, sched


def train_step(model, opt, sched, x):
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    sched.step()


def assert_same(a, b, where="state"):
    """Same nesting, container types, key types, dtypes, shapes and bit-identical tensors."""
    if isinstance(a, dict):
        assert isinstance(b, dict), f"{where}: {type(b).__name__} is not a dict"
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], f"{where}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k!r}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: not a tensor"
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {b.dtype} {b.shape} != {a.dtype} {a.shape}"
        assert torch.equal(a.detach().cpu(), b), f"{where}: values differ"
    else:
        assert type(a) is type(b), f"{where}: {type(b).__name__} != {type(a).__name__}"
        if isinstance(a, (list, tuple)):
            assert len(a) == len(b), f"{where}: length differs"
            for i, (x, y) in enumerate(zip(a, b)):
                assert_same(x, y, f"{where}[{i}]")
        else:
            assert a == b, f"{where}: {b!r} != {a!r}"


def test_round_trip_and_exact_resume(tmp_path):
    model, opt, sched = make_training()
    x = torch.randn(5, 6)
    for _ in range(2):
        train_step(model, opt, sched, x)
    random.gauss(0, 1), np.random.randn(3)  # leave cached Gaussians in both generators
    trainer = {"step": 2, "best": 0.25, "done": False, "note": None, "hist": [1.5, (2, "a"), [None, True]],
               "ids": {3: "x", "3": (1,)}, "empty": {}, "mask": torch.rand(4) > 0.5,
               "bytes": torch.randint(0, 255, (7,), dtype=torch.uint8), "scalar": torch.tensor(3.5)}
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "rng": rng_state(), "trainer": trainer}
    path = save_checkpoint(tmp_path, 2, state)
    assert path == tmp_path / "checkpoint-00000002" and checkpoint_step(path) == 2
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["checkpoint.json", "state.json"] + [f"{k}.safetensors" for k in state])

    loaded = load_checkpoint(path)
    assert_same(state, loaded)
    assert isinstance(loaded["optimizer"]["param_groups"][0]["betas"], tuple)
    assert all(type(k) is int for k in loaded["optimizer"]["state"])
    assert loaded["optimizer"]["state"][0]["step"].dim() == 0
    assert loaded["model"]["scale"].dtype == torch.bfloat16

    model2, opt2, sched2 = make_training(seed=1)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    assert model2.b.weight is model2.a.weight
    train_step(model, opt, sched, x)
    train_step(model2, opt2, sched2, x)
    for (name, p), p2 in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(p, p2), f"{name} differs after resuming"
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_rng_state_restores_every_generator(tmp_path):
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    random.gauss(0, 1), np.random.randn(1), torch.rand(3)
    save_checkpoint(tmp_path, 1, {"rng": rng_state()})
    draws = lambda: (random.random(), random.gauss(0, 1), np.random.randn(5).tolist(),  # noqa: E731
                     torch.rand(5).tolist(), torch.randn(3).tolist())
    expected = draws()
    draws()
    set_rng_state(load_checkpoint(tmp_path / "checkpoint-00000001")["rng"])
    assert draws() == expected


def test_corruption_and_incomplete_checkpoints(tmp_path):
    state = {"model": {"w": torch.randn(16, 16)}, "trainer": {"step": 1}}
    path = save_checkpoint(tmp_path, 1, state)
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-5] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*checksum mismatch"):
        load_checkpoint(path)
    load_checkpoint(path, verify=False)  # the header is intact: only the checksum catches it
    file.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match="model.safetensors.*unreadable"):
        load_checkpoint(path, verify=False)

    path = save_checkpoint(tmp_path, 2, state)
    (path / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint.*interrupted"):
        load_checkpoint(path)
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-00000001"]

    path = save_checkpoint(tmp_path, 4, state)
    manifest = json.loads((path / "checkpoint.json").read_text())
    (path / "checkpoint.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)


def test_tmp_leftovers_keep_and_resave(tmp_path):
    state = lambda s: {"model": {"w": torch.full((3,), float(s)) + torch.rand(3)}}  # noqa: E731
    for s in (1, 2):
        save_checkpoint(tmp_path, s, state(s))
    leftover = tmp_path / ".checkpoint-00000003.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "notes").mkdir()
    assert list_checkpoints(tmp_path) == [tmp_path / f"checkpoint-0000000{s}" for s in (1, 2)]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000002"

    save_checkpoint(tmp_path, 3, state(3), keep=2)
    assert not leftover.exists()
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [2, 3]
    new = state(3)
    save_checkpoint(tmp_path, 3, new, keep=2)  # re-saving the same step replaces it
    assert_same(new, load_checkpoint(latest_checkpoint(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000002", "checkpoint-00000003", "notes"]
    assert latest_checkpoint(tmp_path / "missing") is None

    # killed between parking the old step-3 checkpoint and moving its replacement in
    os.replace(tmp_path / "checkpoint-00000003", tmp_path / ".checkpoint-00000003.old")
    (tmp_path / ".checkpoint-00000002.old").mkdir()  # stale: step 2 is in place
    save_checkpoint(tmp_path, 4, state(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint-0000000{s}" for s in (2, 3, 4)] + ["notes"]
    assert_same(new, load_checkpoint(tmp_path / "checkpoint-00000003"))


KILL_CHILD = """
import sys, torch
from fastkd.train.checkpoint import save_checkpoint
sys.path.insert(0, sys.argv[2])
from test_train_checkpoint import step_state
print("ready", flush=True)
for i in range(100000):
    save_checkpoint(sys.argv[1], i // 2, step_state(i // 2), keep=3)  # each step saved twice
"""


def step_state(step: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    return {"model": {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g).bfloat16()},
            "optimizer": {"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": [{"params": [0]}]},
            "trainer": {"step": step, "pair": (step, str(step))}}


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_sigkill_leaves_only_complete_checkpoints(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for trial in range(3):
        out = tmp_path / f"run{trial}"
        proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(out), str(Path(__file__).parent)],
                                stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(random.Random(trial).uniform(0.05, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        found = list_checkpoints(out)
        visible = [p for p in out.iterdir() if not p.name.startswith(".")] if out.exists() else []
        assert sorted(visible) == found, "a non-hidden directory is not a complete checkpoint"
        for path in found:
            assert_same(step_state(checkpoint_step(path)), load_checkpoint(path, verify=True))
        last = checkpoint_step(found[-1]) + 1 if found else 0
        save_checkpoint(out, last, step_state(last), keep=3)  # cleans leftovers of the killed save
        assert all(p.name.startswith("checkpoint-") for p in out.iterdir())
        for path in list_checkpoints(out):
            assert_same(step_state(checkpoint_step(path)), load_checkpoint(path))
