"""The Mamba-2 mixer (SPEC §2), one code path for prefill, chunked extension and single-token decode.

in_proj → z | xBC | dt;  xBC → depthwise causal conv (seeded with the cached last K−1 raw columns) → SiLU
→ x | B | C;  dt = softplus(dt + dt_bias) (optional floor);  fp32 SSD scan from the cached state;
y + D·x → gated group RMSNorm with z → out_proj.

Left padding: at positions where `valid` is False the raw xBC is zeroed and dt is 0, so padding leaves
both the conv state and the SSM state exactly as an unpadded row would have them.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from twotower_jax.cache import MambaCache
from twotower_jax.config import NemotronHConfig
from twotower_jax.layers.norms import GatedGroupRMSNorm
from twotower_jax.ops.ssd import ScanImpl, ssd_scan


class DepthwiseCausalConv(nn.Module):
    """Depthwise conv over time; `kernel` (K, C) is torch's conv1d.weight [C, 1, K] transposed."""
    channels: int
    kernel_size: int
    use_bias: bool = True
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, history: Float[Array, "b k1 c"], x: Float[Array, "b l c"]):
        """Returns (conv output (b, l, c) in float32, new history = last K−1 input columns)."""
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.kernel_size, self.channels),
                            self.param_dtype).astype(jnp.float32)
        full = jnp.concatenate([history.astype(jnp.float32), x.astype(jnp.float32)], axis=1)  # (b, K-1+l, c)
        length = x.shape[1]
        out = sum(full[:, k:k + length] * kernel[k] for k in range(self.kernel_size))
        if self.use_bias:
            out = out + self.param("bias", nn.initializers.zeros, (self.channels,), self.param_dtype).astype(jnp.float32)
        return out, full[:, length:]


class Mamba2Mixer(nn.Module):
    config: NemotronHConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan_impl: ScanImpl = "chunked"

    @nn.compact
    def __call__(self, x: Float[Array, "b l d"], cache: MambaCache, valid: Bool[Array, "b l"]):
        """Returns (out (b, l, d), updated MambaCache)."""
        cfg = self.config
        b, length, _ = x.shape
        inner, heads, head_dim = cfg.mamba_intermediate_size, cfg.mamba_num_heads, cfg.mamba_head_dim
        gn = cfg.n_groups * cfg.ssm_state_size
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)

        proj = nn.Dense(cfg.mamba_in_proj_size, name="in_proj", **dense)(x)
        z, xbc, dt_raw = jnp.split(proj, [inner, inner + cfg.conv_dim], axis=-1)
        xbc = jnp.where(valid[..., None], xbc, 0)

        conv_out, conv_state = DepthwiseCausalConv(cfg.conv_dim, cfg.conv_kernel, cfg.use_conv_bias,
                                                   self.param_dtype, name="conv1d")(cache.conv, xbc)
        conv_out = nn.silu(conv_out)
        xs, B, C = jnp.split(conv_out, [inner, inner + gn], axis=-1)

        A_log = self.param("A_log", nn.initializers.zeros, (heads,), self.param_dtype)
        D = self.param("D", nn.initializers.ones, (heads,), self.param_dtype)
        dt_bias = self.param("dt_bias", nn.initializers.zeros, (heads,), self.param_dtype)
        dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + dt_bias.astype(jnp.float32))
        if cfg.dt_floor is not None:
            dt = jnp.maximum(dt, cfg.dt_floor)
        dt = jnp.where(valid[..., None], dt, 0.0)
        A = -jnp.exp(A_log.astype(jnp.float32))

        xs = xs.reshape(b, length, heads, head_dim)
        # One token gains nothing from chunking; the sequential form is the cheapest exact step.
        impl = "sequential" if length == 1 else self.scan_impl
        y, ssm_state = ssd_scan(
            xs, dt, A,
            B.reshape(b, length, cfg.n_groups, cfg.ssm_state_size),
            C.reshape(b, length, cfg.n_groups, cfg.ssm_state_size),
            cache.ssm, impl=impl, chunk_size=cfg.chunk_size)
        y = y + D.astype(jnp.float32)[:, None] * xs
        y = GatedGroupRMSNorm(inner, cfg.n_groups, cfg.layer_norm_epsilon, self.param_dtype, name="norm")(
            y.reshape(b, length, inner), z)
        out = nn.Dense(cfg.hidden_size, name="out_proj", **dense)(y.astype(self.dtype))
        return out, MambaCache(conv=conv_state, ssm=ssm_state)
