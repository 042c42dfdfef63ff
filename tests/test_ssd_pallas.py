"""The Pallas SSD kernel (interpret mode on CPU) against the sequential reference: outputs, final states,
gradients, bf16 inputs, the real layer's head sizes, impl selection, a whole tower, and its GPU lowering.
Nothing here runs on a GPU; experiments/gpu_check.py does."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_ssd import assert_close, numpy_recurrence, random_inputs
from twotower_jax.config import tiny
from twotower_jax.ops.ssd import SSD_IMPL_NAMES, resolve_scan_impl, ssd_chunked, ssd_scan, ssd_sequential
from twotower_jax.ops.ssd_pallas import (TRITON_DEPRECATION, _triton_compiler_params, abstract_gpu, kernel_chunk,
                                         ssd_pallas)
from twotower_jax.tower import Impl, NemotronH

pallas = jax.jit(ssd_pallas, static_argnames=("chunk_size", "interpret"))


# (length, chunk): one step; shorter than a chunk; odd lengths over several chunks; a chunk size that is
# not a power of two (rounded up to 32); an exact multiple of the chunk (no time padding).
@pytest.mark.parametrize("length, chunk", [(1, 16), (7, 16), (37, 16), (37, 20), (70, 64), (32, 16)])
def test_pallas_matches_sequential(length, chunk):
    inputs = random_inputs(200 + length, length=length)
    y, h = pallas(*map(jnp.asarray, inputs), chunk_size=chunk)
    y_ref, h_ref = numpy_recurrence(*inputs)
    assert y.dtype == h.dtype == jnp.float32
    assert_close(y, y_ref, 1e-5)
    assert_close(h, h_ref, 1e-5)


# groups: one group for all heads, one head per group; head_dim 80 pads to 128 = two head_dim blocks.
@pytest.mark.parametrize("heads, groups, head_dim, state", [(4, 1, 3, 5), (4, 4, 3, 5), (2, 2, 80, 16)])
def test_pallas_head_group_and_padding_layouts(heads, groups, head_dim, state):
    inputs = random_inputs(heads * head_dim, batch=1, length=19, heads=heads, head_dim=head_dim, groups=groups,
                           state=state)
    y, h = pallas(*map(jnp.asarray, inputs), chunk_size=16)
    y_ref, h_ref = numpy_recurrence(*inputs)
    assert_close(y, y_ref, 1e-5)
    assert_close(h, h_ref, 1e-5)


def test_slow_decay_carries_the_initial_state_across_chunks():
    x, dt, A, B, C, h0 = random_inputs(7, length=50)
    dt = dt * 0.05
    y, h = pallas(*map(jnp.asarray, (x, dt, A, B, C, h0)), chunk_size=16)
    y_ref, h_ref = numpy_recurrence(x, dt, A, B, C, h0)
    assert_close(y, y_ref, 1e-5)
    assert_close(h, h_ref, 1e-5)
    y_zero, _ = pallas(*map(jnp.asarray, (x, dt, A, B, C, np.zeros_like(h0))), chunk_size=16)
    assert np.abs(np.asarray(y_zero) - y_ref)[:, -1].max() > 1e-2  # a dropped state would show


def test_bf16_inputs():
    # Against the reference on the same bf16 values the kernel computes exactly in fp32 (1e-5); against
    # the fp32 inputs the only difference is bf16 rounding of x, B, C, h0 (~3 significant digits): 3e-2.
    x, dt, A, B, C, h0 = random_inputs(11, length=37)
    bf = jnp.bfloat16
    y, h = pallas(*(jnp.asarray(a, bf) if a.ndim == 4 else jnp.asarray(a) for a in (x, dt, A, B, C, h0)),
                  chunk_size=16)
    assert y.dtype == h.dtype == jnp.float32
    rounded = [np.asarray(jnp.asarray(a, bf), np.float32) if a.ndim == 4 else a for a in (x, dt, A, B, C, h0)]
    y_ref, h_ref = numpy_recurrence(*rounded)
    assert_close(y, y_ref, 1e-5)
    assert_close(h, h_ref, 1e-5)
    y32, h32 = numpy_recurrence(x, dt, A, B, C, h0)
    assert_close(y, y32, 3e-2)
    assert_close(h, h32, 3e-2)


def test_gradients_match_the_reference():
    inputs = tuple(map(jnp.asarray, random_inputs(5, length=21)))
    rng = np.random.default_rng(0)
    wy = jnp.asarray(rng.standard_normal((2, 21, 4, 3)), jnp.float32)
    wh = jnp.asarray(rng.standard_normal((2, 4, 3, 5)), jnp.float32)

    def loss(scan):
        def f(*args):
            y, h = scan(*args)
            return jnp.sum(wy * y) + jnp.sum(wh * h)
        return jax.jit(jax.grad(f, argnums=tuple(range(6))))

    grads = loss(lambda *a: ssd_pallas(*a, chunk_size=16))(*inputs)
    grads_ref = loss(ssd_sequential)(*inputs)
    for name, g, g_ref in zip(["x", "dt", "A", "B", "C", "initial_state"], grads, grads_ref):
        assert g.shape == g_ref.shape, name
        assert_close(g, g_ref, 1e-4)


def test_real_layer_head_sizes():
    # H=64, P=64, N=128, G=8 as in the release (SPEC §2), batch 1, a short odd length, config chunk 128.
    inputs = random_inputs(3, batch=1, length=23, heads=64, head_dim=64, groups=8, state=128)
    y, h = pallas(*map(jnp.asarray, inputs), chunk_size=128)
    y_ref, h_ref = numpy_recurrence(*inputs)
    assert_close(y, y_ref, 1e-5)
    assert_close(h, h_ref, 1e-5)


def test_kernel_chunk_rounding():
    assert kernel_chunk(128, 5000) == 64      # capped
    assert kernel_chunk(20, 5000) == 32       # next power of two
    assert kernel_chunk(4, 5000) == 16        # Triton dots need ≥ 16
    assert kernel_chunk(128, 23) == 32        # no longer than the padded sequence needs
    with pytest.raises(ValueError, match="chunk_size"):
        kernel_chunk(0, 10)


def test_impl_selection():
    assert jax.default_backend() == "cpu"
    # "auto" is the XLA chunked scan on every backend until a kernel has passed on a real GPU.
    for backend in (None, "cpu", "gpu", "tpu"):
        assert resolve_scan_impl("auto", backend) == "chunked"
    assert resolve_scan_impl("pallas", "gpu") == "pallas" and resolve_scan_impl("pallas_mosaic") == "pallas_mosaic"
    assert Impl().scan == "auto"
    assert {resolve_scan_impl(v) for v in SSD_IMPL_NAMES.values()} == {"sequential", "chunked", "pallas",
                                                                       "pallas_mosaic"}
    assert SSD_IMPL_NAMES["reference"] == "sequential" and SSD_IMPL_NAMES["xla"] == "chunked"
    assert SSD_IMPL_NAMES["mosaic"] == "pallas_mosaic"
    inputs = tuple(map(jnp.asarray, random_inputs(9, length=11)))

    def jaxpr(fn):
        return str(jax.make_jaxpr(fn)(*inputs))

    auto = jaxpr(lambda *a: ssd_scan(*a, impl="auto", chunk_size=4))
    assert auto == jaxpr(lambda *a: ssd_chunked(*a, chunk_size=4))
    assert "pallas_call" not in auto
    assert "pallas_call" in jaxpr(lambda *a: ssd_scan(*a, impl="pallas", chunk_size=4))
    with pytest.raises(ValueError, match="unknown scan impl 'triton'"):
        ssd_scan(*inputs, impl="triton")


def test_tiny_tower_prefill_pallas_equals_chunked():
    cfg = tiny()
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (2, 13)), jnp.int32)
    chunked = NemotronH(cfg, impl=Impl(scan="chunked"))
    params = chunked.random_params(seed=2)
    logits_chk, cache_chk = chunked.prefill(params, tokens)
    logits_pl, cache_pl = NemotronH(cfg, impl=Impl(scan="pallas")).prefill(params, tokens)
    assert_close(logits_pl, logits_chk, 1e-5)
    for a, b in zip(jax.tree.leaves(cache_pl), jax.tree.leaves(cache_chk)):
        assert_close(a, b, 1e-5)


@pytest.mark.parametrize("dtype, length, dims", [
    (jnp.float32, 37, dict(heads=4, head_dim=3, groups=2, state=5)),
    (jnp.bfloat16, 256, dict(heads=64, head_dim=64, groups=8, state=128)),
])
def test_gpu_path_lowers_to_triton(dtype, length, dims):
    # Lowered for CUDA from this CPU host: the kernel must pass Pallas' Triton lowering (power-of-two
    # loads, ≥16 dots) and go through Triton with our compiler params, not Mosaic GPU. (Triton's own
    # compilation to PTX happens only on a GPU.) jax 0.12 needs a target GPU to lower without one
    # (`abstract_gpu`), and warns that Pallas' Triton backend is deprecated: the only warning allowed.
    x, dt, A, B, C, h0 = random_inputs(1, batch=1, length=length, **dims)
    args = [jax.ShapeDtypeStruct(a.shape, dtype) for a in (x, dt, A, B, C)]
    args[1:3] = [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (dt, A)]
    args.append(jax.ShapeDtypeStruct(h0.shape, jnp.float32))
    fn = jax.jit(lambda *a: ssd_pallas(*a, chunk_size=128, interpret=False))
    with warnings.catch_warnings(record=True) as caught, abstract_gpu():
        warnings.simplefilter("always")
        text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text and "mosaic" not in text.lower()
    assert "num_warps = 4" in text
    others = [str(w.message) for w in caught if not str(w.message).startswith(TRITON_DEPRECATION)]
    assert not others, others


def test_triton_compiler_params_import():
    params = _triton_compiler_params(num_warps=8, num_stages=3)
    assert (params.num_warps, params.num_stages) == (8, 3)
