"""Training with tensor-parallel LM heads on gloo: FSDP2 (dp) × ColwiseParallel heads (tp).

A tiny Llama student (float64, untied head, V=37: 19 + 18 rows over 2 tp ranks) is distilled
from a tiny Llama teacher with ``fastkd.kd_loss`` for a few AdamW steps, once in one process over
the whole batch and once on a 2 × 2 mesh (data split over dp, heads sharded over tp, both through
:mod:`fastkd.train.tensor_parallel`). The losses of every step and the final weights agree to
float64 summation order; a run stopped after 2 steps, checkpointed (``torch.distributed.checkpoint``,
every rank its own shards) and resumed into fresh sharded models computes the same third step as the run that never stopped.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkd
from fastkd.integrations import hidden_and_head

TOL = 1e-9
BATCH, SEQ, VOCAB, TOPK, STEPS = 4, 6, 37, 4, 3

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no torch.distributed with gloo")


def _models():
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(seed, hidden):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                             max_position_embeddings=32, tie_word_embeddings=False)
        return LlamaForCausalLM(config).double()

    student, teacher = build(0, 16), build(1, 24)
    teacher.eval().requires_grad_(False)
    return student, teacher


def _batches():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def _loss_sum(student, teacher, tokens):
    """Sum over the rows of ``tokens`` of the KD + CE loss (the shifted next-token rows)."""
    s = hidden_and_head(student, input_ids=tokens)
    with torch.no_grad():
        t = hidden_and_head(teacher, input_ids=tokens)
    labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], dim=1)
    return fastkd.kd_loss(s["hidden"], s["weight"], t["hidden"], t["weight"], bias=s["bias"],
                          teacher_bias=t["bias"], topk=TOPK, topk_from="union", divergence="jsd",
                          labels=labels, ce_weight=0.5, temperature=1.5, reduction="sum",
                          impl="torch")


def _rows():
    return BATCH * (SEQ - 1)  # counted rows of a whole batch


def _single_process():
    student, teacher = _models()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    losses = []
    for tokens in _batches():
        loss = _loss_sum(student, teacher, tokens) / _rows()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in student.state_dict().items()}


def _sharded_run(mesh, steps, checkpoint=None):
    from fastkd.train import tensor_parallel as tp

    student, teacher = _models()
    tp.shard_student(student, mesh)
    tp.shard_head(teacher, mesh)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    if checkpoint is not None:
        tp.load_sharded(checkpoint, student, optimizer)
    index, count = tp.data_rank(mesh)
    losses = []
    for tokens in steps:
        rows = slice(index * BATCH // count, (index + 1) * BATCH // count)
        local = _loss_sum(student, teacher, tokens[rows]) / _rows()
        (local * count).backward()  # FSDP2 averages over dp: the mean over the whole batch
        total = local.detach().clone()
        dist.all_reduce(total, group=mesh["dp"].get_group())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total.item())
    return losses, student, optimizer


def _worker(rank, rendezvous, checkpoint):
    from torch.distributed.device_mesh import init_device_mesh
    from fastkd.train import tensor_parallel as tp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=4)
    try:
        mesh = tp.make_mesh(2, "cpu")
        assert mesh.shape == (2, 2)
        ref_losses, ref_state = _single_process()
        batches = _batches()
        losses, student, optimizer = _sharded_run(mesh, batches)
        for step, (a, b) in enumerate(zip(losses, ref_losses)):
            assert abs(a - b) <= TOL * abs(b), f"rank {rank} step {step}: loss {a!r} vs one process {b!r}"
        full = tp.full_model_state(student)
        for name, ref in ref_state.items():
            err = ((full[name] - ref).norm() / ref.norm()).item()
            assert err <= TOL, f"rank {rank}: {name} differs from one process by {err:.2e}"
        # the head is sharded over tp and FSDP-sharded over dp while training
        from torch.distributed.tensor import DTensor
        assert isinstance(student.lm_head.weight, DTensor)
        # stop after 2 steps, checkpoint (every rank its shards), resume into fresh sharded models
        first, student2, optimizer2 = _sharded_run(mesh, batches[:2])
        tp.save_sharded(checkpoint, student2, optimizer2)
        resumed, _, _ = _sharded_run(mesh, batches[2:], checkpoint=checkpoint)
        assert resumed[0] == losses[2], f"rank {rank}: resumed step 3 loss {resumed[0]!r} vs {losses[2]!r}"
        assert first == losses[:2]
    finally:
        dist.destroy_process_group()


@pytest.mark.multicore
def test_fsdp2_times_tensor_parallel_heads_equal_one_process_and_resume_exactly(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path / "checkpoint")),
                       nprocs=4, join=True,
                       start_method="spawn")
