"""Batching prompts of different lengths (left padding) and checking sampler inputs."""
from __future__ import annotations

import dataclasses
import hashlib
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


def row_seeds(seed, batch_size: int) -> np.ndarray:
    """Per-row random streams for the samplers (`tokens.row_keys` turns them into PRNG keys).

    - an int: row r gets the seed `seed + r` (the samplers' historical default; rows of seed s and s + 1
      overlap, so the generation engine never uses it: it passes per-request keys);
    - a sequence of ints: one seed per row, (b,) uint32;
    - a (b, k) uint32 array of PRNG key data (`request_key_data`): one key per row, used as is — the
      engine's per-request streams, `fold_in(key(seed), request id)`.
    """
    if isinstance(seed, (int, np.integer)):
        return np.arange(batch_size, dtype=np.int64).astype(np.uint32) + np.uint32(seed)
    seeds = np.asarray(seed if isinstance(seed, np.ndarray) else list(seed))
    if seeds.ndim == 2:
        if seeds.shape[0] != batch_size or seeds.dtype != np.uint32:
            raise ValueError(f"key data must be ({batch_size}, k) uint32, got {seeds.shape} {seeds.dtype}")
        return seeds
    if seeds.shape != (batch_size,):
        raise ValueError(f"got {seeds.size} seeds for {batch_size} prompts")
    return seeds.astype(np.uint32)


def _id_words(request_id) -> list[int]:
    """A request id as uint32 words to fold in: an int in [0, 2**32) is itself; anything else (strings,
    other ints) is the first two 32-bit words of the SHA-256 of its type-tagged text."""
    if isinstance(request_id, (int, np.integer)) and not isinstance(request_id, bool) and 0 <= request_id < 2 ** 32:
        return [int(request_id)]
    tag = ("i:" if isinstance(request_id, (int, np.integer)) else "s:") + str(request_id)
    digest = hashlib.sha256(tag.encode("utf-8")).digest()
    return [int.from_bytes(digest[0:4], "little"), int.from_bytes(digest[4:8], "little")]


def request_key_data(seed: int, request_ids: Sequence) -> np.ndarray:
    """(n, k) uint32 PRNG key data, row i = key_data(fold_in(key(seed), request_ids[i])) (string ids and
    ints outside [0, 2**32) are hashed to words first, each folded in turn). A request's stream depends on
    (seed, id) only: not on its batch, position, bucket, process or resume point; and seed s + 1 shares
    no stream with seed s. `seed` may differ per request (a sequence as long as `request_ids`)."""
    import jax   # the samplers import jax anyway; kept local so this module stays light
    ids = list(request_ids)
    seeds = [seed] * len(ids) if isinstance(seed, (int, np.integer)) else list(seed)
    if len(seeds) != len(ids):
        raise ValueError(f"got {len(seeds)} seeds for {len(ids)} requests")
    rows = []
    for s, request_id in zip(seeds, ids):
        if not isinstance(s, (int, np.integer)) or isinstance(s, bool):
            raise ValueError(f"seed must be an integer, got {s!r}")
        key = jax.random.key(int(s) % 2 ** 32)
        for word in _id_words(request_id):
            key = jax.random.fold_in(key, np.uint32(word))
        rows.append(np.asarray(jax.random.key_data(key)))
    return np.stack(rows).astype(np.uint32) if rows else np.zeros((0, 2), np.uint32)


def check_eos(eos_token_id: Optional[int], vocab_size: int) -> None:
    if eos_token_id is not None and not 0 <= eos_token_id < vocab_size:
        raise ValueError(f"eos_token_id {eos_token_id} is outside the vocabulary [0, {vocab_size})")
