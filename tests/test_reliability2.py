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
