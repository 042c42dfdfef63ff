"""Scoring generations for the sampler experiments: exact-match task accuracy, agreement between two
modes, the AR (context) tower's perplexity of generated text, and a repetition guard.

Perplexity alone rewards degenerate text (a loop of one token is very likely under a small LM), so it is
always reported next to `repetition_rate`, the fraction of n-grams that repeat an earlier n-gram of the
same row.
"""
from __future__ import annotations

import statistics
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax.sampling.prompts import left_pad
from twotower_jax.tower import NemotronH, Params


def strip_eos(row: Sequence[int], eos_token_id: int) -> list[int]:
    row = list(row)
    return row[:row.index(eos_token_id)] if eos_token_id in row else row


def agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]], eos_token_id: int) -> float:
    """Fraction of rows whose generations (up to EOS) are identical."""
    if len(a) != len(b):
        raise ValueError(f"agreement needs equal row counts, got {len(a)} and {len(b)}")
    same = [strip_eos(x, eos_token_id) == strip_eos(y, eos_token_id) for x, y in zip(a, b)]
    return float(np.mean(same)) if same else float("nan")


def repetition_rate(generations: Sequence[Sequence[int]], n: int = 3) -> float:
    """Fraction of all n-grams (over all rows) equal to an earlier n-gram of the same row."""
    repeated = total = 0
    for row in generations:
        seen = set()
        for i in range(len(row) - n + 1):
            gram = tuple(row[i:i + n])
            repeated += gram in seen
            total += 1
            seen.add(gram)
    return repeated / total if total else 0.0


def continuation_perplexity(tower: NemotronH, params: Params, prompts: Sequence[Sequence[int]],
                            generations: Sequence[Sequence[int]], pad_id: int = 0) -> float:
    """exp(mean negative log-likelihood) of the generated tokens (EOS included) given their prompts,
    under `tower` (float32, one batched forward pass)."""
    rows = [list(p) + list(g) for p, g in zip(prompts, generations)]
    if not any(generations):
        return float("nan")
    tokens, valid = left_pad(rows, pad_id, tower.config.vocab_size)
    logits, _ = tower.prefill(params, jnp.asarray(tokens), jnp.asarray(valid))
    logp = np.asarray(jax.nn.log_softmax(logits[:, :-1], axis=-1))
    targets = tokens[:, 1:]
    token_logp = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    scored = np.zeros_like(valid[:, 1:])
    width = tokens.shape[1]
    for i, g in enumerate(generations):   # the last len(g) positions of each row are generated
        if g:
            scored[i, width - 1 - len(g):] = True
    return float(np.exp(-token_logp[scored].mean()))


def timed_one_at_a_time(generate: Callable, prompts: Sequence[Sequence[int]], repeats: int = 3
                        ) -> tuple[int, float]:
    """(generated tokens, run seconds) of generating each prompt alone (batch 1: the latency-bound regime
    where block diffusion pays, as in the release's measurements), the median of `repeats` runs per
    prompt. `generate(list of prompts) -> GenerationResult`; compile time is excluded: the samplers
    report run time alone and reuse their compiled programs."""
    tokens, seconds = 0, 0.0
    for prompt in prompts:
        runs = [generate([prompt]) for _ in range(repeats)]
        tokens += len(runs[-1].tokens[0])
        seconds += statistics.median(r.stats["seconds"] for r in runs)
    return tokens, seconds
