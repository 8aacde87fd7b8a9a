"""Parallel execution of fastkd's losses: a vocabulary-parallel LM head (docs/parallel.md)."""
from .vocab_parallel import VocabShard, is_vocab_sharded, vocab_shard

__all__ = ["VocabShard", "is_vocab_sharded", "vocab_shard"]
