"""Inference caches: a per-layer pytree (KV for `*`, conv + fp32 SSM state for `M`, nothing otherwise).

Slots of the KV buffers are absolute positions 0..capacity-1 shared by every row; rows of different
prompt lengths are left-padded, and `key_valid` marks which slots hold real tokens. There is no
positional encoding in the model, so slot numbers matter only for causality.
"""
from __future__ import annotations

from typing import Optional, Union

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from twotower_jax.config import ATTENTION, MAMBA, NemotronHConfig


@struct.dataclass
class AttentionCache:
    k: Float[Array, "b s kvh d"]
    v: Float[Array, "b s kvh d"]


@struct.dataclass
class MambaCache:
    conv: Float[Array, "b k1 c"]   # last conv_kernel-1 raw (pre-conv) xBC columns
    ssm: Float[Array, "b h p n"]   # float32 always


LayerCache = Optional[Union[AttentionCache, MambaCache]]


@struct.dataclass
class TowerCache:
    layers: tuple                  # one LayerCache per layer (None for `E` and `-`)
    key_valid: Bool[Array, "b s"]  # which KV slots hold real (non-pad) tokens
    length: Int[Array, ""]         # slots filled so far (same for every row)

    @property
    def capacity(self) -> int:
        return self.key_valid.shape[1]

    @property
    def batch_size(self) -> int:
        return self.key_valid.shape[0]


def init_cache(config: NemotronHConfig, batch_size: int, capacity: int, dtype=jnp.float32) -> TowerCache:
    """An empty cache for `capacity` positions. KV in `dtype`; Mamba conv and SSM states in float32."""
    if batch_size < 1 or capacity < 1:
        raise ValueError(f"cache needs batch_size >= 1 and capacity >= 1, got {batch_size}, {capacity}")
    layers = []
    for layer_type in config.pattern:
        if layer_type == ATTENTION:
            shape = (batch_size, capacity, config.num_key_value_heads, config.head_dim)
            layers.append(AttentionCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)))
        elif layer_type == MAMBA:
            layers.append(MambaCache(
                conv=jnp.zeros((batch_size, config.conv_kernel - 1, config.conv_dim), jnp.float32),
                ssm=jnp.zeros((batch_size, config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size),
                              jnp.float32)))
        else:
            layers.append(None)
    return TowerCache(layers=tuple(layers), key_valid=jnp.zeros((batch_size, capacity), bool),
                      length=jnp.zeros((), jnp.int32))


# --- what a layer reads and writes: one typed context per call ----------------------------------

@struct.dataclass
class CausalContext:
    """A tower extending its own cache by a chunk: attention writes the chunk's K/V at slots
    start..start+l−1 and attends causally over every valid slot (`key_valid` (b, capacity) already
    includes the chunk); Mamba continues from its conv/SSM state. The layer returns its new cache."""
    cache: LayerCache
    start: Int[Array, ""]
    key_valid: Bool[Array, "b s"]


@struct.dataclass
class CrossContext:
    """The denoiser reading the context tower's layer cache, read only (SPEC §3): attention sees the
    context's valid slots 0..length−1 and all of the chunk's own positions (bidirectional); Mamba starts
    from the context's states and its end state is discarded."""
    cache: LayerCache
    key_valid: Bool[Array, "b s"]
    length: Int[Array, ""]


@struct.dataclass
class BlockwiseContext:
    """The parallel training pass (SPEC §5): the chunk is a whole sequence of N blocks of `block_size`.
    Attention: `cache` holds the context tower's K/V at the same N·S positions; a query in block n sees
    context keys of blocks 0..n−1 and its own block's keys. Mamba: `cache` holds the context state before
    each block, conv (b, N, k1, c) and ssm (b, N, h, p, n) (block 0: zeros); each block is scanned as its
    own sequence from its seed."""
    cache: LayerCache
    block_size: int = struct.field(pytree_node=False)


LayerContext = Union[CausalContext, CrossContext, BlockwiseContext]


@struct.dataclass
class BlockwiseTowerContext:
    """What the context tower hands the denoiser in the parallel training pass: one layer cache per
    layer as `BlockwiseContext.cache` describes (None for layers without a cache)."""
    layers: tuple
    block_size: int = struct.field(pytree_node=False)

    def layer(self, index: int) -> BlockwiseContext:
        return BlockwiseContext(self.layers[index], self.block_size)
