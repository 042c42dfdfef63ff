"""One Nemotron-H tower: embeddings → layers by pattern → norm_f → LM head (SPEC §2).

Every entry point is the same computation, "extend the cache by a chunk of tokens":

* `prefill(params, tokens, valid, capacity)`  – from an empty cache (full causal forward),
* `extend(params, tokens, cache, valid)`      – a chunk of new tokens (the diffusion commit pass),
* `decode_step(params, token, cache)`         – one token per row.

Params are a plain nested dict (`NemotronHTower.init` / the checkpoint loader fill it).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from twotower_jax.cache import (BlockwiseContext, BlockwiseTowerContext, CausalContext, CrossContext, LayerContext,
                                MambaCache, TowerCache, init_cache)
from twotower_jax.config import ATTENTION, MAMBA, MLP, MOE, NemotronHConfig
from twotower_jax.layers.adaln import TimestepEmbedder, modulate
from twotower_jax.layers.attention import Attention, AttentionImpl
from twotower_jax.layers.mamba2 import Mamba2Mixer, mamba_cache_at
from twotower_jax.layers.moe import MoE, MoEImpl, ReluSquaredMLP
from twotower_jax.layers.norms import RMSNorm
from twotower_jax.ops.ssd import ScanImpl

Params = dict[str, Any]
LogitsAt = Literal["all", "last", "none"]
RematPolicy = Literal["none", "full", "dots"]
# Prompts longer than this are prefilled this many tokens at a time: activation memory stays bounded
# (experiments/results/aot_memory.md: 1024 keeps the real config flat from 1k to 32k tokens on XLA:CPU).
DEFAULT_PREFILL_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class Impl:
    """Implementation choices that do not change the math (resolved at trace time)."""
    scan: ScanImpl = "auto"
    moe: MoEImpl = "auto"
    attention: AttentionImpl = "blockwise"   # "dense": the reference; "fused": cuDNN/XLA kernel where it fits
    attention_q_chunk: int = 512             # queries per online-softmax tile
    attention_k_chunk: int = 1024            # keys per online-softmax tile
    # At most this many keys per tile for one-token calls (decode steps): tiles past the filled slots are
    # skipped, so a step reads about the filled part of the cache, not its capacity; None: attention_k_chunk.
    attention_decode_k_chunk: Optional[int] = 128
    # Rematerialisation per layer under autodiff (training memory): "none" keeps every activation,
    # "full" keeps only each layer's input and recomputes the rest in the backward pass, "dots" also
    # keeps the matmul outputs without batch dimensions (jax.checkpoint_policies).
    remat: RematPolicy = "none"


class Block(nn.Module):
    """One layer: h + mixer(RMSNorm(h)), the mixer chosen by the layer letter.

    With `adaln` (denoiser layers) the block owns a `scale_shift_table` (3, D); given a timestep
    conditioning `t_cond` (b, 3D) it computes (shift, scale, gate) = table + t_cond and
      Mamba / attention:  h + gate · mixer(RMSNorm(modulate(h)))
      MoE / dense MLP:    h + gate · mixer(modulate(RMSNorm(h)))
    (SPEC §3; the release has no dense-MLP layers, which follow the MoE order here.) Without `t_cond`
    the block is plain, as in mock-AR.

    `context` says what the layer reads and writes (`twotower_jax.cache`): a `CausalContext` (the tower
    extends its own cache; the new layer cache is returned), a `CrossContext` (the denoiser reads the
    context tower's layer cache: attention over [context K/V ; own], Mamba seeded from the context
    state) or a `BlockwiseContext` (the parallel training form, SPEC §5: h is a whole sequence of N
    blocks; the attention cache holds the context K/V of all N·S positions, the Mamba cache one seed
    state per block, shaped (b, N, ...)). Returns (h, new layer cache or None).
    """
    config: NemotronHConfig
    layer_type: str
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    impl: Impl = Impl()
    adaln: bool = False

    @nn.compact
    def __call__(self, h, context: Optional[LayerContext], valid, t_cond=None, return_scan_inputs: bool = False):
        cfg = self.config
        norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, self.param_dtype, name="norm")
        gate = None
        if self.adaln:
            table = self.param("scale_shift_table", nn.initializers.zeros, (3, cfg.hidden_size), self.param_dtype)
        if t_cond is not None:
            if not self.adaln:
                raise ValueError("timestep conditioning given to a layer without adaLN")
            cond = table.astype(h.dtype)[None] + t_cond.astype(h.dtype).reshape(h.shape[0], 3, cfg.hidden_size)
            shift, scale, gate = (cond[:, i, None, :] for i in range(3))   # each (b, 1, D)
            if self.layer_type in (MAMBA, ATTENTION):
                x = norm(modulate(h, shift, scale))
            else:
                x = modulate(norm(h), shift, scale)
        else:
            x = norm(h)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name="mixer")
        new_cache = None
        if self.layer_type == MAMBA:
            mixer = Mamba2Mixer(cfg, scan_impl=self.impl.scan, **kw)
            if isinstance(context, BlockwiseContext):
                out = _per_block(mixer, x, context.cache, valid, context.block_size)
            elif return_scan_inputs:  # a CausalContext extension whose prefixes `truncate_extension` rebuilds
                out, new_cache, extension = mixer(x, context.cache, valid, return_scan_inputs=True)
                out = out.astype(h.dtype)
                return h + (out if gate is None else gate * out), new_cache, extension
            else:
                out, state = mixer(x, context.cache, valid)
                new_cache = state if isinstance(context, CausalContext) else None
        elif self.layer_type == ATTENTION:
            out, new_cache = Attention(cfg, impl=self.impl.attention, q_chunk=self.impl.attention_q_chunk,
                                       k_chunk=self.impl.attention_k_chunk,
                                       decode_k_chunk=self.impl.attention_decode_k_chunk, **kw)(x, context)
        elif self.layer_type == MOE:
            out = MoE(cfg, impl=self.impl.moe, **kw)(x)
        elif self.layer_type == MLP:
            out = ReluSquaredMLP(cfg.hidden_size, cfg.intermediate_size, **kw)(x)
        else:
            raise ValueError(f"unknown layer type {self.layer_type!r}")
        out = out.astype(h.dtype)
        h = h + (out if gate is None else gate * out)
        return (h, new_cache, None) if return_scan_inputs else (h, new_cache)


def _per_block(mixer: Mamba2Mixer, x, seeds: MambaCache, valid, block_size: int):
    """Runs a Mamba mixer over each block of `block_size` positions as an independent sequence started
    from that block's seed state (seeds shaped (b, N, ...)); returns the output (b, N·S, d)."""
    b, length, d = x.shape
    n = length // block_size
    flat = MambaCache(conv=seeds.conv.reshape(b * n, *seeds.conv.shape[2:]),
                      ssm=seeds.ssm.reshape(b * n, *seeds.ssm.shape[2:]))
    out, _ = mixer(x.reshape(b * n, block_size, d), flat, valid.reshape(b * n, block_size))
    return out.reshape(b, length, -1)


REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_block(policy: str):
    """`Block`, or `Block` under `nn.remat` with the named policy (same params, same results)."""
    if policy == "none":
        return Block
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; expected 'none', {', '.join(map(repr, REMAT_POLICIES))}")
    # static_argnums counts the module as 0: 5 is `return_scan_inputs` (a Python bool). Every call passes all
    # five arguments positionally, as jax.checkpoint needs the static one among the positional arguments.
    return nn.remat(Block, policy=REMAT_POLICIES[policy], static_argnums=(5,))


class NemotronHTower(nn.Module):
    """Linen module of one tower. `__call__(tokens, cache, valid)` → (float32 logits, new cache).

    With `denoiser=True` it is TwoTower's denoiser tower: every layer gets adaLN, the module owns
    `t_embedder` and `t_block_1`, and `denoise` runs a block against the context tower's cache.
    """
    config: NemotronHConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    impl: Impl = Impl()
    denoiser: bool = False

    def setup(self):
        cfg = self.config
        self.embeddings = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name="embeddings")
        block = remat_block(self.impl.remat)
        self.layers = [block(cfg, t, self.dtype, self.param_dtype, self.impl, adaln=self.denoiser,
                             name=f"layers_{i}") for i, t in enumerate(cfg.pattern)]
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, self.param_dtype, name="norm_f")
        self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="lm_head")
        if self.denoiser:
            self.t_embedder = TimestepEmbedder(cfg.hidden_size, self.dtype, self.param_dtype, name="t_embedder")
            self.t_block_1 = nn.Dense(3 * cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                      name="t_block_1")

    def denoise(self, tokens: Int[Array, "b s"], context: TowerCache, t: Optional[Float[Array, "b"]] = None
                ) -> Float[Array, "b s v"]:
        """Denoiser logits for a block, reading the context tower's cache layer by layer (SPEC §3).

        `t` is the masked fraction per row; None runs plain blocks (mock-AR). Float32 logits.
        """
        contexts = [CrossContext(layer, context.key_valid, context.length) for layer in context.layers]
        return self._denoiser_logits(tokens, contexts, t)

    def denoise_blockwise(self, tokens: Int[Array, "b l"], context: BlockwiseTowerContext, t: Float[Array, "b"]
                          ) -> Float[Array, "b l v"]:
        """Training form of `denoise` (SPEC §5): all N blocks of a noised sequence in one pass, each block
        reading the context tower as the sampler would after the blocks before it. Float32 logits."""
        return self._denoiser_logits(tokens, [context.layer(i) for i in range(len(context.layers))], t)

    def _denoiser_logits(self, tokens, contexts, t):
        h = self.embeddings(tokens)
        t_cond = None if t is None else self.t_block_1(nn.silu(self.t_embedder(t)))
        valid = jnp.ones(tokens.shape, bool)
        for block, context in zip(self.layers, contexts):
            h, _ = block(h, context, valid, t_cond, False)   # all positional: see remat_block
        return self.logits(self.norm_f(h))

    def logits(self, hidden: Float[Array, "... d"]) -> Float[Array, "... v"]:
        """The LM head over final-normed hidden states, float32."""
        return self.lm_head(hidden).astype(jnp.float32)

    def __call__(self, tokens: Int[Array, "b l"], cache: TowerCache, valid: Optional[Bool[Array, "b l"]] = None,
                 logits_at: LogitsAt = "all"):
        """Extends the cache by a chunk. Returns (logits, new cache): logits (b, l, v) for `logits_at="all"`,
        (b, 1, v) of the chunk's last position for "last", None for "none".

        Logits are NaN if the chunk overflows the cache: the fill level is traced, so under jit this
        cannot raise, and a clamped KV write must not pass for a correct answer."""
        overflow = cache.length + tokens.shape[1] > cache.capacity
        hidden, cache = self.hidden_states(tokens, cache, valid)
        if logits_at == "none":
            return None, cache
        logits = self.logits(hidden[:, -1:] if logits_at == "last" else hidden)
        return jnp.where(overflow, jnp.nan, logits), cache

    def hidden_states(self, tokens, cache: TowerCache, valid=None):
        """Final-normed hidden states (b, l, d) and the extended cache."""
        return self.layers_over(self.embed(tokens), cache, valid)

    def embed(self, tokens: Int[Array, "b l"]) -> Float[Array, "b l d"]:
        return self.embeddings(tokens)

    def layers_over(self, h: Float[Array, "b l d"], cache: TowerCache, valid=None, return_scan_inputs: bool = False):
        """Every layer over embedded tokens, extending the cache; returns (final-normed hidden, cache), and
        with `return_scan_inputs` also one `MambaExtension` per layer (None for non-Mamba layers)."""
        if valid is None:
            valid = jnp.ones(h.shape[:2], bool)
        start = cache.length
        key_valid = jax.lax.dynamic_update_slice(cache.key_valid, valid, (0, start))
        new_layers, extensions = [], []
        for block, layer_cache in zip(self.layers, cache.layers):
            if return_scan_inputs:
                # positional: `return_scan_inputs` is a static argument of a rematerialised Block
                h, layer_cache, extension = block(h, CausalContext(layer_cache, start, key_valid), valid, None, True)
                extensions.append(extension)
            else:
                h, layer_cache = block(h, CausalContext(layer_cache, start, key_valid), valid, None, False)
            new_layers.append(layer_cache)
        new_cache = TowerCache(layers=tuple(new_layers), key_valid=key_valid, length=start + h.shape[1])
        if return_scan_inputs:
            return self.norm_f(h), new_cache, tuple(extensions)
        return self.norm_f(h), new_cache

    def extend_truncatable(self, tokens: Int[Array, "b l"], cache: TowerCache, valid: Optional[Bool[Array, "b l"]] = None):
        """`__call__` with logits at every position, also returning the layers' `MambaExtension`s, from which
        `truncate_extension` builds the cache after any per-row prefix of the chunk. Returns (logits,
        cache, extensions)."""
        overflow = cache.length + tokens.shape[1] > cache.capacity
        hidden, cache, extensions = self.layers_over(self.embed(tokens), cache, valid, return_scan_inputs=True)
        return jnp.where(overflow, jnp.nan, self.logits(hidden)), cache, extensions


LOGITS_AT = ("all", "last", "none")


def _check_tokens(tokens, cache: TowerCache, valid, logits_at: str = "all"):
    if logits_at not in LOGITS_AT:
        raise ValueError(f"logits_at must be one of {LOGITS_AT}, got {logits_at!r}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, length), got shape {tokens.shape}")
    if tokens.shape[0] != cache.batch_size:
        raise ValueError(f"tokens batch {tokens.shape[0]} != cache batch {cache.batch_size}")
    if valid is not None and valid.shape != tokens.shape:
        raise ValueError(f"valid mask shape {valid.shape} != tokens shape {tokens.shape}")


@dataclasses.dataclass(frozen=True)
class NemotronH:
    """A tower bound to its config and dtypes, with the three cached entry points (all pure functions)."""
    config: NemotronHConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    impl: Impl = Impl()

    @property
    def module(self) -> NemotronHTower:
        return NemotronHTower(self.config, self.dtype, self.param_dtype, self.impl)

    def init_params(self, rng: jax.Array) -> Params:
        """Linen initialisation (norms 1, A_log 0, lecun-normal projections), jitted."""
        def init(rng):
            return self.module.init(rng, jnp.zeros((1, 1), jnp.int32), self.init_cache(1, 1))["params"]
        return jax.jit(init)(rng)

    def random_params(self, seed: int = 0, scale: float = 0.5) -> Params:
        return random_like(self.param_shapes(), seed, scale)

    def param_shapes(self) -> Params:
        """Shapes/dtypes of every parameter, without allocating any (jax.eval_shape)."""
        return jax.eval_shape(self.init_params, jax.random.key(0))

    def init_cache(self, batch_size: int, capacity: int) -> TowerCache:
        return init_cache(self.config, batch_size, capacity, self.dtype)

    @functools.partial(jax.jit, static_argnums=0, static_argnames="logits_at", donate_argnames="cache")
    def extend(self, params: Params, tokens: Int[Array, "b l"], cache: TowerCache,
               valid: Optional[Bool[Array, "b l"]] = None, logits_at: LogitsAt = "all"
               ) -> tuple[Optional[Float[Array, "b l v"]], TowerCache]:
        """Runs a chunk of new tokens after what the cache holds. Returns (logits, cache); logits are
        (b, l, v) for `logits_at="all"`, (b, 1, v) at the last position for "last", None for "none".
        The cache passed in is donated (its buffers are reused for the new one): do not read it after."""
        _check_tokens(tokens, cache, valid, logits_at)
        return self.module.apply({"params": params}, tokens, cache, valid, logits_at)

    @functools.partial(jax.jit, static_argnums=0, static_argnames=("capacity", "logits_at", "prefill_chunk"))
    def prefill(self, params: Params, tokens: Int[Array, "b l"], valid: Optional[Bool[Array, "b l"]] = None,
                capacity: Optional[int] = None, logits_at: LogitsAt = "all",
                prefill_chunk: Optional[int] = DEFAULT_PREFILL_CHUNK
                ) -> tuple[Optional[Float[Array, "b l v"]], TowerCache]:
        """Full causal forward from an empty cache of `capacity` slots (default: the prompt length).

        A prompt longer than `prefill_chunk` runs `prefill_chunk` tokens at a time through the same
        cache-extension path (a shorter first piece takes the remainder), so activation memory is bounded
        by the chunk, not the prompt; `None` runs it in one piece. `logits_at` as in `extend`."""
        capacity = tokens.shape[1] if capacity is None else capacity
        if capacity < tokens.shape[1]:
            raise ValueError(f"cache capacity {capacity} < prompt length {tokens.shape[1]}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        cache = self.init_cache(tokens.shape[0], capacity)
        _check_tokens(tokens, cache, valid, logits_at)
        length = tokens.shape[1]
        if prefill_chunk is None or length <= prefill_chunk:
            return self.module.apply({"params": params}, tokens, cache, valid, logits_at)
        return self._prefill_in_chunks(params, tokens, cache, valid, logits_at, prefill_chunk)

    def _prefill_in_chunks(self, params, tokens, cache, valid, logits_at, chunk: int):
        """`prefill`'s chunked path: the remainder (if any) first, then a `lax.scan` over full chunks, so
        the tower is traced at most twice whatever the prompt length.

        The whole prompt is embedded before the loop (b, l, d): a loop that gathers from the embedding
        table lets XLA:CPU keep a float32 copy of the table alive through it (measured: +1.3 GiB for the
        real vocabulary, experiments/results/aot_memory.md)."""
        module, variables = self.module, {"params": params}
        batch, length = tokens.shape
        valid = jnp.ones(tokens.shape, bool) if valid is None else valid
        embedded = module.apply(variables, tokens, method=NemotronHTower.embed)
        head = length % chunk
        pieces = []
        if head:
            hidden, cache = module.apply(variables, embedded[:, :head], cache, valid[:, :head],
                                         method=NemotronHTower.layers_over)
            pieces.append(hidden)
        n = (length - head) // chunk
        chunks = (embedded[:, head:].reshape(batch, n, chunk, -1).swapaxes(0, 1),
                  valid[:, head:].reshape(batch, n, chunk).swapaxes(0, 1))

        def body(cache, piece):
            hidden, cache = module.apply(variables, piece[0], cache, piece[1], method=NemotronHTower.layers_over)
            out = module.apply(variables, hidden, method=NemotronHTower.logits) if logits_at == "all" else hidden[:, -1:]
            return cache, out

        cache, outs = jax.lax.scan(body, cache, chunks)
        if logits_at == "none":
            return None, cache
        if logits_at == "last":
            return module.apply(variables, outs[-1], method=NemotronHTower.logits), cache
        scanned = outs.swapaxes(0, 1).reshape(batch, n * chunk, -1)
        if head:
            scanned = jnp.concatenate([module.apply(variables, pieces[0], method=NemotronHTower.logits), scanned], 1)
        return scanned, cache

    def extend_truncatable(self, params: Params, tokens: Int[Array, "b l"], cache: TowerCache,
                           valid: Optional[Bool[Array, "b l"]] = None):
        """`extend` with logits at every position, also returning what `truncate_extension` needs to cut the
        extension back to any prefix per row (no second pass). Not jitted on its own (call it inside a
        program); the cache passed in is not donated."""
        _check_tokens(tokens, cache, valid)
        return self.module.apply({"params": params}, tokens, cache, valid,
                                 method=NemotronHTower.extend_truncatable)

    @functools.partial(jax.jit, static_argnums=0, donate_argnames="cache")
    def decode_step(self, params: Params, token: Int[Array, "b"], cache: TowerCache
                    ) -> tuple[Float[Array, "b v"], TowerCache]:
        """One new token per row. Returns (logits (b, v), cache); the cache passed in is donated."""
        _check_tokens(token[:, None], cache, None)
        logits, cache = self.module.apply({"params": params}, token[:, None], cache, None, "last")
        return logits[:, 0], cache


def truncate_extension(extended: TowerCache, extensions: tuple, start, keep) -> TowerCache:
    """The cache after extending by only the first `keep` (b,) positions of each row of a chunk that
    `extend_truncatable` ran from length `start`: Mamba layers' conv and SSM states rebuilt at `keep` from
    their `MambaExtension`s (`mamba_cache_at`), K/V slots start + keep … of each row marked invalid (the
    K/V written there stay; attention masks them), length = start + max(keep). Equals extending by
    each row's prefix alone (the shorter rows' unused slots are holes, as left padding is)."""
    keep = jnp.asarray(keep, jnp.int32)
    width = extensions_width(extensions, extended, start)
    slot = jnp.arange(extended.capacity)[None, :]
    cut = (slot >= start + keep[:, None]) & (slot < start + width)
    layers = tuple(mamba_cache_at(ext, keep) if ext is not None else layer
                   for layer, ext in zip(extended.layers, extensions))
    return TowerCache(layers=layers, key_valid=extended.key_valid & ~cut, length=start + jnp.max(keep))


def extensions_width(extensions: tuple, extended: TowerCache, start):
    """The chunk length of an extension (from its Mamba layers, or the cache's length if it has none)."""
    for ext in extensions:
        if ext is not None:
            return ext.xbc.shape[1]
    return extended.length - start


def random_like(shapes, seed: int = 0, scale: float = 0.5):
    """Every leaf drawn N(0, scale²) on the host from abstract shapes (no forward pass is compiled):
    O(1)-scale weights for demos and tests, where a dropped tensor must show."""
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [(rng.standard_normal(s.shape) * scale).astype(s.dtype) for s in leaves])


def count_params(tree) -> int:
    """Number of scalars in a param tree of arrays or `jax.ShapeDtypeStruct`s."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
