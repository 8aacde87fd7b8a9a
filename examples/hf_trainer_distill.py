"""Distil with ``transformers.Trainer``: fastkd's DistillationTrainer, online teacher or offline top-k.

    python examples/hf_trainer_distill.py                 # online teacher model, full-vocabulary JSD
    python examples/hf_trainer_distill.py --offline       # teacher top-k stored in the dataset

Everything is built locally (tiny random Llama teacher and student, random token data), so it
runs on a CPU in seconds and downloads nothing; swap in ``from_pretrained`` models and a real
dataset for the real thing. With a real teacher, its top-k would come from a cache (``fastkd
cache``) or from vLLM ``prompt_logprobs``; here it is computed once from the teacher.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
import transformers as tf
from torch.utils.data import Dataset

from fastkd.integrations import compute_kd_loss, hidden_and_head
from fastkd.integrations.trainer import DistillationTrainer

VOCAB, LENGTH, SEQUENCES, TOPK = 512, 32, 64, 16


def tiny_llama(seed: int, width: int):
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return tf.AutoModelForCausalLM.from_config(config)


class TokenData(Dataset):
    """Dicts of tensors; with a teacher, also its top-k of every position (an offline cache)."""

    def __init__(self, teacher=None):
        gen = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(3, VOCAB, (SEQUENCES, LENGTH), generator=gen)
        self.teacher_topk = None
        if teacher is not None:
            with torch.no_grad():
                out = hidden_and_head(teacher.eval(), input_ids=self.input_ids)
                logits = out["hidden"] @ out["weight"].T  # fine for a tiny teacher; use a cache for real ones
                self.teacher_topk = torch.log_softmax(logits, dim=-1).topk(TOPK, dim=-1)

    def __len__(self):
        return SEQUENCES

    def __getitem__(self, i):
        item = {"input_ids": self.input_ids[i], "labels": self.input_ids[i]}
        if self.teacher_topk is not None:
            item["teacher_ids"] = self.teacher_topk.indices[i]        # (T, K), aligned with input_ids
            item["teacher_logprobs"] = self.teacher_topk.values[i]    # (T, K), full-softmax log-probs
        return item


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--offline", action="store_true", help="teacher top-k in the dataset, no teacher model")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    teacher, student = tiny_llama(1, 96), tiny_llama(0, 48)
    if args.offline:
        data = TokenData(teacher)
        kd = dict(divergence="reverse_kl", tail="bucket", ce_weight=0.1)
        teacher_model = None
    else:
        data = TokenData()
        kd = dict(divergence="jsd", beta=0.5, temperature=1.0, ce_weight=0.1)
        teacher_model = teacher

    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in data[0]}
    before = compute_kd_loss(student, batch, teacher_model, **kd).item()
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = tf.TrainingArguments(
            output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=3e-3,
            logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
        trainer = DistillationTrainer(model=student, args=training_args, train_dataset=data,
                                      teacher_model=teacher_model, **kd)
        trainer.train()
    after = compute_kd_loss(student, batch, teacher_model, **kd).item()
    mode = "offline top-k" if args.offline else "online teacher"
    print(f"{mode}: loss on the training set {before:.4f} -> {after:.4f} after {args.steps} steps")


if __name__ == "__main__":
    main()
