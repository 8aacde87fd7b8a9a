"""Training with tensor-parallel LM heads on gloo: FSDP2 (dp) × ColwiseParallel heads (tp).

A tiny Llama student (float64, untied head, V=37: 19 + 18 rows over 2 tp ranks) is distilled
from a tiny Llama teacher with ``fastkd.kd_loss`` for a few AdamW steps, once in one process over
the whole batch and once on a 2 × 2 mesh (data split over dp, heads sharded over tp, both through
:mod:`fastkd.train.tensor_parallel`). The losses of every step and the final weights agree to
float64 summation order; a run stopped after 2 steps, checkpointed as the trainer does (the full model,
every rank's own AdamW shards) and resumed into fresh sharded models computes the same third step as the run that never stopped.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

import fastkd
from fastkd.integrations import hidden_and_head
from procs import spawn

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
    if checkpoint is not None:  # what the trainer's checkpoints hold, as they load it
        tp.load_full_model_state(student, checkpoint["model"])
        tp.load_local_optimizer_state(optimizer, checkpoint["optimizer"])
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


def _worker(rank, rendezvous, checkpoint_dir):
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
        state = {"model": tp.full_model_state(student2), "optimizer": tp.local_optimizer_state(optimizer2)}
        os.makedirs(checkpoint_dir, exist_ok=True)
        path = os.path.join(checkpoint_dir, f"rank{rank}.pt")
        torch.save(state, path)
        resumed, _, _ = _sharded_run(mesh, batches[2:], checkpoint=torch.load(path, weights_only=True))
        assert resumed[0] == losses[2], f"rank {rank}: resumed step 3 loss {resumed[0]!r} vs {losses[2]!r}"
        assert first == losses[:2]
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.multicore
def test_fsdp2_times_tensor_parallel_heads_equal_one_process_and_resume_exactly(tmp_path):
    spawn(_worker, (str(tmp_path / "rendezvous"), str(tmp_path / "checkpoint")), 4)


# ------------------------------------------------------------------------------------------------
# fastkd train --tensor_parallel 2 on 4 processes (accelerate launch, gloo): 2 x 2 mesh
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tp_assets(tmp_path_factory):
    pytest.importorskip("accelerate")
    from transformers import AutoTokenizer

    import test_train_distributed as td
    from fastkd import demo_assets as da

    root = tmp_path_factory.mktemp("tp_assets")
    setup = da.build_demo_setup(root, n_teacher=120, n_student=40, n_heldout=8)
    vocab = len(AutoTokenizer.from_pretrained(setup.teacher_tokenizer))
    vocab += 1 - vocab % 2  # an odd V: the heads split unevenly over 2 ranks (one row never used)
    script = root / "train_script.py"
    script.write_text(td.SCRIPT, encoding="utf-8")
    return dict(root=root, script=script, tokenizer=str(setup.teacher_tokenizer),
                data=str(setup.student_data), heldout=str(setup.heldout_data),
                teacher=str(da.build_model(root / "teacher", vocab, hidden=24, layers=1, seed=1)),
                student=str(da.build_model(root / "student", vocab, hidden=16, layers=2, seed=2)))


def _launch(assets, config, processes, crash_at=0):
    import subprocess
    import sys

    import test_train_distributed as td

    e = td.env()
    e["ACCELERATE_USE_CPU"] = "1"
    e["MASTER_ADDR"] = "127.0.0.1"
    if crash_at:
        e["FASTKD_TEST_CRASH_AT"] = str(crash_at)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(td.free_port()), str(assets["script"]), str(config)]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=400)


@pytest.mark.multicore
def test_fastkd_train_tensor_parallel_2x2_equals_one_process_and_resumes(tp_assets, tmp_path):
    import test_train_distributed as td

    steps = 4
    # one process over batches of 8 == 2 data-parallel ranks over 4 rows each (no token selection:
    # it keeps a fraction per process)
    common = dict(max_steps=steps, token_fraction=1.0, mode="online", topk=8, topk_from="union",
                  ce_weight=0.3, eval_data=tp_assets["heldout"], max_grad_norm=0.5)
    one = td.write_config(tp_assets, tmp_path / "one", batch_size=8, **common)
    result = td.run_script(tp_assets, one, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    reference = td.losses(tmp_path / "one")

    tp_cfg = dict(common, batch_size=4, tensor_parallel=2, save_every=2)
    ref = _launch(tp_assets, td.write_config(tp_assets, tmp_path / "tp", **tp_cfg), 4)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    for rank in range(4):
        assert f"process {rank}/4 DistributedType.MULTI_CPU" in ref.stdout, ref.stdout + ref.stderr
    sharded = td.losses(tmp_path / "tp")
    assert sorted(sharded) == list(range(1, steps + 1))
    # the optimizer state is kept per process: the heads' AdamW moments are vocabulary shards
    state = json.loads((tmp_path / "tp" / "checkpoint-00000004" / "state.json").read_text(encoding="utf-8"))
    assert '"per_process"' in json.dumps(state["parts"]["optimizer"])
    tokens = [[json.loads(line).get("tokens") for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for run in ("one", "tp")]
    assert tokens[0] == tokens[1], tokens
    for step, loss in reference.items():
        assert abs(sharded[step] - loss) <= 1e-4 * abs(loss), (step, sharded, reference)

    crashed_cfg = td.write_config(tp_assets, tmp_path / "crashed", **tp_cfg)
    crashed = _launch(tp_assets, crashed_cfg, 4, crash_at=3)
    assert crashed.returncode != 0 and "simulated crash after step 3" in crashed.stdout, \
        crashed.stdout + crashed.stderr
    resumed = _launch(tp_assets, crashed_cfg, 4)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert td.resumed_step(resumed.stdout) == 2
    assert td.losses(tmp_path / "crashed") == sharded  # the same layout: the same losses, exactly
    td.assert_same_weights(tmp_path / "tp", tmp_path / "crashed")


@pytest.mark.parametrize("values, error, key", [
    (dict(tensor_parallel=0), ValueError, "tensor_parallel"),
    (dict(tensor_parallel=2.5), TypeError, "tensor_parallel"),
    (dict(tensor_parallel=2, lora=True), ValueError, "lora"),
    (dict(tensor_parallel=2, mode="on_policy"), ValueError, "mode"),
])
def test_tensor_parallel_config_errors_name_the_key(values, error, key):
    from fastkd.train import TrainConfig

    good = dict(mode="online", student="s", teacher="t", data="d.txt")
    with pytest.raises(error, match=key):
        TrainConfig.load(None, [], **dict(good, **values))


def test_make_mesh_without_processes_is_a_clear_error():
    from fastkd.train import tensor_parallel as tp

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(ValueError, match="tensor_parallel=2 needs several processes"):
        tp.make_mesh(2, "cpu")
