"""The Mosaic GPU (Hopper) SSD kernel on a CPU host, tested the way the Triton one is: run in Mosaic GPU's
interpreter against the sequential reference (jax >= 0.12, which has a public GPU interpreter; on jax
0.10.2 these skip and say why), and lowered for CUDA on every jax (where layouts, copies and wgmma shapes
are checked). Nothing here runs on a GPU; experiments/gpu_check.py does.

Tolerance: the kernel feeds bf16 operands to wgmma (float32 accumulation, float32 state; see
ssd_mosaic's docstring), so it is held to 2e-2 of the largest |y| / |state|, not 1e-5."""
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_ssd import assert_close, numpy_recurrence, random_inputs
from twotower_jax.config import tiny
from twotower_jax.ops import ssd_mosaic as mosaic
from twotower_jax.ops.ssd import ssd_chunked, ssd_scan, ssd_sequential
from twotower_jax.ops.ssd_mosaic import ssd_mosaic
from twotower_jax.ops.ssd_pallas import abstract_gpu
from twotower_jax.tower import Impl, NemotronH

UNAVAILABLE = mosaic.mosaic_gpu_unavailable()
NO_INTERPRETER = mosaic.interpret_unavailable()
needs_mosaic = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"Mosaic GPU: {UNAVAILABLE}")
needs_interpreter = pytest.mark.skipif(NO_INTERPRETER is not None,
                                       reason=f"Mosaic GPU interpret mode: {NO_INTERPRETER}")
TOL = 2e-2

interpreted = jax.jit(functools.partial(ssd_mosaic, interpret=True))


def check(inputs, tol=TOL):
    y, h = interpreted(*map(jnp.asarray, inputs))
    y_ref, h_ref = numpy_recurrence(*inputs)
    assert y.dtype == h.dtype == jnp.float32
    assert y.shape == y_ref.shape and h.shape == h_ref.shape
    assert_close(y, y_ref, tol)
    assert_close(h, h_ref, tol)
    return y_ref


# One step; one partial chunk; one full chunk (no time padding); two chunks and a tail.
@needs_interpreter
@pytest.mark.parametrize("length", [1, 37, 64, 150])
def test_mosaic_matches_sequential(length):
    check(random_inputs(300 + length, length=length))


@needs_interpreter
def test_slow_decay_carries_the_initial_state_across_chunks():
    # The initial state decays only to ~0.4 over 150 steps: dropping it moves the last output by ~9% of
    # max |y|, far beyond the kernel's bf16 error (~3e-3 here).
    x, dt, A, B, C, h0 = random_inputs(7, batch=1, length=150)
    dt = dt * 0.01
    y_ref = check((x, dt, A, B, C, h0))
    y_zero, _ = interpreted(*map(jnp.asarray, (x, dt, A, B, C, np.zeros_like(h0))))
    assert np.abs(np.asarray(y_zero) - y_ref)[:, -1].max() > 0.05 * np.abs(y_ref).max()


@needs_interpreter
def test_spiky_decay():
    # Rare huge steps (dt·|A| up to ~900) amid slow decay: the in-chunk cumsum reaches thousands.
    x, dt, A, B, C, h0 = random_inputs(11, batch=1, length=200, heads=2, head_dim=4, groups=1, state=4)
    dt = dt * 0.01
    dt[np.random.default_rng(5).random(dt.shape) < 0.05] = 300.0
    check((x, dt.astype(np.float32), A, B, C, h0))


# groups: one group for all heads, one head per group; head_dim 80 and state 70 pad to 128.
@needs_interpreter
@pytest.mark.parametrize("heads, groups, head_dim, state", [(4, 1, 3, 5), (4, 4, 3, 5), (2, 2, 80, 70)])
def test_head_group_and_padding_layouts(heads, groups, head_dim, state):
    check(random_inputs(heads * head_dim, batch=1, length=19, heads=heads, head_dim=head_dim, groups=groups,
                        state=state))


@needs_interpreter
def test_real_layer_head_sizes_bf16():
    # H=64, P=64, N=128, G=8 as in the release (SPEC §2), bf16 x/B/C as the model feeds them.
    inputs = random_inputs(3, batch=1, length=23, heads=64, head_dim=64, groups=8, state=128)
    bf = jnp.bfloat16
    args = [jnp.asarray(a, bf) if a.ndim == 4 and i != 5 else jnp.asarray(a) for i, a in enumerate(inputs)]
    y, h = interpreted(*args)
    rounded = [np.asarray(a, np.float32) for a in args]
    y_ref, h_ref = numpy_recurrence(*rounded)
    assert_close(y, y_ref, TOL)
    assert_close(h, h_ref, TOL)


@needs_interpreter
def test_gradients_are_the_chunked_scans():
    # The backward pass is XLA: the VJP of ssd_chunked, so the gradients match the reference's closely.
    inputs = tuple(map(jnp.asarray, random_inputs(5, length=21)))
    rng = np.random.default_rng(0)
    wy = jnp.asarray(rng.standard_normal((2, 21, 4, 3)), jnp.float32)
    wh = jnp.asarray(rng.standard_normal((2, 4, 3, 5)), jnp.float32)

    def loss(scan):
        def f(*args):
            y, h = scan(*args)
            return jnp.sum(wy * y) + jnp.sum(wh * h)
        return jax.jit(jax.grad(f, argnums=tuple(range(6))))

    grads = loss(functools.partial(ssd_mosaic, interpret=True))(*inputs)
    for g, g_ref in zip(grads, loss(ssd_sequential)(*inputs)):
        assert g.shape == g_ref.shape
        assert_close(g, g_ref, 1e-4)


@needs_interpreter
def test_scan_impl_and_tiny_tower_prefill():
    inputs = tuple(map(jnp.asarray, random_inputs(9, length=11)))
    y, h = jax.jit(lambda *a: ssd_scan(*a, impl="pallas_mosaic"))(*inputs)
    y_ref, h_ref = ssd_chunked(*inputs)
    assert_close(y, y_ref, TOL)
    assert_close(h, h_ref, TOL)

    cfg = tiny()
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (2, 13)), jnp.int32)
    chunked = NemotronH(cfg, impl=Impl(scan="chunked"))
    params = chunked.random_params(seed=2)
    logits_chk, cache_chk = chunked.prefill(params, tokens)
    logits_mg, cache_mg = NemotronH(cfg, impl=Impl(scan="pallas_mosaic")).prefill(params, tokens)
    # Two Mamba layers' bf16 operand rounding, carried through a tower of O(1) random weights: 3e-2 seen.
    assert_close(logits_mg, logits_chk, 5e-2)
    for a, b in zip(jax.tree.leaves(cache_mg), jax.tree.leaves(cache_chk)):
        assert_close(a, b, 5e-2)


@pytest.mark.skipif(NO_INTERPRETER is None, reason="this jax has the Mosaic GPU interpreter")
def test_without_interpreter_or_gpu_the_error_says_why():
    with pytest.raises(NotImplementedError, match="without a GPU"):
        ssd_mosaic(*map(jnp.asarray, random_inputs(1, length=5)))


@needs_mosaic
@pytest.mark.parametrize("dtype, length, dims", [
    (jnp.float32, 37, dict(heads=4, head_dim=3, groups=2, state=5)),
    (jnp.bfloat16, 1000, dict(heads=64, head_dim=64, groups=8, state=128)),
])
def test_gpu_path_lowers_to_mosaic_gpu(dtype, length, dims):
    # Lowered for CUDA (an abstract H100) from this CPU host through Pallas' Mosaic GPU lowering, which
    # checks every register layout, SMEM transfer and wgmma shape. PTX and the run need a GPU.
    x, dt, A, B, C, h0 = random_inputs(1, batch=1, length=length, **dims)
    args = [jax.ShapeDtypeStruct(a.shape, dtype) for a in (x, dt, A, B, C)]
    args[1:3] = [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (dt, A)]
    args.append(jax.ShapeDtypeStruct(h0.shape, jnp.float32))
    fn = jax.jit(lambda *a: ssd_mosaic(*a, interpret=False))
    with warnings.catch_warnings(record=True) as caught, abstract_gpu():
        warnings.simplefilter("always")
        text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "triton" not in text.lower()
    assert not [str(w.message) for w in caught]
