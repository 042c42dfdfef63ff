"""The Mamba-2 mixer (SPEC §2), one code path for prefill, chunked extension and single-token decode.

in_proj → z | xBC | dt;  xBC → depthwise causal conv (seeded with the cached last K−1 raw columns) → SiLU
→ x | B | C;  dt = softplus(dt + dt_bias) (optional floor);  fp32 SSD scan from the cached state;
y + D·x → gated group RMSNorm with z → out_proj.

Padding (`valid` False; left, right, interior, or a whole chunk, before or after a cached history) is
skipped exactly: the conv at each real position reads the K−1 previous *real* columns (from the cached
history and the chunk), the new conv state is the last K−1 real raw columns, and padded positions have
x = B = C = 0 and dt = 0, so they leave the SSM state untouched. A padded row ends with the states, and
its real positions with the outputs, of the same row run unpadded. Outputs at padded positions are
meaningless (finite).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from twotower_jax.cache import MambaCache
from twotower_jax.config import NemotronHConfig
from twotower_jax.layers.norms import GatedGroupRMSNorm
from twotower_jax.ops.ssd import ScanImpl, ssd_scan, ssd_state_at


class DepthwiseCausalConv(nn.Module):
    """Depthwise conv over time; `kernel` (K, C) is torch's conv1d.weight [C, 1, K] transposed."""
    channels: int
    kernel_size: int
    use_bias: bool = True
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, history: Float[Array, "b k1 c"], x: Float[Array, "b l c"],
                 valid: Optional[Bool[Array, "b l"]] = None):
        """Returns (conv output (b, l, c) in float32, new history = last K−1 input columns).

        With `valid`, columns where it is False are skipped: each valid column's output reads the K−1
        previous valid columns (the history's columns count as valid), the new history is the last K−1
        valid columns, and outputs at invalid columns are meaningless."""
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.kernel_size, self.channels),
                            self.param_dtype).astype(jnp.float32)
        k1 = self.kernel_size - 1
        full = jnp.concatenate([history.astype(jnp.float32), x.astype(jnp.float32)], axis=1)  # (b, K-1+l, c)
        b, length = x.shape[:2]
        if valid is None:
            packed, out_index = full, None
            new_history = full[:, length:]
        elif length == 1:  # decode: one column, kept or not
            packed, out_index = full, None
            new_history = jnp.where(valid[:, :, None], full[:, 1:], history.astype(jnp.float32))
        else:
            # Pack each row's valid columns (history first, then the chunk's, in order) to the right end
            # and its invalid ones to the left, run the plain causal conv on the packed row, and read
            # each chunk column's output back from its packed position.
            n = full.shape[1]
            keep = jnp.concatenate([jnp.ones((b, k1), bool), valid], axis=1)               # (b, n)
            n_keep = keep.sum(1, keepdims=True)
            dest = jnp.where(keep, n - n_keep + jnp.cumsum(keep, 1) - 1, jnp.cumsum(~keep, 1) - 1)
            src = jnp.zeros_like(dest).at[jnp.arange(b)[:, None], dest].set(
                jnp.broadcast_to(jnp.arange(n), dest.shape))                               # packed ← column
            packed = jnp.take_along_axis(full, src[:, :, None], axis=1)
            # A valid chunk column has ≥ K−1 valid columns packed before it: its output index is ≥ 0.
            out_index = jnp.maximum(dest[:, k1:] - k1, 0)
            new_history = packed[:, length:]
        out = sum(packed[:, k:k + length] * kernel[k] for k in range(self.kernel_size))
        if out_index is not None:
            out = jnp.take_along_axis(out, out_index[:, :, None], axis=1)
        if self.use_bias:
            out = out + self.param("bias", nn.initializers.zeros, (self.channels,), self.param_dtype).astype(jnp.float32)
        return out, new_history


class Mamba2Mixer(nn.Module):
    config: NemotronHConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan_impl: ScanImpl = "chunked"

    @nn.compact
    def __call__(self, x: Float[Array, "b l d"], cache: MambaCache, valid: Bool[Array, "b l"],
                 return_scan_inputs: bool = False):
        """Returns (out (b, l, d), updated MambaCache); with `return_scan_inputs` also a `MambaExtension`
        (what `mamba_cache_at` needs for the cache after any prefix of the chunk)."""
        cfg = self.config
        b, length, _ = x.shape
        inner, heads, head_dim = cfg.mamba_intermediate_size, cfg.mamba_num_heads, cfg.mamba_head_dim
        gn = cfg.n_groups * cfg.ssm_state_size
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)

        proj = nn.Dense(cfg.mamba_in_proj_size, name="in_proj", **dense)(x)
        z, xbc, dt_raw = jnp.split(proj, [inner, inner + cfg.conv_dim], axis=-1)
        xbc = jnp.where(valid[..., None], xbc, 0)

        conv_out, conv_state = DepthwiseCausalConv(cfg.conv_dim, cfg.conv_kernel, cfg.use_conv_bias,
                                                   self.param_dtype, name="conv1d")(cache.conv, xbc, valid)
        # x = B = C = 0 (and dt = 0 below) at padded positions: they add nothing to the SSM state.
        conv_out = jnp.where(valid[..., None], nn.silu(conv_out), 0.0)
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
        if return_scan_inputs:
            extension = MambaExtension(cache.conv.astype(jnp.float32), cache.ssm, xbc.astype(jnp.float32), valid,
                                       xs, dt, B.reshape(b, length, cfg.n_groups, cfg.ssm_state_size), A)
            return out, MambaCache(conv=conv_state, ssm=ssm_state), extension
        return out, MambaCache(conv=conv_state, ssm=ssm_state)


class MambaExtension(NamedTuple):
    """One Mamba layer's extension by a chunk, kept so that the cache after any prefix of the chunk can be
    rebuilt without running the layer again (self-speculative rollback): the cache before the chunk
    (conv history, SSM state), the chunk's raw pre-conv xBC columns (zero where invalid) and validity, and
    the scan inputs x (b, l, h, p), dt (b, l, h; 0 where invalid), B (b, l, g, n), A (h,)."""
    history: Float[Array, "b k1 c"]
    ssm: Float[Array, "b h p n"]
    xbc: Float[Array, "b l c"]
    valid: Bool[Array, "b l"]
    x: Float[Array, "b l h p"]
    dt: Float[Array, "b l h"]
    B: Float[Array, "b l g n"]
    A: Float[Array, "h"]


def mamba_cache_at(extension: MambaExtension, index) -> MambaCache:
    """The layer's cache after the first `index` (b,) positions of the chunk (0: the cache before it):
    conv = the last K−1 valid raw columns of [history ; chunk[:index]], SSM state = `ssd_state_at`. Equals
    the cache of extending by `chunk[:index]` alone (invalid positions skipped the same way)."""
    history, xbc, valid = extension.history, extension.xbc, extension.valid
    b, k1 = history.shape[:2]
    length = xbc.shape[1]
    index = jnp.asarray(index, jnp.int32)
    full = jnp.concatenate([history, xbc], axis=1)                                     # (b, k1 + l, c)
    keep = jnp.concatenate([jnp.ones((b, k1), bool), valid & (jnp.arange(length)[None] < index[:, None])], 1)
    rank = jnp.cumsum(keep, axis=1)                                                     # 1-based among kept
    wanted = rank[:, -1:, None] - k1 + 1 + jnp.arange(k1)[None, None, :]                # (b, 1, k1)
    column = jnp.argmax(keep[:, :, None] & (rank[:, :, None] == wanted), axis=1)        # (b, k1)
    conv = jnp.take_along_axis(full, column[:, :, None], axis=1)
    ssm = ssd_state_at(extension.x, extension.dt, extension.A, extension.B, extension.ssm, index)
    return MambaCache(conv=conv, ssm=ssm)
