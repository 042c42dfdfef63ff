"""Both SSD scans against an obviously-correct float64 NumPy loop, with initial states and odd lengths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax.ops.ssd import ssd_chunked, ssd_scan, ssd_sequential

# Jitted: run eagerly, a scan dispatches op by op (dozens of small compiles per call).
_chunked_jit = jax.jit(ssd_chunked, static_argnames="chunk_size")
_scan_jit = jax.jit(ssd_scan, static_argnames=("impl", "chunk_size"))


def random_inputs(seed, batch=2, length=13, heads=4, head_dim=3, groups=2, state=5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32)
    dt = np.log1p(np.exp(rng.standard_normal((batch, length, heads)))).astype(np.float32)  # softplus > 0
    A = -rng.uniform(0.2, 3.0, heads).astype(np.float32)
    B = rng.standard_normal((batch, length, groups, state)).astype(np.float32)
    C = rng.standard_normal((batch, length, groups, state)).astype(np.float32)
    h0 = rng.standard_normal((batch, heads, head_dim, state)).astype(np.float32)
    return x, dt, A, B, C, h0


def numpy_recurrence(x, dt, A, B, C, h0):
    """h_t = exp(dt·A)·h_{t−1} + dt·x_t⊗B_t ; y_t = h_t·C_t — float64, one head at a time."""
    b, length, heads, _ = x.shape
    per_group = heads // B.shape[2]
    h = h0.astype(np.float64).copy()
    y = np.zeros(x.shape, np.float64)
    for t in range(length):
        for hd in range(heads):
            g = hd // per_group
            decay = np.exp(dt[:, t, hd] * A[hd])[:, None, None]
            h[:, hd] = decay * h[:, hd] + (dt[:, t, hd, None] * x[:, t, hd])[:, :, None] * B[:, t, g][:, None, :]
            y[:, t, hd] = np.einsum("bpn,bn->bp", h[:, hd], C[:, t, g])
    return y, h


def assert_close(actual, expected, tol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("length", [1, 7, 13, 37])
def test_sequential_matches_numpy_loop(length):
    inputs = random_inputs(length, length=length)
    y, h = ssd_sequential(*map(jnp.asarray, inputs))
    y_ref, h_ref = numpy_recurrence(*inputs)
    assert_close(y, y_ref, 1e-5)
    assert_close(h, h_ref, 1e-5)


@pytest.mark.parametrize("length, chunk", [(1, 4), (7, 4), (13, 8), (37, 8), (37, 1), (16, 16), (10, 64), (40, 5)])
def test_chunked_matches_sequential(length, chunk):
    inputs = tuple(map(jnp.asarray, random_inputs(100 + length, length=length)))
    y_seq, h_seq = ssd_sequential(*inputs)
    y_chk, h_chk = jax.jit(ssd_chunked, static_argnames="chunk_size")(*inputs, chunk_size=chunk)
    assert_close(y_chk, y_seq, 1e-5)
    assert_close(h_chk, h_seq, 1e-5)


def test_initial_state_matters_and_long_decay_is_carried():
    # Slow decay (small |A|·dt) so the initial state still shapes outputs many chunks later.
    x, dt, A, B, C, h0 = random_inputs(7, length=45)
    dt = dt * 0.05
    inputs = tuple(map(jnp.asarray, (x, dt, A, B, C, h0)))
    y_ref, h_ref = numpy_recurrence(x, dt, A, B, C, h0)
    y, h = _chunked_jit(*inputs, chunk_size=4)
    assert_close(y, y_ref, 1e-5)
    assert_close(h, h_ref, 1e-5)
    y_zero, _ = _chunked_jit(*inputs[:5], jnp.zeros_like(inputs[5]), chunk_size=4)
    assert np.abs(np.asarray(y_zero) - y_ref)[:, -1].max() > 1e-2  # the test would see a dropped state


@pytest.mark.parametrize("impl", ["chunked", "sequential"])
def test_scan_in_pieces_equals_one_scan(impl):
    x, dt, A, B, C, h0 = map(jnp.asarray, random_inputs(3, length=21))
    y_all, h_all = _scan_jit(x, dt, A, B, C, h0, impl=impl, chunk_size=4)
    y1, h1 = _scan_jit(x[:, :9], dt[:, :9], A, B[:, :9], C[:, :9], h0, impl=impl, chunk_size=4)
    y2, h2 = _scan_jit(x[:, 9:], dt[:, 9:], A, B[:, 9:], C[:, 9:], h1, impl=impl, chunk_size=4)
    assert_close(jnp.concatenate([y1, y2], 1), y_all, 1e-5)
    assert_close(h2, h_all, 1e-5)


def test_zero_dt_steps_leave_state_untouched():
    x, dt, A, B, C, h0 = random_inputs(5, length=6)
    dt[:, :3] = 0.0  # what left padding produces
    _, h = _chunked_jit(*map(jnp.asarray, (x, dt, A, B, C, h0)), chunk_size=4)
    _, h_tail = _chunked_jit(*map(jnp.asarray, (x[:, 3:], dt[:, 3:], A, B[:, 3:], C[:, 3:], h0)), chunk_size=4)
    assert_close(h, h_tail, 1e-6)


def test_bad_shapes_raise():
    x, dt, A, B, C, h0 = map(jnp.asarray, random_inputs(0))
    with pytest.raises(ValueError, match="initial_state shape"):
        ssd_chunked(x, dt, A, B, C, h0[:, :2])
    with pytest.raises(ValueError, match="unknown scan impl"):
        ssd_scan(x, dt, A, B, C, h0, impl="pallas-someday")


@pytest.mark.parametrize("decay", ["strong", "slow", "spiky"])
def test_chunked_at_chunk_128_on_long_inputs(decay):
    """The real chunk size (128) over 1100 steps (8 full chunks + a 76-step tail), non-zero initial state,
    against the float64 loop; fp32 tolerance 1e-5 relative to the largest |y| (resp. |state|).

    strong: dt·|A| mostly ≫ 1, exp(dt·A) underflows to exactly 0 in fp32 at some steps;
    slow:   exp(dt·A) ≥ 0.98, the initial state still shapes the last output 1100 steps later;
    spiky:  slow decay with rare huge steps (dt·|A| up to ~900), so the in-chunk log-decay cumsum reaches
            thousands while neighbouring steps still decay by ~1%: segment sums must not be formed as
            differences of that cumsum."""
    x, dt, A, B, C, h0 = random_inputs(11, batch=1, length=1100, heads=4, head_dim=4, groups=2, state=4)
    if decay == "strong":
        dt = dt * 30
        assert (np.exp(dt * A).astype(np.float32) == 0).any()
    elif decay == "slow":
        dt = dt * 0.002
        assert np.exp(dt * A).min() > 0.97
    else:
        dt = dt * 0.01
        dt[np.random.default_rng(5).random(dt.shape) < 0.05] = 300.0
    dt = dt.astype(np.float32)
    y_ref, h_ref = numpy_recurrence(x, dt, A, B, C, h0)
    inputs = tuple(map(jnp.asarray, (x, dt, A, B, C, h0)))
    y, h = _chunked_jit(*inputs, chunk_size=128)
    assert_close(y, y_ref, 1e-5)
    assert_close(h, h_ref, 1e-5)
    if decay == "slow":  # the initial state is carried across all 8 chunk boundaries
        y_zero, _ = _chunked_jit(*inputs[:5], jnp.zeros_like(inputs[5]), chunk_size=128)
        assert np.abs(np.asarray(y_zero) - y_ref)[:, -1].max() > 1e-3 * np.abs(y_ref).max()


