"""Shared test helpers: relative-error assertions, random problem builders, the gpu marker."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter (DESIGN.md §6, CPU lane). Triton
# reads this when a kernel is decorated, so it is set before any test imports fastkd's kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped with a reason without one)")
    config.addinivalue_line("markers", "multicore: spawns more processes than 2 cores (CI runs it; "
                                       "deselect with -m 'not multicore' on a small machine)")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tiny-model trainer tests (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): one thread is fastest there, and 2 threads on 2 cores
    shared with another busy process are ~50x slower (spinning workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine (GPU lane: run with -m gpu on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (‖·‖ the Frobenius norm; absolute when ref is all zero)."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """Fails with where and by how much ``out`` differs from ``ref`` when the relative error > tol."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values at {torch.nonzero(~torch.isfinite(out))[:5].tolist()}"
    err = rel_error(out, ref)
    if err > tol:
        diff = (out.detach().double() - ref.detach().double()).abs()
        worst = torch.nonzero(diff == diff.max())[0].tolist()
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {tol:.1e}; worst at index {worst}: "
            f"{out.detach().double()[tuple(worst)].item():.8g} vs reference "
            f"{ref.detach().double()[tuple(worst)].item():.8g} (|ref| max {ref.abs().max().item():.4g})")


def make_problem(n, d, v, k, *, dtype=torch.float32, seed=0, with_bias=False, ragged=False,
                 ignore_frac=0.0, scale=1.0):
    """A random student (hidden, weight, bias) and a random teacher's top-k on the same rows.

    The teacher is a second random LM head; its top-k ids and full-softmax log-probs are taken
    exactly, as a capture would. ``ragged`` replaces some slots with -1; ``ignore_frac`` of the
    labels become -100. ``scale`` multiplies the student logits (sharper distributions).
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=gen) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) / d**0.5).to(dtype).requires_grad_()
    bias = (torch.randn(v, generator=gen) * 0.5).to(dtype).requires_grad_() if with_bias else None
    teacher_logits = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2.0
    teacher_lp = torch.log_softmax(teacher_logits, dim=-1)
    ids = teacher_lp.topk(k, dim=-1).indices
    logprobs = teacher_lp.gather(1, ids)
    if ragged:
        drop = torch.rand(n, k, generator=gen) < 0.3
        ids = torch.where(drop, -1, ids)
        logprobs = torch.where(drop, 0.0, logprobs)
    labels = torch.randint(0, v, (n,), generator=gen)
    if ignore_frac:
        labels = torch.where(torch.rand(n, generator=gen) < ignore_frac, -100, labels)
    return dict(hidden=hidden, weight=weight, bias=bias, teacher_ids=ids,
                teacher_logprobs=logprobs.float(), labels=labels, teacher_logits=teacher_logits)
