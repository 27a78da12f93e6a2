"""Data pipeline: bundled corpus and tokenizer, token shards (writer and manifest), the
data-parallel shard reader with resumable state.

Import the submodules directly (``esolm_dist.data.loader``, ``esolm_dist.data.shards``,
``esolm_dist.data.tokenizer``); this package imports nothing heavy on its own.
"""
