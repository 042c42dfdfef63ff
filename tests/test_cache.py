"""Invariants of the three entry points and of left padding (same logits, same final cache)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax.cache import AttentionCache, MambaCache
from twotower_jax.sampling.ar import generate_ar
from twotower_jax.tower import NemotronH


def assert_caches_equal(a, b, tol=1e-5):
    assert int(a.length) == int(b.length)
    np.testing.assert_array_equal(a.key_valid, b.key_valid)
    for layer_a, layer_b in zip(a.layers, b.layers):
        assert type(layer_a) is type(layer_b)
        if layer_a is None:
            continue
        for x, y in zip(jax.tree.leaves(layer_a), jax.tree.leaves(layer_b)):
            np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["all_types", "mqa_groups4"])
def test_prefill_equals_decode_steps_equals_chunked_pieces(hf_tower, name):
    _, _, config, params = hf_tower(name)
    model = NemotronH(config)
    n, capacity = 13, 16  # 13 spans several Mamba chunks (8 and 4) and is a multiple of neither
    tokens = jnp.asarray(np.random.default_rng(2).integers(3, config.vocab_size, (2, n)))
    full_logits, full_cache = model.prefill(params, tokens, capacity=capacity)

    cache = model.init_cache(2, capacity)
    step_logits = []
    for t in range(n):
        logits, cache = model.decode_step(params, tokens[:, t], cache)
        step_logits.append(logits)
    np.testing.assert_allclose(jnp.stack(step_logits, 1), full_logits, rtol=1e-4, atol=1e-4)
    assert_caches_equal(cache, full_cache)

    cache = model.init_cache(2, capacity)
    piece_logits = []
    for lo, hi in [(0, 5), (5, 6), (6, 13)]:
        logits, cache = model.extend(params, tokens[:, lo:hi], cache)
        piece_logits.append(logits)
    np.testing.assert_allclose(jnp.concatenate(piece_logits, 1), full_logits, rtol=1e-4, atol=1e-4)
    assert_caches_equal(cache, full_cache)
    assert any(isinstance(c, MambaCache) for c in cache.layers)
    assert any(isinstance(c, AttentionCache) for c in cache.layers)


def test_left_padded_batch_equals_each_row_alone(hf_tower):
    _, _, config, params = hf_tower("all_types")
    model = NemotronH(config)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (11, 1, 6)]
    width = max(map(len, prompts))
    tokens = np.zeros((len(prompts), width), np.int32)
    valid = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):], valid[i, width - len(p):] = p, True
    batch_logits, batch_cache = model.prefill(params, jnp.asarray(tokens), jnp.asarray(valid))
    for i, p in enumerate(prompts):
        alone_logits, alone_cache = model.prefill(params, jnp.asarray([p]))
        np.testing.assert_allclose(batch_logits[i, width - len(p):], alone_logits[0], rtol=1e-4, atol=1e-4)
        for batch_layer, alone_layer in zip(batch_cache.layers, alone_cache.layers):
            if isinstance(batch_layer, MambaCache):  # padding left the recurrent state untouched
                np.testing.assert_allclose(batch_layer.ssm[i], alone_layer.ssm[0], rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(batch_layer.conv[i], alone_layer.conv[0], rtol=1e-5, atol=1e-5)

    batch = generate_ar(model, params, prompts, 12)
    for i, p in list(enumerate(prompts))[:2]:  # each distinct prompt length compiles the loop once
        alone = generate_ar(model, params, [p], 12)
        assert batch.tokens[i] == alone.tokens[0]
        np.testing.assert_allclose(batch.logprobs[i], alone.logprobs[0], atol=1e-4)


def test_entry_points_reject_bad_shapes(hf_tower):
    _, _, config, params = hf_tower("all_types")
    model = NemotronH(config)
    with pytest.raises(ValueError, match="tokens must be"):
        model.extend(params, jnp.zeros((3,), jnp.int32), model.init_cache(1, 4))
    with pytest.raises(ValueError, match="batch 2 != cache batch 1"):
        model.extend(params, jnp.zeros((2, 1), jnp.int32), model.init_cache(1, 4))
    with pytest.raises(ValueError, match="capacity 3 < prompt length 5"):
        model.prefill(params, jnp.zeros((1, 5), jnp.int32), capacity=3)


def test_cache_overflow_gives_nan_not_a_silent_answer(hf_tower):
    _, _, config, params = hf_tower("all_types")
    model = NemotronH(config)
    logits, cache = model.prefill(params, jnp.asarray([[5, 6, 7]]), capacity=4)
    assert np.isfinite(np.asarray(logits)).all()
    logits, cache = model.decode_step(params, jnp.asarray([8]), cache)   # fills slot 4 of 4
    assert np.isfinite(np.asarray(logits)).all()
    logits, _ = model.decode_step(params, jnp.asarray([9]), cache)       # no slot left
    assert np.isnan(np.asarray(logits)).all()
