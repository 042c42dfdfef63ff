"""TwoTower: a frozen context tower (Nemotron-H, AR) and a denoiser tower of the same architecture,
wired layer by layer (SPEC §3).

Params: {"context": tower params (its `lm_head` is the release's `context_lm_head`),
         "denoiser": tower params + `t_embedder`, `t_block_1` and a `scale_shift_table` per layer}.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from twotower_jax.cache import TowerCache, init_cache
from twotower_jax.config import NemotronHConfig
from twotower_jax.tower import Impl, NemotronH, NemotronHTower, Params, random_like


@dataclasses.dataclass(frozen=True)
class TwoTower:
    config: NemotronHConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    impl: Impl = Impl()

    @property
    def context(self) -> NemotronH:
        """The context tower with its cached entry points (use with `params["context"]`)."""
        return NemotronH(self.config, self.dtype, self.param_dtype, self.impl)

    @property
    def denoiser_module(self) -> NemotronHTower:
        return NemotronHTower(self.config, self.dtype, self.param_dtype, self.impl, denoiser=True)

    def init_params(self, rng: jax.Array) -> Params:
        """Linen initialisation of both towers (adaLN tables start at zero), jitted."""
        def init(rng):
            context_rng, denoiser_rng = jax.random.split(rng)
            tokens = jnp.zeros((1, 1), jnp.int32)
            cache = init_cache(self.config, 1, 1, self.dtype)
            denoiser = self.denoiser_module.init(denoiser_rng, tokens, cache, jnp.ones((1,)),
                                                 method=NemotronHTower.denoise)["params"]
            context = self.context.module.init(context_rng, tokens, cache)["params"]
            return {"context": context, "denoiser": denoiser}
        return jax.jit(init)(rng)

    def param_shapes(self) -> Params:
        return jax.eval_shape(self.init_params, jax.random.key(0))

    def random_params(self, seed: int = 0, scale: float = 0.5) -> Params:
        return random_like(self.param_shapes(), seed, scale)

    @functools.partial(jax.jit, static_argnums=0)
    def denoise(self, params: Params, tokens: Int[Array, "b s"], context_cache: TowerCache,
                t: Optional[Float[Array, "b"]] = None) -> Float[Array, "b s v"]:
        """Denoiser logits (float32) for a block after what `context_cache` holds; t=None: no adaLN (mock-AR)."""
        if tokens.ndim != 2 or tokens.shape[0] != context_cache.batch_size:
            raise ValueError(f"block tokens must be (batch={context_cache.batch_size}, block), got {tokens.shape}")
        if t is not None and t.shape != (tokens.shape[0],):
            raise ValueError(f"t must have shape ({tokens.shape[0]},), got {t.shape}")
        return self.denoiser_module.apply({"params": params["denoiser"]}, tokens, context_cache, t,
                                          method=NemotronHTower.denoise)


def two_tower_params_from_tower(tower_params: Params, adaln_params: Params) -> Params:
    """Both towers as copies of one AR tower (how training starts), plus the given adaLN params
    (`t_embedder`, `t_block_1`, and `layers_i/scale_shift_table`)."""
    denoiser = dict(tower_params)
    for name in ("t_embedder", "t_block_1"):
        denoiser[name] = adaln_params[name]
    for name, layer in adaln_params.items():
        if name.startswith("layers_"):
            denoiser[name] = {**denoiser[name], "scale_shift_table": layer["scale_shift_table"]}
    return {"context": tower_params, "denoiser": denoiser}


def identity_adaln_params(model: TwoTower, rng: jax.Array) -> Params:
    """adaLN params under which a denoiser layer starts as the plain AR layer: `t_block_1` zero (so the
    conditioning is the table alone) and every `scale_shift_table` = (shift 0, scale 0, gate 1).
    `t_embedder` keeps its random init, so gradients reach it once `t_block_1` moves off zero."""
    denoiser = model.init_params(rng)["denoiser"]
    adaln = {"t_embedder": denoiser["t_embedder"],
             "t_block_1": jax.tree.map(jnp.zeros_like, denoiser["t_block_1"])}
    for name, layer in denoiser.items():
        if name.startswith("layers_"):
            table = layer["scale_shift_table"]
            adaln[name] = {"scale_shift_table": jnp.zeros_like(table).at[2].set(1)}
    return adaln
