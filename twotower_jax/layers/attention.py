"""Grouped-query attention with no positional encoding, reading and writing a slot-indexed KV cache."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from twotower_jax.cache import AttentionCache
from twotower_jax.config import NemotronHConfig


def gqa_attention(
    q: Float[Array, "b l hq d"],
    k: Float[Array, "b s kvh d"],
    v: Float[Array, "b s kvh d"],
    mask: Bool[Array, "b l s"],
) -> Float[Array, "b l hq d"]:
    """softmax(q·kᵀ/√d + mask)·v with query heads grouped onto KV heads; scores and softmax in float32.

    Masked scores get the most negative finite float rather than −inf, so a query with no visible key
    (a pad position) yields a harmless average instead of NaN.
    """
    b, length, hq, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, length, kvh, hq // kvh, d)
    scores = jnp.einsum("blgrd,bsgd->bgrls", qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrls,bsgd->blgrd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, length, hq, d).astype(q.dtype)


def blockwise_cross_mask(length: int, block_size: int) -> Bool[Array, "l 2l"]:
    """Visibility over keys [context (l) ; own (l)] for queries of a sequence cut into blocks of
    `block_size`: context keys of earlier blocks, own keys of the same block."""
    block = jnp.arange(length) // block_size
    sees_context = block[None, :] < block[:, None]
    sees_own = block[None, :] == block[:, None]
    return jnp.concatenate([sees_context, sees_own], axis=1)


class Attention(nn.Module):
    config: NemotronHConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "b l d"], cache: AttentionCache, start: Int[Array, ""],
                 key_valid: Bool[Array, "b s"], cross: bool = False, block_size: Optional[int] = None):
        """Causal mode: writes this chunk's K/V at slots start..start+l-1 and attends causally over all
        valid slots (`key_valid` already includes this chunk). Returns (out (b, l, d), new cache).

        Cross mode (the denoiser reading the context tower): `cache` is the other tower's K/V, read only;
        keys are [its valid slots ; this chunk's own k/v] with no mask inside the chunk (bidirectional).
        `start` is unused and the cache comes back unchanged.

        Cross mode with `block_size` S (the parallel training form, SPEC §5): x is a whole sequence of
        L = N·S positions and `cache` holds the context tower's K/V for the same L positions; a query in
        block n sees context keys of blocks 0..n−1 and its own block's keys (bidirectionally), nothing else.
        """
        cfg = self.config
        b, length, _ = x.shape
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        q = nn.Dense(cfg.num_attention_heads * cfg.head_dim, name="q_proj", **dense)(x)
        k = nn.Dense(cfg.num_key_value_heads * cfg.head_dim, name="k_proj", **dense)(x)
        v = nn.Dense(cfg.num_key_value_heads * cfg.head_dim, name="v_proj", **dense)(x)
        q = q.reshape(b, length, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(b, length, cfg.num_key_value_heads, cfg.head_dim).astype(cache.k.dtype)
        v = v.reshape(b, length, cfg.num_key_value_heads, cfg.head_dim).astype(cache.v.dtype)
        if cross and block_size is not None:
            k_all = jnp.concatenate([cache.k, k], axis=1)
            v_all = jnp.concatenate([cache.v, v], axis=1)
            mask = blockwise_cross_mask(length, block_size)[None]
        elif cross:
            k_all = jnp.concatenate([cache.k, k], axis=1)
            v_all = jnp.concatenate([cache.v, v], axis=1)
            visible = jnp.concatenate([key_valid, jnp.ones((b, length), bool)], axis=1)
            mask = jnp.broadcast_to(visible[:, None, :], (b, length, visible.shape[1]))
        else:
            k_all = jax.lax.dynamic_update_slice(cache.k, k, (0, start, 0, 0))
            v_all = jax.lax.dynamic_update_slice(cache.v, v, (0, start, 0, 0))
            query_slot = start + jnp.arange(length)
            key_slot = jnp.arange(cache.k.shape[1])
            mask = (key_slot[None, :] <= query_slot[:, None])[None] & key_valid[:, None, :]
        out = gqa_attention(q, k_all.astype(self.dtype), v_all.astype(self.dtype), mask)
        out = nn.Dense(cfg.hidden_size, name="o_proj", **dense)(out.reshape(b, length, -1))
        return out, (cache if cross else AttentionCache(k=k_all, v=v_all))
