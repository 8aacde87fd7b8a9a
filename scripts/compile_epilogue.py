"""Compile the Triton epilogue kernels (fastkd/backends/triton_epilogue.py) for the GPU, no GPU needed.

For each kernel, buffer dtype and target (sm_90, sm_89, sm_80) it compiles the launch the launchers
make (``triton_epilogue.compile_specs``) with Triton's compiler and the ptxas Triton ships, and
reports compile seconds, registers per thread, spilled bytes (ptxas -v), local memory and shared
memory per block (Triton's dynamic allocation + static). Exits 1 when a kernel spills, or needs more
shared memory than the target allows per block, or more registers than one block can have.

    python scripts/compile_epilogue.py                 # float32, bfloat16, float16 buffers; 3 targets
    python scripts/compile_epilogue.py --dtypes bf16 --targets 90 --vocab 151936 --k 64
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

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastkd.backends import triton_epilogue  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Shared memory one block may use (opt-in maximum), bytes: A100, RTX 4090 (sm_86/89), H100/H200.
SHARED_LIMIT = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
REGISTERS_PER_SM = 65536
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def ptxas_report(ptx: str, cc: int) -> tuple[int, int]:
    """(registers, spill store + load bytes) from ptxas -v on the kernel's PTX, with the ptxas
    Triton itself uses for that target (it ships one for sm_80/89 and a newer one for sm_90+)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
        res = subprocess.run([get_ptxas(cc).path, "-v", f"--gpu-name={arch}", src,
                              "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text}")
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return regs, spills


def static_shared(cubin: bytes) -> int:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True).stdout
    match = re.search(r"SHARED:(\d+)", text)
    return int(match.group(1)) if match else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--targets", nargs="+", type=int, default=[90, 89, 80], choices=[90, 89, 80])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--kernels", nargs="+", default=None, help="only these kernel names")
    args = parser.parse_args(argv)
    failures = []
    print(f"{'kernel':26s} {'dtype':5s} {'sm':>3s} {'compile_s':>9s} {'regs':>5s} {'spill_B':>7s} "
          f"{'shared_B':>8s} {'warps':>5s} {'BLOCK_V':>7s}")
    total = time.perf_counter()
    for dname in args.dtypes:
        for spec in triton_epilogue.compile_specs(args.vocab, args.k, DTYPES[dname]):
            if args.kernels and spec["name"] not in args.kernels:
                continue
            for cc in args.targets:
                start = time.perf_counter()
                src = ASTSource(spec["kernel"], spec["signature"], spec["constexprs"], spec["attrs"])
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=spec["options"])
                seconds = time.perf_counter() - start
                regs, spills = ptxas_report(compiled.asm["ptx"], cc)
                shared = compiled.metadata.shared + static_shared(compiled.asm["cubin"])
                warps = spec["options"]["num_warps"]
                print(f"{spec['name']:26s} {dname:5s} {cc:3d} {seconds:9.2f} {regs:5d} {spills:7d} "
                      f"{shared:8d} {warps:5d} {spec['constexprs']['BLOCK_V']:7d}", flush=True)
                where = f"{spec['name']} ({dname}, sm_{cc})"
                if spills:
                    failures.append(f"{where}: {spills} bytes of register spills")
                if shared > SHARED_LIMIT[cc]:
                    failures.append(f"{where}: {shared} bytes of shared memory > {SHARED_LIMIT[cc]}")
                if regs * 32 * warps > REGISTERS_PER_SM:
                    failures.append(f"{where}: {regs} registers x {32 * warps} threads > {REGISTERS_PER_SM}")
    print(f"total {time.perf_counter() - total:.1f} s")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
