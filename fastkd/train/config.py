"""The trainer's configuration: one flat dataclass, read from YAML and ``--key value`` overrides.

``fastkd train run.yaml --lr 3e-4 --lora true`` loads ``run.yaml`` into :class:`TrainConfig`, applies
the overrides (parsed by the type of each field), checks every value and the combinations of the
chosen mode, and names the key of anything wrong. ``fastkd train --help-config`` lists the keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import numbers
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

MODES = ("offline", "online", "on_policy", "cross_tokenizer", "sft")
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
# learning-rate schedules: fastkd's three (warm-up, then to min_lr_ratio·lr) and those of
# transformers.get_scheduler that need no further arguments (the same names as lr_scheduler_type)
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
             "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr")
TRACKERS = ("tensorboard", "wandb", "mlflow")
DATA_FORMATS = ("auto", "text", "chat", "prompt_completion")
TOKEN_SELECT = ("teacher_entropy", "entropy", "divergence")  # fastkd.train.selection.CRITERIA


def _doc(text: str, default: Any = dataclasses.MISSING) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """Every option of ``fastkd train``; the help text of each key is in its field metadata."""

    # --- what is trained, from what -------------------------------------------------------------
    mode: str = _doc("offline (teacher top-k cache) | online (teacher model in-process) | on_policy "
                     "(student rollouts with probability lmbda, scored by the teacher) | "
                     "cross_tokenizer (byte-level loss, teacher with another tokenizer) | sft "
                     "(cross-entropy only: the baseline, or training a teacher)", "offline")
    student: str = _doc("student model: a local directory or a hub name (AutoModelForCausalLM)", "")
    teacher: Optional[str] = _doc("teacher model (online, on_policy, cross_tokenizer without a cache)", None)
    teacher_url: Optional[str] = _doc("online/on_policy: instead of teacher, a completions endpoint with vLLM "
                                      "prompt_logprobs (http://host:8000/v1/completions) that scores each batch", None)
    teacher_server_model: Optional[str] = _doc("teacher_url: the served model's name sent in requests", None)
    server_topk: int = _doc("teacher_url: log-probs per position requested (vLLM --max-logprobs)", 20)
    server_timeout: float = _doc("teacher_url: seconds per request", 120.0)
    tokenizer: Optional[str] = _doc("student tokenizer; default: the student's", None)
    teacher_tokenizer: Optional[str] = _doc("teacher tokenizer (cross_tokenizer); default: the teacher's", None)
    cache: Optional[str] = _doc("teacher cache directory (offline; byte-level cache for cross_tokenizer)", None)
    data: Optional[str] = _doc("training data, read by datasets.load_dataset: .txt (a text per line), "
                               ".jsonl/.json, .parquet, or hf:NAME[:SPLIT] (a Hub dataset; downloads only "
                               "when asked so)", None)
    eval_data: Optional[str] = _doc("held-out data, same formats as data", None)
    eval_cache: Optional[str] = _doc("held-out teacher cache (offline: KL to the teacher's top-k)", None)
    data_format: str = _doc("auto (messages -> chat, prompt [+ completion] -> prompt_completion, else text) "
                            "| text | chat | prompt_completion", "auto")
    text_field: str = _doc("the text column of text data", "text")
    messages_field: str = _doc("chat data: the column of message lists, rendered by the tokenizer's chat "
                               "template", "messages")
    prompt_field: str = _doc("prompt/completion data: the prompt column (on_policy: rollouts continue it)",
                             "prompt")
    completion_field: str = _doc("prompt/completion data: the completion column (the loss covers it only)",
                                 "completion")
    append_eos: bool = _doc("end each text, conversation or completion that fits in max_length with EOS", True)
    packing: bool = _doc("concatenate the training examples and cut them into max_length blocks", False)
    max_length: int = _doc("tokens per sequence at most (longer ones are truncated)", 512)

    # --- the loss -------------------------------------------------------------------------------
    divergence: str = _doc("reverse_kl | forward_kl | jsd", "reverse_kl")
    beta: float = _doc("JSD weight in [0, 1]", 0.5)
    topk: Optional[int] = _doc("online teachers: K ids per row (None: full vocabulary; on_policy: 64)", None)
    topk_from: Optional[str] = _doc("teacher | student | union (None: teacher; on_policy: student)", None)
    tail: str = _doc("bucket (exact tail mass) | renormalize", "bucket")
    temperature: float = _doc("distillation temperature tau > 0 (loss scaled by tau^2)", 1.0)
    ce_weight: float = _doc("weight of the cross-entropy on the data's next tokens", 0.0)
    kd_weight: float = _doc("weight of the distillation term", 1.0)
    chunk_weight: float = _doc("cross_tokenizer: weight of the chunk-likelihood term", 0.0)
    token_fraction: float = _doc("train on this fraction of each batch's tokens, in (0, 1]", 1.0)
    token_select: Optional[str] = _doc(
        "how tokens are chosen when token_fraction < 1: teacher_entropy (the teacher's most uncertain; "
        "free from a cache or teacher_url, so 50% of the tokens cost 50% of the loss FLOPs; an online "
        "teacher adds its head's forward on all rows) | entropy (the student's most uncertain) | "
        "divergence (farthest from the teacher); these two score every row with the loss's forward "
        "first: ~83% of the loss at 0.5 with a cache, ~100% online (None: teacher_entropy; sft: entropy, "
        "its only criterion; docs/train.md)", None)
    impl: str = _doc("fastkd backend: auto | torch | triton | cuda", "auto")

    # --- on-policy rollouts ----------------------------------------------------------------------
    lmbda: float = _doc("on_policy: probability that a micro-batch is replaced by student rollouts", 0.5)
    prompt_tokens: int = _doc("on_policy: tokens of each data sequence kept as the prompt", 16)
    max_new_tokens: int = _doc("on_policy: tokens the student samples after the prompt", 32)
    rollout_temperature: float = _doc("on_policy: sampling temperature of the rollouts", 1.0)

    # --- the model ------------------------------------------------------------------------------
    lora: bool = _doc("train LoRA adapters (peft) instead of every weight", False)
    lora_r: int = _doc("LoRA rank", 16)
    lora_alpha: float = _doc("LoRA alpha", 32.0)
    lora_dropout: float = _doc("LoRA dropout", 0.0)
    lora_targets: str = _doc("LoRA target modules: all-linear or a comma-separated list", "all-linear")
    merge_lora: bool = _doc("lora: also save the base model with the adapter merged into it "
                            "(output_dir/final-merged, loadable by from_pretrained without peft)", False)
    bf16: bool = _doc("bf16 autocast for the forward passes", False)
    gradient_checkpointing: bool = _doc("recompute activations in the backward", False)
    tensor_parallel: int = _doc("shard the student's and teacher's LM heads over this many processes "
                                "(ColwiseParallel; FSDP2 over the rest; docs/parallel.md)", 1)

    # --- optimisation ---------------------------------------------------------------------------
    max_steps: Optional[int] = _doc("optimizer steps (None: from num_train_epochs, else 100)", None)
    num_train_epochs: Optional[float] = _doc("passes over the training data (instead of max_steps)", None)
    batch_size: int = _doc("sequences per micro-batch and process", 8)
    grad_accum: int = _doc("micro-batches per optimizer step", 1)
    lr: float = _doc("peak learning rate (AdamW)", 1e-4)
    weight_decay: float = _doc("AdamW weight decay", 0.0)
    adam_betas: str = _doc("AdamW betas, 'b1,b2' or a list [b1, b2]", "0.9,0.999")
    warmup_steps: int = _doc("linear warm-up steps", 0)
    warmup_ratio: float = _doc("warm-up as a fraction of max_steps (instead of warmup_steps)", 0.0)
    lr_schedule: str = _doc("after warm-up: cosine | linear | constant, or another schedule of "
                            "transformers.get_scheduler (" + ", ".join(SCHEDULES[3:]) + ")", "cosine")
    min_lr_ratio: float = _doc("the schedule's final learning rate as a fraction of lr", 0.0)
    max_grad_norm: Optional[float] = _doc("clip the gradient norm to this (None: no clipping)", 1.0)
    on_nonfinite: str = _doc("a NaN/inf loss or gradient norm: error (stop, naming the step and batch) | "
                             "skip (no update; counted as skipped_nonfinite)", "error")
    seed: int = _doc("seed of the initial LoRA weights, the data order and the rollouts", 0)

    # --- evaluation, checkpoints, logs ----------------------------------------------------------
    eval_every: int = _doc("evaluate every N steps (0: only at the end)", 0)
    eval_batches: Optional[int] = _doc("batches per evaluation (None: all of eval_data)", None)
    save_every: int = _doc("checkpoint every N steps (0: only at the end)", 0)
    keep_checkpoints: Optional[int] = _doc("checkpoints kept (None: all)", 2)
    output_dir: str = _doc("checkpoints, metrics.jsonl, loss_curve.png and the final model", "fastkd-run")
    resume: str = _doc("auto (the last checkpoint in output_dir, if any) | never | a checkpoint directory", "auto")
    log_every: int = _doc("write metrics every N steps", 1)
    progress: bool = _doc("show a progress bar", True)
    report_to: str = _doc("experiment trackers (accelerate): none | tensorboard | wandb | mlflow, or a "
                          "list; tensorboard writes under output_dir/tb", "none")
    tensorboard: Optional[bool] = _doc("true: the same as report_to: tensorboard (kept for old configs)", None)
    save_final: bool = _doc("save the trained model (safetensors) to output_dir/final", True)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path=None, overrides: Optional[list[str]] = None, **values: Any) -> "TrainConfig":
        """A config from a YAML file (optional), then ``--key value`` overrides, then ``values``."""
        merged: dict[str, Any] = {}
        for source in ((_read_yaml(Path(path)) if path is not None else {}), parse_overrides(overrides or []),
                       values):
            merged.update(_map_aliases(source))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - names)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(names | set(ALIASES)), n=1, cutoff=0.6)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown config key(s) {', '.join(hints)}; `fastkd train --help-config` lists them")
        return cls(**merged)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def betas(self) -> tuple[float, float]:
        return _betas(self.adam_betas)

    @property
    def resolved_token_select(self) -> str:
        """``token_select`` with the mode's default: teacher_entropy, or entropy in sft (no teacher)."""
        return self.token_select or ("entropy" if self.mode == "sft" else "teacher_entropy")

    @property
    def resolved_topk(self) -> tuple[Optional[int], str]:
        """``(topk, topk_from)`` with the mode's defaults (on_policy: the student's top 64)."""
        if self.mode == "on_policy":
            topk = 64 if self.topk is None else self.topk
            return (None if topk == 0 else topk), self.topk_from or "student"
        return (None if self.topk in (None, 0) else self.topk), self.topk_from or "teacher"

    def validate(self) -> None:
        """Checks types, ranges and the mode's required keys; raises ``ValueError``/``TypeError``."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), f.type))
        if self.max_steps is None and self.num_train_epochs is None:
            self.max_steps = 100
        elif self.max_steps is not None and self.num_train_epochs is not None:
            raise ValueError("max_steps/num_train_epochs: set one of them (num_train_epochs sets max_steps from the "
                             "data's size)")
        if self.num_train_epochs is not None and not self.num_train_epochs > 0:
            raise ValueError(f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        _one_of("mode", self.mode, MODES)
        _one_of("data_format", self.data_format, DATA_FORMATS)
        self._check_trackers()
        _one_of("divergence", self.divergence, DIVERGENCES)
        _one_of("tail", self.tail, ("bucket", "renormalize"))
        if self.token_select is not None:
            _one_of("token_select", self.token_select, TOKEN_SELECT)
        _one_of("lr_schedule", self.lr_schedule, SCHEDULES)
        _one_of("impl", self.impl, ("auto", "torch", "triton", "cuda"))
        _one_of("on_nonfinite", self.on_nonfinite, ("error", "skip"))
        if self.topk_from is not None:
            _one_of("topk_from", self.topk_from, ("teacher", "student", "union"))
        if not self.student:
            raise ValueError("student: a model directory or hub name is required")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        for name in ("max_length", "batch_size", "grad_accum", "lora_r", "log_every",
                     "prompt_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "ce_weight", "kd_weight",
                     "chunk_weight", "weight_decay", "min_lr_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta", "lmbda", "lora_dropout", "min_lr_ratio", "warmup_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("temperature", "lr", "rollout_temperature", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.token_fraction <= 1:
            raise ValueError(f"token_fraction must be in (0, 1], got {self.token_fraction}")
        if self.topk is not None and self.topk < 0:
            raise ValueError(f"topk must be None, 0 (full vocabulary) or a positive int, got {self.topk}")
        for name in ("eval_batches", "keep_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be None or >= 1, got {getattr(self, name)}")
        if self.tensor_parallel != 1:
            if isinstance(self.tensor_parallel, bool) or not isinstance(self.tensor_parallel, int) \
                    or self.tensor_parallel < 1:
                raise ValueError(f"tensor_parallel must be an int >= 1, got {self.tensor_parallel!r}")
            for name, unsupported in (("lora", self.lora), ("mode", self.mode == "on_policy"),
                                      ("teacher_url", self.teacher_url)):
                if unsupported:
                    raise ValueError(f"{name}: tensor_parallel > 1 does not support "
                                     f"{name}={getattr(self, name)!r} yet (docs/parallel.md)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be None or > 0, got {self.max_grad_norm}")
        _betas(self.adam_betas)
        if self.warmup_ratio > 0 and self.warmup_steps > 0:
            raise ValueError("warmup_ratio/warmup_steps: set one of them")
        if self.min_lr_ratio > 0 and self.lr_schedule not in ("cosine", "linear", "cosine_with_min_lr",
                                                                 "cosine_warmup_with_min_lr"):
            raise ValueError(f"min_lr_ratio: lr_schedule {self.lr_schedule} has no final learning rate to set "
                             "(cosine, linear and cosine_with_min_lr have)")
        self._check_mode()
        self._check_unused()

    def _check_trackers(self) -> None:
        wanted = [t for t in self.report_to.replace(" ", "").split(",") if t and t != "none"]
        if self.report_to.replace(" ", "") in ("all",):
            wanted = [t for t in TRACKERS if _tracker_installed(t)]
        for name in wanted:
            _one_of("report_to", name, TRACKERS + ("none", "all"))
        if self.tensorboard and "tensorboard" not in wanted:
            wanted.append("tensorboard")  # the old key
        if self.tensorboard is False and "tensorboard" in wanted:
            raise ValueError("tensorboard: false contradicts report_to: tensorboard; remove tensorboard")
        for name in wanted:
            if not _tracker_installed(name):
                raise ValueError(f"report_to: {name} is not installed (pip install {name}); set report_to to "
                                 "the trackers you have, or none (metrics.jsonl and loss_curve.png are always "
                                 "written)")
        self.report_to = ",".join(wanted) if wanted else "none"

    @property
    def trackers(self) -> list[str]:
        """The experiment trackers of ``report_to`` (empty for none)."""
        return [] if self.report_to == "none" else self.report_to.split(",")

    def _check_unused(self) -> None:
        """Keys the mode (or the other keys) would ignore are errors when set."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        groups = []
        if self.mode == "sft":
            groups.append(("mode sft trains on cross-entropy only", ("divergence", "beta", "tail", "temperature",
                                                                    "kd_weight", "topk", "topk_from",
                                                                    "chunk_weight")))
        if self.mode != "on_policy":
            groups.append((f"mode {self.mode} samples no rollouts (on_policy does)",
                           ("lmbda", "prompt_tokens", "max_new_tokens", "rollout_temperature")))
        if self.mode != "cross_tokenizer":
            groups.append((f"mode {self.mode} has no chunk term (cross_tokenizer has)", ("chunk_weight",)))
        if not self.lora:
            groups.append(("lora is false", ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")))
        if not self.teacher_url:
            groups.append(("there is no teacher_url", ("teacher_server_model", "server_topk", "server_timeout")))
        if self.token_fraction >= 1:
            groups.append(("token_fraction is 1 (every token is kept)", ("token_select",)))
        if not (self.eval_data or self.eval_cache):
            groups.append(("there is no eval_data or eval_cache", ("eval_every", "eval_batches")))
        if self.mode in ("offline", "cross_tokenizer"):
            groups.append((f"mode {self.mode} reads text or caches, not the data formats of sft/online/on_policy",
                           ("data_format", "messages_field", "prompt_field", "completion_field", "packing")))
        for reason, keys in groups:
            for key in keys:
                if getattr(self, key) != defaults[key]:
                    raise ValueError(f"{key}: {reason}, so {key} = {getattr(self, key)!r} would be ignored; "
                                     "remove it")
        if self.packing and self.mode == "on_policy":
            raise ValueError("packing: on_policy rollouts continue each example's prompt; packing would cut "
                             "them apart")

    def _check_mode(self) -> None:
        mode = self.mode
        if self.cache and mode not in ("offline", "cross_tokenizer"):
            raise ValueError(f"cache: mode {mode} does not read a teacher cache (offline and "
                             "cross_tokenizer do)")
        if mode == "offline":
            if not self.cache:
                raise ValueError("cache: mode offline trains from a teacher cache; set cache (`fastkd cache`)")
            if self.topk is not None:
                raise ValueError("topk: mode offline uses the K ids stored in the cache; leave topk unset")
        elif mode == "cross_tokenizer":
            if not (self.teacher or self.cache):
                raise ValueError("teacher: mode cross_tokenizer needs a teacher model or a byte-level cache")
            if not (self.data or self.cache):
                raise ValueError("data: set the training texts (data) or a byte-level cache (cache)")
            if self.token_fraction < 1:
                raise ValueError("token_fraction: token selection applies to the top-k and full-vocabulary "
                                 "losses, not to the byte loss of cross_tokenizer; leave it at 1")
            if self.topk is not None:
                raise ValueError("topk: the byte loss of cross_tokenizer has no top-k; leave topk unset")
        else:
            if mode in ("online", "on_policy") and not (self.teacher or self.teacher_url):
                raise ValueError(f"teacher: mode {mode} needs a teacher model (teacher) or server (teacher_url)")
            if not self.data:
                raise ValueError(f"data: mode {mode} needs the training texts (data)")
        if self.teacher_url:
            if mode not in ("online", "on_policy"):
                raise ValueError(f"teacher_url: mode {mode} takes no teacher server (online and on_policy do)")
            if self.teacher:
                raise ValueError("teacher_url: set either teacher (a model in-process) or teacher_url, not both")
            if self.topk is not None or self.topk_from is not None:
                raise ValueError("topk: a teacher server returns its own top-k (server_topk); leave topk and "
                                 "topk_from unset")
            if self.temperature != 1.0:
                raise ValueError("temperature: a teacher server's prompt_logprobs are at temperature 1")
        if self.server_topk < 1 or not self.server_timeout > 0:
            raise ValueError(f"server_topk must be >= 1 and server_timeout > 0, got {self.server_topk}, "
                             f"{self.server_timeout}")
        if self.eval_cache and mode != "offline":
            raise ValueError(f"eval_cache: only mode offline evaluates against a cache; use eval_data in mode {mode}")
        if self.teacher and (mode in ("offline", "sft") or (mode == "cross_tokenizer" and self.cache)):
            raise ValueError(f"teacher: mode {mode}{' with a cache' if self.cache else ''} uses no teacher model; "
                             "remove teacher (or the cache)")
        if self.teacher_tokenizer and mode != "cross_tokenizer":
            raise ValueError("teacher_tokenizer: only mode cross_tokenizer has a teacher with another tokenizer")
        if self.topk_from is not None and mode not in ("online", "on_policy"):
            raise ValueError(f"topk_from: mode {mode} has no online top-k set; remove topk_from")
        if self.topk_from is not None and self.resolved_topk[0] is None:
            raise ValueError("topk_from: it chooses the ids of a top-k set; set topk as well")
        if mode == "sft" and self.token_select in ("divergence", "teacher_entropy"):
            raise ValueError(f"token_select: mode sft has no teacher, so {self.token_select} does not apply; "
                             "use entropy (the default in sft)")
        if self.merge_lora and not self.lora:
            raise ValueError("merge_lora: only a LoRA run (lora: true) has an adapter to merge")
        if mode != "sft" and self.ce_weight == 0 and self.kd_weight == 0:
            raise ValueError("kd_weight/ce_weight: both are 0, the loss would be 0")
        if mode == "sft" and self.ce_weight == 0:
            self.ce_weight = 1.0  # sft is cross-entropy only: the default weights mean exactly that


# Hugging Face TrainingArguments / TRL names and the keys they set here (a function: the value).
ALIASES: dict[str, Any] = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "lr_schedule",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "save_total_limit": "keep_checkpoints",
    "resume_from_checkpoint": "resume",
    "max_seq_length": "max_length",
    "dataset_text_field": "text_field",
    "model_name_or_path": "student",
    "teacher_model_name_or_path": "teacher",
    "disable_tqdm": ("progress", lambda value: not _coerce_bool("disable_tqdm", value)),
    "adam_beta1": ("adam_betas", None),
    "adam_beta2": ("adam_betas", None),
}


def _map_aliases(values: dict) -> dict:
    """``values`` with the Hugging Face names of :data:`ALIASES` replaced by fastkd's keys; a key
    given under both names is an error naming both."""
    out = {k: v for k, v in values.items() if k not in ALIASES}
    betas = {k: values[k] for k in ("adam_beta1", "adam_beta2") if k in values}
    if betas:
        if "adam_betas" in values:
            raise ValueError("adam_betas: given together with adam_beta1/adam_beta2; use one form")
        b1, b2 = _betas(TrainConfig.__dataclass_fields__["adam_betas"].default)
        out["adam_betas"] = f"{betas.get('adam_beta1', b1)},{betas.get('adam_beta2', b2)}"
    for name, target in ALIASES.items():
        if name not in values or name in ("adam_beta1", "adam_beta2"):
            continue
        key, convert = target if isinstance(target, tuple) else (target, None)
        if key in values:
            raise ValueError(f"{key}: given twice, as {key} and as its Hugging Face name {name}; keep one")
        out[key] = convert(values[name]) if convert else values[name]
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--lr", "3e-4", "--lora=true"]`` → ``{"lr": "3e-4", "lora": "true"}`` (typed later)."""
    values: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"override {arg!r}: expected --key value or --key=value")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ValueError(f"override --{key}: no value given")
            value, i = args[i + 1], i + 1
        values[key.replace("-", "_")] = value
        i += 1
    return values


def config_help() -> str:
    """The keys, their defaults and their help, one per line; then the Hugging Face names."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        lines.append(f"  {f.name:<24} (default {f.default!r})  {f.metadata['help']}")
    lines.append("Hugging Face TrainingArguments / TRL names accepted for them:")
    for name, target in ALIASES.items():
        key = target[0] if isinstance(target, tuple) else target
        lines.append(f"  {name:<32} -> {key}" + (" (negated)" if name == "disable_tqdm" else ""))
    return "\n".join(lines)


def _tracker_installed(name: str) -> bool:
    if name == "tensorboard":
        return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))
    return importlib.util.find_spec(name) is not None


# ----------------------------------------------------------------------------------------------

def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise ValueError(f"config: {path} is not a file")
    with open(path, encoding="utf-8") as handle:
        loaded = yaml.safe_load(handle)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config: {path} must hold a mapping of keys to values, got {type(loaded).__name__}")
    return loaded


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """``value`` as the field's type; strings (from the command line) are parsed."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise TypeError(f"{name} must be a {base.__name__}, got None")
    if base is bool:
        return _coerce_bool(name, value)
    if base is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise TypeError(f"{name} must be an int, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {value!r}")
        return int(value)
    if base is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise TypeError(f"{name} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if base is str:
        if isinstance(value, Path):
            return str(value)
        if name in _LIST_KEYS and isinstance(value, (list, tuple)):  # a YAML list where a list is meant
            if not all(isinstance(v, (str, numbers.Real)) and not isinstance(v, bool) for v in value):
                raise TypeError(f"{name} must be a list of names or numbers, got {value!r}")
            return ",".join(str(v) for v in value)
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {value!r}")
        return value
    return value


_LIST_KEYS = ("adam_betas", "lora_targets", "report_to")


def _coerce_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise TypeError(f"{name} must be true or false, got {value!r}")


def _one_of(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _betas(text: str) -> tuple[float, float]:
    try:
        b1, b2 = (float(part) for part in str(text).split(","))
    except ValueError:
        raise ValueError(f"adam_betas must be two numbers 'b1,b2', got {text!r}") from None
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"adam_betas must be in [0, 1), got {text!r}")
    return b1, b2

