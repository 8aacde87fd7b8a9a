"""Offline teacher caches (DESIGN.md §4, docs/cache.md): capture, import, read.

- ``format``: manifest, safetensors shards, 4-byte packed (id, log-prob) entries, checksums.
- ``capture``: :func:`capture` runs a Hugging Face teacher over a dataset (resumable).
- ``importers``: :func:`import_vllm` (vLLM ``prompt_logprobs``), :func:`import_dataset`
  (``target_token_ids``/``target_logprobs`` columns).
- ``reader``: :class:`TeacherCache` (a ``Dataset``) and :class:`CacheCollator`.
"""
from .capture import capture, load_texts, plan_shards, topk_logprobs
from .format import (FORMAT_VERSION, CacheError, id_bits, logprob_error_bound, pack_topk,
                     tokenizer_fingerprint, unpack_topk)
from .importers import import_dataset, import_vllm
from .reader import CacheCollator, TeacherCache

__all__ = [
    "FORMAT_VERSION", "CacheCollator", "CacheError", "TeacherCache", "capture", "id_bits",
    "import_dataset", "import_vllm", "load_texts", "logprob_error_bound", "pack_topk",
    "plan_shards", "tokenizer_fingerprint", "topk_logprobs", "unpack_topk",
]
