"""The fused Triton kernels of ``fastkd.byte_logprobs`` / ``byte_kd_loss`` (``impl="triton"``).

On the CPU they run in the Triton interpreter. In triton 3.9 the interpreter must be switched on
*before triton is imported* (``triton.jit`` and triton.language's own jitted helpers such as
``tl.sum`` pick their mode when they are decorated). ``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` on a machine without a GPU before anything imports triton; when this process
is nevertheless not interpreting (a GPU machine, or triton imported earlier), the CPU cases run in
one subprocess started with ``TRITON_INTERPRET=1`` (``_worker``). Either way the results are
compared here against the float64 reference. Shapes are tiny (N <= 16, D <= 24, V <= 300): the
interpreter is slow. Its ``tl.dot`` on bf16 operands is wrong, so bf16 is left to the GPU lane
(``-m gpu``), which runs the compiled kernels on CUDA tensors.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastkd
from fastkd.bytes import ByteVocab
from fastkd.bytes.reference import byte_kd_loss_reference, byte_logprobs_reference
from conftest import assert_rel_close, rel_error

TOLERANCE = {torch.float32: 3e-5, torch.float16: 3e-3}

# (name, dtype, N, D, V, temperature, softcap, bias). Why these shapes:
# - V=300 with a 120-id bucket: the bucket crosses tiles and vocabulary ranges (merged partials);
# - V=17: one partial tile and a single range; N=1 and N=13: partial row blocks;
# - D=24: not a multiple of the 16-wide D tile.
CASES = [
    ("plain", torch.float32, 16, 24, 300, 1.0, None, False),
    ("capped", torch.float32, 13, 24, 300, 1.7, 4.0, True),
    ("tiny-vocab", torch.float32, 1, 8, 17, 1.0, None, True),
    ("half", torch.float16, 16, 16, 300, 0.8, None, False),
    ("half-capped", torch.float16, 5, 24, 120, 1.0, 3.0, True),
]


def case_vocab(vocab_size: int, seed: int) -> ByteVocab:
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(0, 257, (vocab_size,), generator=gen)
    first[first % 5 == 2] = 0x65              # empties some buckets
    if vocab_size > 200:
        first[40:160] = 0x20                  # one big bucket
    return ByteVocab.from_bytes([b"" if b == 256 else bytes([int(b)]) + b"~" for b in first])


def case_tensors(index: int):
    name, dtype, n, d, v, temperature, softcap, with_bias = CASES[index]
    gen = torch.Generator().manual_seed(100 + index)
    hidden = (torch.randn(n, d, generator=gen) * 1.5).to(dtype)
    weight = (torch.randn(v, d, generator=gen) / d**0.5).to(dtype)
    bias = (torch.randn(v, generator=gen) * 0.5).to(dtype) if with_bias else None
    grad_out = torch.randn(n, 257, generator=gen)
    return case_vocab(v, index), hidden, weight, bias, grad_out, dict(temperature=temperature, softcap=softcap)


def loss_problem():
    """A small online byte KD problem (student and teacher both through the Triton kernels)."""
    gen = torch.Generator().manual_seed(7)
    student_vocab, teacher_vocab = case_vocab(150, 21), case_vocab(90, 22)
    hidden = torch.randn(12, 16, generator=gen)
    weight = torch.randn(150, 16, generator=gen) / 4
    teacher_hidden = torch.randn(10, 8, generator=gen) * 2
    teacher_weight = torch.randn(90, 8, generator=gen) / 3
    pairs = torch.tensor([[0, 0], [2, 1], [3, 4], [7, 5], [8, 6], [11, 9]])
    labels = torch.randint(0, 150, (12,), generator=gen)
    labels[5] = -100
    teacher_labels = torch.randint(0, 90, (10,), generator=gen)
    return dict(hidden=hidden, weight=weight, byte_vocab=student_vocab, alignment=pairs,
                teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                teacher_byte_vocab=teacher_vocab, labels=labels, teacher_labels=teacher_labels,
                divergence="jsd", chunk_weight=0.5, ce_weight=0.3, temperature=1.3)


def run_cases() -> dict:
    """Every case through ``impl="triton"`` on CPU tensors (needs the interpreter)."""
    from fastkd.backends import triton_bytes

    assert triton_bytes.interpreting(), "the Triton cases on CPU tensors need TRITON_INTERPRET=1"
    results = {"logprobs": []}
    for index in range(len(CASES)):
        vocab, hidden, weight, bias, grad_out, options = case_tensors(index)
        leaves = [hidden.requires_grad_(), weight.requires_grad_()]
        if bias is not None:
            leaves.append(bias.requires_grad_())
        out = fastkd.byte_logprobs(hidden, weight, vocab, bias=bias, impl="triton", **options)
        grads = torch.autograd.grad(torch.where(torch.isfinite(out), out, 0.0), leaves, grad_out)
        results["logprobs"].append((out.detach(), [g.detach() for g in grads]))
    problem = loss_problem()
    problem["hidden"].requires_grad_()
    problem["weight"].requires_grad_()
    loss = fastkd.byte_kd_loss(**problem, impl="triton")
    grads = torch.autograd.grad(loss, (problem["hidden"], problem["weight"]))
    results["loss"] = (loss.detach(), [g.detach() for g in grads])
    vocab, hidden, weight, bias, _, options = case_tensors(2)
    plan = vocab.range_plan(triton_bytes.block_sizes(hidden.device)["BLOCK_V"], 1, hidden.device)
    tensors = vocab.device_tensors(hidden.device)
    torch.library.opcheck(torch.ops.fastkd.byte_lse_triton.default,
                          (hidden.requires_grad_(), weight, bias, tensors["sorted_ids"],
                           tensors["bucket_of_sorted"], *plan, options["temperature"], options["softcap"]),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    results["opcheck"] = True
    return results


def _worker(path: str) -> None:
    """Entry point of the ``TRITON_INTERPRET=1`` subprocess."""
    torch.save(run_cases(), path)


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    pytest.importorskip("triton", reason="triton is not installed (the triton backend is optional)")
    from fastkd.backends import triton_bytes

    if triton_bytes.interpreting():
        return run_cases()
    path = tmp_path_factory.mktemp("triton_bytes") / "results.pt"
    here = Path(__file__).resolve().parent
    code = f"import sys; sys.path.insert(0, {str(here)!r}); import test_bytes_triton as t; t._worker({str(path)!r})"
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"Triton interpreter worker failed:\n{done.stdout}\n{done.stderr[-6000:]}"
    return torch.load(path)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case[0] for case in CASES])
def test_triton_byte_logprobs_against_reference(triton_results, index):
    out, grads = triton_results["logprobs"][index]
    vocab, hidden, weight, bias, grad_out, options = case_tensors(index)
    leaves = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    if bias is not None:
        leaves.append(bias.double().requires_grad_())
    ref = byte_logprobs_reference(leaves[0], leaves[1], vocab, bias=leaves[2] if bias is not None else None,
                                  **options)
    finite = torch.isfinite(ref)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.equal(torch.isfinite(out), finite)
    tol = TOLERANCE[hidden.dtype]
    assert_rel_close(torch.where(finite, out, 0.0), torch.where(finite, ref, 0.0), tol, "byte log-probs")
    ref_grads = torch.autograd.grad(torch.where(finite, ref, 0.0), leaves, grad_out.double())
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == hidden.dtype
        assert_rel_close(g, r, tol, f"grad {name}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-interpreter case; the GPU lane has its own")
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16])
def test_triton_mixed_dtypes_and_tiny_row_scales(weight_dtype):
    # float16 activations with a float32 head (computed in float32) or a float16 one, and a
    # gradient of 1e-5 per entry (a mean over many rows): small 16-bit gradients stay accurate to
    # their own rounding (dz is scaled to O(1) per tile before its 16-bit cast).
    vocab, hidden, weight, bias, grad_out, options = case_tensors(3)
    hidden = hidden.requires_grad_()
    weight = weight.to(weight_dtype).requires_grad_()
    out = fastkd.byte_logprobs(hidden, weight, vocab, impl="triton", **options)
    grads = torch.autograd.grad(torch.where(torch.isfinite(out), out, 0.0), [hidden, weight], grad_out * 1e-5)
    leaves = [hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    ref = byte_logprobs_reference(leaves[0], leaves[1], vocab, **options)
    finite = torch.isfinite(ref)
    assert_rel_close(torch.where(finite, out, 0.0), torch.where(finite, ref, 0.0), TOLERANCE[torch.float32],
                     "byte log-probs")
    ref_grads = torch.autograd.grad(torch.where(finite, ref, 0.0), leaves, grad_out.double() * 1e-5)
    for name, g, r, dtype in zip(("hidden", "weight"), grads, ref_grads, (torch.float16, weight_dtype)):
        assert g.dtype == dtype
        # float16 gradients this small are subnormal: allow twice the reference's own rounding.
        assert_rel_close(g, r, 2 * rel_error(r.to(dtype), r) + TOLERANCE[torch.float16], f"grad {name}")


def test_triton_byte_kd_loss_against_reference(triton_results):
    loss, grads = triton_results["loss"]
    problem = loss_problem()
    for name in ("hidden", "weight"):
        problem[name] = problem[name].double().requires_grad_()
    for name in ("teacher_hidden", "teacher_weight"):
        problem[name] = problem[name].double()
    ref = byte_kd_loss_reference(**problem)
    ref_grads = torch.autograd.grad(ref, (problem["hidden"], problem["weight"]))
    assert_rel_close(loss, ref, TOLERANCE[torch.float32], "loss")
    for name, g, r in zip(("hidden", "weight"), grads, ref_grads):
        assert_rel_close(g, r, TOLERANCE[torch.float32], f"grad {name}")


def test_triton_opcheck(triton_results):
    assert triton_results["opcheck"]


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    """Without the interpreter, impl="triton" on CPU tensors is a clear ValueError before any launch."""
    pytest.importorskip("triton", reason="triton is not installed (the triton backend is optional)")
    from fastkd.backends import triton_bytes

    monkeypatch.setattr(triton_bytes, "interpreting", lambda: False)
    vocab, hidden, weight, bias, _, options = case_tensors(2)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fastkd.byte_logprobs(hidden, weight, vocab, bias=bias, impl="triton", **options)
    # "auto" never picks Triton for CPU tensors.
    assert fastkd.bytes.resolve_byte_impl("auto", torch.device("cpu")) == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_on_gpu_against_reference(dtype):
    """The compiled kernels on CUDA: a realistic bucket layout (byte-level vocabulary), V=50257."""
    gen = torch.Generator().manual_seed(3)
    first = torch.randint(0, 257, (50257,), generator=gen)
    first[:20000] = 0x20
    vocab = ByteVocab.from_bytes([b"" if b == 256 else bytes([int(b)]) for b in first])
    hidden = (torch.randn(300, 128, generator=gen)).to(dtype).cuda().requires_grad_()
    weight = (torch.randn(50257, 128, generator=gen) / 12).to(dtype).cuda().requires_grad_()
    out = fastkd.byte_logprobs(hidden, weight, vocab, temperature=1.3, impl="triton")
    ref = byte_logprobs_reference(hidden.double(), weight.double(), vocab, temperature=1.3)
    finite = torch.isfinite(ref)
    tol = {torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    assert_rel_close(torch.where(finite, out, 0.0), torch.where(finite, ref, 0.0), tol, "byte log-probs")
    grad_out = torch.randn(out.shape, generator=gen).cuda()
    grads = torch.autograd.grad(torch.where(finite, out, 0.0), (hidden, weight), grad_out)
    leaves = (hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_())
    ref = byte_logprobs_reference(*leaves, vocab, temperature=1.3)
    ref_grads = torch.autograd.grad(torch.where(finite, ref, 0.0), leaves, grad_out.double())
    for name, g, r in zip(("hidden", "weight"), grads, ref_grads):
        assert_rel_close(g, r, 2 * tol, f"grad {name}")
