"""``fastkd demo``: distillation end to end, offline, on the CPU (about 10 minutes of CPU time).

1. builds a corpus (arithmetic stories with accented names and emoji), two different tokenizers
   and a small teacher, all locally (:mod:`fastkd.demo_assets`), and trains the teacher on
   plenty of text with ``fastkd.train`` (mode ``sft``);
2. captures the teacher once, offline, on the few texts the students get: a top-k cache for
   same-tokenizer students and a byte-level cache for a student with another tokenizer
   (:func:`fastkd.cache.capture`);
3. trains each student twice from the same initialisation, on the same texts and steps: distilled
   (mode ``offline`` from the top-k cache, or ``cross_tokenizer`` from the byte cache, plus CE) and
   with CE only — a smaller student, a student with another tokenizer, a student larger than the
   teacher;
4. evaluates every student on held-out texts: CE in nats per UTF-8 byte (comparable across
   tokenizers) and KL(teacher ‖ student) over the full vocabulary, nats per token (same tokenizer
   only), and measures the peak memory of the fused loss against the naive one;
5. prints the table; ``--out DIR`` also writes it to ``DIR/results.json``.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch


@dataclass(frozen=True)
class StudentSpec:
    name: str
    tokenizer: str  # "same" | "different"
    hidden: int
    layers: int


@dataclass
class DemoPlan:
    """The demo's sizes; the defaults take about 10 minutes of CPU time (27 min wall measured on a
    2-core VM shared with other jobs)."""

    seed: int = 0
    n_teacher: int = 4000
    n_student: int = 160
    n_heldout: int = 256
    teacher_hidden: int = 96
    teacher_layers: int = 2
    teacher_steps: int = 300
    teacher_lr: float = 3e-3
    students: tuple = field(default_factory=lambda: (
        StudentSpec("small (h48, 2 layers)", "same", 48, 2),
        StudentSpec("other tokenizer (h48, 2 layers)", "different", 48, 2),
        StudentSpec("larger than teacher (h128, 3 layers)", "same", 128, 3),
    ))
    student_steps: int = 200
    student_lr: float = 3e-3
    batch_size: int = 16
    topk: int = 32
    memory_shape: tuple = (2048, 256, 32768, 64)  # tokens, D, V, K of the loss-memory comparison


def _print(line: str) -> None:
    print(line, flush=True)  # each progress line shows at once, also through a pipe


def run_demo(out: Optional[Path] = None, workdir: Optional[Path] = None, plan: Optional[DemoPlan] = None,
             log=_print) -> dict:
    """Runs the demo; returns the results dict (the schema of ``results.json``)."""
    import transformers

    from . import demo_assets as assets
    from .cache import capture
    from .memory import measure
    from .train import Trainer, TrainConfig, train

    plan = plan or DemoPlan()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    keep = workdir is not None
    work = Path(workdir) if keep else Path(tempfile.mkdtemp(prefix="fastkd-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    clock = lambda: f"[{time.perf_counter() - started:5.0f} s]"  # noqa: E731
    try:
        setup = assets.build_demo_setup(work, seed=plan.seed, n_teacher=plan.n_teacher,
                                        n_student=plan.n_student, n_heldout=plan.n_heldout)
        tokenizers = {"same": setup.teacher_tokenizer, "different": setup.student_tokenizer}
        loaded = {k: transformers.AutoTokenizer.from_pretrained(v) for k, v in tokenizers.items()}
        # no EOS appended to the texts: the distilled students train on the cache's sequences,
        # captured without one, and every run (and the evaluation) must see the same tokens
        common = dict(batch_size=plan.batch_size, lr_schedule="cosine", progress=False,
                      seed=plan.seed, resume="never", max_length=128, append_eos=False)

        def every(label: str, total: int, lines: int = 4):
            """An ``on_step`` that logs ``lines`` progress lines over ``total`` steps (no long silences)."""
            interval = max(1, total // lines)

            def on_step(trainer, record):
                if record["step"] % interval == 0 or record["step"] == total:
                    log(f"{clock()}   {label}: step {record['step']}/{total}, loss {record['loss']:.4f}")
            return on_step

        def init(name: str, kind: str, hidden: int, layers: int, seed: int) -> Path:
            path = assets.build_model(work / "init" / name, len(loaded[kind]), hidden=hidden, layers=layers,
                                      seed=seed, tokenizer_dir=tokenizers[kind])
            loaded[kind].save_pretrained(path)
            return path

        teacher_init = init("teacher", "same", plan.teacher_hidden, plan.teacher_layers, plan.seed + 1)
        log(f"{clock()} corpus: {plan.n_teacher} teacher texts, {plan.n_student} student texts, "
            f"{plan.n_heldout} held-out; training the teacher ({plan.teacher_steps} steps)")
        train(TrainConfig(mode="sft", student=str(teacher_init), data=str(setup.teacher_data),
                          output_dir=str(work / "teacher"), max_steps=plan.teacher_steps, lr=plan.teacher_lr,
                          warmup_steps=plan.teacher_steps // 20, **{**common, "batch_size": 2 * plan.batch_size}),
              on_step=every("teacher", plan.teacher_steps, lines=10))
        teacher_dir = work / "teacher" / "final"
        teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
        teacher_params = assets.count_parameters(teacher)

        student_texts = assets.read_texts(setup.student_data)
        log(f"{clock()} teacher trained; capturing it on the student texts")
        capture(teacher, loaded["same"], student_texts, work / "cache-topk", topk=plan.topk, teacher_name="demo-teacher")
        capture(teacher, loaded["same"], student_texts, work / "cache-bytes", byte_level=True,
                teacher_name="demo-teacher")
        log(f"{clock()} teacher cached on the student texts (top-{plan.topk} and byte-level)")

        rows = []
        for index, spec in enumerate(plan.students):
            path = init(f"student-{index}", spec.tokenizer, spec.hidden, spec.layers, plan.seed + 10 + index)
            scores = {}
            log(f"{clock()} student {index + 1}/{len(plan.students)}: {spec.name}, distilled and CE-only "
                f"({plan.student_steps} steps each)")
            for variant in ("distilled", "ce_only"):
                run_dir = work / f"student-{index}-{variant}"
                options = dict(student=str(path), output_dir=str(run_dir), max_steps=plan.student_steps,
                               lr=plan.student_lr, warmup_steps=plan.student_steps // 20, **common)
                if variant == "ce_only":
                    config = TrainConfig(mode="sft", data=str(setup.student_data), **options)
                elif spec.tokenizer == "same":
                    config = TrainConfig(mode="offline", cache=str(work / "cache-topk"), divergence="forward_kl",
                                         ce_weight=0.5, kd_weight=1.0, **options)
                else:
                    config = TrainConfig(mode="cross_tokenizer", cache=str(work / "cache-bytes"),
                                         divergence="forward_kl", ce_weight=1.0, kd_weight=1.0, **options)
                train(config, on_step=every(f"{variant:<9}", plan.student_steps))
                scores[variant] = _evaluate(Trainer, TrainConfig, run_dir / "final", teacher_dir, spec.tokenizer,
                                            setup.heldout_data, work / "eval", common)
            student = transformers.AutoModelForCausalLM.from_pretrained(path)
            rows.append({"student": spec.name, "tokenizer": spec.tokenizer, "teacher_params": teacher_params,
                         "student_params": assets.count_parameters(student),
                         "heldout_ce": scores["distilled"]["ce"], "kl_to_teacher": scores["distilled"]["kl"],
                         "baseline_heldout_ce": scores["ce_only"]["ce"],
                         "baseline_kl_to_teacher": scores["ce_only"]["kl"]})
            log(f"{clock()} {spec.name}: held-out CE {scores['distilled']['ce']:.4f} distilled, "
                f"{scores['ce_only']['ce']:.4f} CE only (nats/byte)")

        log(f"{clock()} measuring the loss's peak memory, fused against naive")
        tokens, dim, vocab, topk = plan.memory_shape
        device = "cuda" if torch.cuda.is_available() else "cpu"
        fused, naive = (measure(impl, tokens, dim, vocab, topk, device, "float32") for impl in ("fused", "naive"))
        teacher_ce = _evaluate(Trainer, TrainConfig, teacher_dir, None, "same", setup.heldout_data,
                               work / "eval", common)["ce"]
        results = {"rows": rows,
                   "memory": {"fused_loss_peak_mb": fused["peak_extra_bytes"] / 2**20,
                              "naive_loss_peak_mb": naive["peak_extra_bytes"] / 2**20},
                   "teacher_heldout_ce": teacher_ce, "units": {"heldout_ce": "nats per UTF-8 byte",
                                                              "kl_to_teacher": "nats per token"},
                   "memory_shape": {"tokens": tokens, "dim": dim, "vocab": vocab, "topk": topk,
                                    "device": device, "method": fused["method"]},
                   "seconds": round(time.perf_counter() - started, 1)}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    log("")
    log(format_table(results))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        log(f"\nwrote {out / 'results.json'}")
    return results


def _evaluate(Trainer, TrainConfig, student_dir: Path, teacher_dir: Optional[Path], kind: str, heldout: Path,
              work: Path, common: dict) -> dict:
    """Held-out CE (nats per byte) and, for a same-tokenizer student, KL(teacher ‖ student) per token."""
    if teacher_dir is None or kind != "same":  # CE only: the KL across vocabularies is not defined
        config = TrainConfig(mode="sft", student=str(student_dir), data=str(heldout), eval_data=str(heldout),
                             output_dir=str(work), **common)
    else:
        config = TrainConfig(mode="online", student=str(student_dir), teacher=str(teacher_dir), data=str(heldout),
                             eval_data=str(heldout), output_dir=str(work), **common)
    metrics = Trainer(config).evaluate()
    return {"ce": metrics["eval_ce_per_byte"], "kl": metrics.get("eval_kl")}


def format_table(results: dict) -> str:
    """The comparison table of :func:`run_demo`'s results."""
    head = (f"{'student':<38}{'tokenizer':<11}{'params':>9}   {'held-out CE (nats/byte)':^27}"
            f"{'KL to teacher (nats/token)':^28}")
    sub = f"{'':<38}{'':<11}{'':>9}   {'distilled':>12}{'CE only':>12}   {'distilled':>12}{'CE only':>12}"
    lines = ["held-out CE and KL to the teacher: lower is better; compare the distilled column against CE only",
             "(the same student from the same initialisation, the same texts and steps, without the teacher)",
             "", head, sub]
    for row in results["rows"]:
        kl = "n/a" if row["kl_to_teacher"] is None else f"{row['kl_to_teacher']:.4f}"
        base_kl = "n/a" if row["baseline_kl_to_teacher"] is None else f"{row['baseline_kl_to_teacher']:.4f}"
        lines.append(f"{row['student']:<38}{row['tokenizer']:<11}{row['student_params']:>9,}   "
                     f"{row['heldout_ce']:>12.4f}{row['baseline_heldout_ce']:>12.4f}   {kl:>12}{base_kl:>12}")
    teacher_params = results["rows"][0]["teacher_params"] if results["rows"] else 0
    lines.append(f"{'teacher':<38}{'':<11}{teacher_params:>9,}   {results['teacher_heldout_ce']:>12.4f}")
    memory, shape = results["memory"], results["memory_shape"]
    lines.append("")
    lines.append(f"loss peak memory, forward+backward, N={shape['tokens']} D={shape['dim']} V={shape['vocab']} "
                 f"K={shape['topk']} on {shape['device']}: fused {memory['fused_loss_peak_mb']:.1f} MB, naive "
                 f"{memory['naive_loss_peak_mb']:.1f} MB "
                 f"({memory['naive_loss_peak_mb'] / max(memory['fused_loss_peak_mb'], 1e-9):.1f}x)")
    lines.append(f"total {results['seconds']:.0f} s")
    return "\n".join(lines)
