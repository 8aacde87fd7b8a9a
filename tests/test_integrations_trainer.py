"""fastkd.integrations.trainer: DistillationTrainer trains (online and offline teacher), GKDLossMixin.

Tiny float32 Llama students and teachers from configs (no downloads), CPU, a few optimiser steps,
nothing written outside pytest's tmp_path.
"""
from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from torch.utils.data import Dataset

import fastkd
from fastkd.integrations import compute_kd_loss, hidden_and_head
from fastkd.integrations.trainer import DistillationTrainer, GKDLossMixin
from conftest import assert_rel_close

V, T, N_SEQUENCES, K = 131, 12, 16, 8


def _llama(seed, dim):
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=V, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return tf.AutoModelForCausalLM.from_config(config)


class _Sequences(Dataset):
    """Random token sequences (the last two of every fourth sequence padded), as dicts of tensors."""

    def __init__(self, seed, teacher=None):
        gen = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(3, V, (N_SEQUENCES, T), generator=gen)
        self.attention_mask = torch.ones(N_SEQUENCES, T, dtype=torch.long)
        self.attention_mask[::4, -2:] = 0
        self.input_ids = self.input_ids.masked_fill(self.attention_mask == 0, 0)
        self.labels = self.input_ids.masked_fill(self.attention_mask == 0, -100)
        self.teacher_fields = None
        if teacher is not None:  # an offline cache: the teacher's top-k of every position
            with torch.no_grad():
                out = hidden_and_head(teacher.eval(), input_ids=self.input_ids, attention_mask=self.attention_mask)
                logprobs = torch.log_softmax(out["hidden"] @ out["weight"].T, -1)
            top = logprobs.topk(K, dim=-1)
            self.teacher_fields = (top.indices, top.values)

    def __len__(self):
        return N_SEQUENCES

    def __getitem__(self, i):
        item = dict(input_ids=self.input_ids[i], attention_mask=self.attention_mask[i], labels=self.labels[i])
        if self.teacher_fields is not None:
            item.update(teacher_ids=self.teacher_fields[0][i], teacher_logprobs=self.teacher_fields[1][i])
        return item

    def all(self):
        return {k: torch.stack([self[i][k] for i in range(len(self))]) for k in self[0]}


def _args(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4,
                   per_device_eval_batch_size=N_SEQUENCES, learning_rate=1e-2, lr_scheduler_type="constant",
                   warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
                   use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    options.update(overrides)
    return tf.TrainingArguments(**options)


def _logged_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_online_teacher_loss_goes_down(tmp_path):
    student, teacher = _llama(0, 32), _llama(1, 48)
    data = _Sequences(2)
    options = dict(divergence="jsd", beta=0.5, temperature=1.5, ce_weight=0.1, topk=16, topk_from="union")
    before = compute_kd_loss(student, data.all(), teacher, **options).item()
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), train_dataset=data, eval_dataset=data,
                                  teacher_model=teacher, **options)
    assert not any(p.requires_grad for p in teacher.parameters())
    trainer.train()
    after = compute_kd_loss(student, data.all(), teacher, **options).item()
    assert after < 0.8 * before, f"KD loss on the training set went from {before:.4f} to {after:.4f}"
    losses = _logged_losses(trainer)
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    # evaluation reports the same loss, on one batch holding the whole set
    assert trainer.evaluate()["eval_loss"] == pytest.approx(after, rel=1e-5)
    assert not list(tmp_path.iterdir()), "the trainer wrote files although save_strategy='no'"


def test_offline_teacher_fields_with_gradient_accumulation(tmp_path):
    student = _llama(3, 32)
    data = _Sequences(4, teacher=_llama(5, 48))
    options = dict(divergence="reverse_kl", tail="bucket", ce_weight=0.5)
    before = compute_kd_loss(student, data.all(), **options).item()
    trainer = DistillationTrainer(model=student, args=_args(tmp_path, gradient_accumulation_steps=2,
                                                            max_steps=8, per_device_train_batch_size=2),
                                  train_dataset=data, **options)
    trainer.train()
    after = compute_kd_loss(student, data.all(), **options).item()
    assert after < 0.8 * before, f"loss on the training set went from {before:.4f} to {after:.4f}"
    assert len(_logged_losses(trainer)) == 8


def test_trainer_loss_is_the_fused_loss_of_the_batch(tmp_path):
    """compute_loss of the Trainer with num_items_in_batch: sum over counted rows / num_items."""
    student, teacher = _llama(6, 32), _llama(7, 48)
    batch = _Sequences(8).all()
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher,
                                  divergence="forward_kl", temperature=2.0)
    mean = trainer.compute_loss(student, batch)
    counted = (batch["labels"][:, 1:] != -100).sum()
    summed = trainer.compute_loss(student, batch, num_items_in_batch=3 * counted)
    assert_rel_close(summed, mean / 3, 1e-6, "num_items_in_batch normalisation")
    direct = compute_kd_loss(student, batch, teacher, divergence="forward_kl", temperature=2.0)
    assert_rel_close(mean, direct, 1e-6, "trainer loss vs compute_kd_loss")


def test_trainer_rejects_bad_options(tmp_path):
    student = _llama(9, 32)
    with pytest.raises(ValueError, match="divergence must be one of"):
        DistillationTrainer(model=student, args=_args(tmp_path), divergence="kl")
    with pytest.raises(ValueError, match="beta must be <= 1.0"):
        DistillationTrainer(model=student, args=_args(tmp_path), beta=1.5)
    with pytest.raises(ValueError, match="topk applies to an online teacher"):
        DistillationTrainer(model=student, args=_args(tmp_path), topk=8)
    with pytest.raises(ValueError, match="topk must be None or a positive int"):
        DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=_llama(10, 32), topk=0)
    with pytest.raises(TypeError, match="teacher_model must be None or a torch.nn.Module"):
        DistillationTrainer(model=student, args=_args(tmp_path), teacher_model="gpt2")
    with pytest.raises(ValueError, match="compute_loss_func cannot be combined"):
        DistillationTrainer(model=student, args=_args(tmp_path), compute_loss_func=lambda *a, **k: 0.0)


class _GKDShaped(GKDLossMixin, tf.Trainer):
    """Stands in for trl's GKDTrainer (which this test must not need): teacher_model and beta."""

    def __init__(self, *args, teacher_model, beta, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_model, self.beta = teacher_model, beta


def test_gkd_mixin_is_trl_generalised_jsd(tmp_path):
    """The mixin's loss is GKD's: JSD(β) of full softmaxes at τ=1 over labels[:, 1:] != -100."""
    student, teacher = _llama(11, 32).double(), _llama(12, 48).double().eval()
    batch = _Sequences(13).all()
    batch["labels"][:, :4] = -100  # a prompt: only completions are distilled
    trainer = _GKDShaped(model=student, args=_args(tmp_path), teacher_model=teacher, beta=0.2)
    loss = trainer.compute_loss(student, dict(batch, prompts=batch["input_ids"][:, :4]))  # extra keys ignored

    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    log_p = torch.log_softmax(student(**inputs).logits[:, :-1], -1)
    with torch.no_grad():
        log_q = torch.log_softmax(teacher(**inputs).logits[:, :-1], -1)
    log_m = torch.logsumexp(torch.stack([log_q + math.log(0.2), log_p + math.log(0.8)]), 0)
    jsd = 0.2 * (log_q.exp() * (log_q - log_m)).sum(-1) + 0.8 * (log_p.exp() * (log_p - log_m)).sum(-1)
    mask = batch["labels"][:, 1:] != -100
    ref = jsd[mask].mean()
    assert_rel_close(loss, ref, 1e-10, "GKD mixin loss")
    params = [p for p in student.parameters()]
    for g, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        assert_rel_close(g, r, 1e-10, "GKD mixin gradient")

    trainer.fastkd_options = {"topk": 8, "tail": "renormalize"}
    topk_loss = trainer.compute_loss(student, batch)
    direct = fastkd.integrations.compute_kd_loss(student, batch, teacher, divergence="jsd", beta=0.2,
                                                 topk=8, tail="renormalize")
    assert_rel_close(topk_loss, direct, 1e-12, "GKD mixin with fastkd_options")


def test_trainer_logs_the_kd_and_ce_terms_apart(tmp_path):
    student, teacher = _llama(0, 32), _llama(1, 48)
    data = _Sequences(2)
    options = dict(divergence="forward_kl", temperature=1.0, ce_weight=0.5, kd_weight=1.0)
    trainer = DistillationTrainer(model=student, args=_args(tmp_path, max_steps=3), train_dataset=data,
                                  eval_dataset=data, teacher_model=teacher, **options)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:  # the logged loss is its two terms, each logged
        assert entry["kd"] > 0 and entry["ce"] > 0
        assert entry["loss"] == pytest.approx(0.5 * entry["ce"] + entry["kd"], rel=1e-3)
    metrics = trainer.evaluate()  # one batch of every sequence: the terms of the whole data
    student.eval()
    batch = data.all()
    kd = compute_kd_loss(student, batch, teacher, divergence="forward_kl", kd_weight=1.0).item()
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), batch["labels"][:, 1:].reshape(-1)).item()
    assert metrics["eval_kd"] == pytest.approx(kd, rel=1e-4) and metrics["eval_ce"] == pytest.approx(ce, rel=1e-4)
    assert metrics["eval_loss"] == pytest.approx(0.5 * ce + kd, rel=1e-4)
