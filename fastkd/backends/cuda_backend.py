"""The csrc epilogues (``impl="cuda"``): the chunked plan's provider backed by fastkd's CUDA extension.

The plan itself — GEMMs, chunking, the ``(chunk, K)`` epilogue, gradients in the forward — is
``fastkd.backends.chunked``, shared with the torch and Triton providers. This module only passes
the plan's tensors to the extension's entry points (``csrc/bindings.cpp``) as raw pointers with
the dtype code of the logits buffer and the caller's current CUDA stream:

- ``topk_stats`` / ``topk_grad`` (``csrc/topk_epilogue.cu``): row statistics over the float32
  logits buffer (lse over V, exact lse over ``V∖S``, CE lse, ``E_p[z]``), then ``dz`` in place;
- ``dense_stats`` / ``dense_divergence`` / ``dense_grad`` (``csrc/dense_epilogue.cu``): the online
  teacher's three passes over the student and teacher buffers.

The buffers are the plan's float32 GEMM outputs, so the kernels see unrounded logits whatever the
operand dtype; they leave the logits unchanged until ``*_grad`` writes ``dz`` over them
(``keeps_logits``), which the plan then rounds to the operand dtype for its tensor-core GEMMs.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import cuda_build
from .chunked import _kind, chunk_rows  # noqa: F401  (re-exported: the CUDA tests use them)
from .torch_backend import sorted_topk_ids  # noqa: F401

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptr(x: Optional[Tensor]) -> int:
    return 0 if x is None else x.data_ptr()


def _code(buffer: Tensor) -> int:
    if buffer.dtype not in _DTYPE_CODES:
        raise TypeError(f"impl='cuda' takes float16, bfloat16 or float32 buffers, got {buffer.dtype}")
    return _DTYPE_CODES[buffer.dtype]


class CsrcEpilogue:
    """The chunked plan's provider backed by the csrc kernels (one instance per op call)."""

    name = "cuda"
    keeps_logits = True
    takes_out = False

    @staticmethod
    def scratch_blocks(divergence, general, stats=True) -> int:
        """The csrc epilogues work in place on the plan's buffers: no scratch."""
        return 0

    def __init__(self):
        self.ext = cuda_build.extension()

    def _stream(self, like: Tensor) -> int:
        return torch.cuda.current_stream(like.device).cuda_stream if like.device.type == "cuda" else 0

    def _guard(self, like: Tensor):
        return torch.cuda.device(like.device) if like.device.type == "cuda" else contextlib.nullcontext()

    def topk_stats(self, logits, rows, vocab, sorted_ids, k, inv_temp, cap, with_tail, with_ce,
                   with_stats, lse, tail_lse, lse_ce, mean_z):
        with self._guard(logits):
            self.ext.topk_stats(logits.data_ptr(), _code(logits), rows, vocab, _ptr(sorted_ids), k,
                                inv_temp, cap, with_tail, with_ce, with_stats, _ptr(lse),
                                _ptr(tail_lse), _ptr(lse_ce), _ptr(mean_z), self._stream(logits))

    def topk_grad(self, logits, rows, vocab, sorted_ids, sorted_values, k, kd_lse, dense_scale,
                  lse_ce, ce_scale, labels, inv_temp, cap, with_tail, with_ce):
        with self._guard(logits):
            self.ext.topk_grad(logits.data_ptr(), _code(logits), rows, vocab, _ptr(sorted_ids),
                               _ptr(sorted_values), k, _ptr(kd_lse), _ptr(dense_scale), _ptr(lse_ce),
                               _ptr(ce_scale), _ptr(labels), inv_temp, cap, with_tail, with_ce,
                               self._stream(logits))
        return logits

    def dense_stats(self, student, teacher, rows, vocab, inv_temp, cap, teacher_cap, with_ce,
                    with_stats, lse, teacher_lse, lse_ce, mean_z):
        with self._guard(student):
            self.ext.dense_stats(student.data_ptr(), teacher.data_ptr(), _code(student), rows, vocab,
                                 inv_temp, cap, teacher_cap, with_ce, with_stats, _ptr(lse),
                                 _ptr(teacher_lse), _ptr(lse_ce), _ptr(mean_z), self._stream(student))

    def dense_divergence(self, student, teacher, rows, vocab, inv_temp, cap, teacher_cap, kind,
                         beta, lse, teacher_lse, kd, wsum):
        with self._guard(student):
            self.ext.dense_divergence(student.data_ptr(), teacher.data_ptr(), _code(student), rows,
                                      vocab, inv_temp, cap, teacher_cap, kind, beta, _ptr(lse),
                                      _ptr(teacher_lse), _ptr(kd), _ptr(wsum), self._stream(student))

    def dense_grad(self, student, teacher, rows, vocab, inv_temp, cap, teacher_cap, kind, beta, lse,
                   teacher_lse, wsum, kd_scale, lse_ce, ce_scale, labels, with_ce):
        with self._guard(student):
            self.ext.dense_grad(student.data_ptr(), teacher.data_ptr(), _code(student), rows, vocab,
                                inv_temp, cap, teacher_cap, kind, beta, _ptr(lse), _ptr(teacher_lse),
                                _ptr(wsum), _ptr(kd_scale), _ptr(lse_ce), _ptr(ce_scale),
                                _ptr(labels), with_ce, self._stream(student))
        return student
