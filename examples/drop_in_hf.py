"""Drop-in: replace ``log_softmax(model(**batch).logits)`` + KL by one fastkd call on hidden states.

    python examples/drop_in_hf.py                       # tiny random Gemma-2 (softcap, tied head)
    python examples/drop_in_hf.py --family cohere       # or llama, qwen2, gpt2 (all built locally)
    python examples/drop_in_hf.py --model Qwen/Qwen2.5-0.5B   # a hub or local checkpoint

Prints the fused loss next to the naive one computed from full logits (they agree), and how big
the logits tensor the fused loss never built would have been.
"""
from __future__ import annotations

import argparse

import torch
import transformers as tf

import fastkd
from fastkd.integrations import hidden_and_head

TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "gemma2": lambda: tf.Gemma2Config(**TINY, head_dim=16, final_logit_softcapping=30.0),
    "llama": lambda: tf.LlamaConfig(**TINY),
    "qwen2": lambda: tf.Qwen2Config(**TINY, tie_word_embeddings=True),
    "cohere": lambda: tf.CohereConfig(**TINY, logit_scale=0.0625),
    "gpt2": lambda: tf.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="gemma2")
    parser.add_argument("--model", help="load this checkpoint instead of a tiny random model")
    parser.add_argument("--topk", type=int, default=32)
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.model:
        model = tf.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        model = tf.AutoModelForCausalLM.from_config(FAMILIES[args.family](), attn_implementation="eager")
    model.eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    input_ids = torch.randint(3, min(vocab, 32000), (2, 64))
    labels = input_ids.clone()
    labels[:, :8] = -100  # e.g. a prompt that is not distilled

    # A teacher's top-k for every position, as an offline cache would store it (here: random).
    teacher_logprobs = torch.log_softmax(torch.randn(2, 63, vocab) * 3, dim=-1)
    top = teacher_logprobs.topk(args.topk, dim=-1)

    # fastkd: hidden states and head, no logits. Position t predicts token t+1: shift by one.
    out = hidden_and_head(model, input_ids=input_ids)
    loss = fastkd.topk_kd_loss(out["hidden"][:, :-1], out["weight"], top.indices, top.values, bias=out["bias"],
                               softcap=out["softcap"], labels=labels[:, 1:], divergence="reverse_kl",
                               tail="bucket", ce_weight=0.1)
    loss.backward()

    # The same loss the usual way, from the full logits.
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :-1].double()
        log_p = torch.log_softmax(logits, -1)
        log_p_top = log_p.gather(-1, top.indices)
        log_p_tail = torch.log1p(-log_p_top.exp().sum(-1, keepdim=True))
        log_q_top = top.values.double()
        log_q_tail = torch.log1p(-log_q_top.exp().sum(-1, keepdim=True))
        p = torch.cat([log_p_top, log_p_tail], -1)
        q = torch.cat([log_q_top, log_q_tail], -1)
        kd = (p.exp() * (p - q)).sum(-1)
        ce = -log_p.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        counted = labels[:, 1:] != -100
        naive = ((kd + 0.1 * ce) * counted).sum() / counted.sum()

    name = args.model or f"tiny random {type(model).__name__}"
    print(f"model: {name}  softcap={out['softcap']}  head bias={out['bias'] is not None}  "
          f"tied={model.get_output_embeddings().weight is model.get_input_embeddings().weight}")
    print(f"fastkd loss {loss.item():.6f}   naive loss from full logits {naive.item():.6f}")
    rows = out["hidden"][:, :-1].numel() // out["hidden"].shape[-1]
    print(f"logits fastkd did not build: {rows} x {vocab} float32 = {rows * vocab * 4 / 2**20:.2f} MiB "
          "(and as much again for their gradient)")
    assert abs(loss.item() - naive.item()) <= 1e-4 * abs(naive.item()), "fused and naive losses disagree"


if __name__ == "__main__":
    main()
