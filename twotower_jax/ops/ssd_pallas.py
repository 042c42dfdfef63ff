"""The chunked SSD scan (Mamba-2) as one Pallas kernel, Triton-style, with an XLA backward pass.

Same contract as `ssd.ssd_chunked`: x (b,l,h,p), dt (b,l,h), A (h,), B/C (b,l,g,n), initial_state
(b,h,p,n) → y (b,l,h,p) float32 (no D skip) and final_state (b,h,p,n) float32.

Kernel layout. The grid is (batch, head, head_dim block); every program owns one (block_p, N) slice of one
head's state in float32 and walks the chunks of its sequence in order (`fori_loop`), so the inter-chunk
recurrence never leaves the kernel. Per chunk of Q steps, with a = dt·A and seg_ij = Σ_{j<k≤i} a_k:

    y      = ((C·Bᵀ) ∘ exp(seg_ij)[j ≤ i] ∘ dt_j) · x  +  exp(Σ_{k≤i} a_k) · (C · stateᵀ)
    state ← exp(Σ_k a_k) · state + (x ∘ dt_j · exp(Σ_{k>j} a_k))ᵀ · B

Inputs are read in their own layout (no transposes): the BlockSpecs squeeze batch and head, and head h
reads group h // (H/G) straight from B and C. Loads may be bf16; everything after the load, every dot
included, is float32 (IEEE-precision dots: exact, though slower on GPU than TF32/bf16 tensor-core dots).

Padding, done in XLA before the call, because Triton tensors must have power-of-two shapes and its dots
need every dimension ≥ 16:
  * time to a multiple of the kernel chunk Q, with dt = 0 (decay exp(0) = 1 and no input, so padded
    steps change neither the state nor the real outputs); Q is `chunk_size` rounded up to a power of two
    and clamped to [16, 64] (any chunk size gives the same math; 64 bounds the Q×Q tiles a program
    keeps in registers), and never more than the padded length needs;
  * head_dim P and state N to powers of two ≥ 16 with zeros (zero B/C columns and zero state rows stay
    zero). The real layer (P = 64, N = 128) needs no P/N padding.
The padding is applied in interpret mode too, so CPU tests run the very shapes the GPU kernel sees.

Backward: `jax.custom_vjp`; the backward pass is XLA, the VJP of `ssd_chunked` recomputed from the saved
inputs (no Pallas backward kernel yet).

What has run where: nothing here has run on a GPU yet. On CPU the kernel runs in Pallas' interpret mode
(tests/test_ssd_pallas.py, against the sequential reference) and is lowered for CUDA through Pallas'
Triton lowering (jax 0.10.2 and 0.12; `abstract_gpu` supplies the GPU that jax 0.12 needs to lower
without one). Triton's compilation to PTX and the run happen only on a GPU: `experiments/gpu_check.py`.

Triton vs Mosaic GPU: jax 0.12 deprecates Pallas' Triton backend in favour of Mosaic GPU and warns
(a DeprecationWarning, raised while lowering, so Python shows it only under pytest or `-W`). This kernel
passes Triton compiler params explicitly, so it stays on Triton while jax has the backend (SPEC §9). The
Mosaic GPU (Hopper) version of the same scan is `ssd_mosaic.ssd_mosaic`, scan impl "pallas_mosaic".
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from twotower_jax.ops.kernel_vjp import with_chunked_backward
from twotower_jax.ops.ssd import check_shapes

_MIN_DIM = 16      # Triton's dot needs M, N, K ≥ 16
_MAX_CHUNK = 64    # kernel chunk cap: Q×Q fp32 tiles live in registers
_MAX_BLOCK_P = 64  # head_dim columns per program


def _triton_compiler_params(num_warps: int, num_stages: int):
    """Triton compiler params for jax 0.10–0.12 (`pallas.triton.CompilerParams`), or the older
    `pallas.gpu.TritonCompilerParams`; passing them keeps Pallas off its Mosaic GPU lowering (SPEC §9)."""
    try:
        from jax.experimental.pallas import triton as pl_triton
        return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    except (ImportError, AttributeError):
        from jax.experimental.pallas import gpu as pl_gpu
        return pl_gpu.TritonCompilerParams(num_warps=num_warps, num_stages=num_stages)


TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"  # the start of jax 0.12's warning


def abstract_gpu(device_kind: str = "NVIDIA H100", num_cores: int = 132):
    """Context manager that makes `.lower(lowering_platforms=("cuda",))` work on a host without a GPU.

    jax 0.12's Triton lowering asks for the target GPU ("No supported GPU devices found, please specify an
    abstract GPU device using AbstractDevice"); this names one through an abstract mesh of one device.
    jax 0.10.2 falls back to compute capability 9.0 by itself and accepts the same context. A jax without
    `AbstractDevice` gets a null context. Not needed (and not used) on a machine with a GPU.
    """
    device_cls = getattr(jax.sharding, "AbstractDevice", None)
    mesh_cls = getattr(jax.sharding, "AbstractMesh", None)
    use = getattr(jax.sharding, "use_abstract_mesh", None)
    if device_cls is None or mesh_cls is None or use is None or \
            "abstract_device" not in inspect.signature(mesh_cls).parameters:
        return contextlib.nullcontext()
    device = device_cls(device_kind=device_kind, num_cores=num_cores, platform="gpu")
    mesh = mesh_cls((1,), ("gpu",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
    return use(mesh)


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(n - 1, 0).bit_length())


def kernel_chunk(chunk_size: int, length: int) -> int:
    """The chunk length Q the kernel really uses for `chunk_size` at sequence length `length`."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return min(_pow2_at_least(min(chunk_size, _MAX_CHUNK), _MIN_DIM), _pow2_at_least(length, _MIN_DIM))


def _ssd_kernel(x_ref, dt_ref, da_ref, b_ref, c_ref, h0_ref, y_ref, hT_ref, *, chunk: int, num_chunks: int):
    """One (batch, head, head_dim block): x_ref (L, bp), dt_ref/da_ref (L,), b_ref/c_ref (L, N),
    h0_ref/hT_ref (bp, N), y_ref (L, bp); L = num_chunks·chunk."""
    f32 = jnp.float32
    dot = functools.partial(jax.lax.dot_general, precision=jax.lax.Precision.HIGHEST, preferred_element_type=f32)
    rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)

    def one_chunk(c, state):
        t = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
        x = x_ref[t, :].astype(f32)                                      # (Q, bp)
        dt = dt_ref[t].astype(f32)                                       # (Q,)
        da = da_ref[t].astype(f32)                                       # (Q,) dt·A ≤ 0
        Bc = b_ref[t, :].astype(f32)                                     # (Q, N)
        Cc = c_ref[t, :].astype(f32)

        # Segment sums Σ_{j<k≤i} da_k from their own terms (z[k, j] = da_k for k > j, summed down the
        # rows), not as differences of one long cumsum: those cancel, and exp amplifies the error.
        z = jnp.where(rows > cols, da[:, None], 0.0)
        seg = jnp.where(cols <= rows, jnp.cumsum(z, axis=0), -jnp.inf)  # (i, j); −inf: exp → 0 above
        to_end = jnp.sum(z, axis=0)                                      # (Q,) Σ_{k>j} da_k
        from_start = jnp.cumsum(da)                                      # (Q,) Σ_{k≤i} da_k
        total = jnp.sum(da)

        # Inside the chunk: y_i = Σ_{j≤i} (C_i·B_j) exp(seg_ij) dt_j x_j.
        cb = dot(Cc, Bc, (((1,), (1,)), ((), ())))                        # (Q, Q)
        y = dot(cb * jnp.exp(seg) * dt[None, :], x, (((1,), (0,)), ((), ())))
        # The entering state, decayed to each position.
        y += jnp.exp(from_start)[:, None] * dot(Cc, state, (((1,), (1,)), ((), ())))
        y_ref[t, :] = y.astype(y_ref.dtype)

        weighted_x = x * (dt * jnp.exp(to_end))[:, None]                 # (Q, bp)
        return jnp.exp(total) * state + dot(weighted_x, Bc, (((0,), (0,)), ((), ())))

    hT_ref[...] = jax.lax.fori_loop(0, num_chunks, one_chunk, h0_ref[...].astype(f32)).astype(hT_ref.dtype)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _forward(x, dt, A, B, C, initial_state, chunk_size: int, interpret: bool | None):
    check_shapes(x, dt, A, B, C, initial_state)
    if interpret is None:
        interpret = not _on_gpu()
    f32 = jnp.float32
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    heads_per_group = h // g
    q = kernel_chunk(chunk_size, length)
    padded_len = -(-length // q) * q
    pp, npad = _pow2_at_least(p, _MIN_DIM), _pow2_at_least(n, _MIN_DIM)
    block_p = min(pp, _MAX_BLOCK_P)

    def pad(a, axis_sizes):
        widths = [(0, size - dim) for dim, size in zip(a.shape, axis_sizes)]
        return jnp.pad(a, widths) if any(w for _, w in widths) else a

    dt = dt.astype(f32)
    x = pad(x, (b, padded_len, h, pp))
    da = pad(dt * A.astype(f32), (b, padded_len, h))
    dt = pad(dt, (b, padded_len, h))                                    # dt = 0 on padded steps
    B = pad(B, (b, padded_len, g, npad))
    C = pad(C, (b, padded_len, g, npad))
    h0 = pad(initial_state.astype(f32), (b, h, pp, npad))

    seq_spec = pl.BlockSpec((None, padded_len, None, block_p), lambda bi, hi, pi: (bi, 0, hi, pi))
    head_spec = pl.BlockSpec((None, padded_len, None), lambda bi, hi, pi: (bi, 0, hi))
    group_spec = pl.BlockSpec((None, padded_len, None, npad), lambda bi, hi, pi: (bi, 0, hi // heads_per_group, 0))
    state_spec = pl.BlockSpec((None, None, block_p, npad), lambda bi, hi, pi: (bi, hi, pi, 0))
    extra = {} if interpret else {"compiler_params": _triton_compiler_params(num_warps=4, num_stages=2)}
    y, final_state = pl.pallas_call(
        functools.partial(_ssd_kernel, chunk=q, num_chunks=padded_len // q),
        grid=(b, h, pp // block_p),
        in_specs=[seq_spec, head_spec, head_spec, group_spec, group_spec, state_spec],
        out_specs=[seq_spec, state_spec],
        out_shape=[jax.ShapeDtypeStruct((b, padded_len, h, pp), f32), jax.ShapeDtypeStruct((b, h, pp, npad), f32)],
        interpret=interpret,
        name="ssd_chunked_scan",
        **extra,
    )(x, dt, da, B, C, h0)
    return y[:, :length, :, :p], final_state[:, :, :p, :n]


_ssd_pallas = with_chunked_backward(_forward)


def ssd_pallas(
    x: Float[Array, "b l h p"],
    dt: Float[Array, "b l h"],
    A: Float[Array, "h"],
    B: Float[Array, "b l g n"],
    C: Float[Array, "b l g n"],
    initial_state: Float[Array, "b h p n"],
    *,
    chunk_size: int = 128,
    interpret: bool | None = None,
) -> tuple[Float[Array, "b l h p"], Float[Array, "b h p n"]]:
    """Chunked SSD in one Pallas kernel. Returns (y, final_state), both float32.

    `chunk_size` is rounded to the kernel chunk (see `kernel_chunk`); the math does not depend on it.
    `interpret=None` runs the Pallas interpreter unless the default backend is a GPU, where the kernel is
    compiled with Triton. Differentiable in every input (XLA backward, see the module docstring).
    """
    return _ssd_pallas(x, dt, A, B, C, initial_state, chunk_size, interpret)
