"""The thin trainer: a readable loop over Hugging Face causal LMs, built on fastkd's losses.

One optimizer step:

1. draw ``grad_accum`` micro-batches (the order is seeded and resumable); in ``on_policy`` mode
   each is, with probability ``lmbda``, replaced by the student's own continuations of its prompts;
2. count the rows that will be trained on (``ceil(token_fraction · counted)`` per micro-batch), so
   the step's loss is a mean over the whole accumulated batch;
3. per micro-batch: the student (and an online teacher, without gradients) run up to their LM
   heads (:func:`fastkd.integrations.hidden_and_head`), the fused loss gives one value per row
   (top-k, full-vocabulary, byte-level or CE only), token selection keeps the chosen rows, and the
   sum goes backward;
4. clip, AdamW, the warm-up + cosine/linear/constant schedule; metrics, evaluation and
   checkpoints at their intervals.

Everything that decides the next step (weights, optimizer, schedule, every process's RNG, the
data position) is in each checkpoint (:mod:`fastkd.train.checkpoint`), so a resumed run computes
the same losses as one that never stopped. Multi-GPU runs go through ``accelerate launch`` (DDP or
FSDP2): the batch is split across processes, gradients are averaged by the wrapper.
"""
from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from ..api import kd_loss, topk_kd_loss
from ..integrations.hf import hidden_and_head
from . import checkpoint as ckpt
from . import selection
from .config import TrainConfig
from .data import (CachedCrossItems, CausalCollator, CrossCollator, OrderSampler, cross_items, example_items,
                   load_texts, pack_items, pad_token_id, text_items)
from .guard import NonFiniteGuard, check_finite_weights


def _selection(settings: dict) -> Optional[str]:
    """The criterion a run's token selection used (None when every token was kept), from its
    settings: runs saved before ``token_select`` defaulted to None stored "entropy", which, with
    ``token_fraction`` 1, selected nothing and must resume as before."""
    if settings.get("token_fraction", 1.0) >= 1:
        return None
    chosen = settings.get("token_select")
    return chosen or ("entropy" if settings.get("mode") == "sft" else "teacher_entropy")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a run after a step; ``checkpoint`` holds that step (resume from it)."""

    def __init__(self, step: int, checkpoint: Optional[Path]):
        super().__init__(f"interrupted after step {step}")
        self.step, self.checkpoint = step, checkpoint


class Trainer:
    """Builds the models, data and optimizer of a :class:`TrainConfig`; :meth:`train` runs it.

    Args:
        config: the run.
        accelerator: an ``accelerate.Accelerator`` (default: a new one; ``accelerate launch``
            configures it for DDP/FSDP2 and mixed precision).
        on_step: called as ``on_step(trainer, record)`` after every optimizer step (``record``: the
            step's metrics); may raise to stop a run (the tests use it to simulate a crash).
    """

    def __init__(self, config: TrainConfig, *, accelerator=None,
                 on_step: Optional[Callable[["Trainer", dict], None]] = None):
        self.config = cfg = config
        for key in ("student", "teacher", "tokenizer", "teacher_tokenizer"):
            _check_local(key, getattr(cfg, key))  # before anything slow: a typo is one line naming its key
        for key in ("data", "eval_data", "cache", "eval_cache"):
            spec = getattr(cfg, key)
            if spec and not spec.startswith("hf:") and not Path(spec).expanduser().exists():
                raise ValueError(f"{key}: {spec} does not exist")
        self.acc = acc = accelerator or _accelerator(cfg.bf16, cfg.trackers, cfg.output_dir)
        self.on_step = on_step
        self.out = Path(cfg.output_dir)
        if acc.is_main_process:
            _make_output_dir(self.out)
        torch.manual_seed(cfg.seed)  # the same LoRA initialisation on every process
        self.tokenizer = _load_tokenizer(cfg.tokenizer or cfg.student, "tokenizer" if cfg.tokenizer else "student")
        self.pad_id = pad_token_id(self.tokenizer)
        self.student = self._load_student()
        self.teacher = self._load_teacher()
        self.server = None
        if cfg.teacher_url:
            from .server import ServerTeacher

            self.server = ServerTeacher(cfg.teacher_url, cfg.teacher_server_model, cfg.server_topk,
                                        self.student.get_output_embeddings().weight.shape[0],
                                        timeout=cfg.server_timeout)
        self.shared_vocab = self._shared_vocab()
        self.items, self.collate, self.eval_items = self._build_data()
        self.sampler = OrderSampler(len(self.items), cfg.seed)
        if cfg.num_train_epochs is not None:  # HF's rule: steps = ceil(epochs · batches per epoch)
            per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes
            cfg.max_steps = max(1, math.ceil(cfg.num_train_epochs * len(self.items) / per_step))
            cfg.num_train_epochs = None
        if cfg.warmup_ratio > 0:
            cfg.warmup_steps, cfg.warmup_ratio = math.ceil(cfg.warmup_ratio * cfg.max_steps), 0.0

        self.mesh = None  # (dp, tp) with tensor-parallel heads (fastkd.train.tensor_parallel)
        if cfg.tensor_parallel > 1:
            from . import tensor_parallel as tp

            self.mesh = tp.make_mesh(cfg.tensor_parallel, acc.device.type)
            self.student = tp.shard_student(self.student.to(acc.device), self.mesh)
        params = [p for p in self.student.parameters() if p.requires_grad]
        if params:
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
            self.scheduler = _scheduler(cfg, self.optimizer)
            if self.mesh is None:
                self.student, self.optimizer = acc.prepare(self.student, self.optimizer)
        else:  # a model with nothing trainable (a saved LoRA adapter, loaded to evaluate it)
            self.optimizer = self.scheduler = None
            if self.mesh is None:
                self.student = acc.prepare(self.student)
        if self.teacher is not None:
            self.teacher.to(acc.device)
            if self.mesh is not None:
                tp.shard_head(self.teacher, self.mesh)
        self.step = 0
        self.history: list[dict] = []
        torch.manual_seed(cfg.seed + 1 + acc.process_index)  # rollouts differ across processes
        random.seed(cfg.seed + acc.process_index)

    # ------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------
    def _load_student(self):
        from transformers import AutoModelForCausalLM

        cfg = self.config
        model = _load_model(AutoModelForCausalLM, "student", cfg.student).float()  # fp32 master weights
        if len(self.tokenizer) > model.get_output_embeddings().weight.shape[0]:
            raise ValueError(f"tokenizer: {len(self.tokenizer)} ids but the student's LM head has "
                             f"{model.get_output_embeddings().weight.shape[0]} rows")
        if cfg.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if cfg.lora:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError:
                raise ValueError("lora: LoRA training needs peft (pip install peft)") from None
            targets = "all-linear" if cfg.lora_targets == "all-linear" else [
                t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
            model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                     lora_dropout=cfg.lora_dropout, target_modules=targets,
                                                     task_type="CAUSAL_LM"))
            if Path(cfg.student).is_dir():  # the adapter names its base model resolvably from anywhere
                model.peft_config["default"].base_model_name_or_path = str(Path(cfg.student).resolve())
        return model.train()

    def _load_teacher(self):
        cfg = self.config
        if cfg.mode == "sft" or not cfg.teacher or (cfg.mode == "cross_tokenizer" and cfg.cache):
            return None
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if cfg.bf16 and torch.cuda.is_available() else torch.float32
        teacher = _load_model(AutoModelForCausalLM, "teacher", cfg.teacher).to(dtype)
        teacher.eval().requires_grad_(False)
        if cfg.mode == "cross_tokenizer":
            self.teacher_tokenizer = _load_tokenizer(cfg.teacher_tokenizer or cfg.teacher,
                                                     "teacher_tokenizer" if cfg.teacher_tokenizer else "teacher")
        else:
            from ..cache.format import tokenizer_fingerprint

            other = cfg.teacher
            try:
                teacher_tok = _load_tokenizer(other, "teacher")
            except (OSError, ValueError):
                teacher_tok = None  # a teacher directory without a tokenizer: the student's is assumed
            if teacher_tok is not None and tokenizer_fingerprint(teacher_tok) != tokenizer_fingerprint(self.tokenizer):
                raise ValueError(f"teacher: {other} has another tokenizer than the student; mode "
                                 f"{cfg.mode} needs the same one (use mode cross_tokenizer)")
        return teacher

    def _shared_vocab(self) -> Optional[int]:
        """The rows both heads keep when the student and an online teacher share a tokenizer."""
        if self.teacher is None or self.config.mode == "cross_tokenizer":
            return None
        v_s = self.student.get_output_embeddings().weight.shape[0]
        v_t = self.teacher.get_output_embeddings().weight.shape[0]
        return None if v_s == v_t else min(v_s, v_t)

    def _build_data(self):
        cfg = self.config
        if cfg.mode == "offline":
            from ..cache import CacheCollator

            items = self._open_cache(cfg.cache, "topk", "cache")  # read from the memory map on access
            eval_items = None
            if cfg.eval_cache:
                eval_items = self._open_cache(cfg.eval_cache, "topk", "eval_cache")
            elif cfg.eval_data:
                eval_items = text_items(self.tokenizer, load_texts(cfg.eval_data, cfg.text_field, "eval_data"),
                                        cfg.max_length)
            collate = CacheCollator(self.pad_id, max_length=cfg.max_length)
            self.eval_collate = CausalCollator(self.pad_id) if cfg.eval_data and not cfg.eval_cache else collate
            return items, collate, eval_items
        if cfg.mode == "cross_tokenizer":
            from ..bytes import ByteVocab

            self.byte_vocab = ByteVocab.from_tokenizer(self.tokenizer, vocab_size=self.student.get_output_embeddings().weight.shape[0])
            if self.teacher is not None:
                self.teacher_vocab = ByteVocab.from_tokenizer(
                    self.teacher_tokenizer, vocab_size=self.teacher.get_output_embeddings().weight.shape[0])
                build = lambda texts: cross_items(self.tokenizer, self.byte_vocab,  # noqa: E731
                                                  texts, cfg.max_length, self.teacher_tokenizer, self.teacher_vocab)
                collate = CrossCollator(self.pad_id, pad_token_id(self.teacher_tokenizer))
                items = build(load_texts(cfg.data, cfg.text_field, "data"))
            else:
                cache = self._open_cache(cfg.cache, "bytes", "cache")
                items = CachedCrossItems(self.tokenizer, self.byte_vocab, cache, cfg.max_length)
                collate = CrossCollator(self.pad_id, 0)
                build = None
            eval_items = None
            if cfg.eval_data:
                texts = load_texts(cfg.eval_data, cfg.text_field, "eval_data")
                eval_items = build(texts) if build is not None else text_items(self.tokenizer, texts, cfg.max_length)
            self.eval_collate = collate if build is not None else CausalCollator(self.pad_id)
            return items, collate, eval_items
        collate = CausalCollator(self.pad_id)
        self.eval_collate = collate
        items, fmt = example_items(self.tokenizer, cfg.data, cfg, "data")
        if fmt == "prompt_only" and not (cfg.mode == "on_policy" and cfg.lmbda == 1):
            raise ValueError(f"data: {cfg.data} holds prompts without completions: only on_policy with lmbda 1 "
                             "trains on them (every micro-batch a rollout); add a completion column")
        if cfg.packing:
            items = pack_items(items, cfg.max_length)
        eval_items = None
        if cfg.eval_data:
            eval_items, eval_fmt = example_items(self.tokenizer, cfg.eval_data, cfg, "eval_data")
            if eval_fmt == "prompt_only":
                raise ValueError(f"eval_data: {cfg.eval_data} holds prompts without completions; nothing to score")
        return items, collate, eval_items

    def _open_cache(self, path: str, kind: str, key: str):
        """A teacher cache of ``kind`` captured at this run's temperature (checksums verified)."""
        from ..cache import TeacherCache

        cache = TeacherCache(path, tokenizer=self.tokenizer if kind == "topk" else None)
        if cache.kind != kind:
            raise ValueError(f"{key}: mode {self.config.mode} needs a {'top-k' if kind == 'topk' else 'byte-level'} "
                             f"cache, {path} is a {cache.kind} cache")
        recorded = float(cache.manifest["temperature"])
        if recorded != self.config.temperature:
            raise ValueError(f"temperature: {path} holds the teacher's log-probs at temperature {recorded:g}, this "
                             f"run has temperature {self.config.temperature:g}; they must be equal (capture the "
                             "cache at the distillation temperature)")
        return cache

    # ------------------------------------------------------------------------------------------
    # batches
    # ------------------------------------------------------------------------------------------
    def _next_batch(self) -> dict:
        cfg = self.config
        index, count = self._data_shard()
        indices = self.sampler.take(cfg.batch_size * count)
        mine = indices[index * cfg.batch_size:(index + 1) * cfg.batch_size]
        return self.collate([self.items[i] for i in mine])

    def _to_device(self, batch: dict) -> dict:
        device = self.acc.device
        return {k: (v.to(device) if isinstance(v, Tensor) or hasattr(v, "to") and k == "alignment" else v)
                for k, v in batch.items()}

    def _rollout(self, batch: dict) -> dict:
        """The student's continuations of each sequence's first ``prompt_tokens`` tokens; labels
        cover the generated tokens only (up to and including an end-of-sequence token)."""
        cfg = self.config
        model = self.acc.unwrap_model(self.student)
        lengths = batch["attention_mask"].sum(1).tolist()
        if "prompt_lengths" in batch:  # prompt/completion data: the rollouts continue the prompts
            prompts = [batch["input_ids"][b, :max(1, n)] for b, n in enumerate(batch["prompt_lengths"].tolist())]
        else:
            prompts = [batch["input_ids"][b, :max(1, min(cfg.prompt_tokens, n - 1))] for b, n in enumerate(lengths)]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):  # left-padded for generation
            ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
        eos = _eos_ids(model, self.tokenizer)
        was_training = model.training
        model.eval()
        with torch.no_grad(), self.acc.autocast():
            out = model.generate(input_ids=ids.to(self.acc.device), attention_mask=mask.to(self.acc.device),
                                 do_sample=True, temperature=cfg.rollout_temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=cfg.max_new_tokens, pad_token_id=self.pad_id,
                                 eos_token_id=eos or None, synced_gpus=self._fsdp())
        model.train(was_training)
        items = []
        for b, p in enumerate(prompts):
            new = out[b, width:].cpu()
            ended = torch.isin(new, torch.tensor(eos, dtype=new.dtype)).nonzero()
            if len(ended):  # cut after the first end-of-sequence token (what follows is padding)
                new = new[:int(ended[0]) + 1]
            items.append({"input_ids": torch.cat([p, new]), "prompt_length": len(p)})
        return CausalCollator(self.pad_id)(items)

    def _step_batches(self) -> list[tuple[dict, bool]]:
        cfg = self.config
        batches = []
        for micro in range(cfg.grad_accum):
            batch = self._next_batch()
            # the on-policy coin is the same on every process (FSDP generates in lockstep)
            on_policy = (cfg.mode == "on_policy"
                         and random.Random(cfg.seed * 1_000_003 + self.step * 1009 + micro).random() < cfg.lmbda)
            if on_policy:
                batch = self._rollout(batch)
            batches.append((self._to_device(batch), on_policy))
        return batches

    # ------------------------------------------------------------------------------------------
    # the loss
    # ------------------------------------------------------------------------------------------
    def _kept_rows(self, batch: dict) -> Tensor:
        """``ceil(token_fraction · counted)`` as a float64 tensor on the device (no host sync; the
        same double product as :meth:`_select`'s)."""
        labels = batch["labels"] if self.config.mode == "cross_tokenizer" else batch["labels"][:, 1:]
        return torch.ceil((labels != -100).sum().double() * self.config.token_fraction)

    def _options(self, on_policy: bool) -> dict:
        cfg = self.config
        ce = 0.0 if on_policy else cfg.ce_weight  # no CE on the student's own samples
        return dict(divergence=cfg.divergence, beta=cfg.beta, tail=cfg.tail, temperature=cfg.temperature,
                    ce_weight=ce, kd_weight=cfg.kd_weight, impl=cfg.impl)

    def _loss_rows(self, model, batch: dict, on_policy: bool = False) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """Per-row loss ``(N,)`` and per-row statistics (None for CE only), and the counted mask.

        The KD losses, and the CE of sft with token selection, return instead the *sum* of their
        rows (a summing reduction: the loss makes its gradients in the forward, three GEMMs, no
        recomputation) and the statistics of the rows trained on. With token selection
        (``token_fraction < 1``) the kept rows are chosen first and gathered *before* the loss, so
        its GEMMs run on them alone (:mod:`fastkd.train.selection`: the cost of each
        ``token_select`` criterion).
        """
        cfg = self.config
        if cfg.mode == "cross_tokenizer":
            options = self._options(False)
            del options["tail"]
            return self._byte_rows(model, batch, options)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["labels"][:, 1:]
        counted = labels.reshape(-1) != -100
        s = hidden_and_head(model, vocab_size=self.shared_vocab, **inputs)
        hidden = s["hidden"][:, :-1]
        if cfg.mode == "sft" and cfg.token_fraction >= 1:
            rows, stats = _fused_ce(hidden, s, labels, cfg.impl, ce_weight=cfg.ce_weight, reduction="none",
                                    return_stats=True)
            return rows, stats, counted
        if cfg.mode == "sft":  # the CE alone: a top-k loss with an empty set, the kept rows gathered first
            empty = torch.full((*labels.shape, 1), -1, dtype=torch.int64, device=labels.device)
            no_teacher = {"ids": empty, "logprobs": torch.zeros(empty.shape, device=labels.device)}
            rows, stats = selection.selected_kd_loss(
                dict(s, hidden=hidden), labels, no_teacher, options=dict(ce_weight=cfg.ce_weight, kd_weight=0.0,
                                                                         impl=cfg.impl),
                token_fraction=cfg.token_fraction, token_select="entropy")
            return rows, stats, counted
        if self.server is not None:  # the teacher's top-k from the server, like a cache's
            with torch.no_grad():
                batch["teacher_ids"], batch["teacher_logprobs"] = self.server.topk_logprobs(
                    batch["input_ids"], batch["attention_mask"])
        if "teacher_ids" in batch:
            teacher = {"ids": batch["teacher_ids"][:, :-1], "logprobs": batch["teacher_logprobs"][:, :-1]}
        else:
            with torch.no_grad():
                t = hidden_and_head(self.teacher, vocab_size=self.shared_vocab, **inputs)
            teacher = dict(t, hidden=t["hidden"][:, :-1])
        topk, topk_from = cfg.resolved_topk
        rows, stats = selection.selected_kd_loss(
            dict(s, hidden=hidden), labels, teacher, options=self._options(on_policy),
            token_fraction=cfg.token_fraction, token_select=cfg.resolved_token_select, topk=topk,
            topk_from=topk_from)
        return rows, stats, counted

    def _byte_rows(self, model, batch: dict, options: dict, student: Optional[dict] = None):
        from ..bytes import byte_kd_loss

        s = student or hidden_and_head(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        teacher = {}
        if "teacher_input_ids" in batch:
            with torch.no_grad():
                t = hidden_and_head(self.teacher, input_ids=batch["teacher_input_ids"],
                                    attention_mask=batch["teacher_attention_mask"])
            teacher = dict(teacher_hidden=t["hidden"], teacher_weight=t["weight"], teacher_bias=t["bias"],
                           teacher_softcap=t["softcap"], teacher_byte_vocab=self.teacher_vocab,
                           teacher_labels=batch["teacher_labels"])
        else:
            teacher = dict(teacher_byte_logprobs=batch["teacher_byte_logprobs"],
                           teacher_token_logprobs=batch["teacher_token_logprobs"])
        rows = byte_kd_loss(s["hidden"], s["weight"], self.byte_vocab, batch["alignment"], labels=batch["labels"],
                            bias=s["bias"], softcap=s["softcap"], chunk_weight=self.config.chunk_weight,
                            reduction="none", **teacher, **options)
        return rows, None, batch["labels"].reshape(-1) != -100

    def _select(self, rows: Tensor, stats, counted: Tensor) -> Tensor:
        """0/1 weights of the rows trained on, for losses with per-row values (CE only and bytes,
        at ``token_fraction`` 1): the counted ones. With token selection every loss comes summed
        over its kept rows (:mod:`fastkd.train.selection`)."""
        return counted.to(rows.dtype)

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Runs (or resumes) the configured steps; returns a summary (last metrics, eval, paths)."""
        cfg, acc = self.config, self.acc
        if self.optimizer is None:
            raise ValueError(f"student: {cfg.student} has no trainable parameters (a saved LoRA adapter? "
                             "train its base model with lora: true)")
        self._maybe_resume()
        from .metrics import MetricsLog, format_eval

        log = MetricsLog(self.out, enabled=acc.is_main_process, resume_step=self.step, progress=cfg.progress,
                         total=cfg.max_steps, accelerator=acc if cfg.trackers else None, config=cfg.to_dict())
        params = [p for p in self.student.parameters() if p.requires_grad]
        guard = NonFiniteGuard(cfg.on_nonfinite, self.sampler, cfg.batch_size * acc.num_processes * cfg.grad_accum,
                               skipped=self.history[-1].get("skipped_nonfinite", 0) if self.history else 0)
        # elapsed_s continues the resumed run's clock
        started = time.perf_counter() - (self.history[-1].get("elapsed_s", 0.0) if self.history else 0.0)
        tokens = 0
        last_eval: dict = {}
        self._stop = False
        restore = self._catch_ctrl_c()
        try:
            while self.step < cfg.max_steps:
                guard.begin_step()
                batches = self._step_batches()
                # the step's loss is a mean over the rows kept on all processes: each process
                # divides its sum by total / processes, and the wrapper averages the gradients
                total = self._all_processes_sum(torch.stack([self._kept_rows(b) for b, _ in batches]).sum())
                denominator = (total.clamp(min=1) / acc.num_processes).float()
                sums = torch.zeros(3, dtype=torch.float64, device=acc.device)  # loss, kd, stop: one sync a step
                rollouts, has_kd = 0, False
                for i, (batch, on_policy) in enumerate(batches):
                    sync = contextlib.nullcontext() if i == len(batches) - 1 else acc.no_sync(self.student)
                    with sync:
                        with acc.autocast():
                            rows, stats, counted = self._loss_rows(self.student, batch, on_policy)
                        # the KD losses come summed over the rows trained on; others per row
                        keep = self._select(rows, stats, counted) if rows.dim() else None
                        loss = (rows.float() * keep).sum() if keep is not None else rows.float()
                        loss = loss / denominator
                        acc.backward(loss)
                    sums[0] += loss.detach()
                    if stats is not None:
                        kd = stats.kd.reshape(-1)
                        sums[1] += (kd * keep if keep is not None else kd).sum() / denominator
                        has_kd = True
                    rollouts += on_policy  # the same on every process (a shared coin)
                if self._stop:  # Ctrl-C on any process stops every process after this step
                    sums[2] = acc.num_processes
                # log the mean over processes, not the main one's share
                loss_sum, kd_sum, stop = (self._all_processes_sum(sums) / acc.num_processes).tolist()
                total = int(total)
                total //= cfg.tensor_parallel  # the ranks of a tensor-parallel group share rows
                # the norm also feeds the non-finite guard (max_norm inf: no clipping, grads * 1.0)
                max_norm = cfg.max_grad_norm or math.inf
                if self.mesh is not None:
                    from .tensor_parallel import clip_grad_norm_
                    grad_norm = float(clip_grad_norm_(params, max_norm))
                else:
                    grad_norm = float(acc.clip_grad_norm_(params, max_norm))
                lr = self.scheduler.get_last_lr()[0]
                if not guard.check(self.step + 1, loss_sum, grad_norm):  # on_nonfinite: error raises
                    self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                tokens += total
                record = {"step": self.step, "loss": loss_sum, "lr": lr, "tokens": total,
                          "elapsed_s": time.perf_counter() - started}
                if has_kd and cfg.mode != "sft":
                    record["kd"] = kd_sum
                ce = _ce_term(cfg, loss_sum, kd_sum if has_kd else 0.0)
                if ce is not None:
                    record["ce"] = ce
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                if cfg.mode == "on_policy":
                    record["rollout_batches"] = rollouts
                if guard.skipped:
                    record["skipped_nonfinite"] = guard.skipped
                self.history.append(record)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    log.write(record)
                log.advance(record)
                if stop:
                    raise Interrupted(self.step, self._save_on_interrupt(log))
                if self.eval_items and cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    last_eval = self.evaluate()
                    log.write({"step": self.step, **last_eval})
                    log.note(format_eval(self.step, last_eval))
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self, record)
            if self.eval_items:
                last_eval = self.evaluate()
                log.write({"step": self.step, **last_eval})
                log.note(format_eval(self.step, last_eval))
            checkpoint = self.save_checkpoint()
            if cfg.save_final:
                self.save_model(self.out / "final")
                if cfg.lora and cfg.merge_lora:
                    self.save_merged(self.out / "final-merged")
        finally:
            restore()
            log.close()
        if acc.is_main_process:
            log.plot(self.out / "loss_curve.png")
        return {"step": self.step, "loss": self.history[-1]["loss"] if self.history else None,
                "eval": last_eval, "checkpoint": str(checkpoint), "output_dir": str(self.out),
                "tokens": tokens, "last": self.history[-1] if self.history else {}}

    def _catch_ctrl_c(self) -> Callable[[], None]:
        """Ctrl-C (SIGINT) asks the run to stop after the current step, save a checkpoint and
        raise :class:`Interrupted`; a second Ctrl-C interrupts at once. Returns the function that
        puts the previous handler back (nothing is changed outside the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            self._stop = True
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if self.acc.is_main_process:
                print("\nfastkd train: Ctrl-C, stopping after this step and saving a checkpoint "
                      "(Ctrl-C again to abort)", file=sys.stderr, flush=True)

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)

    def _save_on_interrupt(self, log) -> Path:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.close()
        if self.acc.is_main_process:
            log.plot(self.out / "loss_curve.png")
        return self.save_checkpoint()

    def _data_shard(self) -> tuple[int, int]:
        """``(index, count)`` of this process's share of the data: its data-parallel coordinate
        (the ranks of a tensor-parallel group read the same rows)."""
        if self.mesh is not None:
            from .tensor_parallel import data_rank
            return data_rank(self.mesh)
        return self.acc.process_index, self.acc.num_processes

    def _all_processes_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the processes (one all-reduce; as it is with one process)."""
        return tensor if self.acc.num_processes == 1 else self.acc.reduce(tensor, reduction="sum")

    # ------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out CE (nats per token, and per UTF-8 byte when the texts are known) and KL to the
        teacher: full-vocabulary ``KL(teacher ‖ student)`` per token with an online teacher, over
        the teacher's top-k plus tail bucket with an eval cache, over next-byte distributions at
        aligned rows in cross_tokenizer mode; every process evaluates its share, sums are reduced."""
        cfg, acc = self.config, self.acc
        if not self.eval_items:
            raise ValueError("eval_data (or eval_cache): nothing to evaluate on")
        model = self.student
        was_training = model.training
        model.eval()
        sums = torch.zeros(6, dtype=torch.float64)  # ce, tokens, bytes, kl, kl rows, batches without bytes
        n_items = len(self.eval_items)
        starts = list(range(0, n_items, cfg.batch_size))[:cfg.eval_batches]
        # every process runs the same number of forwards (FSDP all-gathers in each; DDP syncs
        # buffers): a process short of batches repeats its first one with weight 0
        index, count = self._data_shard()
        per_process = -(-len(starts) // count)
        mine = starts[index::count]
        kl_name = None
        for k in range(per_process):
            start = mine[k] if k < len(mine) else starts[0]
            items = [self.eval_items[i] for i in range(start, min(start + cfg.batch_size, n_items))]
            batch = self._to_device(self.eval_collate(items))
            with acc.autocast():
                ce, n, kl, kl_name = self._eval_batch(model, batch)
            weight = 1.0 if k < len(mine) else 0.0
            sums += weight * torch.tensor([ce, n, batch.get("n_bytes", 0), kl or 0.0, n if kl is not None else 0,
                                           "n_bytes" not in batch], dtype=torch.float64)
        sums = self._all_processes_sum(sums.to(acc.device)).cpu() / self.config.tensor_parallel
        model.train(was_training)
        ce, n, n_bytes, kl, kl_rows, unknown_bytes = sums.tolist()
        out = {"eval_ce": ce / max(n, 1), "eval_tokens": int(n)}
        if n_bytes and not unknown_bytes:
            out["eval_ce_per_byte"] = ce / n_bytes
        if kl_name is not None and kl_rows:
            out[kl_name] = kl / kl_rows
        return out

    def _eval_batch(self, model, batch: dict):
        cfg = self.config
        if cfg.mode == "cross_tokenizer" and "alignment" in batch:
            s = hidden_and_head(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            ce = _ce_sum(s["hidden"], s, batch["labels"], cfg.impl)
            rows, _, counted = self._byte_rows(model, batch, dict(divergence="forward_kl", ce_weight=0.0,
                                                                    kd_weight=1.0, impl=cfg.impl), student=s)
            return ce, int(counted.sum()), float(rows.sum()), "eval_byte_kl"
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["labels"][:, 1:]
        s = hidden_and_head(model, vocab_size=self.shared_vocab, **inputs)
        hidden = s["hidden"][:, :-1]
        ce = _ce_sum(hidden, s, labels, cfg.impl)
        n = int((labels != -100).sum())
        if self.server is not None:
            batch["teacher_ids"], batch["teacher_logprobs"] = self.server.topk_logprobs(
                batch["input_ids"], batch["attention_mask"])
        if "teacher_ids" in batch:
            kl = topk_kd_loss(hidden, s["weight"], batch["teacher_ids"][:, :-1], batch["teacher_logprobs"][:, :-1],
                              bias=s["bias"], softcap=s["softcap"], labels=labels, divergence="forward_kl",
                              temperature=cfg.temperature, reduction="sum", impl=cfg.impl) / cfg.temperature**2
            return ce, n, float(kl), "eval_kl_topk"
        if self.teacher is not None and cfg.mode != "cross_tokenizer":
            t = hidden_and_head(self.teacher, vocab_size=self.shared_vocab, **inputs)
            kl = kd_loss(hidden, s["weight"], t["hidden"][:, :-1], t["weight"], bias=s["bias"], softcap=s["softcap"],
                         teacher_bias=t["bias"], teacher_softcap=t["softcap"], labels=labels,
                         divergence="forward_kl", reduction="sum", impl=cfg.impl)
            return ce, n, float(kl), "eval_kl"
        return ce, n, None, None

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def _model_state(self) -> dict:
        """The weights a checkpoint holds: all of them, or the trainable ones with LoRA; full
        (unsharded) tensors under FSDP2, collected on every process, kept by the main one."""
        model = self.acc.unwrap_model(self.student)
        if self._fsdp() or self.mesh is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            state = model.state_dict()
        if self.config.lora:
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            state = {n: t for n, t in state.items() if n in trainable}
        return state

    def _fsdp(self) -> bool:
        return "FSDP" in str(self.acc.distributed_type)

    def save_checkpoint(self) -> Path:
        """Writes ``output_dir/checkpoint-{step}`` (atomic, checksummed); returns its path."""
        from accelerate.utils import gather_object

        acc = self.acc
        rng = ckpt.rng_state()
        rngs = gather_object([rng]) if acc.num_processes > 1 else [rng]
        check_finite_weights(self.student, self.step, self._all_processes_sum)  # never over good ones
        model_state = self._model_state()
        optimizer_state = self._optimizer_state()
        path = self.out / f"checkpoint-{self.step:08d}"
        if acc.is_main_process:
            state = {"model": model_state, "optimizer": optimizer_state,
                     "scheduler": self.scheduler.state_dict(), "rng": rngs,
                     "trainer": {"step": self.step, "sampler": self.sampler.state_dict(),
                                 "config": self.config.to_dict(), "history": self.history,
                                 "processes": acc.num_processes}}
            path = ckpt.save_checkpoint(self.out, self.step, state, keep=self.config.keep_checkpoints)
        acc.wait_for_everyone()
        return path

    def _optimizer_state(self) -> dict:
        if self.mesh is not None:  # every process's own shards, in process order (same layout to resume)
            from accelerate.utils import gather_object

            from .tensor_parallel import local_optimizer_state
            return {"per_process": gather_object([local_optimizer_state(self.optimizer)])}
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.acc.unwrap_model(self.student), self.optimizer.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _maybe_resume(self) -> None:
        cfg = self.config
        if cfg.resume == "never":
            # starting over replaces the run in output_dir: its checkpoints (some of a later step
            # than this run will reach) must not be picked up by a later resume=auto
            if self.acc.is_main_process:
                for old in ckpt.list_checkpoints(self.out):
                    ckpt.delete_checkpoint(old)
            self.acc.wait_for_everyone()
            return
        path = ckpt.latest_checkpoint(self.out) if cfg.resume == "auto" else Path(cfg.resume)
        if path is None:
            return
        state = ckpt.load_checkpoint(path)
        trainer = state["trainer"]
        if trainer["processes"] != self.acc.num_processes:
            raise ValueError(f"resume: {path} was written by {trainer['processes']} processes, this run has "
                             f"{self.acc.num_processes}; an exact resume needs the same number")
        resumable = _RESUMABLE | ({"max_steps"} if cfg.lr_schedule == "constant" else set())
        changed = [k for k, v in trainer["config"].items()
                   if k not in resumable and k != "token_select" and getattr(cfg, k, None) != v]
        if _selection(trainer["config"]) != _selection(cfg.to_dict()):
            changed.append("token_select")
        if changed:
            raise ValueError(f"resume: {path} was trained with other settings ({', '.join(sorted(changed))}); "
                             "use a new output_dir or resume=never")
        model = self.acc.unwrap_model(self.student)
        if self.mesh is not None:
            from .tensor_parallel import load_full_model_state, load_local_optimizer_state
            load_full_model_state(model, state["model"])
            load_local_optimizer_state(self.optimizer, state["optimizer"]["per_process"][self.acc.process_index])
        elif self._fsdp():
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False, strict=not cfg.lora)
            set_model_state_dict(model, state["model"], options=options)
            set_optimizer_state_dict(model, self.optimizer.optimizer, state["optimizer"], options=options)
        else:
            unexpected = model.load_state_dict(state["model"], strict=not cfg.lora).unexpected_keys
            if unexpected:
                raise ValueError(f"resume: {path} holds weights this model does not have ({unexpected[:3]}...)")
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(trainer["sampler"])
        self.step, self.history = int(trainer["step"]), list(trainer["history"])
        ckpt.set_rng_state(state["rng"][self.acc.process_index])
        if self.acc.is_main_process:
            # resuming an earlier checkpoint abandons the later ones: a later resume=auto must
            # not pick them up
            for later in ckpt.list_checkpoints(self.out):
                if ckpt.checkpoint_step(later) > self.step:
                    ckpt.delete_checkpoint(later)
            print(f"fastkd train: resumed from {path} at step {self.step}")
        self.acc.wait_for_everyone()

    def save_model(self, directory: Path) -> None:
        """The trained student (or its LoRA adapter) and tokenizer, ``save_pretrained`` in safetensors."""
        acc = self.acc
        state = acc.get_state_dict(self.student) if self._fsdp() else None
        if self.mesh is not None:
            state = self._model_state()
        if acc.is_main_process:
            model = acc.unwrap_model(self.student)
            model.save_pretrained(directory, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
        acc.wait_for_everyone()

    def save_merged(self, directory: Path) -> None:
        """The base model with the LoRA adapter merged into its weights, ``save_pretrained`` in
        safetensors (loadable without peft). The trained model is merged in place: call it last."""
        if self._fsdp():
            raise ValueError("merge_lora: merging under FSDP is not supported; merge output_dir/final with "
                             "peft's merge_and_unload() after the run")
        if self.acc.is_main_process:
            merged = self.acc.unwrap_model(self.student).merge_and_unload()
            merged.save_pretrained(directory, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
        self.acc.wait_for_everyone()


# Keys a resumed run may change (where to log, how often, how long).
# (max_steps too with a constant schedule: cosine and linear depend on it.)
_RESUMABLE = {"resume", "eval_every", "eval_batches", "save_every", "keep_checkpoints", "log_every",
              "progress", "tensorboard", "save_final", "output_dir", "eval_data", "eval_cache",
              "merge_lora", "report_to", "on_nonfinite"}


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a rollout: the generation config's (several for chat models) and the
    tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _accelerator(bf16: bool, trackers: tuple = (), output_dir: str = "."):
    """An ``Accelerator`` for this run (with ``trackers``, logging under ``output_dir``).
    accelerate keeps one process-wide state; a run in the same process as an earlier one with
    another precision (tests, the demo) gets that state reset (the process group,
    ``PartialState``, is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    wanted = "bf16" if bf16 else "no"
    if AcceleratorState._shared_state.get("_mixed_precision", wanted) != wanted:
        AcceleratorState._reset_state()
    if not trackers:
        return Accelerator(mixed_precision=wanted)
    from accelerate.utils import ProjectConfiguration

    # TensorBoard writes under output_dir/tb/fastkd
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "tb"))
    return Accelerator(mixed_precision=wanted, log_with=list(trackers), project_config=project)


def _scheduler(cfg: TrainConfig, optimizer):
    """The learning-rate schedule, from ``transformers.get_scheduler``: warm-up, then fastkd's
    ``cosine``/``linear`` down to ``min_lr_ratio · lr`` and ``constant`` (HF's
    ``constant_with_warmup``), or the HF schedule of that name."""
    from transformers import get_scheduler

    name, extra = cfg.lr_schedule, {}
    if name == "constant":
        name = "constant_with_warmup"
    elif name == "cosine" and cfg.min_lr_ratio > 0:
        name, extra = "cosine_with_min_lr", {"min_lr_rate": cfg.min_lr_ratio}
    elif name == "linear" and cfg.min_lr_ratio > 0:
        name, extra = "polynomial", {"lr_end": cfg.min_lr_ratio * cfg.lr, "power": 1.0}
    elif name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        extra = {"min_lr_rate": cfg.min_lr_ratio}
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps,
                         scheduler_specific_kwargs=extra or None)


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id: absolute, ``./``, ``../``, ``~``, more than one ``/``, a
    Windows drive, or a first component that exists here."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name or ":" in name:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def _check_local(key: str, name: Optional[str]) -> None:
    if name and _looks_local(name) and not Path(name).expanduser().exists():
        parent = Path(name).expanduser().parent
        hint = f" (no directory {parent})" if not parent.is_dir() else ""
        raise ValueError(f"{key}: {name} does not exist{hint}")


def _load_model(auto, key: str, name: str):
    """``auto.from_pretrained(name)`` with a failure as one ``ValueError`` naming ``key``."""
    try:
        return auto.from_pretrained(name)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = "a local directory without a model" if Path(name).is_dir() else "not a local directory, and the Hub"
        raise ValueError(f"{key}: cannot load {name} ({where}: {first})") from None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                    "vocab.txt", "sentencepiece.bpe.model")


def _make_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fastkd-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"output_dir: cannot write to {out} ({error.strerror or error})") from None


def _ce_term(cfg: TrainConfig, loss: float, kd: float) -> Optional[float]:
    """The step's mean CE from its loss ``ce_weight·CE + kd_weight·τ²·KD`` (None without a CE term,
    in on_policy, whose rollouts have none, and in cross_tokenizer, whose loss has a chunk term)."""
    if cfg.ce_weight == 0 or cfg.mode in ("on_policy", "cross_tokenizer"):
        return None
    kd_part = 0.0 if cfg.mode == "sft" else cfg.kd_weight * cfg.temperature ** 2 * kd
    return (loss - kd_part) / cfg.ce_weight


def _fused_ce(hidden: Tensor, head: dict, labels: Tensor, impl: str, **options):
    """Next-token CE of the counted rows, fused (no logits tensor): the top-k loss with an empty
    set (every slot ``-1``) and ``kd_weight=0``."""
    ids = torch.full((*labels.shape, 1), -1, dtype=torch.int64, device=labels.device)
    return topk_kd_loss(hidden, head["weight"], ids, torch.zeros(ids.shape, device=labels.device), bias=head["bias"],
                        softcap=head["softcap"], labels=labels, kd_weight=0.0, impl=impl, **options)


def _ce_sum(hidden: Tensor, head: dict, labels: Tensor, impl: str) -> float:
    """Summed next-token CE of the counted rows."""
    return float(_fused_ce(hidden, head, labels, impl, ce_weight=1.0, reduction="sum"))


def _load_tokenizer(name: str, key: str = "tokenizer"):
    from transformers import AutoTokenizer

    if Path(name).is_dir() and not any((Path(name) / f).exists() for f in _TOKENIZER_FILES):
        hint = " (or set tokenizer)" if key == "student" else ""
        raise ValueError(f"{key}: {name} holds no tokenizer ({', '.join(_TOKENIZER_FILES[:2])}, ...); save the "
                         f"tokenizer there{hint}")
    return _load_model(AutoTokenizer, key, name)


def train(config: TrainConfig, **kwargs) -> dict:
    """``Trainer(config, **kwargs).train()``."""
    return Trainer(config, **kwargs).train()

