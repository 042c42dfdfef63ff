"""Picking tokens from logits (greedy, temperature, top-k, top-p) and scoring them under the model."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean no filtering."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def row_keys(seeds) -> jax.Array:
    """One PRNG key per row, so a row samples the same alone as in any batch: from its own seed ((b,) ints,
    `jax.random.key(seed)`), or from key data ((b, k) uint32, `prompts.request_key_data`: the engine's
    per-request streams, wrapped as they are)."""
    seeds = jnp.asarray(seeds)
    if seeds.ndim == 2:
        return jax.random.wrap_key_data(seeds.astype(jnp.uint32))
    return jax.vmap(jax.random.key)(seeds)


def fold_rows(keys: jax.Array, *indices) -> jax.Array:
    """Each row's key folded with the same loop indices (block, step, ...)."""
    for index in indices:
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, index)
    return keys


def sampling_logits(logits: Float[Array, "... v"], sampling: SamplingParams) -> Float[Array, "... v"]:
    """The logits `select_tokens` samples from when temperature > 0: logits / T, with every token outside the
    top-k / top-p set at the float32 minimum (softmax of the result is the sampling distribution)."""
    scaled = logits.astype(jnp.float32) / sampling.temperature
    neg = jnp.finfo(jnp.float32).min
    if sampling.top_k > 0:
        k = min(sampling.top_k, logits.shape[-1])
        kth = jax.lax.top_k(scaled, k)[0][..., -1:]
        scaled = jnp.where(scaled < kth, neg, scaled)
    if sampling.top_p < 1:
        sorted_logits = jnp.flip(jnp.sort(scaled, axis=-1), axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        cutoff = jnp.min(jnp.where(mass_before < sampling.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled < cutoff, neg, scaled)
    return scaled


def select_tokens(logits: Float[Array, "b v"], keys: jax.Array, sampling: SamplingParams) -> Int[Array, "b"]:
    """Greedy argmax, or a sample from softmax(logits / T) restricted to the top-k / top-p set.

    `keys` holds one PRNG key per row."""
    logits = logits.astype(jnp.float32)
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(keys, sampling_logits(logits, sampling)).astype(jnp.int32)


def token_logprobs(logits: Float[Array, "b v"], tokens: Int[Array, "b"]) -> Float[Array, "b"]:
    """log p(token) under the model's own distribution (unscaled, unfiltered softmax)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
