"""RMSNorm and the Mamba-2 gated, grouped RMSNorm. Statistics in float32."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float


def _rms_normalize(x: Float[Array, "... d"], eps: float) -> Float[Array, "... d"]:
    x = x.astype(jnp.float32)
    return x * jnp.reciprocal(jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps))


class RMSNorm(nn.Module):
    """y = weight · x / rms(x), computed in float32, cast back to the input dtype."""
    dim: int
    eps: float = 1e-5
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        weight = self.param("weight", nn.initializers.ones, (self.dim,), self.param_dtype)
        return (weight.astype(jnp.float32) * _rms_normalize(x, self.eps)).astype(x.dtype)


class GatedGroupRMSNorm(nn.Module):
    """Mamba-2 output norm: normalise y·silu(z) within each of `groups` channel groups, then × weight."""
    dim: int
    groups: int
    eps: float = 1e-5
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, y: Float[Array, "... i"], z: Float[Array, "... i"]) -> Float[Array, "... i"]:
        weight = self.param("weight", nn.initializers.ones, (self.dim,), self.param_dtype)
        gated = y.astype(jnp.float32) * nn.silu(z.astype(jnp.float32))
        grouped = gated.reshape(*gated.shape[:-1], self.groups, self.dim // self.groups)
        normed = _rms_normalize(grouped, self.eps).reshape(gated.shape)
        return weight.astype(jnp.float32) * normed
