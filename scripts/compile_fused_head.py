"""Compile the fused head's kernels (fastkd/backends/triton_fused_head.py) for the GPU, no GPU needed.

For each operand dtype and target (sm_90, sm_89, sm_80) it compiles the launches of a chunk
(``triton_fused_head.compile_specs(cc, ...)``: the configuration each target gets) with Triton's
compiler and the ptxas Triton ships, and prints compile seconds, registers, local memory (spills),
shared memory per block and the tensor-core instructions in the SASS (``cuobjdump -sass``). Exits 1
when a kernel spills, needs more shared memory than the target allows per block or more registers
than a block can have, takes longer than 60 s to compile, or — the statistics kernel and the
gradient GEMMs with 16-bit operands — has no HGMMA (sm_90) / HMMA (sm_80/89) instruction.

    python scripts/compile_fused_head.py                  # bf16 and fp16 operands, 3 targets
    python scripts/compile_fused_head.py --dtypes fp32    # float32 operands (chunked_epilogue="fused")
    python scripts/compile_fused_head.py --dtypes bf16 --targets 90 --vocab 151936 --dim 1536
    python scripts/compile_fused_head.py --wide-flags --targets 90   # every flag set of the wide tile

Each run compiles into a fresh temporary Triton cache, so the seconds are real compile times.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the CPU interpreter
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastkd-compile-")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_epilogue import BIN, REGISTERS_PER_SM, SHARED_LIMIT, resource_usage  # noqa: E402

from fastkd.backends import triton_fused_head  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_COMPILE_S = 60.0


def tensor_core_ops(cubin: bytes) -> dict:
    """Counts of HGMMA and HMMA instructions in the cubin's SASS (bundled cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    return {op: len(re.findall(rf"\b{op}\.", sass)) for op in ("HGMMA", "HMMA")}


def _flags(constexprs: dict) -> str:
    """The boolean flags a launch sets, e.g. ``BIAS,CAP,SET,TAIL``."""
    names = [k.replace("HAS_", "").replace("WITH_", "") for k, v in constexprs.items()
             if v is True and k.startswith(("HAS_", "WITH_", "SEPARATE_", "GRAD", "SCALED", "ONLY_"))]
    return ",".join(names) or "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=list(DTYPES))
    parser.add_argument("--targets", nargs="+", type=int, default=[90, 89, 80], choices=[90, 89, 80])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--wide-flags", action="store_true",
                        help="compile every flag set the wide sm_90 tile takes (wide_specs), "
                             "instead of one chunk's launches")
    args = parser.parse_args(argv)
    failures = []
    print(f"{'kernel':18s} {'dtype':5s} {'sm':>3s} {'compile_s':>9s} {'regs':>5s} {'spill_B':>7s} "
          f"{'shared_B':>8s} {'warps':>5s} {'stages':>6s} {'HGMMA':>5s} {'HMMA':>5s}  tile  flags")
    total = time.perf_counter()
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for cc in args.targets:
            specs = triton_fused_head.wide_specs if args.wide_flags else triton_fused_head.compile_specs
            for spec in specs(cc, args.vocab, args.dim, args.k, dtype):
                start = time.perf_counter()
                src = ASTSource(spec["kernel"], spec["signature"], spec["constexprs"], spec["attrs"])
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=spec["options"])
                seconds = time.perf_counter() - start
                usage = resource_usage(compiled.asm["cubin"])
                regs, spills = usage["REG"], usage["LOCAL"] + usage["STACK"]
                shared = compiled.metadata.shared + usage["SHARED"]
                ops = tensor_core_ops(compiled.asm["cubin"])
                warps = spec["options"]["num_warps"]
                stages = spec["options"].get("num_stages", "-")
                c = spec["constexprs"]
                tile = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_V", "BLOCK_N", "BLOCK_D",
                                                    "BLOCK_K", "BLOCK_C") if k in c)
                print(f"{spec['name']:18s} {dname:5s} {cc:3d} {seconds:9.2f} {regs:5d} {spills:7d} "
                      f"{shared:8d} {warps:5d} {stages!s:>6s} {ops['HGMMA']:5d} {ops['HMMA']:5d}  {tile}"
                      f"  {_flags(c)}", flush=True)
                where = f"{spec['name']} ({dname}, sm_{cc})"
                if spills:
                    failures.append(f"{where}: {spills} bytes of register spills")
                if shared > SHARED_LIMIT[cc]:
                    failures.append(f"{where}: {shared} bytes of shared memory > {SHARED_LIMIT[cc]}")
                if regs * 32 * warps > REGISTERS_PER_SM:
                    failures.append(f"{where}: {regs} registers x {32 * warps} threads > {REGISTERS_PER_SM}")
                if seconds > MAX_COMPILE_S:
                    failures.append(f"{where}: compiled in {seconds:.0f} s > {MAX_COMPILE_S:.0f} s")
                gemms = ("head_stats_kernel", "head_dh_kernel", "head_dw_kernel")
                if spec["name"] in gemms and dtype != torch.float32:
                    want = "HGMMA" if cc >= 90 else "HMMA"
                    if ops[want] == 0:
                        failures.append(f"{where}: no {want} instruction in the SASS")
    print(f"total {time.perf_counter() - total:.1f} s")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
