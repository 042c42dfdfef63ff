"""Blockwise attention (online softmax over key and query chunks) against the dense reference and an
independent NumPy softmax, through every entry point; `logits_at`; chunked prefill; cache donation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax.config import tiny
from twotower_jax.layers.attention import KeySegment, blockwise_attention, fused_attention, fused_kernel_name
from twotower_jax.sampling.diffusion import generate_mask_diffusion
from twotower_jax.sampling.ar import generate_ar, generate_mock_ar
from twotower_jax.tower import Impl, NemotronH
from twotower_jax.training.objective import blockwise_context, denoiser_logits, noise_tokens
from twotower_jax.two_tower import TwoTower

# Chunks far smaller than the sequences below: several query and key tiles, skipped tiles (beyond the
# filled length, in the causal future, outside a block) and a last tile shifted back inside the buffer.
SMALL_TILES = dict(attention_q_chunk=3, attention_k_chunk=4)
CONFIG = tiny(pattern="M*E*M", chunk_size=4)
DENSE = TwoTower(CONFIG, impl=Impl(attention="dense", moe="dense"))
BLOCKWISE = TwoTower(CONFIG, impl=Impl(attention="blockwise", moe="dense", **SMALL_TILES))
# "fused": jax.nn.dot_product_attention (cuDNN on GPU; XLA's kernel here) for a tower's own causal
# cache, blockwise for the denoiser's two segments.
FUSED = TwoTower(CONFIG, impl=Impl(attention="fused", moe="dense", **SMALL_TILES))
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def params():
    return DENSE.random_params(seed=5, scale=0.4)


def numpy_attention(q, k, v, visible):
    """softmax over the visible keys, float64, written from the definition: q (l, h, d), k/v (s, g, d),
    visible (l, s); query head i reads KV head i // (h / g). Queries that see nothing are skipped (NaN)."""
    h, g = q.shape[1], k.shape[1]
    out = np.full(q.shape, np.nan)
    for i in range(q.shape[0]):
        keys = np.flatnonzero(visible[i])
        if not len(keys):
            continue
        for head in range(h):
            kv = head // (h // g)
            scores = k[keys, kv] @ q[i, head] / np.sqrt(q.shape[-1])
            weights = np.exp(scores - scores.max())
            out[i, head] = (weights / weights.sum()) @ v[keys, kv]
    return out


@pytest.mark.parametrize("kernel", ["blockwise", "fused"])
@pytest.mark.parametrize("rule", ["all", "causal", "earlier_blocks", "same_block"])
def test_attention_kernels_match_numpy_softmax_for_every_rule(rule, kernel):
    rng = np.random.default_rng(0)
    b, lq, s, h, g, d, block = 2, 11, 13, 4, 2, 8, 3
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in
               [(b, lq, h, d), (b, s, g, d), (b, s, g, d)])
    key_valid = rng.random((b, s)) > 0.2
    length, q_start = 12, 2          # slot 12 is past the filled length; queries sit at 2..12
    seg = KeySegment(jnp.asarray(k), jnp.asarray(v), rule, jnp.asarray(key_valid), jnp.int32(length), block)
    if kernel == "blockwise":
        ours = np.asarray(blockwise_attention(jnp.asarray(q), jnp.int32(q_start), [seg], q_chunk=4, k_chunk=5))
    else:
        ours = np.asarray(fused_attention(jnp.asarray(q), jnp.int32(q_start), seg))
    q_pos, k_pos = q_start + np.arange(lq)[:, None], np.arange(s)[None]
    rule_mask = {"all": np.ones((lq, s), bool), "causal": k_pos <= q_pos,
                 "earlier_blocks": k_pos // block < q_pos // block,
                 "same_block": k_pos // block == q_pos // block}[rule]
    for row in range(b):
        visible = rule_mask & key_valid[row][None] & (k_pos < length)
        expected = numpy_attention(q[row].astype(np.float64), k[row].astype(np.float64), v[row].astype(np.float64),
                                   visible)
        seen = visible.any(-1)
        assert seen.any()
        np.testing.assert_allclose(ours[row][seen], expected[seen], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ours[row][~seen], 0.0)   # a query with no visible key: 0, not NaN


def test_two_segments_merge_like_one_concatenated_softmax():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 5, 4, 8)).astype(np.float32)
    k1, v1 = (rng.standard_normal((1, 9, 2, 8)).astype(np.float32) for _ in range(2))
    k2, v2 = (rng.standard_normal((1, 5, 2, 8)).astype(np.float32) for _ in range(2))
    valid = rng.random((1, 9)) > 0.3
    ours = blockwise_attention(jnp.asarray(q), 0, [KeySegment(jnp.asarray(k1), jnp.asarray(v1), "all",
                                                              jnp.asarray(valid), 7),
                                                   KeySegment(jnp.asarray(k2), jnp.asarray(v2))], k_chunk=2)
    visible = np.concatenate([valid[0] & (np.arange(9) < 7), np.ones(5, bool)])[None].repeat(5, 0)
    expected = numpy_attention(q[0].astype(np.float64), np.concatenate([k1[0], k2[0]]).astype(np.float64),
                               np.concatenate([v1[0], v2[0]]).astype(np.float64), visible)
    np.testing.assert_allclose(np.asarray(ours[0]), expected, rtol=1e-5, atol=1e-5)


def _left_padded(rng, lengths, width, vocab):
    tokens = np.zeros((len(lengths), width), np.int32)
    valid = np.zeros((len(lengths), width), bool)
    for i, n in enumerate(lengths):
        tokens[i, width - n:] = rng.integers(4, vocab, n)
        valid[i, width - n:] = True
    return jnp.asarray(tokens), jnp.asarray(valid)


@pytest.mark.parametrize("fast", [BLOCKWISE, FUSED], ids=["blockwise", "fused"])
def test_tower_entry_points_equal_dense_with_padding(params, fast):
    dense, blockwise = DENSE.context, fast.context
    p = params["context"]
    tokens, valid = _left_padded(np.random.default_rng(2), [13, 6], 13, CONFIG.vocab_size)
    (ld, cd), (lb, cb) = (m.prefill(p, tokens, valid, capacity=24) for m in (dense, blockwise))
    real = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(lb)[real], np.asarray(ld)[real], **TOL)
    chunk = jnp.asarray([[7, 8, 9, 10, 11], [12, 13, 14, 15, 16]])
    chunk_valid = jnp.asarray([[True] * 5, [False, True, True, True, True]])
    (ld, cd), (lb, cb) = (m.extend(p, chunk, c, chunk_valid) for m, c in ((dense, cd), (blockwise, cb)))
    np.testing.assert_allclose(np.asarray(lb)[np.asarray(chunk_valid)], np.asarray(ld)[np.asarray(chunk_valid)], **TOL)
    for step in range(3):
        token = jnp.asarray([20 + step, 30 + step])
        (ld, cd), (lb, cb) = (m.decode_step(p, token, c) for m, c in ((dense, cd), (blockwise, cb)))
        np.testing.assert_allclose(lb, ld, **TOL)
    real_slots = np.asarray(cd.key_valid)   # K/V at pad slots are never read (and differ: see finish())
    for a, b in zip(cd.layers, cb.layers):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            if x.ndim == 4 and x.shape[1] == real_slots.shape[1]:   # attention K/V (b, slots, kvh, d)
                x, y = x[real_slots], y[real_slots]
            np.testing.assert_allclose(y, x, **TOL)
    # the denoiser against that padded context cache (two segments: context slots + the block itself)
    block = jnp.asarray([[3, 3, 40, 3, 41], [3, 50, 3, 3, 3]])
    t = jnp.asarray([0.6, 0.8])
    np.testing.assert_allclose(fast.denoise(params, block, cb, t), DENSE.denoise(params, block, cd, t), **TOL)


def test_fused_kernel_choice():
    """cuDNN only on a GPU backend and for 16-bit operands (it has no float32 kernel)."""
    expected = "cudnn" if jax.default_backend() == "gpu" else "xla"
    assert fused_kernel_name(jnp.bfloat16) == expected
    assert fused_kernel_name(jnp.float32) == "xla"


def test_training_objective_blockwise_equals_dense(params):
    tokens = jax.random.randint(jax.random.key(3), (2, 20), 4, CONFIG.vocab_size)
    noisy, _, t = noise_tokens(jax.random.key(4), tokens, 3)
    # jitted: run eagerly, these objectives dispatch op by op (hundreds of small compiles)
    context = jax.jit(blockwise_context, static_argnums=(0, 3))(DENSE.context, params["context"], tokens, 5)
    logits = jax.jit(denoiser_logits, static_argnums=0)
    dense = logits(DENSE, params["denoiser"], noisy, context, t)
    blockwise = logits(BLOCKWISE, params["denoiser"], noisy, context, t)
    np.testing.assert_allclose(blockwise, dense, **TOL)

    def loss(p, model):
        return denoiser_logits(model, p, noisy, context, t).astype(jnp.float32).std()

    grads = [jax.jit(jax.grad(loss), static_argnums=1)(params["denoiser"], m) for m in (DENSE, BLOCKWISE)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_samplers_generate_the_same_tokens_with_every_attention(params):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    models = (DENSE, BLOCKWISE, FUSED)
    for generate in (generate_ar, generate_mock_ar):
        runs = [generate(m, params, prompts, 6).tokens for m in models]
        assert runs[1:] == runs[:1] * 2
    runs = [generate_mask_diffusion(m, params, prompts, 8, block_size=4, steps_per_block=2).tokens for m in models]
    assert runs[1:] == runs[:1] * 2


def test_logits_at_last_and_none_and_chunked_prefill(params):
    model, p = BLOCKWISE.context, params["context"]
    tokens, valid = _left_padded(np.random.default_rng(6), [11, 4], 11, CONFIG.vocab_size)
    full, full_cache = model.prefill(p, tokens, valid, capacity=16, prefill_chunk=None)
    last, last_cache = model.prefill(p, tokens, valid, capacity=16, logits_at="last", prefill_chunk=None)
    assert last.shape == (2, 1, CONFIG.vocab_size)
    np.testing.assert_allclose(last, full[:, -1:], **TOL)
    none, _ = model.prefill(p, tokens, valid, capacity=16, logits_at="none")
    assert none is None
    for chunk in (4, 11 // 2, 1):      # a remainder piece first (11 = 3 + 2·4), two pieces, every token alone
        chunked, cache = model.prefill(p, tokens, valid, capacity=16, prefill_chunk=chunk)
        real = np.asarray(valid)
        np.testing.assert_allclose(np.asarray(chunked)[real], np.asarray(full)[real], rtol=1e-4, atol=1e-4)
        chunked_last, _ = model.prefill(p, tokens, valid, capacity=16, prefill_chunk=chunk, logits_at="last")
        np.testing.assert_allclose(chunked_last, full[:, -1:], rtol=1e-4, atol=1e-4)
        for a, b in zip(jax.tree.leaves(full_cache), jax.tree.leaves(cache)):
            np.testing.assert_allclose(np.asarray(b, np.float64), np.asarray(a, np.float64), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="logits_at must be one of"):
        model.prefill(p, tokens, valid, logits_at="first")
    with pytest.raises(ValueError, match="prefill_chunk must be"):
        model.prefill(p, tokens, valid, prefill_chunk=0)


def test_extend_and_decode_donate_the_cache(params):
    model, p = BLOCKWISE.context, params["context"]
    _, cache = model.prefill(p, jnp.asarray([[5, 6, 7]]), capacity=8)
    _, extended = model.extend(p, jnp.asarray([[8]]), cache, logits_at="none")
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(cache))
    _, stepped = model.decode_step(p, jnp.asarray([9]), extended)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(extended))
    assert int(stepped.length) == 5


def test_impl_rejects_an_unknown_attention(params):
    bad = dataclasses.replace(BLOCKWISE.context, impl=Impl(attention="flash"))
    with pytest.raises(ValueError, match="unknown attention impl"):
        bad.prefill(params["context"], jnp.asarray([[5, 6]]))
