"""Fused Triton kernels of the per-bucket log-sum-exp behind byte-level distillation.

Math (DESIGN.md §1, "Byte-level cross-tokenizer alignment"; the same quantity as
``fastkd.backends.torch_bytes``): for rows ``h (N, D)`` and an LM head ``W (V, D)``, ``b (V,)``,
with ``z = softcap(h · Wᵀ + b) / τ`` and the first-byte bucket ``c(v)`` of each token id,

    forward:   L[n, c] = log Σ_{v: c(v)=c} exp(z[n, v])          (N, 257) float32, -inf if empty
    backward:  dz[n, v] = g[n, c(v)] · exp(z[n, v] − L[n, c(v)])  (the §1 bucket term; the −p·Σg
               term comes from autograd through the normalisation of L, outside the kernel)
               dh = dz · W,  dW = dzᵀ · h,  db = Σ_n dz     (× 1/τ and the softcap derivative)

Forward: the vocabulary is visited in first-byte order (``ByteVocab.sorted_ids``; the LM-head
rows are gathered through it, W is never permuted or copied), so each bucket is a contiguous run
of positions and its log-sum-exp a segmented reduction. The sorted vocabulary is cut into G
*ranges* of whole ``BLOCK_V`` tiles (``ByteVocab.range_plan``); program (row block, range) streams
its tiles with an online max/sum for the bucket in progress, writes every bucket that starts and
ends inside its range straight to the output, and leaves a partial log-sum-exp for the first and
the last bucket of its range, which neighbouring ranges may share. A few PyTorch ops on
``(N, 2G)`` then merge those partials. Cost: one ``N x V x D`` GEMM, nothing ``N x V`` in memory.

Backward: program (row block, vocabulary tile), in grouped order for L2 reuse, in the original id
order recomputes its logit tile,
forms dz from the saved L and the incoming g (gathered by bucket), and accumulates dh and dW with
fp32 atomics (the tile of dz is never written out), like Cut Cross-Entropy's backward.

Shapes: ``hidden (N, D)``, ``weight (V, D)`` contiguous float16/bfloat16/float32, ``bias (V,)``.
Accumulation is float32; fp32 operands use IEEE dot products (no TF32).

Triton interpreter: with ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (``tl.dot`` on
bf16 operands is wrong in the triton 3.9 interpreter: use fp32/fp16 there). In triton 3.9 the
mode is fixed when triton is *imported*: ``triton.jit`` reads ``TRITON_INTERPRET`` when it
decorates, and triton.language's own jitted helpers (``tl.zeros``, ``tl.sum``, ``tl.max``,
``tl.sigmoid``) are decorated at import. So the variable must be set before the process imports
triton; setting it later leaves a compiled/interpreted mix that fails. ``interpreting()`` reports
the mode the kernels actually have (``tests/conftest.py`` sets the variable on a machine without a
GPU; ``tests/test_bytes_triton.py`` falls back to a subprocess when the test process lacks it).
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch_configs as lc
from .triton_kernels import _grouped, _logits_tile

N_BUCKETS = 257


# ------------------------------------------------------------------------------------------------
# forward kernel
# ------------------------------------------------------------------------------------------------

@triton.jit
def _byte_lse_forward_kernel(
    # pointers
    hidden_ptr, weight_ptr, bias_ptr, sorted_ids_ptr, bucket_of_sorted_ptr, range_start_ptr,
    out_ptr, part_ptr,
    # shapes
    n_rows, dim, n_ranges,
    # meta
    inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, N_BUCKETS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    lo = tl.load(range_start_ptr + pid_r)
    hi = tl.load(range_start_ptr + pid_r + 1)
    head = tl.load(bucket_of_sorted_ptr + lo)  # first bucket of the range: may continue a neighbour's
    current = head
    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    part_row = (rows * n_ranges + pid_r) * 2
    for tile in range(lo, hi, BLOCK_V):
        cols = tile + tl.arange(0, BLOCK_V)
        col_mask = cols < hi
        ids = tl.load(sorted_ids_ptr + cols, mask=col_mask, other=0).to(tl.int64)
        buckets = tl.load(bucket_of_sorted_ptr + cols, mask=col_mask, other=N_BUCKETS)
        last = tl.load(bucket_of_sorted_ptr + tl.minimum(tile + BLOCK_V, hi) - 1)
        logits = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, ids, col_mask, dim, softcap,
                              HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION) * inv_temperature
        # Buckets current..last meet this tile (some may be empty); all but `last` end in it.
        for bucket in range(current, last + 1):
            # per-row vectors, not scalars: the 3.9 interpreter mis-types `vector & scalar` masks
            bucket_vec = tl.full([BLOCK_N], bucket, tl.int32)
            segment = tl.where((buckets == bucket)[None, :], logits, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(segment, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            new_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(segment - shift[:, None]), axis=1)
            lse = tl.where(new_sum > 0.0, shift + tl.log(tl.maximum(new_sum, 1e-30)), float("-inf"))
            finished = bucket_vec < last
            tl.store(out_ptr + rows * N_BUCKETS + bucket, lse, mask=row_mask & finished & (bucket_vec != head))
            tl.store(part_ptr + part_row, lse, mask=row_mask & finished & (bucket_vec == head))
            run_max = tl.where(finished, float("-inf"), new_max)
            run_sum = tl.where(finished, 0.0, new_sum)
        current = last
    # The range's last bucket may go on in the next range: leave its partial for the merge.
    shift = tl.where(run_max == float("-inf"), 0.0, run_max)
    lse = tl.where(run_sum > 0.0, shift + tl.log(tl.maximum(run_sum, 1e-30)), float("-inf"))
    single = tl.full([BLOCK_N], current, tl.int32) == head
    tl.store(part_ptr + part_row, lse, mask=row_mask & single)
    tl.store(part_ptr + part_row + 1, tl.where(single, float("-inf"), lse), mask=row_mask)


# ------------------------------------------------------------------------------------------------
# backward kernel
# ------------------------------------------------------------------------------------------------

@triton.jit
def _byte_lse_backward_kernel(
    # pointers
    hidden_ptr, weight_ptr, bias_ptr, first_byte_ptr, lse_ptr, grad_ptr,
    grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr,
    # shapes
    n_rows, vocab, dim,
    # meta
    inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, N_BUCKETS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # 1-D grid in grouped order (GROUP row blocks at a time): a wave shares h blocks and W tiles in L2
    pid_n, pid_v = _grouped(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.cdiv(vocab, BLOCK_V), GROUP)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_rows
    col_mask = cols < vocab
    tile_mask = row_mask[:, None] & col_mask[None, :]
    logits = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, dim, softcap,
                          HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
    buckets = tl.load(first_byte_ptr + cols, mask=col_mask, other=0)
    at_bucket = rows[:, None] * N_BUCKETS + buckets[None, :]
    bucket_lse = tl.load(lse_ptr + at_bucket, mask=tile_mask, other=0.0)
    grad = tl.load(grad_ptr + at_bucket, mask=tile_mask, other=0.0)
    dz = tl.where(tile_mask, grad * tl.exp(logits * inv_temperature - bucket_lse), 0.0) * inv_temperature
    if HAS_SOFTCAP:
        capped = logits / softcap
        dz = dz * (1.0 - capped * capped)
    if HAS_BIAS:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")
    # Scaled to O(1) before a 16-bit cast (a mean over many rows makes every entry tiny and fp16
    # would flush it to zero); the products are scaled back in float32.
    scale = tl.maximum(tl.max(tl.abs(dz)), 1e-30)
    dz = (dz / scale).to(hidden_ptr.dtype.element_ty)
    for k in range(0, dim, BLOCK_D):
        dims = k + tl.arange(0, BLOCK_D)
        dim_mask = dims < dim
        w = tl.load(weight_ptr + cols[:, None] * dim + dims[None, :],
                    mask=col_mask[:, None] & dim_mask[None, :], other=0.0)
        tl.atomic_add(grad_hidden_ptr + rows[:, None] * dim + dims[None, :],
                      tl.dot(dz, w, input_precision=DOT_PRECISION) * scale,
                      mask=row_mask[:, None] & dim_mask[None, :], sem="relaxed")
        h = tl.load(hidden_ptr + rows[:, None] * dim + dims[None, :],
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        tl.atomic_add(grad_weight_ptr + cols[:, None] * dim + dims[None, :],
                      tl.dot(tl.trans(dz), h, input_precision=DOT_PRECISION) * scale,
                      mask=col_mask[:, None] & dim_mask[None, :], sem="relaxed")


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------

def interpreting() -> bool:
    """Whether these kernels run in the Triton interpreter (decided when triton was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_byte_lse_forward_kernel, InterpretedFunction)


def block_sizes(device: torch.device, dtype: torch.dtype = torch.bfloat16,
                family: str = "byte_stream") -> dict:
    """Tile sizes, warps and stages (``launch_configs``, per target architecture): small tiles in
    the interpreter (speed, and tests that cross many tiles). ``family``: "byte_stream" for the
    forward, "byte_backward" for the backward."""
    cc = lc.target(device)
    if cc == lc.INTERPRETER:
        return dict(BLOCK_N=16, BLOCK_V=16, BLOCK_D=16, num_warps=1, num_stages=1)
    tiles = lc.tiles(family, device, dtype)
    return dict(BLOCK_N=tiles.BM, BLOCK_V=tiles.BN, BLOCK_D=tiles.BD, **tiles.options())


def _options(blocks: dict) -> dict:
    return {k: v for k, v in blocks.items() if not k.startswith("BLOCK_")}


def n_ranges(n_rows: int, vocab: int, device: torch.device) -> int:
    """How many vocabulary ranges to split the forward into: enough programs to fill the GPU."""
    blocks = block_sizes(device)
    n_tiles = -(-vocab // blocks["BLOCK_V"])
    if lc.target(device) == lc.INTERPRETER:
        return min(n_tiles, 3)  # several ranges, so the partial-bucket merge is always exercised
    row_blocks = -(-n_rows // blocks["BLOCK_N"])
    programs = 4 * lc.sm_count(device)
    return max(1, min(n_tiles, -(-programs // row_blocks)))


def check_runnable(device: torch.device) -> None:
    """Raises ValueError when Triton cannot run on ``device`` (CPU tensors need the interpreter)."""
    if device.type == "cpu" and not interpreting():
        raise ValueError(
            "impl='triton' got CPU tensors: Triton kernels run on CPU tensors only in the Triton "
            "interpreter, which must be switched on before triton is imported (start the process "
            "with TRITON_INTERPRET=1 in the environment); or use impl='torch' (or 'auto')")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"impl='triton' needs CUDA (or CPU tensors under TRITON_INTERPRET=1), got {device}")


def _dot_precision(dtype: torch.dtype):
    return "ieee" if dtype == torch.float32 else None


def _merge_partials(out: Tensor, part: Tensor, part_bucket: Tensor) -> Tensor:
    """Fills the buckets cut by range boundaries with the log-sum-exp of their partials."""
    n_rows = out.shape[0]
    flat = part.reshape(n_rows, -1)
    index = part_bucket.reshape(1, -1).expand(n_rows, -1)
    bucket_max = out.new_full((n_rows, N_BUCKETS + 1), float("-inf"))
    bucket_max.scatter_reduce_(1, index, flat, reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(bucket_max), bucket_max, 0.0)
    sums = out.new_zeros((n_rows, N_BUCKETS + 1)).scatter_add_(1, index, (flat - shift.gather(1, index)).exp())
    merged = torch.where(sums > 0, sums.log() + shift, float("-inf"))
    shared = torch.zeros(N_BUCKETS + 1, dtype=torch.bool, device=out.device)
    shared[part_bucket.reshape(-1)] = True
    return torch.where(shared[:N_BUCKETS], merged[:, :N_BUCKETS], out)


@torch.library.custom_op("fastkd::byte_lse_triton", mutates_args=())
def byte_lse(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], sorted_ids: Tensor,
    bucket_of_sorted: Tensor, range_start: Tensor, part_bucket: Tensor, temperature: float,
    softcap: Optional[float],
) -> Tensor:
    """Bucket log-sum-exps ``(N, 257)`` float32; ``range_start``/``part_bucket`` from
    ``ByteVocab.range_plan(block_sizes(device)["BLOCK_V"], G, device)``."""
    # tl.dot needs one operand dtype: the wider of the two (a float32 head is not rounded).
    common = torch.promote_types(hidden.dtype, weight.dtype)
    hidden, weight = hidden.to(common).contiguous(), weight.to(common).contiguous()
    bias = None if bias is None else bias.contiguous()
    n_rows, dim = hidden.shape
    blocks = block_sizes(hidden.device, hidden.dtype)
    ranges = range_start.shape[0] - 1
    out = torch.full((n_rows, N_BUCKETS), float("-inf"), dtype=torch.float32, device=hidden.device)
    part = torch.empty((n_rows, ranges, 2), dtype=torch.float32, device=hidden.device)
    if n_rows == 0:
        return out
    grid = (triton.cdiv(n_rows, blocks["BLOCK_N"]), ranges)
    lc.launch(
        _byte_lse_forward_kernel, grid,
        hidden, weight, bias if bias is not None else hidden, sorted_ids, bucket_of_sorted,
        range_start, out, part,
        n_rows, dim, ranges,
        1.0 / temperature, 1.0 if softcap is None else softcap,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, N_BUCKETS=N_BUCKETS,
        BLOCK_N=blocks["BLOCK_N"], BLOCK_V=blocks["BLOCK_V"], BLOCK_D=blocks["BLOCK_D"],
        DOT_PRECISION=_dot_precision(hidden.dtype), **_options(blocks))
    return _merge_partials(out, part, part_bucket)


@byte_lse.register_fake
def _(hidden, weight, bias, sorted_ids, bucket_of_sorted, range_start, part_bucket, temperature, softcap):
    return hidden.new_empty((hidden.shape[0], N_BUCKETS), dtype=torch.float32)


@torch.library.custom_op("fastkd::byte_lse_triton_backward", mutates_args=())
def byte_lse_backward(
    grad: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], first_byte: Tensor,
    bucket_lse: Tensor, temperature: float, softcap: Optional[float],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(d hidden, d weight, d bias or empty)`` of ``Σ grad · bucket_lse``."""
    hidden_dtype, weight_dtype = hidden.dtype, weight.dtype
    # tl.dot needs one operand dtype: the wider of the two (a float32 head is not rounded).
    common = torch.promote_types(hidden.dtype, weight.dtype)
    hidden, weight = hidden.to(common).contiguous(), weight.to(common).contiguous()
    bias = None if bias is None else bias.contiguous()
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    blocks = block_sizes(hidden.device, hidden.dtype, "byte_backward")
    grad_hidden = torch.zeros((n_rows, dim), dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros((vocab, dim), dtype=torch.float32, device=hidden.device)
    grad_bias = torch.zeros(vocab if bias is not None else 0, dtype=torch.float32, device=hidden.device)
    if n_rows:
        grid = (triton.cdiv(n_rows, blocks["BLOCK_N"]) * triton.cdiv(vocab, blocks["BLOCK_V"]),)
        lc.launch(
            _byte_lse_backward_kernel, grid,
            hidden, weight, bias if bias is not None else hidden, first_byte,
            bucket_lse.float().contiguous(), grad.float().contiguous(),
            grad_hidden, grad_weight, grad_bias if bias is not None else grad_hidden,
            n_rows, vocab, dim,
            1.0 / temperature, 1.0 if softcap is None else softcap,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, N_BUCKETS=N_BUCKETS,
            GROUP=8 if lc.target(hidden.device) != lc.INTERPRETER else 2,
            BLOCK_N=blocks["BLOCK_N"], BLOCK_V=blocks["BLOCK_V"], BLOCK_D=blocks["BLOCK_D"],
            DOT_PRECISION=_dot_precision(hidden.dtype), **_options(blocks))
    return (grad_hidden.to(hidden_dtype), grad_weight.to(weight_dtype),
            grad_bias.to(bias.dtype if bias is not None else weight_dtype))


@byte_lse_backward.register_fake
def _(grad, hidden, weight, bias, first_byte, bucket_lse, temperature, softcap):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            weight.new_empty(weight.shape[0] if bias is not None else 0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, sorted_ids, bucket_of_sorted, range_start, part_bucket, temperature, softcap = inputs
    first_byte = torch.empty_like(bucket_of_sorted).scatter_(0, sorted_ids.long(), bucket_of_sorted)
    ctx.save_for_backward(hidden, weight, bias, first_byte, output)
    ctx.options = (temperature, softcap)


def _backward(ctx, grad):
    hidden, weight, bias, first_byte, bucket_lse = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = byte_lse_backward(
        grad, hidden, weight, bias, first_byte, bucket_lse, *ctx.options)
    return (grad_hidden, grad_weight, grad_bias if bias is not None else None) + (None,) * 6


torch.library.register_autograd("fastkd::byte_lse_triton", _backward, setup_context=_setup_context)
