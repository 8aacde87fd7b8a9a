"""Process-wide settings of fastkd, in one place (set them in code; nothing is read from the environment)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Config:
    """Attributes of ``fastkd.config``.

    Attributes:
        check_values: validate the *values* of teacher ids, teacher log-probs and labels (ids in
            range, no duplicates, log-probs finite and ≤ 0, top-k mass ≤ 1 + slack). Costs one
            host-device synchronisation per call; turn it off for the last few percent of
            throughput once the data pipeline is trusted. Shapes, dtypes and options are always
            checked. Skipped automatically while ``torch.compile`` traces.
        torch_chunk_bytes: memory budget of the ``torch`` backend's per-chunk work blocks; the
            chunk height is this divided by the bytes of the ``chunk x V`` blocks a path keeps
            alive. Default 256 MiB.
        cuda_chunk_bytes: memory budget of the ``cuda`` backend's reused logits buffer (two for
            the dense online teacher, which share it); the chunk height is this divided by
            ``V x element size``, rounded down to a multiple of 64 rows. Default 512 MiB: 1024
            rows of a 256k-vocabulary bf16 head (2048 of Llama-3's 128k), tall enough that the
            cuBLAS GEMMs run near peak, small next to the activations of a 24 GB card.
        deterministic: bit-identical gradients run to run. The ``triton`` backend then runs its
            backward without atomics (one kernel owns each row block of the hidden-state
            gradient, another each vocabulary tile of the weight gradient), at the cost of one more
            recomputation of the logits. The ``torch`` backend is deterministic on the CPU either
            way. Default False.

    (Earlier versions had ``triton_grad_filter``, which skipped backward tiles judged negligible;
    it dropped real gradient and was removed: every backend computes the whole gradient.)
    """

    check_values: bool = True
    torch_chunk_bytes: int = 256 * 2**20
    cuda_chunk_bytes: int = 512 * 2**20
    deterministic: bool = False


config = Config()
