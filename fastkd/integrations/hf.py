"""Final hidden states and LM head of any Hugging Face causal LM, without computing its logits.

``hidden_and_head(model, **batch)`` runs the model's forward with its output-embedding module
(``model.get_output_embeddings()``, the LM head) swapped for a stand-in that records the hidden
states it is given and returns a tiny *probe* instead of ``[B, T, V]`` logits. Whatever the model
does to its logits after the head (Gemma-2 ``final_logit_softcapping``, Cohere ``logit_scale``,
Granite ``logits_scaling``, Falcon-H1 ``lm_head_multiplier``, ...) is then applied to the probe,
and reading the probe back tells which transform ran:

    logits = softcap(scale · (hidden · weightᵀ + bias))      softcap(x) = c·tanh(x / c), or identity

``scale`` is folded into the returned ``hidden`` and ``bias``, so that

    softcap(out["hidden"] @ out["weight"].T + out["bias"]) == model(**batch).logits

and ``fastkd.topk_kd_loss(**out, ...)`` / ``fastkd.kd_loss`` take the result as they are. A
transform that is not of that form (an additive shift, a different non-linearity) is an error,
never a silently wrong loss. The scale and cap read off the probe are replaced by the exact values
from the model's config when those agree (they always do for the families above). The probe is
read back once per model (one host sync on the first call) and remembered.

What is found where:
- the head: ``get_output_embeddings()`` of the model under any wrappers (DDP, ``torch.compile``,
  peft); tied embeddings need nothing special (the head's weight *is* the embedding matrix, and
  its gradient collects both uses);
- peft: a ``PeftModel`` is called as it is (its adapters run); a LoRA adapter on the head itself
  contributes ``weight + Σ scaling·B·A`` (differentiable, so LoRA's head parameters train; LoRA
  dropout on the head is not applied), ``modules_to_save=["lm_head"]`` uses the trained copy;
- FSDP2 (``fully_shard``): a head that is still sharded after the forward is a ``DTensor``; it is
  gathered with ``full_tensor()`` (differentiable: the gradient is reduce-scattered back to the
  shards). A head in the root FSDP unit stays unsharded after the forward and is used as it is.
  FSDP1 (``FullyShardedDataParallel``) is rejected: its flat parameters do not expose the head
  weight outside the forward (use FSDP2, accelerate ``fsdp_version: 2``);
- tensor parallelism (``ColwiseParallel`` on the head, docs/parallel.md): the head stays a
  vocabulary-sharded DTensor and fastkd's losses run vocabulary-parallel; the hidden states
  (replicated) come back as a plain tensor;
- vocabulary padding: ``vocab_size=V`` keeps the first V rows of the head (e.g. the tokenizer's
  length, when a teacher and a student that share a tokenizer pad their heads differently:
  151936 vs 152064). A head is never padded: extra rows would need ``-inf`` logits.
"""
from __future__ import annotations

import math
import numbers
import weakref
from typing import Any, Optional

import torch
from torch import Tensor, nn

# Probe values standing in for raw head outputs ``hidden · weightᵀ + bias``. The tiny one gives
# the slope at 0 (the scale: exact in float64, ``tanh`` is linear there to 1e-13 relative), the
# large ones reach the saturation of a softcap, the rest check the fitted transform in between.
_PROBE = (0.0, 2.0**-20, 1.0, -3.0, 20.0, -150.0, 1000.0, -8000.0)
_SLOPE = 1
# Agreement required between the probe read back and the fitted transform, and for snapping a
# fitted value to the config's: loose enough for a model that casts its logits to 16 bits.
_PROBE_RTOL = 1e-2
_SNAP_RTOL = 1e-3
# Config attributes that scale the logits after the head, and whether the model multiplies by the
# value (True) or divides by it (False). ``logits_scaling`` divides in Granite and multiplies in
# HyperCLOVA X: the probe decides which one ran, these only supply exact values.
_SCALE_ATTRIBUTES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")
_SOFTCAP_ATTRIBUTES = ("final_logit_softcapping",)
# Batch keys that are targets, not model inputs: removed before the forward, so that the model
# does not compute a loss from the probe.
_NOT_MODEL_INPUTS = ("labels",)
# (scale, softcap) read once per model: the probe is read back to the host (one sync) only on the
# first call, later calls reuse it.
_TRANSFORMS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def hidden_and_head(model: nn.Module, *, vocab_size: Optional[int] = None, **batch: Any) -> dict:
    """Runs ``model(**batch)`` up to its LM head; returns what fastkd's losses take instead of logits.

    Args:
        model: a ``transformers`` causal LM (``...ForCausalLM``, ``GPT2LMHeadModel``, ...), as it
            is or wrapped by peft, DDP, FSDP2 or ``torch.compile``.
        vocab_size: None (default: the head's V) or an int in ``[1, V]``: keep the first
            ``vocab_size`` rows of the head (shared vocabulary of two models whose heads are padded
            differently). Never pads.
        **batch: the model's inputs (``input_ids``, ``attention_mask``, ...). ``labels`` is dropped
            (the model must not compute a loss); shift and pass labels to the fastkd loss instead.

    Returns:
        dict with
        ``hidden``: ``(B, T, D)`` the input of the LM head (after the final norm), in the model's
        dtype, multiplied by the post-head logit scale if the model has one; differentiable;
        ``weight``: ``(V, D)`` the head weight (sliced to ``vocab_size``), differentiable;
        ``bias``: ``(V,)`` the head bias times the logit scale, or None;
        ``softcap``: float cap c of a final-logit softcap ``c·tanh(x/c)``, or None.
        ``softcap(hidden @ weight.T + bias)`` equals ``model(**batch).logits`` (up to rounding; the
        logits of a model in training mode differ only by dropout).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` with ``get_output_embeddings()``, is wrapped by
            FSDP1, or its head is not a linear layer fastkd can read.
        ValueError: the forward never calls the head, calls it more than once, applies a logit
            transform other than a scale and a softcap, or ``vocab_size`` is out of range.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    _reject_fsdp1(model)
    core = _core_model(model)
    head = _output_embeddings(core)
    inputs = {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}

    captured: list[Tensor] = []
    probe_dtype: list[torch.dtype] = []
    tensor_parallel_input: list[bool] = []

    def stand_in(hidden_states, *args, **kwargs):
        tensor_parallel = _is_dtensor(hidden_states)  # ColwiseParallel's input hook made it one
        if tensor_parallel:
            hidden_states = hidden_states.to_local()  # replicated: the same on every rank
        captured.append(hidden_states)
        tensor_parallel_input.append(tensor_parallel)
        dtype = torch.float64 if hidden_states.device.type in ("cpu", "cuda") else torch.float32
        probe_dtype.append(dtype)
        probe = torch.tensor(_PROBE, dtype=dtype, device=hidden_states.device)
        probe = probe.expand(*hidden_states.shape[:-1], len(_PROBE)).contiguous()
        return _tensor_parallel_probe(probe, head) if tensor_parallel else probe

    had_instance_forward = "forward" in head.__dict__
    previous_forward = head.__dict__.get("forward")
    head.forward = stand_in
    try:
        output = model(**inputs)
    finally:
        if had_instance_forward:
            head.forward = previous_forward
        else:
            del head.forward

    model_name = type(core).__name__
    if not captured:
        raise ValueError(
            f"model: the forward of {model_name} never called its LM head "
            f"({type(head).__name__} from get_output_embeddings()); fastkd cannot intercept a head "
            "that is applied some other way (e.g. F.linear on the embedding weight)")
    if len(captured) > 1:
        raise ValueError(
            f"model: the forward of {model_name} called its LM head {len(captured)} times "
            "(multi-token or multi-head prediction); hidden_and_head supports one call")
    hidden = captured[0]
    transform = _TRANSFORMS.get(core)
    if transform is None:
        logits = output.logits if hasattr(output, "logits") else output[0]
        transform = _TRANSFORMS[core] = _read_probe(logits, probe_dtype[0], core, model_name)
    scale, softcap = transform

    weight, bias = _head_parameters(head)
    if _is_dtensor(weight) and tensor_parallel_input[0]:
        # a vocabulary-parallel head stays sharded: fastkd's losses take it (docs/parallel.md)
        if vocab_size is not None and vocab_size != weight.shape[0]:
            raise ValueError(f"vocab_size={vocab_size}: a tensor-parallel head of {model_name} "
                             f"cannot be sliced; its V={weight.shape[0]} rows are all used")
        vocab_size = None
    else:
        weight, bias = _gather_sharded(weight), _gather_sharded(bias)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise TypeError(
            f"model: the LM head of {model_name} must have a (V, D={hidden.shape[-1]}) weight like "
            f"nn.Linear, got {shape} (a head sharded outside FSDP2, e.g. DeepSpeed ZeRO-3, must be "
            "gathered first, e.g. inside deepspeed.zero.GatheredParameters)")
    weight, bias = _slice_vocab(weight, bias, vocab_size, model_name)
    if scale != 1.0:
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    return {"hidden": hidden, "weight": weight, "bias": bias, "softcap": softcap}


def _core_model(model: nn.Module) -> nn.Module:
    """The model under DDP/DataParallel/DeepSpeed (``.module``) or ``torch.compile`` (``._orig_mod``)."""
    core = model
    for _ in range(16):
        if callable(getattr(core, "get_output_embeddings", None)):
            return core
        inner = getattr(core, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(core, "module", None)
        if not isinstance(inner, nn.Module):
            break
        core = inner
    raise TypeError(
        f"model must be a transformers causal LM with get_output_embeddings() (possibly wrapped by "
        f"peft, DDP, FSDP2 or torch.compile), got {type(model).__name__}")


def _output_embeddings(core: nn.Module) -> nn.Module:
    head = core.get_output_embeddings()
    if not isinstance(head, nn.Module):
        raise TypeError(
            f"model: {type(core).__name__}.get_output_embeddings() returned "
            f"{type(head).__name__}, not an LM-head module; is this a causal LM (...ForCausalLM)?")
    return head


def _reject_fsdp1(model: nn.Module) -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return  # FSDP1 needs an initialised process group: nothing to look for
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise TypeError(
            "model is wrapped by FSDP1 (FullyShardedDataParallel), whose flat parameters hide the "
            "LM-head weight outside the forward; use FSDP2 (torch.distributed.fsdp.fully_shard, "
            "accelerate fsdp_version: 2), which hidden_and_head supports")


def _head_parameters(head: nn.Module):
    """(weight, bias) of the linear map the head applies, peft adapters on the head included."""
    if not (hasattr(head, "lora_A") and callable(getattr(head, "get_base_layer", None))):
        # nn.Linear, or peft's ModulesToSaveWrapper, which forwards .weight/.bias to the active copy
        return getattr(head, "weight", None), getattr(head, "bias", None)
    base = head.get_base_layer()
    weight, bias = base.weight, base.bias
    if head.disable_adapters or head.merged:
        return weight, bias  # merged adapters are already in base.weight
    for adapter in head.active_adapters:
        if adapter not in head.lora_A:
            continue
        if adapter in getattr(head, "lora_variant", {}) or getattr(head, "use_dora", {}).get(adapter, False):
            raise TypeError(
                f"model: the LM head carries a LoRA variant (e.g. DoRA) in adapter {adapter!r}; "
                "hidden_and_head supports plain LoRA on the head (or merge the adapter first)")
        weight = weight + head.get_delta_weight(adapter).to(weight.dtype)
        if getattr(head, "lora_bias", {}).get(adapter, False):
            delta = head.lora_B[adapter].bias * head.scaling[adapter]
            bias = delta if bias is None else bias + delta
    return weight, bias


def _is_dtensor(x) -> bool:
    import sys

    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def _tensor_parallel_probe(probe: Tensor, head: nn.Module):
    """The probe as the sharded output ColwiseParallel's output hook expects (every rank the same
    probe: after the hook's ``to_local()`` each reads back its own copy)."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = head.weight.device_mesh
    return DTensor.from_local(probe, mesh, [Shard(probe.dim() - 1)] * mesh.ndim, run_check=False)


def _gather_sharded(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """A DTensor (FSDP2 shard) gathered to a full, differentiable tensor; anything else as it is."""
    if tensor is None or not torch.distributed.is_available():
        return tensor
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(tensor, DTensor):
        return tensor
    # The head's own FSDP unit never sees its output used, so its post-backward reduce-scatter
    # does not run: the gather's backward must average the per-rank gradients itself, as FSDP's
    # own reduction would (Partial("avg")); the default would keep each rank's own contribution.
    return tensor.full_tensor(grad_placements=[Partial("avg")] * len(tensor.placements))


def _slice_vocab(weight: Tensor, bias: Optional[Tensor], vocab_size, model_name: str):
    if vocab_size is None:
        return weight, bias
    rows = weight.shape[0]
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size must be None or an int, got {vocab_size!r}")
    if not 1 <= vocab_size <= rows:
        raise ValueError(
            f"vocab_size must be in [1, {rows}] (the LM head of {model_name} has V={rows} rows), got "
            f"{vocab_size}; an LM head is never padded (extra rows would need -inf logits): pass "
            "the smaller, shared vocabulary (e.g. len(tokenizer)) for both models")
    vocab_size = int(vocab_size)
    return weight[:vocab_size], None if bias is None else bias[:vocab_size]


def _read_probe(logits, dtype: torch.dtype, core: nn.Module, model_name: str):
    """(scale, softcap) of the model's post-head transform, read from the probe it returned."""
    width = len(_PROBE)
    if not isinstance(logits, Tensor) or logits.shape[-1:] != (width,) or logits.numel() < width:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"model: {model_name} did not return its LM-head output as logits of shape (..., V) "
            f"(got {shape} for a stand-in of width {width}); hidden_and_head cannot tell which "
            "transform follows the head")
    seen = logits.detach().reshape(-1, width)[0].to(dtype).cpu().tolist()
    scale = seen[_SLOPE] / _PROBE[_SLOPE]
    configured_scales, configured_caps = _configured_transform(core)
    candidates = [(cap, None) for cap in configured_caps] + [(None, None)]
    if any(abs(y) < 0.5 * abs(scale * x) for x, y in zip(_PROBE, seen)):
        # something saturates: also try the cap read off the largest probe
        candidates.append((max(abs(y) for y in seen), "estimated"))
    for cap, _origin in candidates:
        if _fits(seen, scale, cap):
            scale = _snap(scale, configured_scales + [1.0])
            if cap is not None:
                cap = _snap(cap, configured_caps)
            return scale, cap
    raise ValueError(
        f"model: {model_name} transforms its logits after the LM head in a way fastkd does not "
        "model (only softcap(scale·x), softcap(x) = c·tanh(x/c), is supported): raw head outputs "
        f"{list(_PROBE)} became {[float(f'{y:.6g}') for y in seen]}")


def _fits(seen, scale: float, cap: Optional[float]) -> bool:
    if not math.isfinite(scale) or scale == 0.0:
        return False
    for x, y in zip(_PROBE, seen):
        expected = scale * x if cap is None else cap * math.tanh(scale * x / cap)
        if not math.isfinite(y) or abs(y - expected) > _PROBE_RTOL * max(abs(expected), abs(scale) * _PROBE[_SLOPE]):
            return False
    return True


def _snap(value: float, exact_values) -> float:
    for exact in exact_values:
        if abs(value - exact) <= _SNAP_RTOL * abs(exact):
            return float(exact)
    return float(value)


def _configured_transform(core: nn.Module):
    """Exact logit scales (and their reciprocals) and softcaps named by the model's config."""
    configs = [getattr(core, "config", None)]
    text_config = getattr(configs[0], "get_text_config", None)
    if callable(text_config):
        configs.append(text_config())
    owners = [core] + configs
    scales, caps = [], []
    for owner in owners:
        if owner is None:
            continue
        for name in _SCALE_ATTRIBUTES:
            value = _positive_real(getattr(owner, name, None))
            if value is not None:
                scales += [value, 1.0 / value]
        for name in _SOFTCAP_ATTRIBUTES:
            value = _positive_real(getattr(owner, name, None))
            if value is not None:
                caps.append(value)
    base = getattr(core, "model", None)  # Falcon-H1 keeps lm_head_multiplier on the decoder
    value = _positive_real(getattr(base, "lm_head_multiplier", None)) if isinstance(base, nn.Module) else None
    if value is not None:
        scales += [value, 1.0 / value]
    return scales, list(dict.fromkeys(caps))


def _positive_real(value) -> Optional[float]:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) and value > 0 else None
