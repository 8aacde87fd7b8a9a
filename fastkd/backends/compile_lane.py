"""The offline compile lane: every Triton kernel a GPU launch can use, compiled for sm_80/89/90.

No GPU and no interpreter. Three steps:

1. **Record.** Each *driver* (:data:`DRIVERS`) calls a backend's ops (forward and backward) on
   tiny CPU tensors inside ``launch_configs.recording(cc)``: the launchers pick their tiles,
   warps and stages for ``cc`` exactly as on that GPU, and ``launch_configs.launch`` records each
   launch instead of running it. The configurations checked are therefore the launchers' own.
2. **Compile.** Each distinct record becomes ``triton.compile(ASTSource(kernel, signature,
   constexprs, attrs), target=GPUTarget("cuda", cc, 32), options)``. The signature, constexprs,
   divisibility attributes and options come from Triton's own argument binder for that target
   (``create_function_from_signature`` + ``JITFunction._pack_args``, what ``kernel[grid](...)``
   runs before it compiles), so nothing is re-derived by hand and no driver stub is needed.
   Compiles run in parallel worker processes, each with a fresh, empty Triton cache (nothing is
   reused across runs, so a regression cannot hide behind a cached binary).
3. **Check** (each failure names the kernel, its configuration, the target and the number):
   compile time ≤ 60 s; shared memory ≤ the target's per-block limit; registers allow one block
   per SM (64K per SM, allocated per warp in units of 256); no local-memory spills (``STL`` in the
   SASS, ``LOCAL`` in ``cuobjdump -res-usage``); 16-bit kernels with ``tt.dot`` carry tensor-core
   instructions (``HGMMA`` on sm_90, ``HMMA`` on sm_80/89); no GPU-scope ``MEMBAR`` in a kernel
   with global atomics (``tl.atomic_add`` defaults to ``acq_rel``, which adds that fence).

The csrc CUDA kernels get the same resource checks from ``nvcc -Xptxas -v`` (:func:`check_csrc`).

Adding kernels from another file: make its launcher call ``launch_configs.launch`` and pick its
tiles with ``launch_configs.tiles``, then add one entry to :data:`DRIVERS`: a function of
``(dtype, k)`` that calls the new ops on tiny CPU tensors (forward and ``.backward()``), e.g.
``DRIVERS["chunked_topk"] = Driver(_drive_chunked_topk, ci=True)``.

Run: ``python scripts/compile_lane.py`` (CI subset: bf16, the main drivers, three targets) or
``python scripts/compile_lane.py --full`` (every driver, bf16/fp16/fp32, both top-k widths).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Optional

TARGETS = (90, 89, 80)
COMPILE_SECONDS = 60.0
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# ------------------------------------------------------------------------------------------------
# drivers: the backends' ops on tiny CPU tensors (sizes multiples of 16, as real heads are, so the
# divisibility specialisation matches a real launch)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Driver:
    run: Callable          # (dtype, k) -> None; runs forwards and backwards inside recording()
    ci: bool = False       # part of the CI subset
    what: str = ""


N_ROWS, DIM, VOCAB = 64, 64, 512


def _tensors(dtype, teacher: bool = False, bias: bool = False):
    import torch

    gen = torch.Generator().manual_seed(0)
    out = dict(hidden=torch.randn(N_ROWS, DIM, generator=gen).to(dtype).requires_grad_(),
               weight=torch.randn(VOCAB, DIM, generator=gen).to(dtype).requires_grad_(),
               bias=torch.randn(VOCAB, generator=gen).to(dtype).requires_grad_() if bias else None,
               labels=torch.randint(0, VOCAB, (N_ROWS,), generator=gen))
    if teacher:
        out.update(teacher_hidden=torch.randn(N_ROWS, 2 * DIM, generator=gen).to(dtype),
                   teacher_weight=torch.randn(VOCAB, 2 * DIM, generator=gen).to(dtype))
    return out


def _teacher_topk(k: int):
    import torch

    gen = torch.Generator().manual_seed(1)
    ids = torch.rand(N_ROWS, VOCAB, generator=gen).argsort(dim=1)[:, :k]
    return ids, torch.full((N_ROWS, k), -8.0)


def _topk(dtype, k, *, tail="bucket", full=False, deterministic=False, capped=False, stats=None):
    import torch

    from ..config import config
    from . import triton_backend  # registers the ops

    t = _tensors(dtype, bias=full)
    ids, logprobs = _teacher_topk(k)
    saved = config.deterministic, triton_backend.SLAB_BYTES
    config.deterministic = deterministic
    triton_backend.SLAB_BYTES = 0  # 16-bit: dW by slabs of one tile, so every slab launch is seen
    try:
        out = torch.ops.fastkd.triton_topk_kd_forward(
            t["hidden"], t["weight"], t["bias"], ids, logprobs, None, None, None,
            t["labels"] if full else None, "reverse_kl", 0.5, tail, 1.0,
            30.0 if full or capped else None, None, -100, 0.5 if full else 0.0, 1.0,
            full if stats is None else stats)
        out[0].sum().backward()
    finally:
        config.deterministic, triton_backend.SLAB_BYTES = saved


def _dense(dtype, k, *, full=False):
    import torch

    from . import triton_backend  # noqa: F401

    t = _tensors(dtype, teacher=True, bias=full)
    out = torch.ops.fastkd.triton_dense_kd_forward(
        t["hidden"], t["weight"], t["bias"], t["teacher_hidden"], t["teacher_weight"], None,
        t["labels"] if full else None, "jsd", 0.5, 1.0, 30.0 if full else None, None, -100,
        0.5 if full else 0.0, 1.0, full)
    out[0].sum().backward()


def _online_topk(dtype, k, *, topk_from="teacher"):
    import torch

    from . import triton_backend  # noqa: F401

    t = _tensors(dtype, teacher=True)
    ids = torch.ops.fastkd.triton_select_topk(t["hidden"], t["weight"], None, t["teacher_hidden"],
                                              t["teacher_weight"], None, k, topk_from, None, None)
    out = torch.ops.fastkd.triton_topk_kd_forward(
        t["hidden"], t["weight"], None, ids, None, t["teacher_hidden"], t["teacher_weight"], None,
        None, "reverse_kl", 0.5, "bucket", 1.0, None, None, -100, 0.0, 1.0, False)
    out[0].sum().backward()


def _bytes(dtype, k, *, full=False):
    import torch

    from ..bytes import ByteVocab
    from ..bytes.loss import _bucket_lse

    t = _tensors(dtype, bias=full)
    vocab = ByteVocab.from_bytes([bytes([i % 256]) + b"~" if i % 97 else b"" for i in range(VOCAB)])
    lse = _bucket_lse(t["hidden"], t["weight"], t["bias"], vocab, 1.0, 30.0 if full else None,
                      "triton")
    torch.where(torch.isfinite(lse), lse, 0.0).sum().backward()


DRIVERS: dict[str, Driver] = {
    "topk": Driver(lambda dtype, k: _topk(dtype, k), ci=True,
                   what="top-k KD, offline teacher, tail=bucket: forward + atomic backward"),
    "topk_full": Driver(lambda dtype, k: _topk(dtype, k, full=True),
                        what="the same with bias, softcap, labels, CE and statistics"),
    "topk_capped": Driver(lambda dtype, k: _topk(dtype, k, capped=True), ci=True,
                          what="softcap only (Gemma-2's head): the widest top-k tiles with the cap"),
    "topk_ce": Driver(lambda dtype, k: _topk(dtype, k, full=True, stats=False),
                      what="bias, softcap, labels and CE without statistics (128-row forward)"),
    "topk_deterministic": Driver(lambda dtype, k: _topk(dtype, k, full=True, deterministic=True),
                                 what="deterministic backward (row-owner and column-owner kernels)"),
    "topk_renormalize": Driver(lambda dtype, k: _topk(dtype, k, tail="renormalize"),
                               what="tail=renormalize: gathered logits only, O(N·K·D)"),
    "dense": Driver(lambda dtype, k: _dense(dtype, k), ci=True,
                    what="online dense teacher: two forward passes + backward"),
    "dense_full": Driver(lambda dtype, k: _dense(dtype, k, full=True),
                         what="the same with bias, softcap, labels, CE and statistics"),
    "online_topk": Driver(lambda dtype, k: _online_topk(dtype, k), ci=True,
                          what="online teacher top-k: selection, then the top-k kernels"),
    "online_topk_union": Driver(lambda dtype, k: _online_topk(dtype, k, topk_from="union"),
                                what="selection from teacher and student at once"),
    "bytes": Driver(lambda dtype, k: _bytes(dtype, k), ci=True,
                    what="byte-level bucket log-sum-exp: forward ranges + atomic backward"),
    "bytes_full": Driver(lambda dtype, k: _bytes(dtype, k, full=True),
                         what="the same with bias and softcap"),
}


# ------------------------------------------------------------------------------------------------
# record -> compile jobs
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    module: str
    kernel: str
    label: str            # kernel name and the constexprs that tell its variants apart
    dtype: str
    target: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    drivers: list


def _short(value) -> str:
    return str(value).replace(" ", "")


def _job(record, driver: str, dtype_name: str) -> Job:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = record.kernel
    target = GPUTarget("cuda", record.target, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(record.kwargs, debug=False)
    bound, specialization, options = binder(*record.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization,
                                                              options)
    names = {(kernel.arg_names.index(k),) if isinstance(k, str) else k: v for k, v in constexprs.items()}
    # the flags that are on and every non-flag constexpr (the tiles), in argument order
    shown = ",".join(kernel.arg_names[i[0]] if v is True else f"{kernel.arg_names[i[0]]}={_short(v)}"
                     for i, v in sorted(names.items())
                     if v is not False and v is not None
                     and kernel.arg_names[i[0]] not in ("PRECISION", "DOT_PRECISION", "N_BUCKETS"))
    label = f"{kernel.__name__}[{shown},w{options.num_warps},s{options.num_stages}]"
    return Job(kernel.fn.__module__, kernel.__name__, label, dtype_name, record.target, signature,
               constexprs, attrs, dict(options.__dict__), [driver])


def collect(drivers: list[str], dtypes: list[str], targets: list[int], ks: list[int]) -> list[Job]:
    """Runs the drivers in recording mode; one job per distinct (kernel, specialisation, target)."""
    import torch

    from . import launch_configs

    jobs: dict[tuple, Job] = {}
    for cc in targets:
        for dtype_name in dtypes:
            dtype = getattr(torch, DTYPE_NAMES[dtype_name])
            for name in drivers:
                for k in ks:
                    with launch_configs.recording(cc) as records:
                        DRIVERS[name].run(dtype, k)
                    if not records:
                        raise RuntimeError(f"driver {name} launched no kernel")
                    for record in records:
                        job = _job(record, name, dtype_name)
                        key = (job.module, job.kernel, repr(sorted(job.signature.items())),
                               repr(sorted(job.constexprs.items())), repr(sorted(job.attrs.items())),
                               job.options["num_warps"], job.options["num_stages"], cc)
                        if key in jobs:
                            if name not in jobs[key].drivers:
                                jobs[key].drivers.append(name)
                        else:
                            jobs[key] = job
    return list(jobs.values())


# ------------------------------------------------------------------------------------------------
# compile and inspect (worker processes)
# ------------------------------------------------------------------------------------------------

def _nvidia_tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _res_usage(cubin_path: str) -> dict:
    out = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", cubin_path], check=True,
                         capture_output=True, text=True).stdout
    found = {key: int(val) for key, val in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    return found


def compile_job(job: Job) -> dict:
    """Compiles one job for its target; returns its figures (never raises: errors are figures)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(job.module), job.kernel)
    result = dict(label=job.label, kernel=job.kernel, dtype=job.dtype, target=job.target,
                  drivers=job.drivers, num_warps=job.options["num_warps"],
                  num_stages=job.options["num_stages"])
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(kernel, job.signature, job.constexprs, job.attrs),
                                  target=GPUTarget("cuda", job.target, 32), options=job.options)
    except Exception as error:  # reported as a failed compile of this kernel
        result.update(error=f"{type(error).__name__}: {str(error)[:2000]}",
                      seconds=time.perf_counter() - start)
        return result
    result["seconds"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        usage = _res_usage(cubin)
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", cubin], check=True,
                              capture_output=True, text=True).stdout
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)
    result.update(
        registers=usage.get("REG", 0),
        shared=int(compiled.metadata.shared),
        local=usage.get("LOCAL", 0),
        stack=usage.get("STACK", 0),
        spill_stores=sum(op.startswith("STL") for op in opcodes),
        tensor_core=sum(op.startswith(("HGMMA", "HMMA")) for op in opcodes),
        wgmma=sum(op.startswith("HGMMA") for op in opcodes),
        atomics=sum(op.startswith(("ATOMG", "REDG", "RED.", "ATOM.")) for op in opcodes),
        gpu_fences=sum(op.startswith("MEMBAR") and (".GPU" in op or ".SYS" in op) for op in opcodes),
        has_dot="tt.dot" in compiled.asm["ttir"],
    )
    return result


def _worker_init(cache_root: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=cache_root)


# ------------------------------------------------------------------------------------------------
# rules
# ------------------------------------------------------------------------------------------------

def _blocks_by_registers(registers: int, num_warps: int) -> int:
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    return (64 * 1024) // (per_warp * num_warps)


def violations(result: dict) -> list[str]:
    """The rules this compiled kernel breaks, each a sentence naming kernel, target and number."""
    from .launch_configs import SHARED_PER_BLOCK

    where = f"{result['label']} ({result['dtype']}) on sm_{result['target']}"
    if "error" in result:
        return [f"{where}: does not compile: {result['error']}"]
    found = []
    if result["seconds"] > COMPILE_SECONDS:
        found.append(f"{where}: compiles in {result['seconds']:.0f} s > {COMPILE_SECONDS:.0f} s")
    limit = SHARED_PER_BLOCK[result["target"]]
    if result["shared"] > limit:
        found.append(f"{where}: needs {result['shared'] / 1024:.1f} KB of shared memory per block, "
                     f"the target allows {limit / 1024:.0f} KB")
    if result["registers"] > 255 or _blocks_by_registers(result["registers"], result["num_warps"]) < 1:
        found.append(f"{where}: {result['registers']} registers x {32 * result['num_warps']} threads "
                     f"exceed the 64K registers of an SM")
    if result["spill_stores"] or result["local"]:
        found.append(f"{where}: spills registers ({result['spill_stores']} STL instructions, "
                     f"{result['local']} bytes of local memory)")
    if result["dtype"] != "fp32" and result["has_dot"] and not result["tensor_core"]:
        found.append(f"{where}: 16-bit tl.dot kernel without tensor-core instructions in its SASS "
                     f"(0 HMMA/HGMMA)")
    if result["atomics"] and result["gpu_fences"]:
        found.append(f"{where}: {result['gpu_fences']} GPU-wide MEMBAR next to its "
                     f"{result['atomics']} atomics (use sem='relaxed')")
    return found


# ------------------------------------------------------------------------------------------------
# csrc: nvcc -Xptxas -v
# ------------------------------------------------------------------------------------------------

def check_csrc(targets: list[int], root: Optional[Path] = None, jobs: int = 2) -> list[dict]:
    """Compiles ``csrc/*.cu`` for each target with ``nvcc -Xptxas -v`` and the build's flags
    (``-O3 -std=c++17 -lineinfo``): registers, shared memory and spills per kernel (``[]`` when
    nvcc is not installed)."""
    from concurrent.futures import ThreadPoolExecutor

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    root = root or Path(__file__).resolve().parents[2]
    work = [(source, cc) for source in sorted((root / "csrc").glob("*.cu")) for cc in targets]
    with ThreadPoolExecutor(jobs) as pool:
        return [r for found in pool.map(lambda w: _nvcc(nvcc, *w), work) for r in found]


def _nvcc(nvcc: str, source: Path, cc: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run = subprocess.run(
            [nvcc, "-c", "-O3", "-std=c++17", "-lineinfo", f"-arch=sm_{cc}", "-Xptxas", "-v",
             str(source), "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if run.returncode:
        return [dict(label=source.name, target=cc, error=run.stderr[-2000:], seconds=seconds)]
    results: list[dict] = []
    for line in run.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            results.append(dict(label=f"{source.name}:{_demangle(m.group(1))}", target=cc,
                                seconds=seconds, registers=0, shared=0, spill_stores=0,
                                spill_loads=0, stack=0))
            continue
        if not results:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            results[-1].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                               spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            results[-1]["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            results[-1]["shared"] = int(s.group(1)) if s else 0
    return results


def _demangle(name: str) -> str:
    """``kernel<dtype>`` from an Itanium-mangled entry name (length-prefixed identifiers)."""
    base, i = name, 0
    while i < len(name):
        m = re.match(r"\d+", name[i:])
        if not m:
            i += 1
            continue
        length, i = int(m.group()), i + len(m.group())
        ident = name[i:i + length]
        if ident.endswith("_kernel"):
            base = ident
        i += length
    for tag, dtype in (("6__half", "fp16"), ("13__nv_bfloat16", "bf16"), ("IfE", "fp32")):
        if tag in name:
            return f"{base}<{dtype}>"
    return base


def csrc_violations(result: dict, threads: int = 256) -> list[str]:
    from .launch_configs import SHARED_PER_BLOCK

    where = f"csrc {result['label']} on sm_{result['target']}"
    if "error" in result:
        return [f"{where}: nvcc failed: {result['error']}"]
    found = []
    if result["spill_stores"] or result["spill_loads"]:
        found.append(f"{where}: spills ({result['spill_stores']} bytes stores, "
                     f"{result['spill_loads']} bytes loads)")
    if result["shared"] > SHARED_PER_BLOCK[result["target"]]:
        found.append(f"{where}: {result['shared']} bytes of shared memory")
    if _blocks_by_registers(result["registers"], threads // 32) < 1:
        found.append(f"{where}: {result['registers']} registers x {threads} threads exceed an SM")
    return found


# ------------------------------------------------------------------------------------------------
# the lane
# ------------------------------------------------------------------------------------------------

def run(drivers: list[str], dtypes: list[str], targets: list[int], ks: list[int], jobs: int,
        csrc: bool, log=print) -> dict:
    """Records, compiles and checks; returns ``{"triton": [...], "csrc": [...], "violations": [...]}``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile lane needs compiled kernels: unset TRITON_INTERPRET")
    start = time.perf_counter()
    work = collect(drivers, dtypes, targets, ks)
    log(f"{len(work)} kernel compiles from {len(drivers)} drivers x {dtypes} x sm_{targets} "
        f"(recorded in {time.perf_counter() - start:.1f} s)")
    cache_root = tempfile.mkdtemp(prefix="fastkd-lane-")
    results = []
    try:
        if jobs > 1:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                                     initargs=(cache_root,)) as pool:
                for result in pool.map(compile_job, work):
                    results.append(result)
                    log(_line(result))
        else:
            _worker_init(cache_root)
            for job in work:
                results.append(compile_job(job))
                log(_line(results[-1]))
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    found = [v for r in results for v in violations(r)]
    csrc_results = check_csrc(targets) if csrc else []
    for r in csrc_results:
        log(_line(r))
    found += [v for r in csrc_results for v in csrc_violations(r)]
    log(f"lane: {len(results)} Triton compiles, {len(csrc_results)} csrc kernels, "
        f"{len(found)} violations, {time.perf_counter() - start:.0f} s")
    return dict(triton=results, csrc=csrc_results, violations=found)


def _line(r: dict) -> str:
    if "error" in r:
        return f"  FAIL sm_{r['target']} {r.get('dtype', '')} {r['label']}: {r['error'][:300]}"
    extra = ""
    if "tensor_core" in r:
        extra = (f" tc={r['tensor_core']} atomics={r['atomics']} fences={r['gpu_fences']}"
                 f" spills={r['spill_stores']}")
    else:
        extra = f" spills={r['spill_stores']}"
    return (f"  sm_{r['target']} {r.get('dtype', ''):4} {r['label']}: {r['seconds']:.1f} s, "
            f"{r['registers']} regs, {r['shared'] / 1024:.1f} KB smem{extra}")


def markdown_table(report: dict) -> str:
    """The per-kernel figures as a Markdown table (docs/gpu_checks.md)."""
    rows = ["| kernel (constexprs, warps, stages) | dtype | target | compile s | registers | "
            "spills (STL) | shared KB | tensor-core instr. | atomics / GPU fences |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(report["triton"], key=lambda r: (r["kernel"], r["label"], r["dtype"], -r["target"])):
        if "error" in r:
            rows.append(f"| `{r['label']}` | {r['dtype']} | sm_{r['target']} | fails | | | | | |")
            continue
        rows.append(f"| `{r['label']}` | {r['dtype']} | sm_{r['target']} | {r['seconds']:.1f} | "
                    f"{r['registers']} | {r['spill_stores']} | {r['shared'] / 1024:.1f} | "
                    f"{r['tensor_core']} | {r['atomics']} / {r['gpu_fences']} |")
    if report["csrc"]:
        rows += ["", "| csrc kernel | target | registers | spill bytes | shared B | stack B |",
                 "|---|---|---|---|---|---|"]
        for r in report["csrc"]:
            if "error" not in r:
                rows.append(f"| `{r['label']}` | sm_{r['target']} | {r['registers']} | "
                            f"{r['spill_stores']} | {r['shared']} | {r['stack']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="every driver, bf16/fp16/fp32, K=64 and K=256, and csrc")
    parser.add_argument("--drivers", nargs="*", help=f"subset of {sorted(DRIVERS)}")
    parser.add_argument("--dtypes", nargs="*", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--targets", nargs="*", type=int, help="compute capabilities (default 90 89 80)")
    parser.add_argument("--k", nargs="*", type=int, help="top-k widths (default 64; --full: 64 256)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-csrc", action="store_true", help="skip the nvcc checks of csrc/")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--markdown", help="write the per-kernel table to this file")
    args = parser.parse_args(argv)
    drivers = args.drivers or [n for n, d in DRIVERS.items() if args.full or d.ci]
    dtypes = args.dtypes or (["bf16", "fp16", "fp32"] if args.full else ["bf16"])
    report = run(drivers, dtypes, args.targets or list(TARGETS), args.k or ([64, 256] if args.full else [64]),
                 args.jobs, csrc=not args.no_csrc)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(report) + "\n")
    for line in report["violations"]:
        print("VIOLATION:", line, file=sys.stderr)
    return 1 if report["violations"] else 0
