"""The cost model (bench/model.py) on hand-computed cases: FLOPs, bytes, programs, bounds, targets."""
from __future__ import annotations

import math

import pytest

from bench import model as cm

# A toy GPU with round rates, so every expected time below is computed by hand.
TOY = cm.Gpu(name="toy", tc_flops=1e6, fp32_flops=1e5, hbm_bytes=1e3, l2_bytes=1e4, sfu_ops=1e2,
             sms=4, l2_size=4096, link_bytes=10.0, source="test")


def test_gemm_counts_flops_bytes_and_programs():
    k = cm.gemm("g", 256, 512, 128, in_bytes=2, out_bytes=4)
    assert k.tc_flops == 2 * 256 * 512 * 128
    assert k.hbm_bytes == (256 * 128 + 512 * 128) * 2 + 256 * 512 * 4
    assert k.programs == math.ceil(256 / 128) * math.ceil(512 / 256) == 4
    # operands re-read from L2 once per 256 rows / columns of the other operand
    assert k.l2_bytes == 256 * 512 * 128 * 2 * (1 / 256 + 1 / 256)
    accumulated = cm.gemm("g", 256, 512, 128, in_bytes=2, out_bytes=4, accumulate=True)
    assert accumulated.hbm_bytes - k.hbm_bytes == 256 * 512 * 4   # C read as well as written
    on_cores = cm.gemm("g", 256, 512, 128, fp32_cores=True)
    assert on_cores.tc_flops == 0 and on_cores.fp32_flops == k.tc_flops


def test_kernel_bound_is_its_slowest_resource_and_idle_sms_count():
    k = cm.Kernel("k", tc_flops=2e6, hbm_bytes=1e3, sfu_ops=50)       # 2 s, 1 s, 0.5 s
    assert k.bound(TOY) == (2.0, "tensor cores")
    k.count = 3
    assert k.bound(TOY) == (6.0, "tensor cores")
    memory = cm.Kernel("m", tc_flops=1e6, hbm_bytes=5e3, l2_bytes=2e4, atomic_bytes=2e4)  # 1, 5, 4 s
    assert memory.bound(TOY) == (5.0, "HBM")
    # two long-running programs on four SMs: half the chip computes
    walk = cm.Kernel("w", tc_flops=2e6, programs=2, long_programs=True)
    assert walk.bound(TOY) == (4.0, "tensor cores")
    short = cm.Kernel("s", tc_flops=2e6, programs=2)   # many short programs rebalance: no penalty
    assert short.bound(TOY) == (2.0, "tensor cores")


def test_chunk_rows_from_the_budget():
    assert cm.chunk_rows(10_000, 1000, 1000 * 4 * 300, 4) == 256       # 300 rows fit, rounded to 128
    assert cm.chunk_rows(10_000, 1000, 1000 * 4 * 50, 4) == 128        # never below one multiple
    assert cm.chunk_rows(100, 1000, 2**30, 4) == 100                   # never above N
    assert cm._chunks(1000, 256) == [(256, 3), (232, 1)]


def test_chunked_plan_by_hand():
    n, d, v = 1000, 64, 1000
    shape = cm.Shape("toy", n, d, v)
    plan = cm.chunked(shape, budget_bytes=v * (4 + 2) * 256)  # an fp32 buffer and bf16 dz per row
    assert plan.extra["chunk_rows"] == 256
    assert plan.total("tc_flops") == 6 * n * d * v                      # exactly the three GEMMs
    assert plan.logit_passes == pytest.approx(1.0)
    epilogues = sum(k.count * k.hbm_bytes for k in plan.kernels if "epilogue" in k.name)
    assert epilogues == (4 + 4 + 2) * n * v                              # fp32 read twice, bf16 dz written
    dw = sum(k.count * k.hbm_bytes for k in plan.kernels if k.name == "dW GEMM")
    chunks = 4
    assert dw == (v + d) * n * 2 + v * d * 4 * (1 + 2 * (chunks - 1))  # fp32 accumulator read+written
    # the bound is the sum of the kernels' bounds
    assert plan.bound(TOY) == pytest.approx(sum(k.bound(TOY)[0] for k in plan.kernels))
    assert plan.floor(TOY) == pytest.approx(6 * n * d * v / 1e6)


def test_online_teacher_adds_one_gemm_and_reads():
    shape = cm.Shape("toy", 512, 64, 1024, teacher_dim=128)
    dense = cm.chunked(shape, teacher="dense", budget_bytes=1024 * 10 * 128)
    topk = cm.chunked(shape, teacher="topk", budget_bytes=1024 * 10 * 128)
    assert dense.total("tc_flops") == 6 * 512 * 64 * 1024 + 2 * 512 * 128 * 1024
    assert shape.floor_flops == dense.total("tc_flops")
    grad = lambda p: sum(k.count * k.hbm_bytes for k in p.kernels if k.name == "grad epilogue")
    assert grad(dense) - grad(topk) == 4 * 512 * 1024                   # dense reads the teacher again
    passes = lambda p: sum(k.count * k.hbm_bytes for k in p.kernels if "epilogue" in k.name)
    assert passes(dense) == (8 + 8 + 8 + 2) * 512 * 1024                # stats, divergence, grad + dz


def test_cuda_is_the_chunked_plan_with_dz_in_place_then_cast():
    n, d, v = 1000, 64, 1000
    for teacher, dt in ((None, None), ("dense", 96)):
        shape = cm.Shape("toy", n, d, v, teacher_dim=dt)
        chunked = cm.chunked(shape, teacher=teacher, budget_bytes=v * 8 * 128)
        cuda = cm.cuda(shape, teacher=teacher, budget_bytes=v * 8 * 128)
        assert cuda.path == ("cuda" if teacher is None else "cuda online dense")
        assert cuda.extra["chunk_rows"] == chunked.extra["chunk_rows"]
        assert cuda.total("tc_flops") == chunked.total("tc_flops")
        # the csrc grad pass writes fp32 dz over the buffer (4 B, not 2), then a cast reads 4, writes 2
        assert cuda.total("hbm_bytes") - chunked.total("hbm_bytes") == (2 + 4 + 2) * n * v
        assert [k for k in cuda.kernels if k.name == "dz cast to bf16"]


def test_fused_head_bytes_per_element_by_hand():
    n, d, v = 512, 64, 1024                 # V = 8 tiles of 128 columns; chunks of 256 rows
    shape = cm.Shape("toy", n, d, v)
    per_row = v * 2 + (v // 128) * 8 * 4  # the tile; partials and the bounds of S per 128 columns
    plan = cm.fused_head(shape, budget_bytes=per_row * 256, scaled=False)
    assert plan.extra["chunk_rows"] == 256 and plan.path == "chunked, gradient pass"
    assert plan.total("tc_flops") == 6 * n * d * v and plan.logit_passes == pytest.approx(1.0)
    tiles = v // 128
    by_name = lambda name: sum(k.count * k.hbm_bytes for k in plan.kernels if k.name == name)
    # GEMM: h and W per chunk (2 chunks), the 16-bit tile, 7 fp32 partials per (row, tile)
    assert by_name("fused logits GEMM") == 2 * (256 * d + v * d) * 2 + n * v * 2 + n * tiles * 7 * 4
    assert by_name("combine") == n * tiles * 6 * 4
    assert by_name("grad pass") == n * v * (2 + 2) + n * tiles * 2 * 4
    # per logit outside the GEMM main loops: 2 (tile out) + 4 (grad) + (28 + 24 + 8) / 128
    outside = by_name("fused logits GEMM") - 2 * (256 * d + v * d) * 2 + by_name("combine") + by_name("grad pass")
    assert outside / (n * v) == pytest.approx(6 + 60 / 128)
    head = next(k for k in plan.kernels if k.name == "fused logits GEMM")
    # 128 x 256 program tiles: W re-read once per 128 rows, h once per 256 columns
    assert head.l2_bytes == 256 * v * d * 2 * (1 / 128 + 1 / 256) and head.programs == 2 * (v // 256)
    online = cm.fused_head(cm.Shape("toy", n, d, v, teacher_dim=96), teacher="dense", budget_bytes=2 * per_row * 256)
    assert online.extra["chunk_rows"] == 256 and online.path == "chunked online dense"
    passes = sum(k.count * k.hbm_bytes for k in online.kernels if k.name in ("divergence pass", "grad pass"))
    assert passes == (4 + 4 + 2) * n * v
    with pytest.raises(ValueError, match="teacher"):
        cm.fused_head(shape, teacher="topk")


def test_fused_head_with_the_scaled_tile_by_hand():
    n, d, v, k = 512, 64, 1024, 64          # 8 tiles of 128 columns; chunks of 256 rows
    shape = cm.Shape("toy", n, d, v, softcap=30.0, topk=k)
    per_row = v * 2 + (v // 128) * 8 * 4
    # the budget holds the float32 dh and the 16-bit σ ⊙ h per row too (6·D B)
    plan = cm.fused_head(shape, budget_bytes=(per_row + 6 * d) * 256)
    assert cm.fused_head(shape, budget_bytes=per_row * 256).extra["chunk_rows"] < 256
    grad_pass = cm.fused_head(shape, budget_bytes=per_row * 256, scaled=False)
    assert plan.path == "chunked" and plan.extra["chunk_rows"] == 256
    assert grad_pass.extra["chunk_rows"] == 256
    names = [kern.name for kern in plan.kernels]
    assert "grad pass" not in names and "probe (R)" in names and "S into G" in names
    by_name = lambda p, name: sum(kern.count * kern.hbm_bytes for kern in p.kernels if kern.name == name)
    # the probe: 4 rows of W and the row of h per row; S and the label: a 32 B sector per entry
    assert by_name(plan, "probe (R)") == n * 5 * d * 2
    assert by_name(plan, "S into G") == n * (k + 1) * (12 + 32)
    # dh out in float32 then × σ into 16 bits; σ ⊙ h for the dW GEMM
    assert by_name(plan, "dh GEMM") - by_name(grad_pass, "dh GEMM") == n * d * 2
    assert by_name(plan, "dh × σ") == n * d * (4 + 2) and by_name(plan, "h × σ") == n * d * 4
    # the softcap's derivative in G: one more exp per element in GEMM 1
    head = lambda p: sum(kern.count * kern.sfu_ops for kern in p.kernels if kern.name == "fused logits GEMM")
    assert head(plan) - head(grad_pass) == n * v
    # what is gone: the grad pass's 2 + 2 B per logit (and its tile max and bounds)
    saved = by_name(grad_pass, "grad pass")
    assert saved == n * v * 4 + n * (v // 128) * 8
    with pytest.raises(ValueError, match="scaled"):
        cm.fused_head(shape, teacher="dense", scaled=True)


def test_fused_head_with_dz_in_the_gradient_gemms_by_hand():
    n, d, v = 512, 320, 1024                # D = 2 blocks of 256 columns (dz made twice); 8 tiles
    shape = cm.Shape("toy", n, d, v, softcap=30.0)
    per_row = v * 2 + math.ceil(v / 128) * 8 * 4
    plain = cm.fused_head(shape, budget_bytes=per_row * 256, scaled=False)
    plan = cm.fused_head(shape, budget_bytes=per_row * 256, grad_in_gemms=True)
    assert plan.path == "chunked, dz in the GEMMs (opt-in)"
    assert plan.total("tc_flops") == 6 * n * d * v and plan.extra["chunk_rows"] == 256
    assert not [k for k in plan.kernels if k.name == "grad pass"]       # no pass, no dz written
    by_name = lambda p, name: sum(k.count * k.hbm_bytes for k in p.kernels if k.name == name)
    tiles = v // 128
    # dh and dW read the tile as their dz operand (as they read dz) plus the tile max and bounds
    for name in ("dh GEMM", "dW GEMM"):
        assert by_name(plan, name) - by_name(plain, name) == n * tiles * 2 * 4
    dh = next(k for k in plan.kernels if k.name == "dh GEMM")
    assert dh.sfu_ops == 2 * 256 * v                                  # one exp per element, twice
    assert dh.fp32_flops == 2 * (8 + 3) * 256 * v                      # + softcap'
    assert dh.l2_bytes == 256 * v * d * 2 * (1 / 128 + 1 / 256)
    assert dh.programs == (256 // 128) * 2
    with pytest.raises(ValueError, match="grad_in_gemms"):
        cm.fused_head(shape, teacher="dense", grad_in_gemms=True)


def test_streaming_plan_by_hand():
    n, d, v = 1024, 256, 2048
    shape = cm.Shape("toy", n, d, v)
    plan = cm.streaming(shape, bm=128, bn_forward=256, bn_backward=128, gpu=TOY)
    forward, backward, correction = plan.kernels
    assert plan.total("tc_flops") == 8 * n * d * v                      # forward + recompute, dh, dW
    assert plan.logit_passes == 2
    assert backward.atomic_bytes == n * v * d * 4 * (1 / 128 + 1 / 128)
    # the ids of S after the tiles: W rows gathered, h and dh once, dW[ids] by fp32 atomics
    k = shape.topk
    assert correction.hbm_bytes == n * k * d * 2 + n * d * 2 + n * d * 4 * 2
    assert correction.atomic_bytes == n * k * d * 4 and correction.fp32_flops == 4 * n * k * d
    # a 256-column tile recomputed in two 128-column parts re-reads h once per part
    split = cm.streaming(shape, bm=128, bn_backward=256, bn_recompute=128, gpu=TOY).kernels[1]
    assert split.l2_bytes == n * v * d * 2 * ((1 / 128 + 1 / 128) + (1 / 256 + 1 / 128))
    assert backward.programs == (n // 128) * (v // 128)
    # 8 row blocks, 4 SMs: the split-V forward needs one split for 2 programs per SM
    assert plan.extra["splits"] == 1 and forward.programs == 8
    # dh rows a group keeps in L2: half of 4096 bytes / (256 x 4) -> below one block: one block,
    # so dW (v x d fp32) is read and written once per row block
    assert plan.extra["dW_groups"] == n // 128
    assert backward.hbm_bytes == (n * d + v * d) * 2 + n * d * 4 + (n // 128) * v * d * 4 * 2


def test_streaming_slabs_memory_and_launches():
    # 16-bit weights at Llama-3-8B's head, N 8192: float32 dW slabs of 1/8 of the float32 dh
    # (16 MiB: 1024 vocabulary rows, 126 slabs), each slab two more launches (tiles, correction)
    n, d, v = 8192, 4096, 128256
    plan = cm.streaming(cm.Shape("llama", n, d, v), gpu=cm.GPUS["H100"])
    slabs = math.ceil(v / 1024)
    assert plan.extra["dW_slabs"] == slabs == 126 and plan.extra["slab_bytes"] == 16 * 2**20
    assert plan.launches == 2 * (slabs - 1)
    assert plan.launch_time() == pytest.approx(2 * (slabs - 1) * cm.LAUNCH_GAP)
    # extra memory: the float32 dh, the slab and the (N, K) and per-row state, under 1 % of the
    # naive loss's 16 B per logit
    assert plan.extra["extra_memory_bytes"] == n * d * 4 + 16 * 2**20 + n * 64 * 8 + n * 32
    assert plan.extra["extra_memory_bytes"] <= 0.01 * n * v * 16
    # each slab's correction reads h only for rows with an id in it
    correction = plan.kernels[2]
    hit = 1 - (1 - 1 / slabs) ** 64
    extra = correction.hbm_bytes - (n * 64 * d * 2 + n * d * 2 + n * d * 4 * 2)
    assert extra == pytest.approx((slabs - 1) * (hit * n * d * 2 + n * 64 * 8))
    # float32 weights: the result is the accumulator, one slab, no extra launches
    fp32 = cm.streaming(cm.Shape("llama", n, d, v, element_bytes=4), gpu=cm.GPUS["H100"])
    assert fp32.extra["dW_slabs"] == 1 and fp32.launches == 0


def test_split_v_fills_the_gpu():
    plan = cm.streaming(cm.Shape("toy", 4096, 4096, 128256), gpu=cm.GPUS["H100"])
    forward = plan.kernels[0]
    # the sm_90 forward takes 128-row blocks (launch_configs "stream"): 32 row blocks x 9 splits
    assert plan.extra["splits"] == math.ceil(2 * 132 / (4096 // 128)) == 9
    assert forward.programs == 32 * 9 >= 2 * cm.GPUS["H100"].sms


def test_vocab_parallel_communication_by_hand():
    shape = cm.Shape("toy", 100, 8, 1001, topk=4)
    plan = cm.vocab_parallel(shape, 2, budget_bytes=2**20, selection=True)
    stats = 2 * (1 / 2) * 100 * (4 + cm.ROW_STATS) * 4
    candidates = 1 * 100 * 4 * 8
    grad_hidden = 2 * (1 / 2) * 100 * 8 * 4
    assert plan.comm_bytes == pytest.approx(stats + candidates + grad_hidden)
    assert plan.total("tc_flops") == 6 * 100 * 8 * 501                  # the local shard: ceil(V / 2)
    assert plan.comm_time(TOY) == pytest.approx(plan.comm_bytes / 10.0)
    assert plan.floor(TOY) == pytest.approx(shape.floor_flops / 2 / 1e6)
    # a design that gathers the bf16 logits moves O(N·V): here each rank receives half of them
    assert plan.extra["gather_logits_bytes"] == pytest.approx(0.5 * 100 * 1001 * 2)
    # communication does not grow with V (only the gather designs do)
    wide = cm.vocab_parallel(cm.Shape("toy", 100, 8, 100_001, topk=4), 2, budget_bytes=2**20, selection=True)
    assert wide.comm_bytes == plan.comm_bytes
    offline = cm.vocab_parallel(shape, 2, budget_bytes=2**20)     # ids given: no candidates gathered
    assert plan.comm_bytes - offline.comm_bytes == candidates


def test_torch_backend_is_on_cuda_cores():
    plan = cm.torch_backend(cm.Shape("toy", 512, 64, 1024))
    assert plan.total("tc_flops") == 0
    assert plan.total("fp32_flops") == 8 * 512 * 64 * 1024


def test_targets_are_judged_where_stated():
    h100 = cm.GPUS["H100"]
    for model, (d, v, cap) in cm.MODELS.items():
        shape = cm.Shape(model, 8192, d, v, softcap=cap)
        # the targets are the default path's: the fused head with 16-bit operands
        for plan, limit in ((cm.fused_head(shape), 1.10), (cm.streaming(shape, gpu=h100), 2.0)):
            expected = "meets" if plan.ratio(h100) <= limit else "MISSES"
            assert cm.verdict(plan, h100).startswith(expected)
        assert cm.verdict(cm.chunked(shape), h100) == ""  # the Triton-epilogue alternative
        assert cm.verdict(cm.fused_head(cm.Shape(model, 4096, d, v, softcap=cap)), h100) == ""
        assert cm.verdict(cm.fused_head(shape), cm.GPUS["H200"]) == ""
    liger = cm.fused_head(cm.LIGER_JSD_SHAPE, teacher="dense", budget_bytes=cm.default_budget(h100))
    expected = "meets" if liger.bound(h100) * 1e3 <= 30.0 else "MISSES"
    assert cm.verdict(liger, h100).startswith(expected)


def test_report_prints_every_path():
    text = cm.report(gpu_keys=("H100",), models=("llama3-8b",), tokens=(4096, 8192), ways=(2,))
    for name in ("chunked", "streaming", "cuda", "cuda online dense", "chunked, Triton epilogues",
                 "chunked online dense, Triton epilogues", "chunked, dz in the GEMMs (opt-in)", "torch", "byte (chunked)", "byte (streaming)",
                 "chunked online dense", "chunked online top-k", "vocabulary parallel", "Liger"):
        assert name in text
    assert "datasheet" in text


def test_results_table_is_spliced_between_markers(tmp_path):
    from bench import report

    text = report.table()
    assert text.count("| llama3-8b N=8192") >= 10 and "Liger JSD shape" in text
    assert "MISSES" in text or "meets" in text
    target = tmp_path / "RESULTS.md"
    target.write_text(f"head\n{report.BEGIN}\nold\n{report.END}\ntail\n")
    report.write(target, "new table")
    assert target.read_text() == f"head\n{report.BEGIN}\nnew table\n{report.END}\ntail\n"


def test_default_budget_follows_the_card():
    """fastkd's default chunk budget, as the model takes it: 1/64 of the card's memory within
    [512 MiB, 2 GiB], the same rule as fastkd.backends.chunked.budget_bytes."""
    from dataclasses import replace
    from unittest import mock

    import torch
    from fastkd.backends import chunked as engine

    h100 = cm.GPUS["H100"]
    for memory in (24 * 10**9, 78 * cm.GiB, 139 * cm.GiB):
        gpu = replace(h100, memory=memory)
        props = mock.Mock(total_memory=memory)
        engine._gpu_budget.cache_clear()
        with mock.patch.object(torch.cuda, "is_available", lambda: True), \
                mock.patch.object(torch.cuda, "get_device_properties", lambda _device: props):
            assert engine.budget_bytes(None, 4 * 128256, torch.device("cuda", 0)) == cm.default_budget(gpu)
    engine._gpu_budget.cache_clear()
    assert cm.default_budget(replace(h100, memory=24 * 10**9)) == 512 * 2**20
    assert cm.default_budget(cm.GPUS["H200"]) == 2 * cm.GiB
    assert 1.2 * cm.GiB < cm.default_budget(h100) < 1.25 * cm.GiB
