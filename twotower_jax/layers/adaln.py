"""adaLN-single timestep conditioning of the denoiser tower (SPEC §3).

t (b,) is the masked fraction of the block. The release computes t and t·1000 in the model dtype (bf16
rounds both), embeds t·1000 as a 256-d sinusoid (cos first, then sin) and runs
`t_embedder` = Linear(256→D), SiLU, Linear(D→D), then `t_block` = SiLU, Linear(D→3D). Each layer adds its
own `scale_shift_table` (3, D) to get (shift, scale, gate).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

SINUSOID_DIM = 256


def timestep_sinusoid(t_scaled: Float[Array, "b"], dim: int = SINUSOID_DIM) -> Float[Array, "b dim"]:
    """[cos(t·f_k), sin(t·f_k)] with f_k = exp(−ln(10000)·k/(dim/2)), k < dim/2; float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t_scaled.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
    """t (b,) → (b, D): sinusoid of t·1000 (both rounded to `dtype`), Linear, SiLU, Linear."""
    hidden_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t: Float[Array, "b"]) -> Float[Array, "b d"]:
        t_scaled = t.astype(self.dtype) * jnp.asarray(1000, self.dtype)
        emb = timestep_sinusoid(t_scaled).astype(self.dtype)
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = nn.Dense(self.hidden_size, name="mlp_0", **dense)(emb)
        return nn.Dense(self.hidden_size, name="mlp_2", **dense)(nn.silu(emb))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift
