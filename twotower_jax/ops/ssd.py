"""The Mamba-2 selective state-space scan (SSD), in two pure-JAX forms that share one interface.

For each head h (group g = h // (H/G)) and time t:

    state_t = exp(dt_t · A_h) · state_{t-1} + dt_t · (x_t ⊗ B_t)        state: (P, N)
    y_t     = state_t · C_t                                              y:     (P,)

The D skip connection is not part of the scan (the mixer adds it). Everything here is float32:
bf16 states overflow over long contexts (SPEC §2, §8).

`ssd_sequential` is the reference: a `lax.scan` over time that is obviously the recurrence.
`ssd_chunked` is the chunked SSD algorithm (quadratic inside a chunk, recurrent across chunks); it is
exact for any length (the tail is padded with dt = 0, which leaves the state untouched) and any initial
state (carried into every chunk with its decay).
`ssd_pallas` (in `ssd_pallas.py`) is the same chunked algorithm as one Pallas kernel (Triton on GPU);
`ssd_mosaic` (in `ssd_mosaic.py`) is the same again for Mosaic GPU (Hopper tensor cores, bf16 operands).

`ssd_scan` picks one by name: "sequential", "chunked", "pallas", "pallas_mosaic", or "auto" (resolved at
trace time; "chunked" everywhere until a Pallas kernel has passed on a real GPU, see `resolve_scan_impl`).
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

ScanImpl = Literal["auto", "chunked", "pallas", "pallas_mosaic", "sequential"]
SCAN_IMPLS: tuple[str, ...] = ("auto", "chunked", "pallas", "pallas_mosaic", "sequential")
# The CLI's --ssd-impl names → ScanImpl.
SSD_IMPL_NAMES: dict[str, str] = {"reference": "sequential", "xla": "chunked", "pallas": "pallas",
                                  "mosaic": "pallas_mosaic", "auto": "auto"}
_HIGHEST = jax.lax.Precision.HIGHEST


def _heads_from_groups(bc: Float[Array, "b l g n"], num_heads: int) -> Float[Array, "b l h n"]:
    """Head h reads group h // (H/G)."""
    return jnp.repeat(bc, num_heads // bc.shape[2], axis=2)


def check_shapes(x, dt, A, B, C, initial_state):
    b, l, h, p = x.shape
    n = B.shape[-1]
    if dt.shape != (b, l, h) or A.shape != (h,) or B.shape[:2] != (b, l) or C.shape != B.shape:
        raise ValueError(f"ssd: inconsistent shapes x{x.shape} dt{dt.shape} A{A.shape} B{B.shape} C{C.shape}")
    if h % B.shape[2]:
        raise ValueError(f"ssd: {h} heads not divisible by {B.shape[2]} groups")
    if initial_state.shape != (b, h, p, n):
        raise ValueError(f"ssd: initial_state shape {initial_state.shape}, expected {(b, h, p, n)}")


def ssd_sequential(
    x: Float[Array, "b l h p"],
    dt: Float[Array, "b l h"],
    A: Float[Array, "h"],
    B: Float[Array, "b l g n"],
    C: Float[Array, "b l g n"],
    initial_state: Float[Array, "b h p n"],
) -> tuple[Float[Array, "b l h p"], Float[Array, "b h p n"]]:
    """Reference scan: one step per token. Returns (y, final_state)."""
    check_shapes(x, dt, A, B, C, initial_state)
    f32 = jnp.float32
    x, dt, A = x.astype(f32), dt.astype(f32), A.astype(f32)
    Bh = _heads_from_groups(B.astype(f32), x.shape[2])
    Ch = _heads_from_groups(C.astype(f32), x.shape[2])

    def step(state, inputs):
        x_t, dt_t, B_t, C_t = inputs  # (b,h,p) (b,h) (b,h,n) (b,h,n)
        decay = jnp.exp(dt_t * A)[:, :, None, None]
        state = decay * state + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
        y_t = jnp.einsum("bhpn,bhn->bhp", state, C_t, precision=_HIGHEST)
        return state, y_t

    time_major = [jnp.moveaxis(a, 1, 0) for a in (x, dt, Bh, Ch)]
    final_state, ys = jax.lax.scan(step, initial_state.astype(f32), time_major)
    return jnp.moveaxis(ys, 0, 1), final_state


def ssd_chunked(
    x: Float[Array, "b l h p"],
    dt: Float[Array, "b l h"],
    A: Float[Array, "h"],
    B: Float[Array, "b l g n"],
    C: Float[Array, "b l g n"],
    initial_state: Float[Array, "b h p n"],
    chunk_size: int = 128,
) -> tuple[Float[Array, "b l h p"], Float[Array, "b h p n"]]:
    """Chunked SSD. Same contract as `ssd_sequential`; any `chunk_size` gives the same math."""
    check_shapes(x, dt, A, B, C, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    f32 = jnp.float32
    b, length, h, p = x.shape
    q = min(chunk_size, length)
    pad = (-length) % q
    if pad:
        # dt = 0 at padded steps: decay exp(0) = 1 and no input, so the final state is unchanged.
        def pad_time(a):
            return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        x, dt, B, C = map(pad_time, (x, dt, B, C))
    nc = (length + pad) // q

    def chunks(a):
        return a.astype(f32).reshape(b, nc, q, *a.shape[2:])

    x, dt = chunks(x), chunks(dt)                                    # (b,c,q,h,p) (b,c,q,h)
    Bh = chunks(_heads_from_groups(B, h))                            # (b,c,q,h,n)
    Ch = chunks(_heads_from_groups(C, h))
    dA = dt * A.astype(f32)                                          # (b,c,q,h), ≤ 0
    log_decay = jnp.cumsum(dA, axis=2)                               # Σ_{k≤i} dA_k, decreasing

    # Segment sums Σ_{j<k≤i} dA_k from their own terms (z[k, j] = dA_k for k > j, summed over k), not as
    # differences cum_i − cum_j of the long cumsum: with large dt·|A| somewhere in the chunk |cum| is
    # large, the difference loses ~|cum|·eps absolutely, and exp turns that into a relative error.
    rows = jnp.arange(q)[:, None]
    cols = jnp.arange(q)[None, :]
    z = jnp.where((rows > cols)[None, None, :, :, None], dA[:, :, :, None, :], 0.0)  # (b,c,k,j,h)
    causal = (cols <= rows)[None, None, :, :, None]
    seg = jnp.where(causal, jnp.cumsum(z, axis=2), -jnp.inf)          # (b,c,i,j,h); −inf: exp → 0 above

    # 1. Inside each chunk: y_i = Σ_{j≤i} (C_i·B_j) exp(seg_ij) dt_j x_j.
    decay_ij = jnp.exp(seg)
    cb = jnp.einsum("bcihn,bcjhn->bcijh", Ch, Bh, precision=_HIGHEST)
    y_diag = jnp.einsum("bcijh,bcjh,bcjhp->bcihp", cb * decay_ij, dt, x, precision=_HIGHEST)

    # 2.–3. The state entering each chunk.
    final_state, states_in = _states_entering_chunks(x, dt, Bh, z, log_decay[:, :, -1, :], initial_state)

    # 4. What the entering state contributes inside each chunk, decayed to each position.
    y_off = jnp.einsum("bcihn,bchpn,bcih->bcihp", Ch, states_in, jnp.exp(log_decay), precision=_HIGHEST)

    y = (y_diag + y_off).reshape(b, nc * q, h, p)[:, :length]
    return y, final_state


def _states_entering_chunks(x, dt, Bh, z, chunk_log_decay, initial_state):
    """Chunked inputs x (b,c,q,h,p), dt (b,c,q,h), Bh (b,c,q,h,n), z (b,c,k,j,h) = dA_k for k > j (else 0),
    chunk_log_decay (b,c,h) = Σ dA over each chunk. Returns (final state, states entering each chunk
    (b,c,h,p,n)), float32."""
    # 2. The state each chunk adds by its end, from a zero start.
    decay_to_end = jnp.exp(jnp.sum(z, axis=2))                       # (b,c,q,h): exp Σ_{k>j} dA_k
    chunk_states = jnp.einsum("bcjhn,bcjh,bcjhp->bchpn", Bh, decay_to_end * dt, x, precision=_HIGHEST)
    chunk_decay = jnp.exp(chunk_log_decay)                           # (b,c,h)

    # 3. Across chunks: the state entering chunk c, starting from the initial state.
    def carry_state(state, inputs):
        decay, added = inputs
        return decay[:, :, None, None] * state + added, state

    final_state, states_in = jax.lax.scan(
        carry_state, initial_state.astype(jnp.float32),
        (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(chunk_states, 1, 0)))
    return final_state, jnp.moveaxis(states_in, 0, 1)


def ssd_block_states(
    x: Float[Array, "b l h p"],
    dt: Float[Array, "b l h"],
    A: Float[Array, "h"],
    B: Float[Array, "b l g n"],
    initial_state: Float[Array, "b h p n"],
    block_size: int,
) -> Float[Array, "b nb h p n"]:
    """The scan's state before each block of `block_size` positions (block 0: `initial_state`), from the
    scan's own inputs in one parallel pass: the chunked SSD's inter-chunk states with chunk = block
    (no outputs computed). `l` must be a multiple of `block_size`. Float32."""
    check_shapes(x, dt, A, B, B, initial_state)
    b, length, h, p = x.shape
    if block_size < 1 or length % block_size:
        raise ValueError(f"length {length} must be a positive multiple of block_size {block_size}")
    f32 = jnp.float32
    nb, q = length // block_size, block_size

    def chunks(a):
        return a.astype(f32).reshape(b, nb, q, *a.shape[2:])

    x, dt, Bh = chunks(x), chunks(dt), chunks(_heads_from_groups(B, h))
    dA = dt * A.astype(f32)
    rows, cols = jnp.arange(q)[:, None], jnp.arange(q)[None, :]
    z = jnp.where((rows > cols)[None, None, :, :, None], dA[:, :, :, None, :], 0.0)
    return _states_entering_chunks(x, dt, Bh, z, jnp.sum(dA, axis=2), initial_state)[1]


def resolve_scan_impl(impl: str, backend: str | None = None) -> str:
    """Checks the name; "auto" → "chunked" on every backend (`backend`: default backend when None).

    "auto" picks the XLA chunked scan on GPUs too, on purpose: neither Pallas kernel ("pallas": Triton,
    "pallas_mosaic": Mosaic GPU) has yet run on a real GPU; both are checked on CPU only (interpret mode
    and lowering for CUDA). Flip "auto" to a kernel for backend "gpu" once `experiments/gpu_check.py` has
    shown it equal to the reference and faster than "chunked" on that GPU, with the JSON it writes
    committed under experiments/results/ as the evidence. The kernels stay selectable by name."""
    if impl not in SCAN_IMPLS:
        raise ValueError(f"unknown scan impl {impl!r}; expected one of {', '.join(map(repr, SCAN_IMPLS))}")
    if impl == "auto":
        return "chunked"  # on every backend, `backend` included, until the GPU evidence exists
    return impl


def ssd_scan(x, dt, A, B, C, initial_state, *, impl: ScanImpl = "auto", chunk_size: int = 128):
    """Dispatches to one scan implementation (resolved at trace time). Shapes as `ssd_sequential`."""
    impl = resolve_scan_impl(impl)
    if impl == "chunked":
        return ssd_chunked(x, dt, A, B, C, initial_state, chunk_size=chunk_size)
    if impl == "pallas":
        from twotower_jax.ops.ssd_pallas import ssd_pallas  # imports this module: import on use
        return ssd_pallas(x, dt, A, B, C, initial_state, chunk_size=chunk_size)
    if impl == "pallas_mosaic":
        from twotower_jax.ops.ssd_mosaic import ssd_mosaic
        return ssd_mosaic(x, dt, A, B, C, initial_state, chunk_size=chunk_size)
    return ssd_sequential(x, dt, A, B, C, initial_state)


def ssd_state_at(
    x: Float[Array, "b l h p"],
    dt: Float[Array, "b l h"],
    A: Float[Array, "h"],
    B: Float[Array, "b l g n"],
    initial_state: Float[Array, "b h p n"],
    index,
) -> Float[Array, "b h p n"]:
    """The scan's state after the first `index` (b,) positions of each row (0: `initial_state`; l: the
    final state), from the scan's own inputs, without running the scan again:

        state_k = exp(Σ_{t<k} dt_t·A)·state_0 + Σ_{j<k} exp(Σ_{j<t<k} dt_t·A)·dt_j·(x_j ⊗ B_j)

    (row k of the chunked SSD's decay matrix). Segment sums are summed from their own terms, as in
    `ssd_chunked`. O(l²·h + l·h·p·n) per row: for a speculative verify pass, the Mamba states at the
    accepted length without a second pass and without keeping a state per position."""
    check_shapes(x, dt, A, B, B, initial_state)
    f32 = jnp.float32
    b, length, h, p = x.shape
    x, dt = x.astype(f32), dt.astype(f32)
    Bh = _heads_from_groups(B.astype(f32), h)
    position = jnp.arange(length)
    inside = position[None, :] < jnp.asarray(index)[:, None]                           # (b, l)
    dA = jnp.where(inside[..., None], dt * A.astype(f32), 0.0)                          # (b, l, h)
    later = (position[:, None] < position[None, :])[None, :, :, None]                   # t > j
    after = jnp.sum(jnp.where(later, dA[:, None, :, :], 0.0), axis=2)                   # (b, j, h): Σ_{j<t<k}
    weight = jnp.where(inside[..., None], jnp.exp(after) * dt, 0.0)
    added = jnp.einsum("bjh,bjhp,bjhn->bhpn", weight, x, Bh, precision=_HIGHEST)
    return jnp.exp(jnp.sum(dA, axis=1))[:, :, None, None] * initial_state.astype(f32) + added
