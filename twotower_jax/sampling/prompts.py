"""Batching prompts of different lengths (left padding) and checking sampler inputs."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, vocab_size: int, width: Optional[int] = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Returns (tokens (b, p) int32, valid (b, p) bool), each row right-aligned. p = the longest prompt,
    or `width` if given (a fixed width compiles one program for every prompt length up to it)."""
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    rows = [list(map(int, p)) for p in prompts]
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:8]}")
    longest = max(len(r) for r in rows)
    if width is not None and width < longest:
        raise ValueError(f"prompt_width {width} is shorter than the longest prompt ({longest} tokens)")
    width = longest if width is None else width
    tokens = np.full((len(rows), width), pad_id, np.int32)
    valid = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):] = row
        valid[i, width - len(row):] = True
    return tokens, valid


@dataclasses.dataclass
class GenerationResult:
    """Generated ids and their log-probs per row (cut after EOS, EOS kept), plus run statistics."""
    tokens: list[list[int]]
    logprobs: list[list[float]]
    stats: dict

    def to_json_dict(self) -> dict:
        return {"tokens": self.tokens, "logprobs": self.logprobs, "stats": self.stats}


def cut_rows(tokens: np.ndarray, logprobs: np.ndarray, lengths: np.ndarray) -> tuple[list, list]:
    return ([tokens[i, :n].tolist() for i, n in enumerate(lengths)],
            [logprobs[i, :n].tolist() for i, n in enumerate(lengths)])


def row_seeds(seed: Union[int, Sequence[int]], batch_size: int) -> np.ndarray:
    """An int seed gives row r the seed `seed + r`; a sequence gives each row its own."""
    if isinstance(seed, (int, np.integer)):
        return np.arange(batch_size, dtype=np.int64).astype(np.uint32) + np.uint32(seed)
    seeds = np.asarray(list(seed))
    if seeds.shape != (batch_size,):
        raise ValueError(f"got {seeds.size} seeds for {batch_size} prompts")
    return seeds.astype(np.uint32)


def check_eos(eos_token_id: Optional[int], vocab_size: int) -> None:
    if eos_token_id is not None and not 0 <= eos_token_id < vocab_size:
        raise ValueError(f"eos_token_id {eos_token_id} is outside the vocabulary [0, {vocab_size})")
