"""Generative perplexity (paper section 5): each sample, in the export's token ids, is cut at its first
EOS, decoded to text, re-encoded with the evaluator's tokenizer and scored by the evaluator in chunks of
its context length; gen PPL = exp(token-weighted mean NLL over all samples)."""

from __future__ import annotations

import math

from tokenizers import Tokenizer

from esolm_dist.evaluation.evaluator import Evaluator


def evaluator_ids(sample_ids: list[int], tokenizer: Tokenizer, eos_id: int, evaluator: Evaluator) -> list[int]:
    """The sample as the evaluator scores it: [BOS] + its text before the first EOS, re-encoded,
    + [EOS] when the sample ended there (the evaluator is charged for ending the document too)."""
    ended = eos_id in sample_ids
    kept = sample_ids[:sample_ids.index(eos_id)] if ended else sample_ids
    ids = evaluator.encode(tokenizer.decode(kept, skip_special_tokens=False))
    if evaluator.bos_id is not None:
        ids = [evaluator.bos_id, *ids]
    if ended and evaluator.eos_id is not None:
        ids.append(evaluator.eos_id)
    return ids


def chunks_of(ids: list[int], size: int) -> list[list[int]]:
    """Consecutive chunks of at most `size` tokens; each chunk's first token is context only."""
    return [ids[start:start + size] for start in range(0, len(ids), size)]


def sample_nll(evaluator: Evaluator, id_lists: list[list[int]]) -> list[tuple[float, int]]:
    """Per sample: (summed NLL, number of scored tokens), all samples' chunks in one call."""
    per_sample = [chunks_of(ids, evaluator.context_len) for ids in id_lists]
    flat = [chunk for chunks in per_sample for chunk in chunks]
    nlls = iter(evaluator.chunk_nll(flat) if flat else [])
    return [(sum(next(nlls) for _ in chunks), sum(len(chunk) - 1 for chunk in chunks)) for chunks in per_sample]


def perplexity(nlls: list[tuple[float, int]]) -> float:
    """exp(sum of NLLs / number of scored tokens); nan when no token was scored."""
    tokens = sum(count for _, count in nlls)
    return math.exp(sum(nll for nll, _ in nlls) / tokens) if tokens else math.nan
