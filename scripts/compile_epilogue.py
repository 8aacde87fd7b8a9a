"""Compile the Triton epilogue kernels (fastkd/backends/triton_epilogue.py) for the GPU, no GPU needed.

For each kernel, buffer dtype and target (sm_90, sm_89, sm_80) it compiles the launch the launchers
make (``triton_epilogue.compile_specs``) with Triton's compiler and the ptxas Triton ships, and
reports compile seconds, registers per thread, local memory per thread (where spills go; cuobjdump's
resource usage, or ptxas -v's spill bytes with --ptxas) and shared memory per block (Triton's
dynamic allocation + static). Exits 1 when a kernel spills, or needs more
shared memory than the target allows per block, or more registers than one block can have.

    python scripts/compile_epilogue.py      # float32 (+ dz to bf16), bfloat16, float16 buffers; 3 targets
    python scripts/compile_epilogue.py --dtypes bf16 --targets 90 --vocab 151936 --k 64

Each run compiles into a fresh temporary Triton cache, so the seconds are real compile times
(``--warm-cache`` reuses Triton's cache instead).
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
if "--warm-cache" not in sys.argv:  # honest compile times: nothing from Triton's cache
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastkd-compile-")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastkd.backends import triton_epilogue  # noqa: E402

# buffer dtype, and the dtype the gradient kernels write through out= (None: in place)
DTYPES = {"fp32": (torch.float32, None), "fp32>bf16": (torch.float32, torch.bfloat16),
          "bf16": (torch.bfloat16, None), "fp16": (torch.float16, None), "fp64": (torch.float64, None)}
DEFAULT_DTYPES = ["fp32", "fp32>bf16", "bf16", "fp16"]
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


def resource_usage(cubin: bytes) -> dict:
    """REG, SHARED (static), LOCAL and STACK of the cubin's kernel, from the bundled cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", text)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=DEFAULT_DTYPES, choices=list(DTYPES),
                        help="logits buffer dtypes; 'fp32>bf16': float32 logits, dz written to bfloat16")
    parser.add_argument("--targets", nargs="+", type=int, default=[90, 89, 80], choices=[90, 89, 80])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--kernels", nargs="+", default=None, help="only these kernel names")
    parser.add_argument("--ptxas", action="store_true",
                        help="registers and spill bytes from a second ptxas -v run instead of cuobjdump")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use Triton's own cache (faster reruns; compile times then mean little)")
    args = parser.parse_args(argv)
    failures = []
    print(f"{'kernel':26s} {'dtype':9s} {'sm':>3s} {'compile_s':>9s} {'regs':>5s} {'spill_B':>7s} "
          f"{'shared_B':>8s} {'warps':>5s} {'BLOCK_V':>7s}")
    total = time.perf_counter()
    for dname in args.dtypes:
        dtype, out_dtype = DTYPES[dname]
        for spec in triton_epilogue.compile_specs(args.vocab, args.k, dtype, out_dtype):
            if args.kernels and spec["name"] not in args.kernels:
                continue
            if out_dtype is not None and "grad" not in spec["name"]:
                continue  # the statistics kernels do not write dz: same as the in-place case
            for cc in args.targets:
                start = time.perf_counter()
                src = ASTSource(spec["kernel"], spec["signature"], spec["constexprs"], spec["attrs"])
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=spec["options"])
                seconds = time.perf_counter() - start
                usage = resource_usage(compiled.asm["cubin"])
                regs, spills = usage["REG"], usage["LOCAL"] + usage["STACK"]  # spills live in local memory
                if args.ptxas:  # the same figures from ptxas -v, with spill stores/loads split out
                    regs, spills = ptxas_report(compiled.asm["ptx"], cc)
                shared = compiled.metadata.shared + usage["SHARED"]
                warps = spec["options"]["num_warps"]
                print(f"{spec['name']:26s} {dname:9s} {cc:3d} {seconds:9.2f} {regs:5d} {spills:7d} "
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
