"""Layer pieces against NumPy references: router, MoE dispatches, gated group norm, conv state."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax.config import tiny
from twotower_jax.layers.moe import MoE, experts_dense, experts_ragged, route
from twotower_jax.layers.norms import GatedGroupRMSNorm


def numpy_route(x, weight, bias, cfg):
    """Written from SPEC §2 (and HF's group-limited variant) in float64."""
    s = 1 / (1 + np.exp(-(x.astype(np.float64) @ weight.astype(np.float64).T)))
    choice = s + bias
    if cfg.n_group > 1:
        g = choice.reshape(len(x), cfg.n_group, -1)
        group_score = np.sort(g, -1)[..., -2:].sum(-1)
        keep = np.argsort(-group_score, -1)[:, :cfg.topk_group]
        mask = np.zeros_like(group_score, bool)
        np.put_along_axis(mask, keep, True, -1)
        choice = np.where(np.repeat(mask, g.shape[-1], 1), choice, -np.inf)
    idx = np.argsort(-choice, -1, kind="stable")[:, :cfg.num_experts_per_tok]
    w = np.take_along_axis(s, idx, -1)
    w = w / w.sum(-1, keepdims=True) * cfg.routed_scaling_factor
    return w, idx


@pytest.mark.parametrize("n_group, topk_group", [(1, 1), (4, 2)])
def test_router_matches_numpy(n_group, topk_group):
    cfg = tiny(n_routed_experts=16, num_experts_per_tok=3, n_group=n_group, topk_group=topk_group)
    rng = np.random.default_rng(n_group)
    x = rng.standard_normal((11, cfg.hidden_size)).astype(np.float32)
    weight = rng.standard_normal((16, cfg.hidden_size)).astype(np.float32) / 4
    bias = (rng.standard_normal(16) * 0.3).astype(np.float32)
    w, idx = route(jnp.asarray(x), jnp.asarray(weight), jnp.asarray(bias), cfg)
    w_ref, idx_ref = numpy_route(x, weight, bias, cfg)
    order, order_ref = np.argsort(np.asarray(idx), -1), np.argsort(idx_ref, -1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), order, -1),
                                  np.take_along_axis(idx_ref, order_ref, -1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, -1),
                               np.take_along_axis(w_ref, order_ref, -1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(w).sum(-1), cfg.routed_scaling_factor, rtol=1e-5)


def test_router_bias_chooses_but_does_not_weigh():
    cfg = tiny(n_routed_experts=4, num_experts_per_tok=1, norm_topk_prob=False, routed_scaling_factor=1.0)
    x = jnp.ones((1, cfg.hidden_size))
    weight = jnp.zeros((4, cfg.hidden_size))          # all scores sigmoid(0) = 0.5
    bias = jnp.array([0.0, 0.0, 1.0, 0.0])
    w, idx = route(x, weight, bias, cfg)
    assert int(idx[0, 0]) == 2 and float(w[0, 0]) == pytest.approx(0.5)


def test_ragged_dispatch_equals_dense_reference():
    rng = np.random.default_rng(0)
    t, d, f, e, k = 23, 8, 6, 5, 2
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    up = jnp.asarray(rng.standard_normal((e, d, f)), jnp.float32)
    down = jnp.asarray(rng.standard_normal((e, f, d)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]), jnp.int32)
    w = jnp.asarray(rng.uniform(0.1, 1, (t, k)), jnp.float32)
    ref = np.zeros((t, d))
    for i in range(t):
        for j in range(k):
            h = np.maximum(np.asarray(x[i]) @ np.asarray(up[idx[i, j]]), 0) ** 2
            ref[i] += float(w[i, j]) * (h @ np.asarray(down[idx[i, j]]))
    np.testing.assert_allclose(experts_dense(x, up, down, w, idx), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(experts_ragged(x, up, down, w, idx), ref, rtol=1e-4, atol=1e-4)


def test_moe_module_impls_agree():
    cfg = tiny()
    x = jax.random.normal(jax.random.key(1), (2, 7, cfg.hidden_size))
    params = MoE(cfg).init(jax.random.key(2), x)

    def moe(impl):   # jitted: applied eagerly, a MoE dispatches op by op (~280 small compiles in this test)
        return jax.jit(MoE(cfg, impl=impl).apply)

    np.testing.assert_allclose(moe("ragged")(params, x), moe("dense")(params, x), rtol=1e-5, atol=1e-5)
    for impl in ("grouped", "gather"):
        for rows in (x[:1, :1], x[:, :1], x):     # 1 and 2 tokens (some experts idle), 14 (all chosen)
            np.testing.assert_allclose(moe(impl)(params, rows), moe("dense")(params, rows), rtol=1e-5, atol=1e-5)


def test_gated_norm_is_per_group():
    dim, groups = 12, 3
    rng = np.random.default_rng(0)
    y, z = rng.standard_normal((2, 5, dim)), rng.standard_normal((2, 5, dim))
    module = GatedGroupRMSNorm(dim, groups, eps=1e-5)
    weight = rng.standard_normal(dim)
    out = module.apply({"params": {"weight": jnp.asarray(weight)}}, jnp.asarray(y), jnp.asarray(z))
    gated = (y * z / (1 + np.exp(-z))).reshape(2, 5, groups, dim // groups)
    ref = gated / np.sqrt((gated ** 2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, weight * ref.reshape(2, 5, dim), rtol=1e-5, atol=1e-6)


def numpy_conv(history, x, valid, kernel, bias):
    """Depthwise causal conv over each row's valid columns only (history columns count as valid), float64:
    returns (outputs at the valid columns, per row, and the last K−1 valid raw columns)."""
    outs, hists = [], []
    for h, row, ok in zip(history.astype(np.float64), x.astype(np.float64), valid):
        cols = np.concatenate([h, row[ok]], 0)
        k = kernel.shape[0]
        outs.append(np.stack([(cols[i:i + k] * kernel).sum(0) + bias for i in range(len(cols) - k + 1)])
                    if ok.any() else np.zeros((0, x.shape[-1])))
        hists.append(cols[-(k - 1):])
    return outs, np.stack(hists)


@pytest.mark.parametrize("length", [1, 6])
def test_conv_state_matches_numpy_and_skips_padding(length):
    """The Mamba conv with a cached history: outputs at valid columns and the new conv state (last K−1 valid
    raw columns) equal a NumPy conv over the valid columns; padded columns never enter the state."""
    from twotower_jax.layers.mamba2 import DepthwiseCausalConv
    k, c, b = 4, 5, 3
    rng = np.random.default_rng(length)
    history = rng.standard_normal((b, k - 1, c)).astype(np.float32)
    x = rng.standard_normal((b, length, c)).astype(np.float32)
    valid = np.ones((b, length), bool)
    valid[1, 0] = False                 # a left pad (or, at length 1, a frozen row)
    if length > 2:
        valid[2, 2] = False             # a hole in the middle
    conv = DepthwiseCausalConv(c, k)
    params = conv.init(jax.random.key(0), jnp.asarray(history), jnp.asarray(x), jnp.asarray(valid))
    params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    out, state = conv.apply(params, jnp.asarray(history), jnp.asarray(x), jnp.asarray(valid))
    kernel, bias = np.asarray(params["params"]["kernel"]), np.asarray(params["params"]["bias"])
    want_out, want_state = numpy_conv(history, x, valid, kernel, bias)
    np.testing.assert_allclose(state, want_state, rtol=1e-6, atol=1e-6)
    for row in range(b):
        np.testing.assert_allclose(np.asarray(out)[row][valid[row]], want_out[row], rtol=1e-5, atol=1e-5)

    # The same columns fed one at a time through the cached state give the same outputs and state.
    h = jnp.asarray(history)
    steps = []
    for i in range(length):
        o, h = conv.apply(params, h, jnp.asarray(x[:, i:i + 1]), jnp.asarray(valid[:, i:i + 1]))
        steps.append(np.asarray(o)[:, 0])
    np.testing.assert_allclose(h, want_state, rtol=1e-6, atol=1e-6)
    for row in range(b):
        np.testing.assert_allclose(np.stack(steps, 1)[row][valid[row]], want_out[row], rtol=1e-5, atol=1e-5)
