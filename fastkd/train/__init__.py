"""The thin trainer of ``fastkd train`` (DESIGN.md §5; docs/train.md).

- :class:`TrainConfig`: every option, from YAML and ``--key value`` overrides.
- :class:`Trainer` / :func:`train`: the loop (modes offline, online, on_policy, cross_tokenizer and
  sft), evaluation, checkpoints with exact resume, metrics.
- :mod:`fastkd.train.checkpoint`: atomic, checksummed safetensors checkpoints.
"""
from .config import TrainConfig
from .trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
