"""Tensor-parallel LM heads for training (docs/parallel.md): a ``(dp, tp)`` device mesh, the
student's and the teacher's ``lm_head`` sharded over the vocabulary along ``tp`` with torch's
tensor-parallel API (``ColwiseParallel``), and the student sharded along ``dp`` with FSDP2.

Ranks of one ``tp`` group see the same rows (the data is split over ``dp`` only); fastkd's losses
take the sharded heads as they are (:mod:`fastkd.parallel.vocab_parallel`): the logits are never
gathered, each rank keeps the gradient of its own rows of the head, and the gradient of the hidden
states is all-reduced over ``tp``. FSDP2 then reduce-scatters every gradient over ``dp``.

Checkpoints hold the full model (gathered like FSDP2's) and every process's own AdamW shards (the
full-state loader of ``torch.distributed.checkpoint`` cannot yet scatter an optimizer state laid
out with FSDP2's ``_StridedShard`` over a tensor-parallel shard: an AssertionError in
``_StridedShard._shard_tensor``, torch 2.13), so a run resumed on the same layout computes the
same losses.
"""
from __future__ import annotations


import torch
import torch.distributed as dist
from torch import nn


def make_mesh(tensor_parallel: int, device_type: str):
    """A ``(dp, tp)`` DeviceMesh over all processes, ``tp = tensor_parallel`` consecutive ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"tensor_parallel={tensor_parallel} needs several processes (launch with "
                         "torchrun or accelerate launch)")
    world = dist.get_world_size()
    if tensor_parallel < 1 or world % tensor_parallel:
        raise ValueError(f"tensor_parallel must divide the number of processes {world}, got "
                         f"{tensor_parallel}")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world // tensor_parallel, tensor_parallel),
                            mesh_dim_names=("dp", "tp"))


def head_name(model: nn.Module) -> str:
    """The qualified name of ``model``'s LM head (``get_output_embeddings()``), untied."""
    head = model.get_output_embeddings()
    names = [name for name, module in model.named_modules() if module is head]
    if not names:
        raise TypeError(f"model: {type(model).__name__}.get_output_embeddings() is not one of its modules")
    embed = model.get_input_embeddings()
    if embed is not None and getattr(embed, "weight", None) is head.weight:
        raise ValueError("tensor_parallel: the LM head is tied to the input embedding; shard an "
                         "untied head (tie_word_embeddings=False) or train with tensor_parallel 1")
    return names[0]


def shard_head(model: nn.Module, mesh) -> None:
    """``ColwiseParallel`` on ``model``'s LM head over ``mesh["tp"]``: its weight (and bias)
    become ``Shard(0)`` DTensors, rows ``[r·ceil(V/tp), ...)`` on tp rank r."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    parallelize_module(model, mesh["tp"], {head_name(model): ColwiseParallel()})


def shard_student(model: nn.Module, mesh) -> nn.Module:
    """The student: head over ``tp``, then FSDP2 over ``dp`` (each decoder layer, then the root)
    when there is more than one data-parallel rank."""
    shard_head(model, mesh)
    if mesh["dp"].size() > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    return model


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
                type(m) is type(module[0]) for m in module):
            return list(module)
    return []


def data_rank(mesh) -> tuple[int, int]:
    """``(index, count)`` of this process's data shard: the ``dp`` coordinate and size."""
    return mesh["dp"].get_local_rank(), mesh["dp"].size()


def full_model_state(model: nn.Module, cpu_offload: bool = False) -> dict:
    """The full (unsharded) model state dict (collective); with ``cpu_offload`` on CPU and on the
    main process only (what a checkpoint writes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)
    return get_model_state_dict(model, options=options)


@torch.no_grad()
def load_full_model_state(model: nn.Module, state: dict) -> None:
    """Loads :func:`full_model_state` into the sharded model: every rank cuts its own shards out of
    the full tensors (no communication). ``set_model_state_dict(full_state_dict=True)`` scatters
    instead, which fails on FSDP2's ``_StridedShard`` over an uneven tensor-parallel split (an
    AssertionError in ``_StridedShard._shard_tensor``, torch 2.13)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    targets = get_model_state_dict(model)  # the model's own (sharded) tensors, by full name
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise ValueError(f"resume: the checkpoint's weights do not match the model (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})")
    for name, target in targets.items():
        full = state[name].to(device=target.device, dtype=target.dtype)
        if isinstance(target, DTensor):
            local = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
            target.to_local().copy_(local.to_local())
        else:
            target.copy_(full)


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """This rank's optimizer state with every DTensor replaced by its local shard (a copy)."""
    state = optimizer.state_dict()
    return {"state": {k: {n: _local_copy(v) for n, v in s.items()} for k, s in state["state"].items()},
            "param_groups": state["param_groups"]}


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Loads :func:`local_optimizer_state` of the same rank and layout; the shards become DTensors
    laid out like their parameters again."""
    from torch.distributed.tensor import DTensor

    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, DTensor):
                continue
            slots = optimizer.state.get(param, {})
            for name, value in slots.items():
                if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and \
                        value.shape == param.to_local().shape and value.dim() > 0:
                    slots[name] = DTensor.from_local(value.to(param.device), param.device_mesh,
                                                     param.placements, run_check=False,
                                                     shape=param.shape, stride=param.stride())


def _local_copy(value):
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.to_local().detach().clone()
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for parameters that are DTensors on different meshes
    (FSDP2 shards, tensor-parallel heads) or plain tensors: the norm of the full gradients."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    squares = []
    for grad in grads:
        norm = grad.norm()
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).double() ** 2)
    if not squares:
        return torch.zeros(())
    total = torch.stack(squares).sum().sqrt()
    factor = min(1.0, max_norm / (float(total) + 1e-6))  # one host sync, as the trainer logs it
    for grad in grads:
        grad.mul_(factor)
    return total
