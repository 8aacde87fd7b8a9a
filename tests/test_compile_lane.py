"""The offline compile lane (DESIGN.md §6, docs/gpu_checks.md): GPU kernels checked without a GPU.

- ``test_ci_subset_compiles_and_fits``: the CI subset (top-k, dense, online top-k and byte drivers,
  bf16) compiled for sm_90, sm_89 and sm_80 in a subprocess without the interpreter; every rule
  must hold, and every kernel the drivers launch must have been compiled for every target.
- ``test_a_broken_rule_names_kernel_target_and_number``: an sm_89 backward too large for an RTX
  4090's 99 KB (64 x 256 tiles, three pipeline stages: 112 KB) must be reported.
- The rules and the recording on synthetic figures (fast, no compiler).
- ``test_csrc_resources``: ``nvcc -Xptxas -v`` over csrc/ for the three targets.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastkd.backends import compile_lane, launch_configs

ROOT = Path(__file__).resolve().parents[1]


def _lane_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def test_ci_subset_compiles_and_fits(tmp_path):
    report_path = tmp_path / "lane.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_lane.py"), "--no-csrc",
                          "--json", str(report_path)], env=_lane_env(), capture_output=True,
                         text=True, timeout=1200)
    assert report_path.exists(), f"the lane did not finish:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    report = json.loads(report_path.read_text())
    assert not report["violations"], "\n".join(report["violations"])
    assert run.returncode == 0, run.stderr[-3000:]
    seen = {(r["kernel"], r["target"]) for r in report["triton"]}
    for kernel in ("topk_forward_kernel", "backward_kernel", "topk_correction_kernel",
                   "dense_forward_kernel", "select_topk_kernel", "_byte_lse_forward_kernel",
                   "_byte_lse_backward_kernel"):
        for cc in compile_lane.TARGETS:
            assert (kernel, cc) in seen, f"{kernel} was not compiled for sm_{cc}"
    for r in report["triton"]:
        assert r["dtype"] == "bf16" and r["registers"] > 0 and r["seconds"] > 0
        if r["has_dot"]:
            assert r["tensor_core"] > 0
        if r["target"] == 90 and r["kernel"] in ("backward_kernel", "_byte_lse_backward_kernel"):
            assert r["wgmma"] > 0, f"{r['label']}: no wgmma on sm_90"


_BROKEN = """
import sys
from fastkd.backends import compile_lane as cl, launch_configs as lc
lc._GPU[("backward", 86, "16")] = lc.Tiles(64, 256, 64, 8, 3)   # 112 KB of shared memory
found = []
for job in cl.collect(["topk"], ["bf16"], [89], [64]):
    if job.kernel == "backward_kernel":
        found += cl.violations(cl.compile_job(job))
print("\\n".join(found))
"""


def test_a_broken_rule_names_kernel_target_and_number():
    run = subprocess.run([sys.executable, "-c", _BROKEN], env=_lane_env(), capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if "shared memory" in line]
    assert lines, run.stdout
    assert "backward_kernel[" in lines[0] and "BN=256" in lines[0] and "s3]" in lines[0]
    assert "on sm_89" in lines[0]
    needed = float(lines[0].split("needs ")[1].split(" KB")[0])
    assert needed > 99, lines[0]


def _figures(**overrides):
    figures = dict(label="k[BM=64,w8,s2]", kernel="k", dtype="bf16", target=89, num_warps=8,
                   num_stages=2, seconds=3.0, registers=200, shared=80 * 1024, local=0, stack=0,
                   spill_stores=0, tensor_core=8, wgmma=0, atomics=4, gpu_fences=0, has_dot=True)
    figures.update(overrides)
    return figures


@pytest.mark.parametrize("overrides,words", [
    (dict(seconds=75.0), ["compiles in 75 s"]),
    (dict(shared=112 * 1024), ["112.0 KB", "99 KB"]),
    (dict(registers=255, num_warps=16), ["255 registers", "512 threads"]),
    (dict(spill_stores=7), ["7 STL"]),
    (dict(tensor_core=0), ["without tensor-core"]),
    (dict(gpu_fences=3), ["3 GPU-wide MEMBAR", "4 atomics"]),
])
def test_each_rule_fails_with_kernel_target_and_number(overrides, words):
    assert compile_lane.violations(_figures()) == []
    found = compile_lane.violations(_figures(**overrides))
    assert len(found) == 1
    assert found[0].startswith("k[BM=64,w8,s2] (bf16) on sm_89: ")
    for word in words:
        assert word in found[0]


def test_float32_dots_need_no_tensor_cores_but_no_spills():
    assert compile_lane.violations(_figures(dtype="fp32", tensor_core=0)) == []
    assert compile_lane.violations(_figures(dtype="fp32", tensor_core=0, local=16))


def test_launchers_are_recorded_per_target():
    # Recording runs nothing (interpreter or not): the records carry each target's own
    # configuration, chosen by the launchers.
    stages = {}
    for cc in (80, 89, 90):
        with launch_configs.recording(cc) as records:
            compile_lane.DRIVERS["topk"].run(torch.bfloat16, 64)
        by_name = {r.kernel.fn.__name__: r for r in records}
        assert set(by_name) == {"topk_forward_kernel", "backward_kernel", "topk_correction_kernel"}
        assert by_name["topk_correction_kernel"].target == cc  # the ids of S, after the tiles
        backward = by_name["backward_kernel"]
        with launch_configs.for_target(cc):
            tiles = launch_configs.tiles("backward", torch.device("cpu"), torch.bfloat16)
        assert backward.target == cc and backward.kwargs["BN"] == tiles.BN
        # 64 rows x 512 columns, the driver's float32 dW slabs one tile wide (SLAB_BYTES = 0):
        # per slab one launch of one program per (row block, vocabulary tile), and a correction
        # that adds dh with the first slab only
        slabs = 512 // tiles.BN
        launches = [r for r in records if r.kernel.fn.__name__ == "backward_kernel"]
        assert len(launches) == slabs and all(r.grid == (-(-64 // tiles.BM),) for r in launches)
        corrections = [r for r in records if r.kernel.fn.__name__ == "topk_correction_kernel"]
        assert [r.kwargs["WITH_DH"] for r in corrections] == [True] + [False] * (slabs - 1)
        assert "maxnreg" not in backward.kwargs  # 16-bit: ptxas chooses
        stages[cc] = backward.kwargs["num_stages"]
    assert stages == {80: 3, 89: 2, 90: 3}
    assert not launch_configs.is_recording()
    assert launch_configs.target(torch.device("cpu")) == launch_configs.INTERPRETER


def test_shared_memory_limits_per_target():
    assert launch_configs.SHARED_PER_BLOCK == {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024,
                                               90: 227 * 1024}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not found on PATH")
def test_csrc_resources():
    results = compile_lane.check_csrc(list(compile_lane.TARGETS), ROOT)
    names = {r["label"].split(":")[1].split("<")[0] for r in results if "error" not in r}
    assert {"topk_stats_kernel", "topk_grad_kernel", "dense_stats_kernel"} <= names
    assert {r["target"] for r in results} == set(compile_lane.TARGETS)
    found = [v for r in results for v in compile_lane.csrc_violations(r)]
    assert not found, "\n".join(found)
