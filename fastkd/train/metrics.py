"""What a run reports: ``metrics.jsonl``, TensorBoard (when installed), a progress bar, a loss curve.

``metrics.jsonl`` holds one JSON object per line: training records (``step``, ``loss``, ``kd``,
``lr``, ``grad_norm``, ``tokens``, ``elapsed_s``) and evaluation records (``step``, ``eval_ce``,
``eval_ce_per_byte``, ``eval_kl``/``eval_kl_topk``/``eval_byte_kl``). A resumed run first drops the
lines past the step it resumes from, so the file reads as one uninterrupted run; that rewrite is
atomic (:func:`rewrite_atomically`), so a kill during it loses no line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


def rewrite_atomically(path: Path, lines: list[str]) -> None:
    """Replaces ``path`` with ``lines``: written to ``path.tmp``, fsynced, renamed over it, the
    directory fsynced. A process killed at any moment leaves the old file or the new one whole
    (never an empty or half-written ``metrics.jsonl``)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(lines)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # no directory descriptors on this platform: the rename still happened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MetricsLog:
    """Writes records to ``out/metrics.jsonl`` (and TensorBoard), advances a progress bar.

    Args:
        out: the run directory.
        enabled: False on every process but the main one (nothing is written or shown).
        tensorboard: also write ``out/tb`` event files when ``torch.utils.tensorboard`` works.
        resume_step: lines with a larger ``step`` are dropped from an existing file.
        progress: show a ``tqdm`` bar of ``total`` steps.
    """

    def __init__(self, out: Path, *, enabled: bool, tensorboard: bool, resume_step: int, progress: bool,
                 total: int):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.records: list[dict] = []
        self._tb = None
        self._bar = None
        if not enabled:
            return
        if self.path.exists():
            with open(self.path, encoding="utf-8") as handle:
                lines = handle.readlines()
            if lines and not lines[-1].endswith("\n"):
                lines.pop()  # a line cut short by a kill mid-write (the run resumes before it)
            kept = [json.loads(line) for line in lines if line.strip()]
            self.records = [r for r in kept if r.get("step", 0) <= resume_step]
            rewrite_atomically(self.path, [json.dumps(r) + "\n" for r in self.records])
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(out) / "tb"), purge_step=resume_step + 1)
            except ImportError:
                self._tb = None  # tensorboard is optional
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=resume_step, desc="fastkd train", unit="step",
                             dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def advance(self, record: dict) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()

    def plot(self, path: Path) -> Optional[Path]:
        """The training loss (and held-out CE, when evaluated) against the step, as a PNG."""
        return plot_curves(self.records, path)


def plot_curves(records: list[dict], path: Path) -> Optional[Path]:
    """Draws ``loss`` and ``eval_ce`` of ``records`` against ``step`` into ``path``; None without
    matplotlib or records."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_ce"]) for r in records if "eval_ce" in r]
    if not train:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastkd train: matplotlib is not installed, no loss_curve.png (pip install matplotlib)")
        return None
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    axis.plot(*zip(*train), label="training loss", linewidth=1.2)
    if evals:
        axis.plot(*zip(*evals), "o-", label="held-out CE (nats/token)", linewidth=1.2)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)
