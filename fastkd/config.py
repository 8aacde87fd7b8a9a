"""Process-wide settings of fastkd, in one place (set them in code; nothing is read from the environment)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Config:
    """Attributes of ``fastkd.config``.

    Attributes:
        check_values: validate the *values* of teacher ids, teacher log-probs and labels (ids in
            range, no duplicates, log-probs finite and ≤ 0, top-k mass ≤ 1 + slack). Costs one
            host-device synchronisation per call; turn it off for the last few percent of
            throughput once the data pipeline is trusted. Shapes, dtypes and options are always
            checked. Skipped automatically while ``torch.compile`` traces.
        check_finite: also flag NaN/±inf in the inputs of every loss (``hidden``, ``weight``,
            ``bias``, and the online teacher's), all rows, with a ``ValueError`` naming the
            argument and the first bad row. Opt-in (default False): it reads every element of
            the hidden states and heads once (a cheap reduction next to the logits GEMM) and adds
            no host synchronisation while ``check_values`` is on (its flags ride on that one
            sync; one sync of its own otherwise). Skipped while ``torch.compile`` traces. The
            trainer's ``on_nonfinite`` guard checks the loss and gradient norm instead.
        chunk_bytes: the memory budget of every row-chunked path (the chunked plan of the
            ``torch``, ``cuda`` and default CUDA paths, the byte-level ``torch`` path, the
            vocabulary-parallel losses): the chunk height is this divided by the bytes of the
            ``chunk x V`` blocks a path holds (float32 logits buffers: one for top-k, two for an
            online teacher; on tensor cores the 16-bit ``dz``; the fused head's 16-bit tiles and
            their per-tile partials; the torch epilogues' scratch: none for top-k, one block for
            reverse KL with statistics (none without), two for forward KL, three for JSD, two
            more with a softcap), rounded down to a multiple of 64 rows. So the extra memory of a
            call is this budget plus the float32 dW. ``None`` (default): the device's default (``fastkd.backends.chunked.budget_bytes``):
            on a GPU 1/64 of its memory within [512 MiB, 2 GiB] (512 MiB on a 24 GB card, 1.22 GiB
            on an 80 GB H100, 2 GiB on an H200: the cost model's gain from 512 MiB to 1–2 GiB, none
            above), fixed per card so the chunking, and the summation order of dW, is the same on
            every call; on the CPU 128 MiB, raised to hold 256 rows of the blocks, at most 512 MiB
            (a CPU GEMM is near its peak from about 256 rows). A positive number of bytes applies
            on every device.
        chunked_epilogue: the epilogues of the default CUDA path (the chunked plan). ``"fused"``:
            the logits GEMM is a Triton kernel that finishes the row statistics in its epilogue
            and stores the logits as 16-bit tiles, which the gradient pass reads
            (``fastkd.backends.triton_fused_head``; offline top-k and online dense teachers; the
            online top-k teacher's forward runs the Triton epilogues); 16-bit operands only
            (float32 ones run ``"triton"``). ``"triton"``: cuBLAS writes float32 logits and the
            Triton epilogues read them. ``"auto"`` (default): ``"fused"`` for 16-bit operands,
            where the cost model puts it below ``"triton"`` on every shape (README, "The fused
            head"); ``"triton"`` for float32. No GPU has run either yet: ``"triton"`` is the
            fallback if the first GPU run finds the fused head's Triton GEMM slower than cuBLAS.
            The fused blocks are 16-bit (2 B per element: twice the rows of float32 buffers for
            the same ``chunk_bytes``), plus per-tile partials outside the budget (≈ 0.2 B per
            element).
        deterministic: bit-identical gradients run to run. The ``triton`` backend then runs its
            backward without atomics (one kernel owns each row block of the hidden-state
            gradient, another each vocabulary tile of the weight gradient), at the cost of one more
            recomputation of the logits. The ``torch`` backend is deterministic on the CPU either
            way. Default False.

    (Earlier versions had ``triton_grad_filter``, which skipped backward tiles judged negligible;
    it dropped real gradient and was removed: every backend computes the whole gradient.)
    """

    check_values: bool = True
    check_finite: bool = False
    chunk_bytes: Optional[int] = None
    chunked_epilogue: str = "auto"
    deterministic: bool = False


config = Config()
