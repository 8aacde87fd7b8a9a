"""The fused head's cost on paper against the three bare GEMMs (issue #14 item 7), with the bench
helper's cost model (``bench/model.py``: its rates, GEMM, row-wise and chunking conventions).

Per chunk of c rows (summing reduction, offline top-k, 16-bit operands), the kernels of
``fastkd.backends.triton_fused_head``:

    fused logits GEMM   2·c·V·D tensor FLOPs; reads h_c and W (16-bit), writes the tile (2 B per
                        element) and 6 float32 partials per (row, 128-column tile) plus the tile
                        bounds of S; 1 exp per element (+1 tanh with a softcap) in its epilogue;
                        L2 traffic of 128×128 program tiles
    combine (torch)     reads the partials: c × V/128 × 24 B
    grad pass           reads the tile (2 B) and writes dz (2 B) per element; 1 exp (+ softcap')
    dh GEMM, dW GEMM    as the unfused plan (16-bit dz, float32 dW accumulated across chunks)

The chunk height comes from the same 512 MiB budget over 2 B per element (twice the rows of the
float32 plan). Run with the bench helper's tree on the path:

    PYTHONPATH=/path/to/tree-with-bench-model:$PWD python scripts/cost_fused_head.py

It also prints the online dense teacher at Liger's benchmark shape (``bench.model.LIGER_JSD_SHAPE``:
student D 2048, teacher D 4096, V 128256, N 8192; Liger publishes 60.7 ms on an H100).
"""
from __future__ import annotations

import argparse
import math

from bench import model as bm

TILE = 128  # the fused GEMM's program tile (triton_fused_head.head_config)
PARTIALS = 6


def fused(shape: "bm.Shape", budget_bytes: int = bm.CHUNK_BYTES, cublas_l2: bool = False) -> "bm.Plan":
    """The fused plan at ``shape``; ``cublas_l2``: the what-if of the GEMM's L2 traffic at
    cuBLAS's tile sizes instead of 128×128."""
    n, d, v, e = shape.tokens, shape.dim, shape.vocab, shape.element_bytes
    rows = bm.chunk_rows(n, v, budget_bytes, 2, multiple=bm.ROW_ALIGN)
    cap = 1 if shape.softcap else 0
    n_tiles = math.ceil(v / TILE)
    kernels = []
    for index, (c, count) in enumerate(bm._chunks(n, rows)):
        head = bm.gemm("fused logits GEMM", c, v, d, in_bytes=e, out_bytes=2, logit_passes=c / n,
                       extra_read=c * n_tiles * (PARTIALS + 1) * 4, count=count)
        if not cublas_l2:
            head.l2_bytes = c * v * d * e * (2 / TILE)
        head.programs = math.ceil(c / TILE) * n_tiles
        head.sfu_ops = (1 + cap) * c * v
        kernels.append(head)
        kernels.append(bm.rowwise("combine", c, n_tiles, read=PARTIALS * 4, write=0, sfu=2,
                                  count=count))
        grad = bm.rowwise("grad pass", c, v, read=2, write=e, sfu=1 + cap, count=count)
        grad.hbm_bytes += c * n_tiles * 2 * 4  # m_t and the bounds
        kernels.append(grad)
        kernels.append(bm.gemm("dh GEMM", c, d, v, in_bytes=e, out_bytes=e, count=count))
        first = 1 if index == 0 else 0
        kernels.append(bm.gemm("dW GEMM", v, d, c, in_bytes=e, out_bytes=4, accumulate=True,
                               count=count - first))
        if first:
            kernels.append(bm.gemm("dW GEMM", v, d, c, in_bytes=e, out_bytes=4, count=1))
    kernels = [k for k in kernels if k.count]
    name = "chunked fused" + (" [cuBLAS L2]" if cublas_l2 else "")
    return bm.Plan(name, shape, kernels, extra={"chunk_rows": rows})


def fused_dense(shape: "bm.Shape", budget_bytes: int = bm.CHUNK_BYTES) -> "bm.Plan":
    """The online dense teacher with both heads fused: per chunk the student's and the teacher's
    GEMMs (16-bit tiles + partials), the divergence pass (reads both tiles: 4 B per element), the
    gradient pass (reads both, writes dz: 6 B), dh and dW."""
    n, d, v, e, dt = shape.tokens, shape.dim, shape.vocab, shape.element_bytes, shape.teacher_dim
    rows = bm.chunk_rows(n, v, budget_bytes, 4, multiple=bm.ROW_ALIGN)  # two 16-bit tiles
    n_tiles = math.ceil(v / TILE)
    kernels = []
    for index, (c, count) in enumerate(bm._chunks(n, rows)):
        for name, width in (("fused logits GEMM", d), ("fused teacher GEMM", dt)):
            head = bm.gemm(name, c, v, width, in_bytes=e, out_bytes=2,
                           logit_passes=c / n if width == d else 0.0,
                           extra_read=c * n_tiles * PARTIALS * 4, count=count)
            head.l2_bytes = c * v * width * e * (2 / TILE)
            head.sfu_ops = c * v
            kernels.append(head)
        kernels.append(bm.rowwise("divergence pass", c, v, read=4, write=0, sfu=3, count=count))
        kernels.append(bm.rowwise("grad pass", c, v, read=4, write=e, sfu=3, count=count))
        kernels.append(bm.gemm("dh GEMM", c, d, v, in_bytes=e, out_bytes=e, count=count))
        first = 1 if index == 0 else 0
        kernels.append(bm.gemm("dW GEMM", v, d, c, in_bytes=e, out_bytes=4, accumulate=True,
                               count=count - first))
        if first:
            kernels.append(bm.gemm("dW GEMM", v, d, c, in_bytes=e, out_bytes=4, count=1))
    kernels = [k for k in kernels if k.count]
    return bm.Plan("chunked online dense fused", shape, kernels, extra={"chunk_rows": rows})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args(argv)
    print(f"{'GPU':6s} {'model':14s} {'path':26s} {'bound ms':>9s} {'floor ms':>9s} {'ratio':>6s}  "
          "largest excess")
    for key in ("H100", "H200"):
        gpu = bm.GPUS[key]
        for model, (d, v, cap) in bm.MODELS.items():
            shape = bm.Shape(model, args.tokens, d, v, softcap=cap)
            for plan in (bm.chunked(shape), fused(shape), fused(shape, cublas_l2=True)):
                print(f"{key:6s} {model:14s} {plan.path:26s} {plan.bound(gpu) * 1e3:9.2f} "
                      f"{plan.floor(gpu) * 1e3:9.2f} {plan.ratio(gpu):6.3f}  {plan.dominant(gpu)}")
        shape = bm.LIGER_JSD_SHAPE
        for plan in (bm.chunked(shape, teacher="dense"), fused_dense(shape)):
            print(f"{key:6s} {shape.model:14s} {plan.path:26s} {plan.bound(gpu) * 1e3:9.2f} "
                  f"{plan.floor(gpu) * 1e3:9.2f} {plan.ratio(gpu):6.3f}  {plan.dominant(gpu)}")


if __name__ == "__main__":
    main()
