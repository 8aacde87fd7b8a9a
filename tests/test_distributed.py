"""fastkd losses under DDP and FSDP2 on the CPU: the same gradients as one process over all rows.

Two processes are spawned (``torch.multiprocessing``, gloo backend, a ``file://`` rendezvous in a
temporary directory: nothing leaves the machine), each computing the loss on its half of the rows
of a tiny student (an embedding and an LM head with bias, float64 so the comparison is exact up to
summation order). The process group lives only in the spawned processes and is destroyed there.

How the per-rank losses must be reduced to match one process (both wrappers *average* gradients
over ranks):
- equal shards with every row counted: ``reduction="mean"`` per rank;
- ignored rows, so the shards count different numbers of rows: ``reduction="sum"`` per rank,
  scaled by ``world_size / (rows counted on all ranks)``.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fastkd
from procs import spawn

WORLD_SIZE = 2
TOL = 1e-12  # float64: only the order of summation differs
ROWS, VOCAB_IN, DIM, VOCAB, TOPK = 12, 31, 8, 37, 5

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no torch.distributed with gloo")


class TinyStudent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB_IN, DIM)
        self.lm_head = torch.nn.Linear(DIM, VOCAB, bias=True)

    def forward(self, tokens, teacher_ids, teacher_logprobs, labels, reduction):
        hidden = torch.tanh(self.embed(tokens))
        # under FSDP2 a head in its own unit is still sharded here (a DTensor): gather it, as
        # fastkd.integrations does; fastkd itself rejects a DTensor with a TypeError saying so
        weight, bias = _gathered(self.lm_head.weight), _gathered(self.lm_head.bias)
        return fastkd.topk_kd_loss(hidden, weight, teacher_ids, teacher_logprobs, bias=bias, labels=labels, divergence="jsd", beta=0.3,
                                   ce_weight=0.2, temperature=1.5, reduction=reduction, impl="torch")


def _gathered(param):
    # the head's own FSDP unit never runs its hooks (lm_head.forward is not called), so its
    # gradient must be reduced by the gather's backward: Partial("avg"), FSDP's own averaging
    from torch.distributed.tensor import DTensor, Partial
    if not isinstance(param, DTensor):
        return param
    return param.full_tensor(grad_placements=[Partial("avg")] * len(param.placements))


def _batch(ignored: bool):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB_IN, (ROWS,), generator=gen)
    teacher = torch.log_softmax(torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64) * 2, dim=-1)
    top = teacher.topk(TOPK, dim=-1)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    if ignored:  # 1 ignored row in the first half, 3 in the second: the shards count 5 and 3 rows
        labels[[2, 6, 7, 11]] = -100
    return tokens, top.indices, top.values, labels


def _student():
    torch.manual_seed(1)
    return TinyStudent().double()


def _single_process_gradients(ignored: bool):
    model = _student()
    model(*_batch(ignored), reduction="mean").backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _shard_loss(model, rank: int, ignored: bool):
    tokens, ids, logprobs, labels = _batch(ignored)
    rows = slice(rank * ROWS // WORLD_SIZE, (rank + 1) * ROWS // WORLD_SIZE)
    if not ignored:
        return model(tokens[rows], ids[rows], logprobs[rows], labels[rows], reduction="mean")
    counted_everywhere = (labels != -100).sum()  # known to every rank here; a trainer all-reduces it
    loss = model(tokens[rows], ids[rows], logprobs[rows], labels[rows], reduction="sum")
    return loss * WORLD_SIZE / counted_everywhere


def _compare(gradients, expected, what):
    for name, grad in gradients.items():
        error = ((grad - expected[name]).norm() / expected[name].norm()).item()
        assert error <= TOL, f"{what}: gradient of {name} differs from one process by {error:.3e}"


def _worker(rank: int, init_file: str, wrapper: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        if wrapper == "dtensor":
            _check_dtensor_is_rejected()
            return
        for ignored, head_alone in ((False, False), (True, True), (False, True)):
            expected = _single_process_gradients(ignored)
            if wrapper == "ddp":
                if head_alone:
                    continue
                model = torch.nn.parallel.DistributedDataParallel(_student())
                _shard_loss(model, rank, ignored).backward()
                gradients = {name.removeprefix("module."): p.grad for name, p in model.named_parameters()}
            else:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard
                from torch.distributed.tensor import DTensor

                model = _student()
                mesh = init_device_mesh("cpu", (WORLD_SIZE,))
                if head_alone:  # the head in its own unit: still sharded (V rows) in the forward
                    fully_shard(model.lm_head, mesh=mesh)
                fully_shard(model, mesh=mesh)
                _shard_loss(model, rank, ignored).backward()
                assert isinstance(model.lm_head.weight.grad, DTensor)  # sharded gradients either way
                gradients = {name: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                             for name, p in model.named_parameters()}
            _compare(gradients, expected, f"{wrapper}, rank {rank}, ignored rows: {ignored}, "
                                          f"head in its own unit: {head_alone}")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _check_dtensor_is_rejected():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _student()
    fully_shard(model.lm_head, mesh=init_device_mesh("cpu", (WORLD_SIZE,)))
    tokens, ids, logprobs, labels = _batch(False)
    rows = slice(dist.get_rank() * ROWS // 2, (dist.get_rank() + 1) * ROWS // 2)  # FSDP: own rows
    # a DTensor head is taken as vocabulary-parallel (docs/parallel.md), which needs the same rows
    # on every rank: data-parallel rows are a clear error pointing at full_tensor()
    with pytest.raises(ValueError, match=r"hidden differs across the ranks .* pass weight.full_tensor\(\)"):
        fastkd.topk_kd_loss(model.embed(tokens[rows]), model.lm_head.weight, ids[rows], logprobs[rows])


def _spawn(wrapper: str, tmp_path):
    # spawned children import this module by name; tests/ is on their sys.path (inherited)
    spawn(_worker, (str(tmp_path / "rendezvous"), wrapper), WORLD_SIZE)


def test_ddp_gradients_equal_one_process(tmp_path):
    _spawn("ddp", tmp_path)


def test_fsdp2_gradients_equal_one_process(tmp_path):
    _spawn("fsdp2", tmp_path)


def test_a_sharded_head_passed_as_is_is_a_clear_type_error(tmp_path):
    _spawn("dtensor", tmp_path)
