"""The CUDA backend (``impl="cuda"``, csrc/): what a CPU machine can check, and the GPU lane.

CPU lane (needs ``nvcc``; skipped with that reason where it is absent):
- every ``csrc/*.cu`` compiles with nvcc (compile only), so a broken kernel fails CI;
- the bindings link against those objects and reject bad arguments before any launch;
- the kernels' code itself — ``csrc/kd_math.cuh``, run thread by thread on the host by
  ``csrc/host/harness.cpp`` — stands in for the extension: first kernel by kernel against float64
  formulas (fp32/fp16/bf16 buffers, unaligned rows), then end to end through ``fastkd.api`` with
  the backend's Python orchestration (chunking, the (N, K) epilogue, gradients in the forward or
  recomputed in the backward) against ``fastkd.reference``.
GPU lane (``-m gpu``): the real extension against the float64 reference, every option, 3 dtypes.
"""
from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import fastkd
from fastkd import api
from fastkd import divergences as dv
from fastkd.backends import chunked, cuda_backend, cuda_build
from fastkd.reference import kd_loss_reference, topk_kd_loss_reference

from conftest import assert_rel_close, make_problem

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) not found on PATH")

# Relative error vs the float64 reference: (loss, gradients). The CPU harness runs fp32 math on
# fp32 buffers; the GPU rows are provisional until the first GPU run (16-bit buffers round the
# logits and dz to 16 bits, as a naive 16-bit loss does).
HOST_TOL = (1e-5, 1e-4)
GPU_TOL = {torch.float32: (1e-4, 1e-3), torch.float16: (1e-2, 2e-2), torch.bfloat16: (3e-2, 6e-2)}
BUFFER_DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# building: nvcc objects (compile-only test), the bindings module, the host harness
# ------------------------------------------------------------------------------------------------

def _cuda_dirs() -> tuple[Path, Path]:
    """The toolkit's include and library folders (nvcc on PATH may be a link or a wrapper)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             str(Path(os.path.realpath(NVCC)).parents[1]), "/usr/local/cuda",
             *sorted(map(str, Path("/usr/local").glob("cuda-*")), reverse=True)]
    for root in filter(None, roots):
        for include, lib in (("include", "lib64"), ("targets/x86_64-linux/include",
                                                    "targets/x86_64-linux/lib")):
            if (Path(root) / include / "cuda_runtime.h").exists():
                return Path(root) / include, Path(root) / lib
    pytest.skip("nvcc found but not the CUDA toolkit's headers (set CUDA_HOME)")


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise AssertionError(f"{' '.join(cmd)}\nfailed with:\n{done.stdout}{done.stderr}")


def _cxx() -> str:
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler (c++/g++) beside nvcc")
    return cxx


@pytest.fixture(scope="module")
def cuda_objects(tmp_path_factory) -> list[Path]:
    """Every csrc/*.cu compiled once by nvcc (sm_80, -fPIC), in parallel."""
    if NVCC is None:
        pytest.skip("nvcc (CUDA toolkit) not found on PATH")
    out = tmp_path_factory.mktemp("nvcc")
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, f"no CUDA sources in {CSRC}"
    jobs = [[NVCC, "-std=c++17", "-arch=sm_80", "-O1", "-Xcompiler", "-fPIC", "-c", str(src),
             "-o", str(out / (src.stem + ".o"))] for src in sources]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        list(pool.map(_run, jobs))
    return [out / (src.stem + ".o") for src in sources]


@needs_nvcc
def test_every_cu_file_compiles_with_nvcc(cuda_objects):
    assert {p.stem for p in cuda_objects} == {p.stem for p in CSRC.glob("*.cu")}
    assert all(p.stat().st_size > 0 for p in cuda_objects)


@pytest.fixture(scope="module")
def bindings(cuda_objects, tmp_path_factory):
    """csrc/bindings.cpp linked with the nvcc objects into a plain pybind11 module."""
    pybind11 = pytest.importorskip("pybind11")
    include, lib = _cuda_dirs()
    out = tmp_path_factory.mktemp("bindings")
    target = out / f"fastkd_cuda{sysconfig.get_config_var('EXT_SUFFIX')}"
    _run([_cxx(), "-std=c++17", "-O1", "-fPIC", "-shared", f"-I{pybind11.get_include()}",
          f"-I{sysconfig.get_paths()['include']}", f"-I{include}", str(CSRC / "bindings.cpp"),
          *map(str, cuda_objects), "-o", str(target), f"-L{lib}", "-lcudart", f"-Wl,-rpath,{lib}"])
    spec = importlib.util.spec_from_file_location("fastkd_cuda", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_nvcc
def test_bindings_reject_bad_arguments_before_launching(bindings):
    x = torch.zeros(4, 8)
    stats = lambda **kw: bindings.topk_stats(**{  # noqa: E731
        "logits": x.data_ptr(), "dtype": 0, "rows": 4, "vocab": 8, "sorted_ids": 0, "k": 0,
        "inv_temp": 1.0, "cap": 0.0, "with_tail": False, "with_ce": False, "with_stats": False,
        "lse": x.data_ptr(), "tail_lse": 0, "lse_ce": 0, "mean_z": 0, "stream": 0, **kw})
    bindings.topk_stats.__doc__  # the module imported and exposes its entry points
    with pytest.raises(ValueError, match="dtype code must be 0"):
        stats(dtype=7)
    with pytest.raises(ValueError, match="vocab must be in"):
        stats(vocab=0)
    with pytest.raises(ValueError, match="rows must be in"):
        stats(rows=-1)
    with pytest.raises(ValueError, match="lse must not be a null pointer"):
        stats(lse=0)
    with pytest.raises(ValueError, match="logits must be 4-byte aligned"):
        stats(logits=x.data_ptr() + 2)
    with pytest.raises(ValueError, match="kind must be in"):
        bindings.dense_divergence(x.data_ptr(), x.data_ptr(), 0, 4, 8, 1.0, 0.0, 0.0, 5, 0.5,
                                  x.data_ptr(), x.data_ptr(), x.data_ptr(), x.data_ptr(), 0)
    # Host memory is refused (no driver here: the pointer cannot even be inspected).
    with pytest.raises((ValueError, RuntimeError), match="logits"):
        stats()
    stats(rows=0)  # nothing to do: no pointer is touched


class HostExtension:
    """The extension's entry points, run on the CPU by csrc/host/harness.cpp (same arguments)."""

    SIGNATURES = {  # p pointer, i int, l int64, d double, b bool
        "topk_stats": "pillplddbbbppppp",
        "topk_grad": "pillpplpppppddbbp",
        "dense_stats": "ppilldddbbppppp",
        "dense_divergence": "ppilldddidppppp",
        "dense_grad": "ppilldddidpppppppbp",
    }
    CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int, "l": ctypes.c_int64,
              "d": ctypes.c_double, "b": ctypes.c_bool}

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        for name, sig in self.SIGNATURES.items():
            fn = getattr(self.lib, f"fastkd_host_{name}")
            fn.argtypes = [self.CTYPES[c] for c in sig]
            fn.restype = ctypes.c_int
            setattr(self, name, self._wrap(name, fn, sig))

    @staticmethod
    def _wrap(name, fn, sig):
        def call(*args):
            assert len(args) == len(sig), f"{name}: {len(args)} arguments, expected {len(sig)}"
            args = [(a or None) if c == "p" else a for a, c in zip(args, sig)]
            if fn(*args):
                raise ValueError(f"{name}: unknown dtype code")
        return call


@pytest.fixture(scope="module")
def host_ext(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc (CUDA toolkit) not found on PATH: its headers are needed")
    include, _lib = _cuda_dirs()
    target = tmp_path_factory.mktemp("harness") / "fastkd_host_harness.so"
    _run([_cxx(), "-std=c++17", "-O2", "-fPIC", "-shared", f"-I{include}",
          str(CSRC / "host" / "harness.cpp"), "-o", str(target)])
    return HostExtension(target)


# ------------------------------------------------------------------------------------------------
# the kernels' code, kernel by kernel, against float64 formulas
# ------------------------------------------------------------------------------------------------

def _buffer(rows, vocab, dtype, seed, scale=3.0, offset=1):
    """Random logits stored at an odd element offset, so rows start at every alignment."""
    gen = torch.Generator().manual_seed(seed)
    storage = (torch.randn(rows * vocab + offset, generator=gen) * scale).to(dtype)
    return storage[offset:].view(rows, vocab)


def _ids(rows, vocab, k, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(rows)])
    ids[0, 1:] = -1  # a ragged row with one id
    ids[1] = -1  # a row without S
    return ids


@needs_nvcc
@pytest.mark.parametrize("code", [0, 1, 2])
@pytest.mark.parametrize("vocab", [37, 1000])  # 37: fewer elements than threads, odd; 1000: vectors
def test_host_topk_stats_match_float64(host_ext, code, vocab):
    rows, k, temperature, cap = 6, 5, 1.7, 4.0
    logits = _buffer(rows, vocab, BUFFER_DTYPES[code], seed=vocab + code)
    ids = _ids(rows, vocab, k, seed=1)
    sorted_ids, _perm = cuda_backend.sorted_topk_ids(ids, vocab)
    out = torch.zeros(4, rows)
    host_ext.topk_stats(logits.data_ptr(), code, rows, vocab, sorted_ids.data_ptr(), k,
                        1 / temperature, cap, True, True, True, *(o.data_ptr() for o in out), 0)
    s = dv.softcap(logits.double(), cap)
    z = s / temperature
    lse = torch.logsumexp(z, dim=1)
    in_s = dv.topk_mask(ids.clamp(min=0), ids >= 0, vocab)
    tail = dv.masked_logsumexp(z, ~in_s)
    mean_z = (torch.softmax(z, dim=1) * z).sum(dim=1)
    for got, want, what in zip(out, (lse, tail, torch.logsumexp(s, dim=1), mean_z),
                               ("lse", "tail lse", "CE lse", "E_p[z]")):
        assert_rel_close(got, want, 1e-6, what)


@needs_nvcc
@pytest.mark.parametrize("code", [0, 2])
@pytest.mark.parametrize("with_tail", [True, False])
def test_host_topk_grad_matches_float64(host_ext, code, with_tail):
    rows, vocab, k, temperature, cap = 5, 301, 4, 0.8, 5.0
    dtype = BUFFER_DTYPES[code]
    logits = _buffer(rows, vocab, dtype, seed=3)
    ids = _ids(rows, vocab, k, seed=4)
    sorted_ids, perm = cuda_backend.sorted_topk_ids(ids, vocab)
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(rows, k, generator=gen)
    kd_lse, dense_scale, ce_scale = (torch.randn(rows, generator=gen) for _ in range(3))
    kd_lse += 6.0
    lse_ce = torch.logsumexp(dv.softcap(logits.double(), cap), dim=1).float()
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    sorted_values = torch.where(ids >= 0, values, 0.0).gather(1, perm).contiguous()
    grad = logits.clone()
    host_ext.topk_grad(grad.data_ptr(), code, rows, vocab, sorted_ids.data_ptr(),
                       sorted_values.data_ptr(), k, kd_lse.data_ptr(), dense_scale.data_ptr(),
                       lse_ce.data_ptr(), ce_scale.data_ptr(), labels.data_ptr(), 1 / temperature,
                       cap, with_tail, True, 0)
    s = dv.softcap(logits.double(), cap)
    want = torch.exp(s / temperature - kd_lse.double().unsqueeze(1)) * dense_scale.double().unsqueeze(1)
    if not with_tail:
        want.zero_()
    for n in range(rows):
        for j in range(k):
            if ids[n, j] >= 0:
                want[n, ids[n, j]] = values[n, j].double()  # set, not added
    onehot = torch.nn.functional.one_hot(labels, vocab).double()
    want += ce_scale.double().unsqueeze(1) * (torch.exp(s - lse_ce.double().unsqueeze(1)) - onehot)
    want *= 1 - (s / cap) ** 2
    tol = 1e-6 if code == 0 else 2**-7
    assert_rel_close(grad.double(), want, tol, "dz")


@needs_nvcc
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_host_dense_passes_match_float64(host_ext, divergence, beta):
    rows, vocab, temperature, cap, teacher_cap = 4, 333, 1.3, 6.0, 0.0
    student = _buffer(rows, vocab, torch.float32, seed=6)
    teacher = _buffer(rows, vocab, torch.float32, seed=7)
    kind = cuda_backend._kind(divergence, beta)
    stats = torch.zeros(4, rows)
    host_ext.dense_stats(student.data_ptr(), teacher.data_ptr(), 0, rows, vocab, 1 / temperature,
                         cap, teacher_cap, True, True, *(o.data_ptr() for o in stats), 0)
    s = dv.softcap(student.double(), cap)
    log_p = torch.log_softmax(s / temperature, dim=1)
    log_q = torch.log_softmax(teacher.double() / temperature, dim=1)
    assert_rel_close(stats[0], torch.logsumexp(s / temperature, dim=1), 1e-6, "student lse")
    assert_rel_close(stats[1], torch.logsumexp(teacher.double() / temperature, dim=1), 1e-6, "teacher lse")
    assert_rel_close(stats[2], torch.logsumexp(s, dim=1), 1e-6, "CE lse")
    kd, wsum = torch.zeros(rows), torch.zeros(rows)
    host_ext.dense_divergence(student.data_ptr(), teacher.data_ptr(), 0, rows, vocab,
                              1 / temperature, cap, teacher_cap, kind, beta, stats[0].data_ptr(),
                              stats[1].data_ptr(), kd.data_ptr(), wsum.data_ptr(), 0)
    w = dv.bucket_weights(log_p, log_q, None, divergence, beta)
    assert_rel_close(kd, dv.divergence(log_p, log_q, None, divergence, beta), 1e-5, "divergence")
    assert_rel_close(wsum, w.sum(dim=1), 1e-5, "W")
    gen = torch.Generator().manual_seed(8)
    kd_scale, ce_scale = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    grad = student.clone()
    host_ext.dense_grad(grad.data_ptr(), teacher.data_ptr(), 0, rows, vocab, 1 / temperature, cap,
                        teacher_cap, kind, beta, stats[0].data_ptr(), stats[1].data_ptr(),
                        wsum.data_ptr(), kd_scale.data_ptr(), stats[2].data_ptr(),
                        ce_scale.data_ptr(), labels.data_ptr(), True, 0)
    want = kd_scale.double().unsqueeze(1) * (w - log_p.exp() * w.sum(dim=1, keepdim=True))
    onehot = torch.nn.functional.one_hot(labels, vocab).double()
    want += ce_scale.double().unsqueeze(1) * (torch.softmax(s, dim=1) - onehot)
    want *= 1 - (s / cap) ** 2
    assert_rel_close(grad.double(), want, 1e-5, "dz")


# ------------------------------------------------------------------------------------------------
# end to end on the CPU: fastkd.api → cuda_backend → the host harness, vs fastkd.reference
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def host_backend(host_ext, monkeypatch):
    """impl='cuda' served by the host harness: the Python side of the backend runs unchanged."""
    resolve = api.resolve_impl
    monkeypatch.setattr(api, "resolve_impl",
                        lambda impl, device, dtype=torch.float32: "cuda" if impl == "cuda"
                        else resolve(impl, device, dtype))
    monkeypatch.setattr(cuda_build, "_module", host_ext)
    # A small budget: several chunks (and a last short one) even on these shapes.
    monkeypatch.setattr(fastkd.config, "chunk_bytes", 5 * 301 * 4)


def _grads(loss, tensors, grad_output):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None], grad_output)


TOPK_CASES = [  # (divergence, beta, tail, temperature, softcap, with_bias, ce_weight, ragged)
    ("reverse_kl", 0.5, "bucket", 1.0, None, False, 0.0, False),
    ("forward_kl", 0.5, "bucket", 2.0, None, True, 0.0, True),
    ("jsd", 0.3, "bucket", 0.7, 30.0, False, 0.5, True),
    ("jsd", 0.0, "bucket", 1.0, None, True, 0.0, False),  # the β=0 limit (forward KL)
    ("reverse_kl", 0.5, "renormalize", 1.5, 5.0, True, 0.3, True),  # renormalised with CE: a V pass
    ("forward_kl", 0.5, "renormalize", 1.0, None, False, 0.0, False),  # no V pass: torch path
]


@needs_nvcc
@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("reduction", ["mean", "none"])  # gradients in the forward / recomputed
def test_host_topk_end_to_end_matches_reference(host_backend, case, reduction):
    divergence, beta, tail, temperature, softcap, with_bias, ce_weight, ragged = case
    # N=13: 3 chunks of 5, 5, 3 rows; V=301 odd (unaligned rows); D=24.
    prob = make_problem(13, 24, 301, 6, seed=11, with_bias=with_bias, ragged=ragged, ignore_frac=0.25)
    kwargs = dict(divergence=divergence, beta=beta, tail=tail, temperature=temperature,
                  labels=prob["labels"], ce_weight=ce_weight, softcap=softcap, bias=prob["bias"],
                  reduction=reduction)
    args = (prob["hidden"], prob["weight"], prob["teacher_ids"], prob["teacher_logprobs"])
    loss, stats = fastkd.topk_kd_loss(*args, impl="cuda", return_stats=True, **kwargs)
    ref, ref_stats = topk_kd_loss_reference(*args, return_stats=True, **kwargs)
    tensors = (prob["hidden"], prob["weight"], prob["bias"])
    grad_output = torch.rand(loss.shape, generator=torch.Generator().manual_seed(2)) + 0.5
    assert_rel_close(loss, ref, HOST_TOL[0], "loss")
    counted = prob["labels"] != -100
    assert_rel_close(stats.entropy[counted], ref_stats.entropy[counted], HOST_TOL[0], "entropy")
    assert_rel_close(stats.topk_mass[counted], ref_stats.topk_mass[counted], HOST_TOL[0], "top-k mass")
    got = _grads(loss, tensors, grad_output)
    want = _grads(ref, tensors, grad_output.double())
    for g, w, name in zip(got, want, ("hidden", "weight", "bias")):
        assert_rel_close(g, w, HOST_TOL[1], f"d{name}")
    assert (got[0][~counted] == 0).all(), "ignored rows must get exactly zero gradient"


@needs_nvcc
@pytest.mark.parametrize("divergence,beta,temperature,softcap,ce_weight,topk", [
    ("reverse_kl", 0.5, 1.0, None, 0.0, None),
    ("jsd", 0.4, 2.0, 20.0, 0.5, None),
    ("forward_kl", 0.5, 0.8, None, 0.0, 5),  # online top-k: S from torch, the loss from the kernels
])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_host_kd_loss_end_to_end_matches_reference(host_backend, divergence, beta, temperature,
                                                   softcap, ce_weight, topk, reduction):
    prob = make_problem(11, 16, 301, 4, seed=21, with_bias=True, ignore_frac=0.2)
    gen = torch.Generator().manual_seed(22)
    teacher_hidden = torch.randn(11, 20, generator=gen)
    teacher_weight = torch.randn(301, 20, generator=gen) / 20**0.5
    kwargs = dict(divergence=divergence, beta=beta, topk=topk, temperature=temperature,
                  labels=prob["labels"], ce_weight=ce_weight, softcap=softcap,
                  teacher_softcap=15.0, bias=prob["bias"], reduction=reduction)
    args = (prob["hidden"], prob["weight"], teacher_hidden, teacher_weight)
    loss = fastkd.kd_loss(*args, impl="cuda", **kwargs)
    ref = kd_loss_reference(*args, **kwargs)
    assert_rel_close(loss, ref, HOST_TOL[0], "loss")
    tensors = (prob["hidden"], prob["weight"], prob["bias"])
    grad_output = torch.rand(loss.shape, generator=gen) + 0.5
    for g, w, name in zip(_grads(loss, tensors, grad_output), _grads(ref, tensors, grad_output.double()),
                          ("hidden", "weight", "bias")):
        assert_rel_close(g, w, HOST_TOL[1], f"d{name}")


@needs_nvcc
def test_host_forward_without_grad_keeps_no_gradients(host_backend):
    prob = make_problem(7, 8, 301, 3, seed=5)
    args = (prob["hidden"], prob["weight"], prob["teacher_ids"], prob["teacher_logprobs"])
    with torch.no_grad():
        out = chunked.topk_forward(
            prob["hidden"], prob["weight"], None, prob["teacher_ids"], prob["teacher_logprobs"],
            None, None, None, None, "reverse_kl", 0.5, "bucket", 1.0, None, None, 0, "teacher",
            -100, 0.0, 1.0, 1 << 20, False,
            api._grads_in_forward("mean", prob["hidden"], prob["weight"]), True, "cuda", torch.float32)
        ref = topk_kd_loss_reference(*args, reduction="none")
    assert all(t.numel() == 0 for t in out[6:])
    assert_rel_close(out[0], ref, HOST_TOL[0], "loss rows")


# ------------------------------------------------------------------------------------------------
# pure Python parts: the chunk height, the error without an extension
# ------------------------------------------------------------------------------------------------

def test_chunk_rows_follow_the_budget():
    mib = 2**20
    # Llama-3 vocabulary in bf16: 512 MiB hold 2093 rows, rounded down to 2048 (whole 64-row tiles).
    assert cuda_backend.chunk_rows(100_000, 128256, 2, 512 * mib) == 2048
    assert cuda_backend.chunk_rows(100_000, 128256, 2, 512 * mib, buffers=2) == 1024
    assert cuda_backend.chunk_rows(100_000, 256000, 4, 512 * mib) == 512
    assert cuda_backend.chunk_rows(10, 128256, 2, 512 * mib) == 10  # never more than N
    assert cuda_backend.chunk_rows(100, 1000, 4, 40_000) == 10  # fewer than 64 fit: not rounded
    assert cuda_backend.chunk_rows(100, 1000, 4, 1) == 1  # below one row: one row at a time
    assert fastkd.config.chunk_bytes is None  # the device default: 512 MiB on a GPU
    assert chunked.budget_bytes(None, 128256 * 4, torch.device("cuda")) == 512 * mib
    # on the CPU 128 MiB, or 256 rows of the blocks when that is more, at most 512 MiB
    assert chunked.budget_bytes(None, 32768 * 4 * 3, torch.device("cpu")) == 128 * mib
    assert chunked.budget_bytes(None, 128256 * 4 * 3, torch.device("cpu")) == 256 * 128256 * 4 * 3
    assert chunked.budget_bytes(None, 256000 * 4 * 5, torch.device("cpu")) == 512 * mib
    assert chunked.budget_bytes(3000, 256000 * 4 * 5, torch.device("cpu")) == 3000
    with pytest.raises(ValueError, match="chunk budget"):
        cuda_backend.chunk_rows(10, 10, 4, 0)


def test_impl_cuda_without_the_extension_says_how_to_build():
    prob = make_problem(4, 8, 16, 3)
    call = lambda: fastkd.topk_kd_loss(prob["hidden"], prob["weight"], prob["teacher_ids"],  # noqa: E731
                                       prob["teacher_logprobs"], impl="cuda")
    if cuda_build.unavailable_reason() is None:  # a GPU machine: CPU tensors are what is wrong
        with pytest.raises(ValueError, match="impl='cuda' needs CUDA tensors"):
            call()
        return
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e .") as info:
        call()
    assert "TORCH_CUDA_ARCH_LIST" in str(info.value) and "impl='torch'" in str(info.value)
    with pytest.raises(RuntimeError, match="unavailable"):
        cuda_build.extension()


# ------------------------------------------------------------------------------------------------
# GPU lane: the real extension
# ------------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cuda_problem(n, d, v, k, dtype, **kw):
    prob = make_problem(n, d, v, k, **kw)
    out = {}
    for key, value in prob.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cuda()
            if key in ("hidden", "weight", "bias"):
                value = value.to(dtype).requires_grad_()
        out[key] = value
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", [(1, 64, 1000, 8), (257, 96, 32003, 32)])  # N=1; V odd, D not 2^k
def test_gpu_topk_matches_reference(dtype, case, reduction, shape):
    divergence, beta, tail, temperature, softcap, with_bias, ce_weight, ragged = case
    prob = _cuda_problem(*shape, dtype, seed=31, with_bias=with_bias, ragged=ragged, ignore_frac=0.2)
    kwargs = dict(divergence=divergence, beta=beta, tail=tail, temperature=temperature,
                  labels=prob["labels"], ce_weight=ce_weight, softcap=softcap, bias=prob["bias"],
                  reduction=reduction)
    args = (prob["hidden"], prob["weight"], prob["teacher_ids"], prob["teacher_logprobs"])
    loss = fastkd.topk_kd_loss(*args, impl="cuda", **kwargs)
    ref = topk_kd_loss_reference(*args, **kwargs)
    tensors = (prob["hidden"], prob["weight"], prob["bias"])
    grad_output = torch.rand(loss.shape, device="cuda") + 0.5
    loss_tol, grad_tol = GPU_TOL[dtype]
    assert_rel_close(loss, ref, loss_tol, "loss")
    got = _grads(loss, tensors, grad_output)
    for g, w, name in zip(got, _grads(ref, tensors, grad_output.double()), ("hidden", "weight", "bias")):
        assert_rel_close(g, w, grad_tol, f"d{name}")
    counted = prob["labels"] != -100
    assert (got[0][~counted] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
@pytest.mark.parametrize("topk", [None, 16])
def test_gpu_kd_loss_matches_reference(dtype, divergence, beta, topk):
    prob = _cuda_problem(300, 64, 5003, 4, dtype, seed=41, with_bias=True, ignore_frac=0.2)
    teacher_hidden = torch.randn(300, 80, device="cuda", dtype=dtype)
    teacher_weight = torch.randn(5003, 80, device="cuda", dtype=dtype) / 80**0.5
    kwargs = dict(divergence=divergence, beta=beta, topk=topk, temperature=1.5,
                  labels=prob["labels"], ce_weight=0.3, softcap=30.0, bias=prob["bias"])
    args = (prob["hidden"], prob["weight"], teacher_hidden, teacher_weight)
    loss = fastkd.kd_loss(*args, impl="cuda", **kwargs)
    ref = kd_loss_reference(*args, **kwargs)
    loss_tol, grad_tol = GPU_TOL[dtype]
    assert_rel_close(loss, ref, loss_tol, "loss")
    tensors = (prob["hidden"], prob["weight"], prob["bias"])
    for g, w, name in zip(_grads(loss, tensors, None), _grads(ref, tensors, None),
                          ("hidden", "weight", "bias")):
        assert_rel_close(g, w, grad_tol, f"d{name}")


@pytest.mark.gpu
def test_gpu_ops_pass_opcheck_and_use_the_current_stream():
    prob = _cuda_problem(40, 32, 1001, 8, torch.float32, seed=51, ignore_frac=0.2)
    args = (prob["hidden"], prob["weight"], None, prob["teacher_ids"], prob["teacher_logprobs"],
            None, None, None, prob["labels"], "jsd", 0.5, "bucket", 1.3, 10.0, None, 0, "teacher",
            -100, 0.2, 1.0, 1 << 20, True)
    for grads_in_forward in (True, False):
        torch.library.opcheck(chunked.topk_forward, args + (grads_in_forward, True, "cuda", torch.float32),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        loss = fastkd.topk_kd_loss(prob["hidden"], prob["weight"], prob["teacher_ids"],
                                   prob["teacher_logprobs"], impl="cuda")
    stream.synchronize()
    ref = topk_kd_loss_reference(prob["hidden"], prob["weight"], prob["teacher_ids"],
                                 prob["teacher_logprobs"])
    assert_rel_close(loss, ref, GPU_TOL[torch.float32][0], "loss on a side stream")
    assert math.isfinite(loss.item())


@pytest.mark.gpu
def test_gpu_bindings_reject_host_memory():
    ext = cuda_build.extension()
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="CUDA device memory"):
        ext.topk_stats(x.data_ptr(), 0, 4, 8, 0, 0, 1.0, 0.0, False, False, False, x.data_ptr(),
                       0, 0, 0, torch.cuda.current_stream().cuda_stream)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
