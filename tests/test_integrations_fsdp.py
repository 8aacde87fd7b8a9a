"""hidden_and_head under FSDP2 (``fully_shard``): same loss and gradients as the unsharded model.

FSDP2 runs here on the CPU with the gloo backend and one process (world size 1): the code paths
are the real ones (DTensor parameters, unshard/reshard hooks, gradient reduce-scatter), only the
shards are whole. It runs in a subprocess so that the process group never leaks into other tests
(a ``transformers.Trainer`` would see a distributed run).
"""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

TOL = 1e-10


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_fsdp2_matches_unsharded_model():
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"FSDP2 worker failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    assert result.stdout.count("ok") == 3, result.stdout


def _worker():
    import torch.distributed as dist
    import transformers as tf
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from fastkd.integrations import compute_kd_loss

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    vocab, rows, positions, k = 157, 2, 9, 5
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (rows, positions), generator=gen)
    teacher_lp = torch.log_softmax(torch.randn(rows, positions, vocab, generator=gen, dtype=torch.float64), -1)
    top = teacher_lp.topk(k, dim=-1)
    batch = dict(input_ids=input_ids, teacher_ids=top.indices, teacher_logprobs=top.values)

    # (tied head, head in its own FSDP unit): a head sharded after the forward is a DTensor; one
    # in the root unit stays unsharded (FSDP2 keeps the root's parameters after the forward).
    for tied, shard_head_alone in ((False, False), (False, True), (True, False)):
        torch.manual_seed(1)
        config = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        reference = tf.AutoModelForCausalLM.from_config(config).double().eval()
        sharded = copy.deepcopy(reference)
        for layer in sharded.model.layers:
            fully_shard(layer, mesh=mesh)
        if shard_head_alone:
            fully_shard(sharded.lm_head, mesh=mesh)
        fully_shard(sharded, mesh=mesh)

        options = dict(divergence="jsd", beta=0.4, ce_weight=0.2)
        loss = compute_kd_loss(sharded, batch, **options)
        # the path under test: gathered from shards (DTensor) or the root's unsharded parameter
        assert isinstance(sharded.lm_head.weight, DTensor) == shard_head_alone, type(sharded.lm_head.weight)
        loss.backward()
        ref = compute_kd_loss(reference, batch, **options)
        ref.backward()
        assert abs(loss.item() - ref.item()) <= TOL * abs(ref.item()), (loss.item(), ref.item())
        for (name, p), r in zip(sharded.named_parameters(), reference.parameters()):
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            error = ((grad - r.grad).norm() / r.grad.norm()).item()
            assert error <= TOL, f"tied={tied} head alone={shard_head_alone}: grad {name} rel. error {error:.3e}"
        print("ok", tied, shard_head_alone)
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
