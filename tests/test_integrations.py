"""fastkd.integrations: hidden states + LM head of HF causal LMs give the losses of their full logits.

Every family is a tiny, randomly initialised model built from its config (no downloads), in
float64. The reference is written the usual way, independently of fastkd: ``model(**batch).logits``,
``torch.log_softmax``, the divergence summed over the vocabulary (top-k buckets for the offline
case). Loss and the gradients of every trainable parameter are compared.
"""
from __future__ import annotations

import math

import peft
import pytest
import torch
import transformers as tf
from torch import nn

import fastkd
from fastkd.integrations import compute_kd_loss, hidden_and_head
from conftest import assert_rel_close

# float64 end to end: the only differences are summation orders.
TOL = 1e-10
# V=157 (prime, not a tile multiple); D=32 student, 48 teacher (a wider teacher); T=9, B=3.
V, D, D_TEACHER, B, T, K = 157, 32, 48, 3, 9, 6
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Larger than the default 0.02 so that logits span a few units: the softmax is not near uniform
# and Gemma-2's cap of 2.0 bends them.
_INIT = 0.2


def _decoder_config(cls, dim, vocab, **extra):
    return cls(vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               initializer_range=_INIT, **_IDS, **extra)


# name -> config builder (dim, vocab); each exercises what its family does after the final norm.
FAMILIES = {
    "llama": lambda d, v: _decoder_config(tf.LlamaConfig, d, v),
    "qwen2-tied": lambda d, v: _decoder_config(tf.Qwen2Config, d, v, tie_word_embeddings=True),
    "qwen3": lambda d, v: _decoder_config(tf.Qwen3Config, d, v, head_dim=8),
    "mistral": lambda d, v: _decoder_config(tf.MistralConfig, d, v),
    "gemma2-softcap-tied": lambda d, v: _decoder_config(tf.Gemma2Config, d, v, head_dim=8,
                                                        final_logit_softcapping=2.0),
    "phi3": lambda d, v: _decoder_config(tf.Phi3Config, d, v),
    "gpt2-tied": lambda d, v: tf.GPT2Config(vocab_size=v, n_embd=d, n_layer=2, n_head=4, n_positions=64,
                                            initializer_range=_INIT, bos_token_id=1, eos_token_id=2),
    "cohere-logit-scale-tied": lambda d, v: _decoder_config(tf.CohereConfig, d, v, logit_scale=0.5),
    "granite-logits-scaling": lambda d, v: _decoder_config(tf.GraniteConfig, d, v, logits_scaling=0.25),
    "phi-head-bias": lambda d, v: _decoder_config(tf.PhiConfig, d, v),
}


def _model(family, seed, dim=D, vocab=V):
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(FAMILIES[family](dim, vocab), attn_implementation="eager")
    return model.double().eval()


def _batch(seed, vocab=V, with_labels=True):
    """Right-padded batch: row 1 has 3 padding positions; labels mask a 2-token prompt per row."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (B, T), generator=gen)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, -3:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    if with_labels:
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :2] = -100
        batch["labels"] = labels
    return batch


def _teacher_topk(seed, rows, positions, vocab=V, k=K):
    """A random teacher's exact top-k ids and full-softmax log-probs, (rows, positions, k)."""
    gen = torch.Generator().manual_seed(seed)
    logprobs = torch.log_softmax(torch.randn(rows, positions, vocab, generator=gen, dtype=torch.float64) * 2, -1)
    ids = logprobs.topk(k, dim=-1).indices
    return ids, logprobs.gather(-1, ids)


def _apply_head(out):
    logits = out["hidden"] @ out["weight"].T
    if out["bias"] is not None:
        logits = logits + out["bias"]
    if out["softcap"] is not None:
        logits = out["softcap"] * torch.tanh(logits / out["softcap"])
    return logits


# ---------------------------------------------------------------- references from full logits


def _mean_over_counted(rows, labels):
    counted = labels != -100
    return torch.where(counted, rows, 0.0).sum() / counted.sum()


def _cross_entropy_rows(logits, labels):
    logp = torch.log_softmax(logits, -1)
    return -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def _reference_topk_reverse_kl(logits, labels, ids, teacher_logprobs, temperature, ce_weight):
    """Top-k reverse KL with the tail bucket, from full logits: Σ_c P_c (log P_c − log Q_c)."""
    logp = torch.log_softmax(logits / temperature, -1)
    log_p_topk = logp.gather(-1, ids)
    log_p_tail = torch.log1p(-log_p_topk.exp().sum(-1, keepdim=True))
    log_q_tail = torch.log1p(-teacher_logprobs.exp().sum(-1, keepdim=True))
    log_p = torch.cat([log_p_topk, log_p_tail], -1)
    log_q = torch.cat([teacher_logprobs, log_q_tail], -1)
    kd = (log_p.exp() * (log_p - log_q)).sum(-1)
    rows = temperature**2 * kd + ce_weight * _cross_entropy_rows(logits, labels)
    return _mean_over_counted(rows, labels)


def _reference_jsd(logits, teacher_logits, labels, beta, temperature, ce_weight):
    """Generalised JSD over the full vocabulary: β·KL(Q‖M) + (1−β)·KL(P‖M), M = βQ + (1−β)P."""
    log_p = torch.log_softmax(logits / temperature, -1)
    log_q = torch.log_softmax(teacher_logits / temperature, -1)
    log_m = torch.logsumexp(torch.stack([log_q + math.log(beta), log_p + math.log(1 - beta)]), 0)
    kd = (beta * (log_q.exp() * (log_q - log_m)).sum(-1)
          + (1 - beta) * (log_p.exp() * (log_p - log_m)).sum(-1))
    rows = temperature**2 * kd + ce_weight * _cross_entropy_rows(logits, labels)
    return _mean_over_counted(rows, labels)


def _grads(loss, model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def _assert_same_loss_and_grads(loss, ref, model, what):
    assert_rel_close(loss, ref, TOL, f"{what}: loss")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, g, r in zip(names, _grads(loss, model), _grads(ref, model)):
        assert r.abs().max() > 0, f"{what}: reference gradient of {name} is zero (a vacuous check)"
        assert_rel_close(g, r, TOL, f"{what}: grad {name}")


# ---------------------------------------------------------------- hidden_and_head per family


@pytest.mark.parametrize("family", FAMILIES)
def test_head_reproduces_the_model_logits(family):
    model = _model(family, seed=0)
    batch = _batch(1)
    out = hidden_and_head(model, **batch)  # labels in the batch are dropped
    assert set(out) == {"hidden", "weight", "bias", "softcap"}
    assert out["hidden"].shape == (B, T, model.get_input_embeddings().weight.shape[1])
    assert out["weight"].shape[0] == V
    head = model.get_output_embeddings()
    assert out["weight"] is head.weight  # the parameter itself, tied or not
    if model.config.tie_word_embeddings:
        assert head.weight is model.get_input_embeddings().weight
    assert (out["softcap"] is not None) == ("softcap" in family)
    assert (out["bias"] is not None) == ("bias" in family)
    reference = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert_rel_close(_apply_head(out), reference, TOL, f"{family}: softcap(h·Wᵀ + b) vs logits")


@pytest.mark.parametrize("family", FAMILIES)
def test_offline_topk_matches_full_logits(family):
    """The README's drop-in: hidden_and_head, shift, fastkd.topk_kd_loss — against log_softmax(logits)."""
    model = _model(family, seed=2)
    batch = _batch(3)
    ids, logprobs = _teacher_topk(4, B, T - 1)
    labels = batch["labels"][:, 1:]
    options = dict(temperature=1.7, ce_weight=0.3)

    out = hidden_and_head(model, **batch)
    loss = fastkd.topk_kd_loss(out["hidden"][:, :-1], out["weight"], ids, logprobs, bias=out["bias"],
                               softcap=out["softcap"], labels=labels, divergence="reverse_kl",
                               tail="bucket", impl="auto", **options)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = _reference_topk_reverse_kl(logits[:, :-1], labels, ids, logprobs, **options)
    _assert_same_loss_and_grads(loss, ref, model, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_online_jsd_matches_full_logits(family):
    """compute_kd_loss with an online teacher (wider than the student): shift, labels, both heads."""
    student, teacher = _model(family, seed=5), _model(family, seed=6, dim=D_TEACHER)
    batch = _batch(7)
    options = dict(beta=0.3, temperature=2.0, ce_weight=0.2)
    loss = compute_kd_loss(student, batch, teacher, divergence="jsd", **options)
    model_inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        teacher_logits = teacher(**model_inputs).logits
    ref = _reference_jsd(student(**model_inputs).logits[:, :-1], teacher_logits[:, :-1],
                         batch["labels"][:, 1:], **options)
    _assert_same_loss_and_grads(loss, ref, student, family)
    assert all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------- vocabulary padding


def test_vocab_size_slices_differently_padded_heads():
    """Teacher and student share a tokenizer of 150 tokens, their heads are padded to 176 and 160."""
    shared = 150
    student = _model("qwen2-tied", seed=8, vocab=160)
    teacher = _model("llama", seed=9, dim=D_TEACHER, vocab=176)
    batch = _batch(10, vocab=shared)

    out = hidden_and_head(student, vocab_size=shared, **batch)
    assert out["weight"].shape == (shared, D)
    full = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert_rel_close(_apply_head(out), full[..., :shared], TOL, "sliced head vs sliced logits")

    with pytest.raises(ValueError, match="vocab_size="):
        compute_kd_loss(student, batch, teacher)
    loss = compute_kd_loss(student, batch, teacher, vocab_size=shared, divergence="jsd", beta=0.6)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = _reference_jsd(full[:, :-1, :shared], teacher_logits[:, :-1, :shared], batch["labels"][:, 1:],
                         beta=0.6, temperature=1.0, ce_weight=0.0)
    _assert_same_loss_and_grads(loss, ref, student, "vocab_size")

    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, 160\].*never padded"):
        hidden_and_head(student, vocab_size=176, **batch)
    with pytest.raises(ValueError, match="vocab_size must be in"):
        hidden_and_head(student, vocab_size=0, **batch)
    with pytest.raises(TypeError, match="vocab_size must be None or an int"):
        hidden_and_head(student, vocab_size=150.0, **batch)


# ---------------------------------------------------------------- compute_kd_loss alignment


def test_compute_kd_loss_offline_alignment_and_num_items():
    model = _model("llama", seed=11)
    batch = _batch(12, with_labels=False)  # targets: input_ids, padding ignored
    ids, logprobs = _teacher_topk(13, B, T)  # aligned with input_ids: the last position is dropped
    targets = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:]

    loss = compute_kd_loss(model, dict(batch, teacher_ids=ids, teacher_logprobs=logprobs),
                           temperature=1.3, ce_weight=0.5)
    logits = model(**batch).logits[:, :-1]
    ref = _reference_topk_reverse_kl(logits, targets, ids[:, :-1], logprobs[:, :-1], 1.3, 0.5)
    _assert_same_loss_and_grads(loss, ref, model, "offline, unshifted teacher fields")

    shifted = compute_kd_loss(model, dict(batch, teacher_ids=ids[:, :-1], teacher_logprobs=logprobs[:, :-1]),
                              temperature=1.3, ce_weight=0.5)
    assert_rel_close(shifted, loss, TOL, "shifted teacher fields")

    counted = (targets != -100).sum()
    summed = compute_kd_loss(model, dict(batch, teacher_ids=ids, teacher_logprobs=logprobs),
                             temperature=1.3, ce_weight=0.5, num_items_in_batch=2 * counted)
    assert_rel_close(summed, loss / 2, TOL, "num_items_in_batch: sum / num_items")


def test_compute_kd_loss_rejects_bad_batches():
    model, teacher = _model("llama", seed=14), _model("llama", seed=15)
    batch = _batch(16)
    ids, logprobs = _teacher_topk(17, B, T)
    with pytest.raises(ValueError, match="either teacher="):
        compute_kd_loss(model, dict(batch, teacher_ids=ids, teacher_logprobs=logprobs), teacher)
    with pytest.raises(ValueError, match="no teacher"):
        compute_kd_loss(model, batch)
    with pytest.raises(ValueError, match="topk=4 applies to an online teacher"):
        compute_kd_loss(model, dict(batch, teacher_ids=ids, teacher_logprobs=logprobs), topk=4)
    with pytest.raises(ValueError, match=r"batch\['teacher_logprobs'\] must be a \(B, T, K\)"):
        compute_kd_loss(model, dict(batch, teacher_ids=ids))
    with pytest.raises(ValueError, match=r"must have shape \(3, 9, K\).*or \(3, 8, K\)"):
        compute_kd_loss(model, dict(batch, teacher_ids=ids[:, :5], teacher_logprobs=logprobs[:, :5]))
    with pytest.raises(TypeError, match="batch must be a mapping"):
        compute_kd_loss(model, [batch["input_ids"]], teacher)
    with pytest.raises(ValueError, match="labels or input_ids"):
        compute_kd_loss(model, {"inputs_embeds": torch.zeros(B, T, D, dtype=torch.float64)}, teacher)
    with pytest.raises(ValueError, match="divergence must be one of"):
        compute_kd_loss(model, batch, teacher, divergence="kl")


# ---------------------------------------------------------------- peft


@pytest.mark.parametrize("lora", [
    dict(target_modules=["q_proj", "v_proj"]),                   # adapters in the body only
    dict(target_modules=["q_proj", "lm_head"]),                  # LoRA on the head: W + s·B·A
    dict(target_modules=["v_proj"], modules_to_save=["lm_head"]),  # a trained copy of the head
], ids=["body", "lora-head", "modules-to-save-head"])
def test_peft_models(lora):
    base = _model("llama", seed=18)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))
    model.eval()
    batch = _batch(19)
    out = hidden_and_head(model, **batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert_rel_close(_apply_head(out), logits, TOL, "peft: softcap(h·Wᵀ + b) vs logits")

    ids, logprobs = _teacher_topk(20, B, T)
    loss = compute_kd_loss(model, dict(batch, teacher_ids=ids, teacher_logprobs=logprobs), ce_weight=0.1)
    ref = _reference_topk_reverse_kl(logits[:, :-1], batch["labels"][:, 1:], ids[:, :-1], logprobs[:, :-1],
                                     temperature=1.0, ce_weight=0.1)
    _assert_same_loss_and_grads(loss, ref, model, f"peft {sorted(lora)}")


# ---------------------------------------------------------------- models outside the families


class _TinyLM(nn.Module):
    """A causal LM of a few lines whose logits go through ``post`` after the head."""

    def __init__(self, post, call_head=True):
        super().__init__()
        self.embed = nn.Embedding(V, D, dtype=torch.float64)
        self.lm_head = nn.Linear(D, V, dtype=torch.float64)
        self.post, self.call_head = post, call_head

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids):
        hidden = torch.tanh(self.embed(input_ids))
        logits = self.lm_head(hidden) if self.call_head else hidden @ self.lm_head.weight.T
        return (self.post(logits),)


def test_unknown_model_with_scale_and_cap_not_in_any_config():
    """No config at all: the scale (0.7) and the cap (3.0) are read off the probe."""
    torch.manual_seed(21)
    model = _TinyLM(lambda z: 3.0 * torch.tanh(0.7 * z / 3.0))
    input_ids = torch.randint(0, V, (B, T))
    out = hidden_and_head(model, input_ids=input_ids)
    assert out["softcap"] == pytest.approx(3.0, rel=1e-12)
    assert_rel_close(_apply_head(out), model(input_ids)[0], TOL, "probed scale and cap")


@pytest.mark.parametrize("post, message", [
    (lambda z: z + 1.0, "transforms its logits after the LM head"),
    (lambda z: z**3, "transforms its logits after the LM head"),
    (lambda z: z.sum(-1), "did not return its LM-head output"),
])
def test_unsupported_logit_transforms_are_rejected(post, message):
    with pytest.raises(ValueError, match=message):
        hidden_and_head(_TinyLM(post), input_ids=torch.randint(0, V, (B, T)))


def test_models_without_a_usable_head_are_rejected():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        hidden_and_head("gpt2", input_ids=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="get_output_embeddings"):
        hidden_and_head(nn.Linear(3, 3), input_ids=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="never called its LM head"):
        hidden_and_head(_TinyLM(lambda z: z, call_head=False), input_ids=torch.randint(0, V, (B, T)))
    model = _TinyLM(lambda z: z)
    model.get_output_embeddings = lambda: None
    with pytest.raises(TypeError, match="returned NoneType, not an LM-head module"):
        hidden_and_head(model, input_ids=torch.randint(0, V, (B, T)))


def test_head_forward_is_restored():
    model = _model("llama", seed=22)
    head = model.get_output_embeddings()
    hidden_and_head(model, **_batch(23))
    assert "forward" not in head.__dict__
    assert model(input_ids=_batch(23)["input_ids"]).logits.shape == (B, T, V)
