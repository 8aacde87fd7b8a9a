"""What a run reports: ``metrics.jsonl``, experiment trackers, a progress bar, a loss curve.

``metrics.jsonl`` holds one JSON object per line: training records (``step``, ``loss``, ``kd``,
``ce``, ``lr``, ``grad_norm``, ``tokens``, ``elapsed_s``) and evaluation records (``step``,
``eval_ce``, ``eval_ce_per_byte``, ``eval_kl``/``eval_kl_topk``/``eval_byte_kl``). A resumed run
first drops the lines past the step it resumes from, so the file reads as one uninterrupted run;
that rewrite is atomic (:func:`rewrite_atomically`), so a kill during it loses no line.
The trackers of ``report_to`` (accelerate's: TensorBoard, W&B, MLflow) get the same values in two
groups, ``train/loss``, ``train/kd``, ... and ``eval/ce``, ``eval/kl``, ....
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def rewrite_atomically(path: Path, lines: list[str]) -> None:
    """Replaces ``path`` with ``lines`` through ``path.tmp``, an fsync and a rename (the cache's
    :func:`~fastkd.cache.format.atomic_write`): a process killed at any moment leaves the old file or
    the new one whole, never an empty or half-written ``metrics.jsonl``."""
    from ..cache.format import atomic_write

    atomic_write(path, "".join(lines).encode("utf-8"))


class MetricsLog:
    """Writes records to ``out/metrics.jsonl`` (and the trackers), advances a progress bar.

    Args:
        out: the run directory.
        enabled: False on every process but the main one (nothing is written or shown).
        resume_step: lines with a larger ``step`` are dropped from an existing file.
        progress: show a ``tqdm`` bar of ``total`` steps.
        accelerator: an ``accelerate.Accelerator`` built with ``log_with`` (its trackers get every
            record, under ``train/`` and ``eval/``), or None.
        config: the run's settings, recorded by the trackers.
    """

    def __init__(self, out: Path, *, enabled: bool, resume_step: int, progress: bool, total: int,
                 accelerator=None, config: Optional[dict] = None):
        self.enabled = enabled
        self._acc = accelerator
        self.path = Path(out) / "metrics.jsonl"
        self.records: list[dict] = []
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
        if accelerator is not None:  # a resumed run's TensorBoard drops the events past its step
            accelerator.init_trackers("fastkd", config=_flat(config or {}),
                                      init_kwargs={"tensorboard": {"purge_step": resume_step + 1}})
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
        if self._acc is not None:
            self._acc.log(grouped(record), step=record["step"])

    def advance(self, record: dict) -> None:
        if self._bar is not None:
            # the postfix first: update() redraws the bar, with this step's loss
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
            self._bar.update(1)

    def note(self, line: str) -> None:
        """Prints ``line`` above the progress bar (an evaluation while training)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if not self.enabled or self._file.closed:
            return
        self._file.close()
        if self._acc is not None:
            self._acc.end_training()
        if self._bar is not None:
            self._bar.close()

    def plot(self, path: Path) -> Optional[Path]:
        """The training loss (and held-out CE, when evaluated) against the step, as a PNG."""
        return plot_curves(self.records, path)


# metrics.jsonl key -> tracker name (train/ and eval/ groups)
_EVAL_NAMES = {"eval_ce": "ce", "eval_ce_per_byte": "ce_per_byte", "eval_kl": "kl", "eval_kl_topk": "kl_topk",
               "eval_byte_kl": "byte_kl", "eval_tokens": "tokens"}


def grouped(record: dict) -> dict:
    """A record's numbers under ``train/...`` and ``eval/...`` (no ``step``)."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"eval/{_EVAL_NAMES[key]}" if key in _EVAL_NAMES else f"train/{key}"] = value
    return out


def _flat(config: dict) -> dict:
    """Settings as trackers take them (numbers, strings, booleans; None as "none")."""
    return {k: ("none" if v is None else v) for k, v in config.items()}


def format_eval(step: int, metrics: dict) -> str:
    """One line of an evaluation: ``step 20 | eval ce 2.3107 nats/token | 0.5213 nats/byte | kl 0.1210``."""
    parts = [f"step {step}", f"eval ce {metrics['eval_ce']:.4f} nats/token"]
    if "eval_ce_per_byte" in metrics:
        parts.append(f"{metrics['eval_ce_per_byte']:.4f} nats/byte")
    for key, name in (("eval_kl", "kl to teacher"), ("eval_kl_topk", "kl to teacher top-k"),
                      ("eval_byte_kl", "byte kl to teacher")):
        if key in metrics:
            parts.append(f"{name} {metrics[key]:.4f}")
    return " | ".join(parts)


def summary_table(summary: dict) -> str:
    """The end of a run as a short two-column table (steps, final loss and its terms, eval)."""
    rows = [("steps", str(summary["step"]))]
    last = summary.get("last") or {}
    for key, name in (("loss", "final training loss"), ("kd", "  its KD term"), ("ce", "  its CE term")):
        if last.get(key) is not None:
            rows.append((name, f"{last[key]:.4f}"))
    evaluation = summary.get("eval") or {}
    for key, name in (("eval_ce", "held-out CE (nats/token)"), ("eval_ce_per_byte", "held-out CE (nats/byte)"),
                      ("eval_kl", "KL to teacher (nats/token)"), ("eval_kl_topk", "KL to teacher top-k"),
                      ("eval_byte_kl", "byte KL to teacher")):
        if key in evaluation:
            rows.append((name, f"{evaluation[key]:.4f}"))
    if last.get("elapsed_s") is not None:
        rows.append(("time", f"{last['elapsed_s']:.0f} s"))
    rows.append(("outputs", str(summary["output_dir"])))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


# (panel title, [(metrics.jsonl key, label), ...]); a panel is drawn when it has points
_PANELS = (
    ("training loss", [("loss", "loss")]),
    ("its terms", [("kd", "KD (divergence)"), ("ce", "CE")]),
    ("held-out CE", [("eval_ce", "nats/token"), ("eval_ce_per_byte", "nats/byte")]),
    ("KL to the teacher (held out)", [("eval_kl", "full vocabulary"), ("eval_kl_topk", "top-k + tail"),
                                      ("eval_byte_kl", "next byte")]),
)


def plot_curves(records: list[dict], path: Path) -> Optional[Path]:
    """Draws ``records`` against ``step`` into ``path``, a panel per quantity (each on its own
    scale): the training loss, its KD and CE terms, held-out CE, KL to the teacher. None without
    matplotlib or training records."""
    if not any("loss" in r for r in records):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastkd train: matplotlib is not installed, no loss_curve.png (pip install matplotlib)")
        return None
    panels = []
    for title, series in _PANELS:
        lines = [(label, [(r["step"], r[key]) for r in records if r.get(key) is not None]) for key, label in series]
        lines = [(label, points) for label, points in lines if points]
        if lines:
            panels.append((title, lines))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=110, squeeze=False)
    for axis, (title, lines) in zip(axes[0], panels):
        for label, points in lines:
            style = "o-" if len(points) < 30 else "-"
            axis.plot(*zip(*points), style, label=label, linewidth=1.2, markersize=3)
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        if len(lines) > 1 or title != lines[0][0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)
