"""Invariants of the three entry points and of left padding (same logits, same final cache)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax.cache import AttentionCache, MambaCache
from twotower_jax.config import tiny
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


# Padding after a non-empty history. Each string is one row's valid mask over a chunk (T real, F pad):
# left, right, interior, all-pad, none, mixed; several rows have fewer than K−1 = 3 real tokens, so the
# new conv state must still reach back into the history. Pad positions carry garbage inputs, not zeros.
PAD_PATTERNS = {5: ["FFFTT", "TFFFF", "TFTFT", "FFFFF", "TTTTT", "FTFFT"], 1: ["T", "F"]}


def _masks(patterns):
    return np.array([[c == "T" for c in p] for p in patterns])


def _row(cache: MambaCache, i):
    return MambaCache(conv=cache.conv[i:i + 1], ssm=cache.ssm[i:i + 1])


@pytest.mark.parametrize("chunk", sorted(PAD_PATTERNS))
@pytest.mark.parametrize("history", [0, 5])
def test_mamba_mixer_skips_padding_exactly(history, chunk):
    """A padded chunk == the same row fed only its real tokens, one step at a time: outputs at the real
    positions and the conv + SSM states (fp32, 1e-5). chunk_size 4, so a 5-token chunk spans two scan
    chunks. The conv state is also checked against the raw xBC columns computed here in NumPy."""
    from twotower_jax.layers.mamba2 import Mamba2Mixer
    cfg = tiny(chunk_size=4)
    k1, inner = cfg.conv_kernel - 1, cfg.mamba_intermediate_size
    masks = _masks(PAD_PATTERNS[chunk])
    b, d = masks.shape[0], cfg.hidden_size
    rng = np.random.default_rng(history * 10 + chunk)
    hist_x = rng.standard_normal((b, history, d)).astype(np.float32)
    chunk_x = rng.standard_normal((b, chunk, d)).astype(np.float32)

    def empty(batch):
        return MambaCache(conv=jnp.zeros((batch, k1, cfg.conv_dim)),
                          ssm=jnp.zeros((batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size)))

    mixer = Mamba2Mixer(cfg)
    shapes = jax.eval_shape(mixer.init, jax.random.key(0), chunk_x, empty(b), jnp.asarray(masks))
    leaves, tree = jax.tree.flatten(shapes)
    params = jax.tree.unflatten(tree, [jnp.asarray(rng.standard_normal(s.shape) * 0.5, s.dtype) for s in leaves])
    apply = jax.jit(mixer.apply)

    cache = empty(b)
    if history:
        _, cache = apply(params, hist_x, cache, jnp.ones((b, history), bool))
    out, new = apply(params, chunk_x, cache, jnp.asarray(masks))
    w_xbc = np.asarray(params["params"]["in_proj"]["kernel"], np.float64)[:, inner:inner + cfg.conv_dim]
    one = jnp.ones((1, 1), bool)
    for i in range(b):
        ref = _row(cache, i)
        for t in np.flatnonzero(masks[i]):
            ref_out, ref = apply(params, chunk_x[i:i + 1, t:t + 1], ref, one)
            np.testing.assert_allclose(out[i, t], ref_out[0, 0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(new.conv[i], ref.conv[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(new.ssm[i], ref.ssm[0], rtol=1e-5, atol=1e-5)
        # Independently: the conv state is the last K−1 raw xBC columns of the real tokens (zeros before).
        seq = np.concatenate([np.zeros((k1, d)), hist_x[i], chunk_x[i][masks[i]]])
        np.testing.assert_allclose(new.conv[i], (seq @ w_xbc)[-k1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", sorted(PAD_PATTERNS))
def test_tower_extend_with_padding_after_a_prefill(chunk):
    """Through a whole tower: after 5 real tokens, extending with a padded chunk == the row alone fed its
    real tokens one decode step at a time: their logits, every Mamba layer's conv + SSM state, and the
    logits of the next real token (which also reads the attention cache past the pad slots). Every
    batched call has the padded chunk's shape, so the test compiles the tower three times in all."""
    cfg = tiny()
    model = NemotronH(cfg)
    params = model.random_params(seed=6)
    masks = _masks(PAD_PATTERNS[chunk])
    b = masks.shape[0]
    rng = np.random.default_rng(chunk)
    hist = rng.integers(3, cfg.vocab_size, (b, 5))
    tokens = rng.integers(3, cfg.vocab_size, (b, chunk))
    nxt = rng.integers(3, cfg.vocab_size, (b, chunk))        # only column 0 is real
    nxt_valid = np.arange(chunk)[None].repeat(b, 0) == 0
    cache = model.init_cache(b, 16)
    for lo in range(0, 5, chunk):
        _, cache = model.extend(params, jnp.asarray(hist[:, lo:lo + chunk]), cache, jnp.ones((b, chunk), bool))
    logits, cache = model.extend(params, jnp.asarray(tokens), cache, jnp.asarray(masks))
    states = [(np.asarray(c.conv), np.asarray(c.ssm)) for c in cache.layers if isinstance(c, MambaCache)]
    assert states
    next_logits, _ = model.extend(params, jnp.asarray(nxt), cache, jnp.asarray(nxt_valid))  # donates cache
    for i in range(b):
        ref_cache = model.init_cache(1, 16)
        for token in hist[i]:
            _, ref_cache = model.decode_step(params, jnp.asarray([token]), ref_cache)
        for t in np.flatnonzero(masks[i]):
            ref_logits, ref_cache = model.decode_step(params, jnp.asarray(tokens[i, t:t + 1]), ref_cache)
            np.testing.assert_allclose(logits[i, t], ref_logits[0], rtol=1e-5, atol=1e-5)
        ref_states = [c for c in ref_cache.layers if isinstance(c, MambaCache)]
        for (conv, ssm), ref_layer in zip(states, ref_states, strict=True):
            np.testing.assert_allclose(conv[i], ref_layer.conv[0], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(ssm[i], ref_layer.ssm[0], rtol=1e-5, atol=1e-5)
        ref_next, _ = model.decode_step(params, jnp.asarray(nxt[i, :1]), ref_cache)
        np.testing.assert_allclose(next_logits[i, 0], ref_next[0], rtol=1e-5, atol=1e-5)
