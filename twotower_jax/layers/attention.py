"""Grouped-query attention with no positional encoding, over typed key contexts (SPEC §2, §3, §5).

A layer's keys come in **segments**, each with its own visibility rule:

* causal (a tower extending its own cache): one segment, the cache slots after this chunk's K/V are
  written, key s visible to the query at slot p iff s <= p and the slot holds a real token;
* cross (the denoiser at inference): [the context tower's valid slots] + [the block's own K/V], all
  visible — two segments, never concatenated;
* blockwise (the parallel training pass over N blocks of S): [context K/V of every position, visible
  iff in an earlier block] + [own K/V, visible iff in the same block].

`blockwise_attention` runs an online softmax over key chunks of every segment (and over query chunks),
skipping key chunks that no query of the chunk can see or that lie past the segment's filled length,
so memory is O(chunk²) rather than O(queries × capacity) and work grows with the filled part of the
cache, not its capacity. `dense_attention` is the reference: it materialises the keys and one mask
(the form the tests compare against). Both compute scores and softmax in float32.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from twotower_jax.cache import AttentionCache, BlockwiseContext, CausalContext, CrossContext, LayerContext
from twotower_jax.config import NemotronHConfig

AttentionImpl = Literal["blockwise", "dense", "fused"]
Rule = Literal["all", "causal", "earlier_blocks", "same_block"]
_NEG = jnp.finfo(jnp.float32).min


@dataclasses.dataclass(frozen=True)
class KeySegment:
    """Keys/values (b, s, kvh, d) with a visibility rule. Only slots < `length` (static or traced;
    default s) are read; `key_valid` (b, s) masks slots that hold no real token."""
    k: jax.Array
    v: jax.Array
    rule: Rule = "all"
    key_valid: Optional[jax.Array] = None
    length: Union[int, jax.Array, None] = None
    block_size: int = 1


def _visible(rule: Rule, q_pos, k_pos, block_size: int):
    """(lq, kc) visibility of keys at positions k_pos to queries at positions q_pos."""
    q, k = q_pos[:, None], k_pos[None, :]
    if rule == "all":
        return jnp.ones((q_pos.shape[0], k_pos.shape[0]), bool)
    if rule == "causal":
        return k <= q
    if rule == "earlier_blocks":
        return k // block_size < q // block_size
    if rule == "same_block":
        return k // block_size == q // block_size
    raise ValueError(f"unknown attention rule {rule!r}")


def _key_range(seg: KeySegment, q_min, q_max):
    """[lo, hi): the key positions any query in [q_min, q_max] may see (chunks outside are skipped)."""
    length = seg.k.shape[1] if seg.length is None else seg.length
    s = seg.block_size
    if seg.rule == "all":
        lo, hi = 0, length
    elif seg.rule == "causal":
        lo, hi = 0, jnp.minimum(length, q_max + 1)
    elif seg.rule == "earlier_blocks":
        lo, hi = 0, jnp.minimum(length, (q_max // s) * s)
    else:  # same_block
        lo, hi = (q_min // s) * s, jnp.minimum(length, (q_max // s + 1) * s)
    return lo, hi


class _Softmax:
    """Online-softmax state for grouped queries: running max m, normaliser l (b, g, r, lq), acc (…, d)."""

    @staticmethod
    def init(b, g, r, lq, d):
        return (jnp.full((b, g, r, lq), _NEG, jnp.float32), jnp.zeros((b, g, r, lq), jnp.float32),
                jnp.zeros((b, g, r, lq, d), jnp.float32))

    @staticmethod
    def update(state, qg, k, v, mask):
        """Folds keys k, v (b, kc, g, d) visible per `mask` (b, lq, kc) into the state."""
        m, l, acc = state
        d = qg.shape[-1]
        scores = jnp.einsum("blgrd,bsgd->bgrls", qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
        mask = mask[:, None, None]
        scores = jnp.where(mask, scores, _NEG)
        m_new = jnp.maximum(m, scores.max(-1))
        p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(-1)
        pv = jnp.einsum("bgrls,bsgd->bgrld", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l, acc * correction[..., None] + pv

    @staticmethod
    def finish(state):
        _, l, acc = state
        # A query that saw no key (only pad positions) gets 0 instead of NaN.
        return acc / jnp.maximum(l, jnp.finfo(jnp.float32).tiny)[..., None]


def _fold_segment(state, qg, q_pos, seg: KeySegment, k_chunk: int):
    """Folds one segment into the online-softmax state, key chunk by key chunk."""
    b, s = seg.k.shape[:2]
    kc = min(k_chunk, s)
    lo, hi = _key_range(seg, q_pos[0], q_pos[-1])

    def chunk_mask(first, start):
        """Keys start..start+kc−1, of which positions < first were already folded (the last chunk is
        shifted back to stay inside the buffer rather than padding a copy of it)."""
        k_pos = start + jnp.arange(kc)
        ok = _visible(seg.rule, q_pos, k_pos, seg.block_size)[None]
        ok &= ((k_pos >= first) & (k_pos >= lo) & (k_pos < hi))[None, None, :]
        if seg.key_valid is not None:
            ok &= jax.lax.dynamic_slice_in_dim(seg.key_valid, start, kc, axis=1)[:, None, :]
        return ok

    def fold(state, first):
        start = jnp.minimum(first, s - kc)
        k = jax.lax.dynamic_slice_in_dim(seg.k, start, kc, axis=1)
        v = jax.lax.dynamic_slice_in_dim(seg.v, start, kc, axis=1)
        return _Softmax.update(state, qg, k, v, chunk_mask(first, start))

    n_chunks = -(-s // kc)
    if n_chunks == 1:
        return fold(state, 0)

    @jax.checkpoint  # keep only the running state per chunk under autodiff, not the scores
    def body(state, index):
        first = index * kc
        needed = (first < hi) & (first + kc > lo)
        return jax.lax.cond(needed, fold, lambda st, _: st, state, first), None

    state, _ = jax.lax.scan(body, state, jnp.arange(n_chunks))
    return state


def blockwise_attention(q: Float[Array, "b l hq d"], q_start: Union[int, Int[Array, ""]],
                        segments: Sequence[KeySegment], *, q_chunk: int = 512, k_chunk: int = 1024
                        ) -> Float[Array, "b l hq d"]:
    """softmax(q·kᵀ/√d)·v over all segments' visible keys, as an online softmax over key chunks and
    query chunks. Query i sits at position q_start + i (the positions the rules compare)."""
    b, length, hq, d = q.shape
    kvh = segments[0].k.shape[2]
    qg = q.reshape(b, length, kvh, hq // kvh, d)

    def attend(qg_chunk, first):
        q_pos = q_start + first + jnp.arange(qg_chunk.shape[1])
        state = _Softmax.init(b, kvh, hq // kvh, qg_chunk.shape[1], d)
        for seg in segments:
            state = _fold_segment(state, qg_chunk, q_pos, seg, k_chunk)
        out = _Softmax.finish(state)                                    # (b, g, r, lq, d)
        return jnp.moveaxis(out, 3, 1).reshape(b, qg_chunk.shape[1], hq, d)

    qc = min(q_chunk, length)
    if qc == length:
        return attend(qg, 0).astype(q.dtype)

    def body(out, index):   # the last chunk shifts back inside the queries; it rewrites equal values
        first = jnp.minimum(index * qc, length - qc)
        chunk = jax.lax.dynamic_slice_in_dim(qg, first, qc, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(out, attend(chunk, first), first, axis=1), None

    out, _ = jax.lax.scan(body, jnp.zeros((b, length, hq, d), jnp.float32), jnp.arange(-(-length // qc)))
    return out.astype(q.dtype)


# --- the dense reference ------------------------------------------------------------------------

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
    scores = jnp.where(mask[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrls,bsgd->blgrd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, length, hq, d).astype(q.dtype)


def dense_attention(q: Float[Array, "b l hq d"], q_start, segments: Sequence[KeySegment]
                    ) -> Float[Array, "b l hq d"]:
    """The reference: every segment's keys concatenated and one dense (b, l, Σs) mask."""
    q_pos = q_start + jnp.arange(q.shape[1])
    masks = []
    for seg in segments:
        k_pos = jnp.arange(seg.k.shape[1])
        length = seg.k.shape[1] if seg.length is None else seg.length
        ok = _visible(seg.rule, q_pos, k_pos, seg.block_size)[None] & (k_pos < length)[None, None]
        if seg.key_valid is not None:
            ok = ok & seg.key_valid[:, None, :]
        masks.append(jnp.broadcast_to(ok, (q.shape[0], q.shape[1], seg.k.shape[1])))
    k = jnp.concatenate([seg.k for seg in segments], axis=1)
    v = jnp.concatenate([seg.v for seg in segments], axis=1)
    return gqa_attention(q, k, v, jnp.concatenate(masks, axis=-1))


def blockwise_cross_mask(length: int, block_size: int) -> Bool[Array, "l 2l"]:
    """Visibility over keys [context (l) ; own (l)] for queries of a sequence cut into blocks of
    `block_size`: context keys of earlier blocks, own keys of the same block (the dense training mask;
    the reference only)."""
    block = jnp.arange(length) // block_size
    sees_context = block[None, :] < block[:, None]
    sees_own = block[None, :] == block[:, None]
    return jnp.concatenate([sees_context, sees_own], axis=1)


# --- the platform's fused kernel -------------------------------------------------------------------

def fused_kernel_name(dtype) -> str:
    """The `jax.nn.dot_product_attention` implementation for this backend and dtype: cuDNN's flash
    attention on GPU for 16-bit operands (cuDNN has no float32 kernel), XLA's otherwise."""
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return "xla"


def fused_attention(q: Float[Array, "b l hq d"], q_start, segment: KeySegment,
                    implementation: Optional[str] = None) -> Float[Array, "b l hq d"]:
    """One key segment through `jax.nn.dot_product_attention` (cuDNN on GPU), its visibility as a
    boolean (b, 1, l, s) mask: O(l·s) booleans, so with chunked prefill (l <= prefill_chunk) it grows
    linearly with the cache. Queries that see no key get 0, as in `blockwise_attention`."""
    b, length = q.shape[:2]
    s = segment.k.shape[1]
    q_pos = q_start + jnp.arange(length)
    k_pos = jnp.arange(s)
    filled = s if segment.length is None else segment.length
    ok = _visible(segment.rule, q_pos, k_pos, segment.block_size) & (k_pos < filled)[None, :]
    ok = jnp.broadcast_to(ok[None], (b, length, s))
    if segment.key_valid is not None:
        ok = ok & segment.key_valid[:, None, :]
    implementation = implementation or fused_kernel_name(q.dtype)
    out = jax.nn.dot_product_attention(q, segment.k, segment.v, mask=ok[:, None],
                                       implementation=implementation)
    return jnp.where(ok.any(-1)[:, :, None, None], out, 0).astype(q.dtype)


def attend(q, q_start, segments: Sequence[KeySegment], impl: AttentionImpl = "blockwise", *,
           q_chunk: int = 512, k_chunk: int = 1024):
    """The one entry point the layer uses: blockwise (default), the dense reference, or "fused": the
    platform's kernel where it fits (one key segment: a tower's causal cache in prefill, extend and
    decode) and blockwise elsewhere (the denoiser's two segments would need a concatenated copy)."""
    if impl == "dense":
        return dense_attention(q, q_start, segments)
    if impl == "fused" and len(segments) == 1:
        return fused_attention(q, q_start, segments[0])
    if impl in ("blockwise", "fused"):
        return blockwise_attention(q, q_start, segments, q_chunk=q_chunk, k_chunk=k_chunk)
    raise ValueError(f"unknown attention impl {impl!r}; expected 'blockwise', 'dense' or 'fused'")


# --- the layer ------------------------------------------------------------------------------------

class Attention(nn.Module):
    config: NemotronHConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    impl: AttentionImpl = "blockwise"
    q_chunk: int = 512
    k_chunk: int = 1024
    # Decode steps (one query per row) tile keys at most this finely: `blockwise_attention` skips the
    # tiles past the filled part of the cache, so a step reads (and XLA:CPU copies into the batched-dot
    # layout) about the filled slots rather than the whole capacity, a cost that grows with the batch
    # (experiments/results/decode_batch_cpu.md). None: `k_chunk`.
    decode_k_chunk: Optional[int] = 128

    @nn.compact
    def __call__(self, x: Float[Array, "b l d"], context: LayerContext):
        """Returns (out (b, l, d), the layer's new cache for a `CausalContext`, else None)."""
        cfg = self.config
        b, length, _ = x.shape
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        q = nn.Dense(cfg.num_attention_heads * cfg.head_dim, name="q_proj", **dense)(x)
        k = nn.Dense(cfg.num_key_value_heads * cfg.head_dim, name="k_proj", **dense)(x)
        v = nn.Dense(cfg.num_key_value_heads * cfg.head_dim, name="v_proj", **dense)(x)
        q = q.reshape(b, length, cfg.num_attention_heads, cfg.head_dim)
        cache = context.cache
        k = k.reshape(b, length, cfg.num_key_value_heads, cfg.head_dim).astype(cache.k.dtype)
        v = v.reshape(b, length, cfg.num_key_value_heads, cfg.head_dim).astype(cache.v.dtype)
        new_cache = None
        if isinstance(context, CausalContext):
            start = context.start
            new_cache = AttentionCache(k=jax.lax.dynamic_update_slice(cache.k, k, (0, start, 0, 0)),
                                       v=jax.lax.dynamic_update_slice(cache.v, v, (0, start, 0, 0)))
            segments = [KeySegment(new_cache.k, new_cache.v, "causal", context.key_valid, start + length)]
            q_start = start
        elif isinstance(context, CrossContext):
            segments = [KeySegment(cache.k, cache.v, "all", context.key_valid, context.length),
                        KeySegment(k, v, "all")]
            q_start = 0
        elif isinstance(context, BlockwiseContext):
            s = context.block_size
            segments = [KeySegment(cache.k, cache.v, "earlier_blocks", block_size=s),
                        KeySegment(k, v, "same_block", block_size=s)]
            q_start = 0
        else:
            raise TypeError(f"attention needs a Causal/Cross/BlockwiseContext, got {type(context).__name__}")
        segments = [dataclasses.replace(seg, k=seg.k.astype(self.dtype), v=seg.v.astype(self.dtype))
                    for seg in segments]
        k_chunk = self.k_chunk
        if length == 1 and self.decode_k_chunk is not None:
            k_chunk = min(k_chunk, self.decode_k_chunk)
        out = attend(q, q_start, segments, self.impl, q_chunk=self.q_chunk, k_chunk=k_chunk)
        out = nn.Dense(cfg.hidden_size, name="o_proj", **dense)(out.reshape(b, length, -1))
        return out, new_cache
