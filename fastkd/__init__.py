"""fastkd: fused knowledge-distillation losses for large-vocabulary language models.

The losses are computed straight from hidden states and the LM-head weight, streaming over the
vocabulary, without a ``[tokens x vocab]`` logits tensor. See DESIGN.md §2 for the API contract.
"""
from .api import kd_loss, resolve_impl, topk_kd_loss
from .bytes import ByteKDLoss, ByteVocab, align_batch, align_tokenizations, byte_kd_loss, byte_logprobs
from .config import config
from .modules import KDLoss, TopKKDLoss
from .stats import KDStats

__version__ = "0.1.0"

__all__ = ["ByteKDLoss", "ByteVocab", "KDLoss", "KDStats", "TopKKDLoss", "align_batch",
           "align_tokenizations", "byte_kd_loss", "byte_logprobs", "config", "kd_loss",
           "resolve_impl", "topk_kd_loss"]
