"""Training objectives: plain next-token AR loss for a tower, and the TwoTower denoiser's block-wise
masked-diffusion loss in its parallel form (SPEC §5).

Diffusion, one training sequence of L = N·S tokens:
  1. the frozen context tower runs over the clean sequence once, in one call (no gradient), keeping the
     K/V of all positions and each Mamba layer's conv/SSM state at every block boundary
     (`blockwise_context`);
  2. per example t ~ U[t_min, 1]; each token is replaced by MASK with probability t (`noise_tokens`);
  3. the denoiser runs over the noised sequence in one pass (`NemotronHTower.denoise_blockwise`):
     block n attends to context blocks 0..n−1 and to itself, and its Mamba layers start from the context
     state at the end of block n−1 — exactly what the sampler gives block n at inference;
  4. loss = mean cross-entropy over the masked positions, labels = the clean tokens at the same position,
     no 1/t weighting.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int

from twotower_jax.cache import AttentionCache, BlockwiseTowerContext, MambaCache
from twotower_jax.ops.ssd import ssd_block_states
from twotower_jax.tower import NemotronH, NemotronHTower, Params
from twotower_jax.training.load_balance import expert_loads
from twotower_jax.two_tower import TwoTower

T_MIN = 1e-3


def _check_sequence(tokens, block_size: int) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"training tokens must be (batch, length), got shape {tokens.shape}")
    if block_size < 1 or tokens.shape[1] % block_size:
        raise ValueError(f"sequence length {tokens.shape[1]} must be a positive multiple of block_size {block_size}")


# Queries and keys per online-softmax tile in the one-call context pass (`blockwise_context`).
CONTEXT_ATTENTION_TILE = 128


def blockwise_context(model: NemotronH, params: Params, tokens: Int[Array, "b l"], block_size: int, *,
                      attention_tile: int | None = CONTEXT_ATTENTION_TILE) -> BlockwiseTowerContext:
    """The context tower over a clean sequence (b, l) in one causal pass; returns its K/V for all l
    positions and each Mamba layer's conv (b, l/S, K−1, c) and SSM state (b, l/S, h, p, n) before every
    block. The pass keeps every Mamba layer's scan inputs (`MambaExtension`); the states at block
    boundaries come from them in one parallel computation (`ssd_block_states`: the chunked SSD's
    inter-chunk states with chunk = block), the conv states are the K−1 raw columns before each block.
    Wrapped in `stop_gradient`: the context tower is frozen. `blockwise_context_by_blocks` is the same
    context built block by block through the sampler's path.

    `attention_tile`: the pass's attention runs in tiles of this many queries × keys (the model's `Impl`
    tiles otherwise; None keeps them). All l queries attend causally in one call, so small square tiles
    let `blockwise_attention` skip every tile above the diagonal (about half the score work) and keep
    each tile's scores small; the default tiles (512 queries × 1,024 keys) score the whole causal square
    through large intermediates and made this pass slower than the block-by-block one on a CPU
    (experiments/results/context_pass_cpu.md). Tiling changes only the softmax's summation order."""
    _check_sequence(tokens, block_size)
    if attention_tile is not None:
        if attention_tile < 1:
            raise ValueError(f"attention_tile must be >= 1 or None, got {attention_tile}")
        model = dataclasses.replace(model, impl=dataclasses.replace(
            model.impl, attention_q_chunk=attention_tile, attention_k_chunk=attention_tile))
    b, length = tokens.shape
    n = length // block_size
    module = model.module
    variables = {"params": params}
    embedded = module.apply(variables, tokens, method=NemotronHTower.embed)
    _, cache, extensions = module.apply(variables, embedded, model.init_cache(b, length), None, True,
                                        method=NemotronHTower.layers_over)
    layers = []
    for final, extension in zip(cache.layers, extensions):
        if isinstance(final, AttentionCache):
            layers.append(final)
        elif isinstance(final, MambaCache):
            full = jnp.concatenate([extension.history, extension.xbc], axis=1)        # (b, k1 + l, c)
            k1 = extension.history.shape[1]
            before = (jnp.arange(n) * block_size)[:, None] + jnp.arange(k1)[None, :]  # (n, k1) columns of full
            conv = full[:, before].astype(final.conv.dtype)                            # (b, n, k1, c)
            ssm = ssd_block_states(extension.x, extension.dt, extension.A, extension.B, extension.ssm, block_size)
            layers.append(MambaCache(conv=conv, ssm=ssm.astype(final.ssm.dtype)))
        else:
            layers.append(None)
    return jax.lax.stop_gradient(BlockwiseTowerContext(layers=tuple(layers), block_size=block_size))


def blockwise_context_by_blocks(model: NemotronH, params: Params, tokens: Int[Array, "b l"], block_size: int
                                ) -> BlockwiseTowerContext:
    """`blockwise_context` the way the sampler builds it: block by block through the cache-extension
    path (L/S serial tower calls), keeping each Mamba cache before every block. The reference."""
    _check_sequence(tokens, block_size)
    b, length = tokens.shape
    n = length // block_size
    module = model.module
    blocks = tokens.reshape(b, n, block_size).swapaxes(0, 1)   # (n, b, S)

    def extend(cache, block_tokens):
        before = tuple(layer if isinstance(layer, MambaCache) else None for layer in cache.layers)
        _, cache = module.apply({"params": params}, block_tokens, cache, method=NemotronHTower.hidden_states)
        return cache, before

    cache, seeds = jax.lax.scan(extend, model.init_cache(b, length), blocks)
    layers = []
    for final, seed in zip(cache.layers, seeds):
        if isinstance(final, AttentionCache):
            layers.append(final)
        elif isinstance(final, MambaCache):   # scan stacks on axis 0: (n, b, ...) -> (b, n, ...)
            layers.append(MambaCache(conv=seed.conv.swapaxes(0, 1), ssm=seed.ssm.swapaxes(0, 1)))
        else:
            layers.append(None)
    return jax.lax.stop_gradient(BlockwiseTowerContext(layers=tuple(layers), block_size=block_size))


def noise_tokens(rng: jax.Array, tokens: Int[Array, "b l"], mask_token_id: int, t_min: float = T_MIN
                 ) -> tuple[Int[Array, "b l"], Bool[Array, "b l"], Float[Array, "b"]]:
    """Linear-schedule masking: t ~ U[t_min, 1] per example, each token masked with probability t.
    Returns (noisy tokens, masked positions, t)."""
    t_rng, mask_rng = jax.random.split(rng)
    t = jax.random.uniform(t_rng, (tokens.shape[0],), jnp.float32, t_min, 1.0)
    masked = jax.random.uniform(mask_rng, tokens.shape) < t[:, None]
    return jnp.where(masked, mask_token_id, tokens), masked, t


def denoiser_logits(model: TwoTower, denoiser_params: Params, noisy: Int[Array, "b l"],
                    context: BlockwiseTowerContext, t: Float[Array, "b"], *, with_expert_load: bool = False):
    """The denoiser's float32 logits (b, l, v) for every block of a noised sequence, in one pass; with
    `with_expert_load`, (logits, {MoE layer path: tokens per expert (E,)}) (`training.load_balance`)."""
    if not with_expert_load:
        return model.denoiser_module.apply({"params": denoiser_params}, noisy, context, t,
                                           method=NemotronHTower.denoise_blockwise)
    logits, state = model.denoiser_module.apply({"params": denoiser_params}, noisy, context, t,
                                                method=NemotronHTower.denoise_blockwise, mutable=["intermediates"])
    return logits, expert_loads(state.get("intermediates", {}))


def masked_mean(values: Float[Array, "..."], weights: Bool[Array, "..."]) -> Float[Array, ""]:
    weights = weights.astype(jnp.float32)
    return jnp.sum(values * weights) / jnp.maximum(weights.sum(), 1.0)


def diffusion_loss(denoiser_params: Params, context_params: Params, tokens: Int[Array, "b l"],
                   rng: jax.Array, *, model: TwoTower, block_size: int, mask_token_id: int,
                   t_min: float = T_MIN, expert_load: bool = False) -> tuple[Float[Array, ""], dict[str, Any]]:
    """Mean cross-entropy over masked positions (no 1/t). Returns (loss, metrics); with `expert_load`
    the metrics also hold "expert_load", the denoiser's per-layer router loads (the training step turns
    them into the routers' bias update and load statistics: `training.load_balance`)."""
    _check_sequence(tokens, block_size)
    noisy, masked, t = noise_tokens(rng, tokens, mask_token_id, t_min)
    context = blockwise_context(model.context, context_params, tokens, block_size)
    logits = denoiser_logits(model, denoiser_params, noisy, context, t, with_expert_load=expert_load)
    loads = None
    if expert_load:
        logits, loads = logits
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    loss = masked_mean(ce, masked)
    accuracy = masked_mean(jnp.argmax(logits, -1) == tokens, masked)
    metrics = {"loss": loss, "masked_accuracy": accuracy, "masked_fraction": masked.mean()}
    if loads is not None:
        metrics["expert_load"] = loads
    return loss, metrics


def ar_loss(params: Params, frozen: Any, tokens: Int[Array, "b l"], rng: jax.Array, *, model: NemotronH
            ) -> tuple[Float[Array, ""], dict[str, Any]]:
    """Next-token cross-entropy of a tower over packed sequences (every position predicts the next).
    `frozen` and `rng` are unused; they keep the signature of every training loss."""
    del frozen, rng
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"AR training tokens must be (batch, length >= 2), got shape {tokens.shape}")
    logits, _ = model.module.apply({"params": params}, tokens, model.init_cache(*tokens.shape))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    loss = ce.mean()
    accuracy = (jnp.argmax(logits[:, :-1], -1) == tokens[:, 1:]).mean()
    return loss, {"loss": loss, "accuracy": accuracy}

