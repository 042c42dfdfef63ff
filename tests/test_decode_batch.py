"""The decode step's attention tiles (`Impl.attention_decode_k_chunk`, experiments/bench_decode_batch.py):
one query per row through several key tiles equals the dense reference and NumPy, and a batched tower
decode with fine decode tiles equals the old path (one capacity-wide tile), step by step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax.config import tiny
from twotower_jax.layers.attention import KeySegment, blockwise_attention, dense_attention
from twotower_jax.tower import Impl, NemotronH

OLD_DECODE = Impl(attention_decode_k_chunk=None)


def _numpy_one_query(q, k, v, visible):
    """q (h, d), k/v (s, g, d), visible (s,): float64 softmax over the visible keys, head i on KV head
    i // (h / g)."""
    h, g = q.shape[0], k.shape[1]
    out = np.zeros(q.shape)
    keys = np.flatnonzero(visible)
    for head in range(h):
        kv = head // (h // g)
        scores = k[keys, kv].astype(np.float64) @ q[head] / np.sqrt(q.shape[-1])
        w = np.exp(scores - scores.max())
        out[head] = (w / w.sum()) @ v[keys, kv]
    return out


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("k_chunk", [4, 16, 64])
def test_one_query_over_key_tiles_equals_dense_and_numpy(dtype, tol, k_chunk):
    """One query per row over a causal segment (holes in key_valid, slots past the fill) plus an "all"
    segment (the denoiser's shape): several tiles, tiles skipped past the fill, a last tile shifted back."""
    rng = np.random.default_rng(0)
    b, s, h, g, d, fill = 3, 37, 8, 2, 16, 29
    q = rng.standard_normal((b, 1, h, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, s, g, d)).astype(np.float32) for _ in range(2))
    own_k, own_v = (rng.standard_normal((b, 5, g, d)).astype(np.float32) for _ in range(2))
    key_valid = rng.random((b, s)) > 0.3
    key_valid[:, fill - 1] = True                     # the query's own slot
    cast = lambda x: jnp.asarray(x, dtype)
    segments = [KeySegment(cast(k), cast(v), "causal", jnp.asarray(key_valid), fill),
                KeySegment(cast(own_k), cast(own_v), "all")]
    q_start = jnp.int32(fill - 1)
    tiled = np.asarray(blockwise_attention(cast(q), q_start, segments, k_chunk=k_chunk), np.float32)
    dense = np.asarray(dense_attention(cast(q), q_start, segments), np.float32)
    np.testing.assert_allclose(tiled, dense, rtol=tol, atol=tol)
    as_f32 = lambda x: np.asarray(cast(x), np.float32)   # NumPy sees the rounded operands
    for row in range(b):
        visible = np.concatenate([key_valid[row] & (np.arange(s) < fill), np.ones(5, bool)])
        expected = _numpy_one_query(as_f32(q)[row, 0], np.concatenate([as_f32(k)[row], as_f32(own_k)[row]]),
                                    np.concatenate([as_f32(v)[row], as_f32(own_v)[row]]), visible)
        np.testing.assert_allclose(tiled[row, 0], expected, rtol=tol, atol=tol)


def test_decode_tiles_are_never_coarser_than_the_key_tile():
    """`attention_decode_k_chunk` caps the decode tile; a finer `attention_k_chunk` (the tests' small
    tiles) still applies to decode."""
    config = tiny(pattern="*", chunk_size=4)
    params = NemotronH(config).random_params(seed=1, scale=0.4)
    tokens = jnp.asarray([[5, 6, 7, 8, 9, 10, 11]], jnp.int32)
    hlo = {}
    for name, impl in {"capped": Impl(attention_k_chunk=64, attention_decode_k_chunk=4),
                       "small": Impl(attention_k_chunk=4, attention_decode_k_chunk=128),
                       "one_tile": Impl(attention_k_chunk=64, attention_decode_k_chunk=None)}.items():
        model = NemotronH(config, impl=impl)
        _, cache = model.prefill(params, tokens, capacity=16)
        hlo[name] = model.decode_step.lower(model, params, tokens[:, 0], cache).as_text()
    assert "while" in hlo["capped"] and "while" in hlo["small"]   # a loop over 4 tiles of 4 keys
    assert "while" not in hlo["one_tile"]                         # one tile of all 16 slots


def test_batched_decode_equals_the_old_path():
    """A left-padded batch of 3 decoded 6 steps across decode-tile boundaries (tile 8): logits and every
    cache leaf equal the old decode path's (one capacity-wide tile)."""
    config = tiny(pattern="M*E*M", chunk_size=4)
    new, old = NemotronH(config, impl=Impl(attention_decode_k_chunk=8)), NemotronH(config, impl=OLD_DECODE)
    params = new.random_params(seed=3, scale=0.4)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(4, config.vocab_size, (3, 6)), jnp.int32)
    valid = jnp.asarray([[True] * 6, [False, False] + [True] * 4, [False] * 5 + [True]])
    (_, cn), (_, co) = (m.prefill(params, tokens, valid, capacity=20) for m in (new, old))
    for step in range(6):
        token = jnp.asarray(rng.integers(4, config.vocab_size, (3,)), jnp.int32)
        (ln, cn), (lo, co) = new.decode_step(params, token, cn), old.decode_step(params, token, co)
        np.testing.assert_allclose(ln, lo, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(cn), jax.tree.leaves(co)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-5)
