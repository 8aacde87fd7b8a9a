"""TRL's GKD (on-policy distillation, generalised JSD with β) with fastkd's fused loss.

    pip install trl          # this example needs it; fastkd does not
    python examples/trl_gkd.py

The only change to a GKD script is the trainer class:

    from trl.experimental.gkd import GKDTrainer
    from fastkd.integrations.trainer import GKDLossMixin

    class FastGKDTrainer(GKDLossMixin, GKDTrainer):
        fastkd_options = {}          # e.g. {"topk": 64} or {"vocab_size": len(tokenizer)}

``GKDTrainer`` still samples student completions with probability ``lmbda`` (and ``seq_kd``);
``compute_loss`` now takes hidden states and LM heads instead of both models' full logits. Here
the tokenizer, the chat data and both models are built locally (tiny and random), so nothing is
downloaded and it runs on a CPU in seconds.
"""
from __future__ import annotations

import sys
import tempfile

try:
    import datasets
    from trl.experimental.gkd import GKDConfig, GKDTrainer
except ImportError as error:  # trl is optional for fastkd
    sys.exit(f"examples/trl_gkd.py needs TRL (and its `datasets` dependency): pip install trl  ({error})")

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

from fastkd.integrations.trainer import GKDLossMixin

WORDS = ["<pad>", "<eos>", "<unk>", "user:", "assistant:", "\n"] + [f"w{i}" for i in range(250)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} \n {% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}")


class FastGKDTrainer(GKDLossMixin, GKDTrainer):
    """GKDTrainer whose loss is fastkd's fused generalised JSD (β = GKDConfig.beta)."""


def local_tokenizer():
    vocab = {word: i for i, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                           unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(seed, width, tokenizer):
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            initializer_range=0.1, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return tf.AutoModelForCausalLM.from_config(config)


def chat_data(n=32):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        words = [f"w{i}" for i in torch.randint(0, 250, (10,), generator=gen).tolist()]
        rows.append({"messages": [{"role": "user", "content": " ".join(words[:4])},
                                  {"role": "assistant", "content": " ".join(words[4:])}]})
    return datasets.Dataset.from_list(rows)


def main():
    tokenizer = local_tokenizer()
    student, teacher = tiny_llama(0, 48, tokenizer), tiny_llama(1, 96, tokenizer)
    with tempfile.TemporaryDirectory() as output_dir:
        config = GKDConfig(output_dir=output_dir, max_steps=10, per_device_train_batch_size=4, learning_rate=3e-3,
                           lmbda=0.5, beta=0.5, max_new_tokens=6, logging_steps=5, save_strategy="no",
                           report_to=[], use_cpu=True, disable_tqdm=True)
        trainer = FastGKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=chat_data(),
                                 processing_class=tokenizer)
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"GKD with fastkd's fused JSD (beta={config.beta}, lmbda={config.lmbda}): logged losses {losses}")

    # The fused loss is GKD's own generalised JSD, computed without the logits:
    batch = trainer.data_collator([chat_data()[i] for i in range(4)])
    student.eval()
    with torch.no_grad():
        fused = trainer.compute_loss(student, batch)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        reference = GKDTrainer.generalized_jsd_loss(student(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1],
                                                    labels=batch["labels"][:, 1:], beta=config.beta)
    print(f"one batch: fastkd {fused.item():.6f}, GKDTrainer.generalized_jsd_loss from full logits {reference.item():.6f}")


if __name__ == "__main__":
    main()
