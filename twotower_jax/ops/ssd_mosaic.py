"""The chunked SSD scan (Mamba-2) as one Pallas kernel for Mosaic GPU (Hopper tensor cores), with an XLA
backward pass.

Same contract as `ssd.ssd_chunked`: x (b,l,h,p), dt (b,l,h), A (h,), B/C (b,l,g,n), initial_state
(b,h,p,n) → y (b,l,h,p) float32 (no D skip) and final_state (b,h,p,n) float32.

WHAT HAS RUN WHERE. Nothing in this module has run on a GPU. On a CPU it is checked two ways:
  * Mosaic GPU's interpreter (`plgpu.InterpretGPUParams`, public from jax 0.11): the kernel's own jaxpr,
    copies, barriers and wgmma calls simulated in numpy (tests/test_ssd_mosaic.py, against the sequential
    reference). jax 0.10.2's interpreter cannot run it (no rule for `layout_cast`), so there the
    interpret-mode tests skip and say so.
  * lowering for CUDA (`jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))`) on jax 0.10.2,
    0.11.2 (the lent GPU machines' version) and 0.12: Pallas' Mosaic GPU lowering accepts every op,
    layout, copy and wgmma shape (this is where layout errors show up; the interpreter ignores layouts).
    PTX generation, `ptxas` and the run itself happen only on a GPU: `experiments/gpu_check.py` does that.
The kernel uses wgmma, so it needs an sm_90a (Hopper: H100/H200) GPU.

Kernel layout. `plgpu.kernel` with grid (batch, head): one warpgroup owns one head's whole state and walks
its chunks in order (`fori_loop`), so the inter-chunk recurrence never leaves the kernel. The state is
kept transposed, S = stateᵀ (N, P), in float32 registers (the wgmma accumulator layout). Per chunk of
Q = 64 steps (the wgmma M), with cum_i = Σ_{k≤i} dt_k·A inside the chunk (computed in XLA: Mosaic GPU
has no cumsum):

    CB     = C · Bᵀ                                           (Q, Q)   wgmma, bf16 operands
    M_ij   = CB_ij · exp(cum_i − cum_j) · dt_j  [j ≤ i]       (Q, Q)   registers, float32
    y      = exp(cum_i) · (C · S) + M · x                     (Q, P)   two wgmmas, summed in registers
    S     ← exp(cum_Q) · S + Bᵀ · (x ∘ w),  w_j = dt_j·exp(Σ_{k>j} dt_k·A)     (N, P)   wgmma

The in-chunk segment sums cum_i − cum_j are differences of the chunk-local cumsum (Mosaic GPU has no
cumsum, and the Q×Q mask-and-cumsum of `ssd_pallas` would not fit the register budget next to the state):
they lose ~|cum|·6e-8 absolutely, below the bf16 rounding below unless one chunk's Σ dt·|A| exceeds ~1e5.

Precision (read this before comparing numbers): wgmma takes 16-bit operands here, so x, B, C, the
intra-chunk matrix M, x ∘ w and the entering state's copy used for C · S are rounded to bfloat16;
every product accumulates in float32 and the carried state S stays float32 (SPEC §2). That is the recipe
of mamba_ssm's Triton kernels. Against the float32 sequential reference expect ~1e-2 relative error,
not the 1e-5 of `ssd_pallas` (whose dots are IEEE float32). Mosaic GPU's interpreter multiplies the
bf16 operands in float32 (numpy), so CPU tests see the bf16 rounding of the operands but not the tensor
cores' accumulation order.

Padding, done in XLA: time to a multiple of 64 with dt = 0 (no decay, no input: the state and the real
outputs are unchanged); head_dim P and state N to multiples of 64 with zeros (128-byte bf16 rows, the
swizzle the wgmma operands use). B is passed transposed (b, g, N, L) so that no wgmma operand needs a
transposed SMEM view (not every jax's GPU interpreter has one), and the states cross the kernel boundary
transposed (b, h, N, P). The kernel does not overlap the next chunk's copies with this chunk's math (no
software pipelining yet), and batch 1 gives one block per head (64 of an H100's 132 SMs).

Backward: `jax.custom_vjp`; the VJP of `ssd_chunked` recomputed in XLA from the saved inputs.
"""
from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from twotower_jax.ops.kernel_vjp import with_chunked_backward
from twotower_jax.ops.ssd import check_shapes

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # a jax without Mosaic GPU
    plgpu = None

CHUNK = 64   # the kernel's chunk Q: wgmma's M
_ALIGN = 64  # P and N are padded to multiples of this (bf16 rows of 128 bytes)


def mosaic_gpu_unavailable() -> str | None:
    """Why this jax cannot build the kernel at all, or None when it can."""
    if plgpu is None:
        return "jax.experimental.pallas.mosaic_gpu is not importable in this jax"
    missing = [name for name in ("kernel", "wgmma", "ACC", "SMEM", "Barrier", "load", "layout_cast",
                                 "copy_gmem_to_smem", "copy_smem_to_gmem", "TilingTransform", "SwizzleTransform")
               if not hasattr(plgpu, name)]
    if missing:
        return f"jax {jax.__version__}: pallas.mosaic_gpu lacks {', '.join(missing)}"
    return None


def interpret_params():
    """Mosaic GPU interpret-mode parameters, or None where this jax has no public GPU interpreter that can
    run the kernel (jax 0.10.2 has a private one without a `layout_cast` rule; 0.11 and 0.12 have it)."""
    cls = getattr(plgpu, "InterpretGPUParams", None) if plgpu is not None else None
    return None if cls is None else cls()


def interpret_unavailable() -> str | None:
    """Why the kernel cannot run in Mosaic GPU interpret mode on this jax, or None when it can."""
    reason = mosaic_gpu_unavailable()
    if reason is None and interpret_params() is None:
        reason = (f"jax {jax.__version__}: no public Mosaic GPU interpreter (plgpu.InterpretGPUParams, jax >= "
                  "0.11); the private one in jax 0.10.2 cannot lower layout_cast on CPU")
    return reason


def _load(ref, layout):
    """`plgpu.load` into `layout`: jax 0.10.2 requires an index argument, 0.11 deprecates it (optional),
    0.12 has none."""
    idx = inspect.signature(plgpu.load).parameters.get("idx")
    if idx is not None and idx.default is inspect.Parameter.empty:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _ssd_kernel(x_g, bt_g, c_g, cum_g, w_g, dt_g, dec_g, h0_g, y_g, hT_g,
                x_s, bt_s, c_s, m_s, xw_s, st_s, cum_s, w_s, dt_s, dec_s, y_s, h_s, bars,
                *, num_chunks: int, heads_per_group: int):
    """One (batch, head). GMEM: x_g (b,L,h,P) bf16, bt_g (b,g,N,L) bf16, c_g (b,L,g,N) bf16, cum_g/w_g/dt_g
    (b,h,L) f32, dec_g (b,h,chunks,P) f32, h0_g/hT_g (b,h,N,P) f32, y_g (b,L,h,P) f32."""
    f32, bf16 = jnp.float32, jnp.bfloat16
    q = CHUNK
    wgmma_layout = plgpu.Layout.WGMMA
    rows, cols = wgmma_layout.reduce(1), wgmma_layout.reduce(0)   # (Q,) vectors along i and along j
    bi = jax.lax.axis_index("batch")
    hi = jax.lax.axis_index("head")
    gi = jax.lax.div(hi, jnp.int32(heads_per_group))

    def copy_in(src, dst, k):
        plgpu.copy_gmem_to_smem(src, dst, bars.at[k])

    copy_in(h0_g.at[bi, hi], h_s, 0)
    plgpu.barrier_wait(bars.at[0])
    state = _load(h_s, wgmma_layout)                                     # S = stateᵀ (N, P) float32
    st_s[...] = state.astype(bf16)
    plgpu.commit_smem()

    def matmul(a, b, shape):
        def body(acc):
            plgpu.wgmma(acc, a, b)
            return acc[...]
        return pl.run_scoped(body, plgpu.ACC(shape, f32))


    def one_chunk(c, state):
        t = pl.ds(c * q, q)
        copy_in(x_g.at[bi, t, hi], x_s, 0)
        copy_in(bt_g.at[bi, gi, :, t], bt_s, 1)
        copy_in(c_g.at[bi, t, gi], c_s, 2)
        copy_in(cum_g.at[bi, hi, t], cum_s, 3)
        copy_in(w_g.at[bi, hi, t], w_s, 4)
        copy_in(dt_g.at[bi, hi, t], dt_s, 5)
        copy_in(dec_g.at[bi, hi, c], dec_s, 6)
        for k in range(7):
            plgpu.barrier_wait(bars.at[k])

        cum_i = _load(cum_s, rows)
        cum_j = _load(cum_s, cols)
        dt_j = _load(dt_s, cols)
        cb = matmul(c_s, bt_s, (q, q))                                   # C · Bᵀ
        seg = (jax.lax.broadcast_in_dim(cum_i, (q, q), [0]) - jax.lax.broadcast_in_dim(cum_j, (q, q), [1]))
        i = plgpu.broadcasted_iota(jnp.int32, (q, q), 0, layout=wgmma_layout)
        j = plgpu.broadcasted_iota(jnp.int32, (q, q), 1, layout=wgmma_layout)
        # Above the diagonal seg > 0 and exp could overflow: clamp before exp, then mask.
        decay = jnp.exp(jnp.minimum(seg, 0.0))
        m = jnp.where(i >= j, cb * decay * jax.lax.broadcast_in_dim(dt_j, (q, q), [1]), 0.0)

        y = matmul(c_s, st_s, (q, state.shape[1]))                       # C · S (entering state)
        y = y * jax.lax.broadcast_in_dim(jnp.exp(cum_i), y.shape, [0])
        m_s[...] = m.astype(bf16)
        plgpu.commit_smem()
        y = y + matmul(m_s, x_s, y.shape)                                # + M · x
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)                  # the previous chunk's y left y_s
        y_s[...] = y
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_s, y_g.at[bi, t, hi])

        x = _load(x_s, wgmma_layout).astype(f32)
        xw_s[...] = (x * jax.lax.broadcast_in_dim(_load(w_s, rows), x.shape, [0])).astype(bf16)
        plgpu.commit_smem()
        state = state * jax.lax.broadcast_in_dim(_load(dec_s, cols), state.shape, [1])
        state = state + matmul(bt_s, xw_s, state.shape)                  # + Bᵀ · (x ∘ w)
        st_s[...] = state.astype(bf16)
        plgpu.commit_smem()
        return state

    state = jax.lax.fori_loop(0, num_chunks, one_chunk, state)
    h_s[...] = state
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(h_s, hT_g.at[bi, hi])
    plgpu.wait_smem_to_gmem(0)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _forward(x, dt, A, B, C, initial_state, interpret):
    check_shapes(x, dt, A, B, C, initial_state)
    reason = mosaic_gpu_unavailable()
    if reason:
        raise NotImplementedError(f"ssd_mosaic: {reason}")
    if interpret is None:
        interpret = not _on_gpu()
    params = None
    if interpret:
        params = interpret_params()
        if params is None:
            raise NotImplementedError(f"ssd_mosaic cannot run here without a GPU: {interpret_unavailable()}")
    f32, bf16 = jnp.float32, jnp.bfloat16
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    q = CHUNK
    padded_len = _round_up(length, q)
    num_chunks = padded_len // q
    pp, npad = _round_up(p, _ALIGN), _round_up(n, _ALIGN)

    def pad(a, sizes):
        widths = [(0, size - dim) for dim, size in zip(a.shape, sizes)]
        return jnp.pad(a, widths) if any(w for _, w in widths) else a

    dt = pad(dt.astype(f32), (b, padded_len, h))                          # dt = 0 on padded steps
    da = dt * A.astype(f32)
    da = da.reshape(b, num_chunks, q, h)
    cum = jnp.cumsum(da, axis=2)                                         # Σ_{k≤i} dt·A inside each chunk
    # Σ_{k>j} dt·A as a sum of its own terms (a reverse cumsum shifted by one), not cum_Q − cum_j.
    to_end = jnp.pad(jnp.flip(jnp.cumsum(jnp.flip(da, 2), axis=2), 2)[:, :, 1:], [(0, 0), (0, 0), (0, 1), (0, 0)])
    w = dt.reshape(b, num_chunks, q, h) * jnp.exp(to_end)
    dec = jnp.broadcast_to(jnp.exp(cum[:, :, -1, :]).transpose(0, 2, 1)[..., None], (b, h, num_chunks, pp))

    def per_head(a):                                                      # (b, c, q, h) -> (b, h, L)
        return a.transpose(0, 3, 1, 2).reshape(b, h, padded_len)

    xs = pad(x, (b, padded_len, h, pp)).astype(bf16)
    bt = pad(B, (b, padded_len, g, npad)).astype(bf16).transpose(0, 2, 3, 1)   # (b, g, N, L)
    cs = pad(C, (b, padded_len, g, npad)).astype(bf16)
    h0t = pad(initial_state.astype(f32), (b, h, pp, npad)).transpose(0, 1, 3, 2)  # (b, h, N, P)

    # 128-byte swizzled tiles: 64 bf16 or 32 float32 columns (what wgmma operands and the WGMMA-layout
    # register <-> SMEM transfers need).
    tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    tiles32 = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
    scratch = [
        plgpu.SMEM((q, pp), bf16, transforms=tiles),       # x
        plgpu.SMEM((npad, q), bf16, transforms=tiles),     # Bᵀ
        plgpu.SMEM((q, npad), bf16, transforms=tiles),     # C
        plgpu.SMEM((q, q), bf16, transforms=tiles),        # M
        plgpu.SMEM((q, pp), bf16, transforms=tiles),       # x ∘ w
        plgpu.SMEM((npad, pp), bf16, transforms=tiles),    # S (bf16 copy for C · S)
        plgpu.SMEM((q,), f32),                             # cum
        plgpu.SMEM((q,), f32),                             # w
        plgpu.SMEM((q,), f32),                             # dt
        plgpu.SMEM((pp,), f32),                            # chunk decay
        plgpu.SMEM((q, pp), f32, transforms=tiles32),      # y
        plgpu.SMEM((npad, pp), f32, transforms=tiles32),   # initial / final state
        plgpu.Barrier(num_arrivals=1, num_barriers=7),
    ]
    extra = {"interpret": params} if params is not None else {}
    y, final_t = plgpu.kernel(
        functools.partial(_ssd_kernel, num_chunks=num_chunks, heads_per_group=h // g),
        out_type=(jax.ShapeDtypeStruct((b, padded_len, h, pp), f32), jax.ShapeDtypeStruct((b, h, npad, pp), f32)),
        scratch_types=scratch,
        grid=(b, h),
        grid_names=("batch", "head"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        **extra,
    )(xs, bt, cs, per_head(cum), per_head(w), per_head(dt.reshape(b, num_chunks, q, h)), dec, h0t)
    return y[:, :length, :, :p], final_t.transpose(0, 1, 3, 2)[:, :, :p, :n]


# The kernel's chunk is fixed (CHUNK); the backward recomputes ssd_chunked at that chunk.
_ssd_mosaic = with_chunked_backward(lambda x, dt, A, B, C, h0, _chunk, interpret: _forward(x, dt, A, B, C, h0, interpret))


def ssd_mosaic(
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
    """Chunked SSD in one Mosaic GPU kernel (Hopper). Returns (y, final_state), both float32.

    `chunk_size` is accepted for the `ssd_scan` interface and ignored: the kernel's chunk is 64 (wgmma M);
    the math does not depend on it. `interpret=None` compiles for the GPU when the default backend is one
    and otherwise runs Mosaic GPU's interpreter (jax >= 0.11; NotImplementedError where there is none).
    Differentiable in every input (XLA backward). bf16 tensor-core operands: see the module docstring.
    """
    del chunk_size
    return _ssd_mosaic(x, dt, A, B, C, initial_state, CHUNK, interpret)
