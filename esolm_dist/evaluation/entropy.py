"""Unigram entropy of a sample: low values flag repetitive text that a low gen PPL would hide."""

from __future__ import annotations

import math
from collections import Counter


def unigram_entropy(token_ids: list[int]) -> float:
    """-sum_v p_v log p_v (nats) of the token frequencies p_v in one sample (all its L tokens, as the
    paper's code counts them); 0 for an empty sample."""
    total = len(token_ids)
    return -sum(count / total * math.log(count / total) for count in Counter(token_ids).values())
