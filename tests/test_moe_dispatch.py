"""Every MoE dispatch == the dense reference (fp32, ≤ 1e-5), on one and two devices, with idle experts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax.config import tiny
from twotower_jax.layers.moe import (EXPERT_AXIS, MoE, chosen_experts, experts_dense, experts_expert_parallel,
                                     experts_gather, experts_grouped, experts_ragged)
from twotower_jax.tower import Impl, NemotronH


def random_problem(seed, tokens, experts=8, k=2, d=6, f=5):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((tokens, d)), jnp.float32)
    up = jnp.asarray(rng.standard_normal((experts, d, f)), jnp.float32)
    down = jnp.asarray(rng.standard_normal((experts, f, d)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]), jnp.int32)
    weights = jnp.asarray(rng.uniform(0.1, 1, (tokens, k)), jnp.float32)
    return x, up, down, weights, idx


def expert_mesh():
    assert jax.device_count() >= 2
    return jax.make_mesh((2,), (EXPERT_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.parametrize("tokens", [1, 3, 4, 40])  # 1 and 3 tokens leave most of the 8 experts idle
def test_dispatches_equal_dense(tokens):
    problem = random_problem(tokens, tokens)
    idle = 8 - len(np.unique(np.asarray(problem[4])))
    assert tokens > 3 or idle > 0
    # jitted, as the model runs them (eagerly each dispatch compiles its ops one by one: ~100 compiles here)
    reference = jax.jit(experts_dense)(*problem)
    for dispatch in (experts_ragged, experts_gather, experts_grouped):
        np.testing.assert_allclose(jax.jit(dispatch)(*problem), reference, rtol=1e-5, atol=1e-5)
    with jax.set_mesh(expert_mesh()):
        sharded = jax.jit(experts_expert_parallel)(*problem)
    np.testing.assert_allclose(sharded, reference, rtol=1e-5, atol=1e-5)


def test_moe_module_and_tower_with_sharded_experts():
    cfg = tiny()
    x = jax.random.normal(jax.random.key(1), (2, 5, cfg.hidden_size))
    params = MoE(cfg).init(jax.random.key(2), x)
    # jitted: applied eagerly, each MoE dispatches op by op (dozens of small compiles)
    reference = jax.jit(MoE(cfg, impl="dense").apply)(params, x)
    for impl in ("gather", "grouped"):
        np.testing.assert_allclose(jax.jit(MoE(cfg, impl=impl).apply)(params, x), reference, rtol=1e-5, atol=1e-5)
    mesh = expert_mesh()
    with jax.set_mesh(mesh):
        out = jax.jit(MoE(cfg, impl="expert_parallel").apply)(params, x)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)

    # A whole tower, experts placed on the two devices, == one device with the dense dispatch.
    model = NemotronH(cfg)
    tower_params = model.random_params(seed=4)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 9)))
    expected, _ = NemotronH(cfg, impl=Impl(moe="dense")).prefill(tower_params, tokens)
    P = jax.sharding.PartitionSpec

    def place(path, leaf):
        name = path[-1].key
        spec = P(EXPERT_AXIS) if name in ("experts_up", "experts_down") else P()
        return jax.device_put(leaf, jax.sharding.NamedSharding(mesh, spec))

    placed = jax.tree_util.tree_map_with_path(place, tower_params)
    assert placed["layers_1"]["mixer"]["experts_up"].sharding.spec == P(EXPERT_AXIS)
    with jax.set_mesh(mesh):
        logits, _ = NemotronH(cfg, impl=Impl(moe="expert_parallel")).prefill(placed, tokens)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_expert_parallel_without_mesh_is_a_clear_error():
    problem = random_problem(0, 4)
    with pytest.raises(ValueError, match="needs a mesh with an 'expert' axis"):
        experts_expert_parallel(*problem)



def test_auto_dispatch_picks_by_call_size_and_backend():
    from twotower_jax.layers.moe import GROUPED_MAX_TOKENS, resolve_moe_impl
    assert resolve_moe_impl("auto", 1, "cpu") == resolve_moe_impl("auto", GROUPED_MAX_TOKENS, "gpu") == "grouped"
    assert resolve_moe_impl("auto", GROUPED_MAX_TOKENS + 1, "cpu") == "dense"
    assert resolve_moe_impl("auto", 512, "gpu") == "ragged"
    assert resolve_moe_impl("ragged", 1, "cpu") == "ragged"   # an explicit choice is kept


def test_rows_outside_every_group_cannot_leak_nan(monkeypatch):
    """`ragged_dot` leaves rows past the last group undefined (the overflow bucket of the expert-parallel
    dispatch). A backend that leaves NaN there must not reach the output: 0·NaN = NaN, so those rows have
    to be masked, not multiplied by a zero weight. Emulated by NaN-filling those rows after the real op."""
    real_ragged_dot = jax.lax.ragged_dot

    def nan_outside_groups(lhs, rhs, group_sizes, *args, **kwargs):
        out = real_ragged_dot(lhs, rhs, group_sizes, *args, **kwargs)
        inside = jnp.arange(out.shape[0]) < group_sizes.sum()
        return jnp.where(inside[:, None], out, jnp.nan)

    monkeypatch.setattr(jax.lax, "ragged_dot", nan_outside_groups)
    x, up, down, weights, idx = random_problem(7, 11)
    # Experts 5..7 live "elsewhere": their picks go to the overflow bucket (index = number of local
    # experts) with weight 0, exactly as `experts_expert_parallel` hands them to `experts_ragged`.
    elsewhere = idx >= 5
    assert elsewhere.any() and not elsewhere.all()
    local_weights = jnp.where(elsewhere, 0.0, weights)
    out = experts_ragged(x, up[:5], down[:5], local_weights, jnp.where(elsewhere, 5, idx))
    assert np.isfinite(np.asarray(out)).all(), f"{np.isnan(np.asarray(out)).sum()} NaN of {out.size}"
    # Reference: the dense dispatch over only the local experts' picks, written out per token.
    h = np.maximum(np.einsum("td,edf->tef", x, up), 0) ** 2
    per_expert = np.einsum("tef,efd->ted", h, down)
    expected = np.zeros(x.shape)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            if not elsewhere[t, k]:
                expected[t] += float(weights[t, k]) * per_expert[t, int(idx[t, k])]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, experts_dense(x, up, down, local_weights, idx), rtol=1e-5, atol=1e-5)

    # The whole expert-parallel dispatch (each device's foreign experts are its overflow bucket).
    problem = random_problem(8, 13)
    with jax.set_mesh(expert_mesh()):
        sharded = jax.jit(lambda *a: experts_expert_parallel(*a))(*problem)
    assert np.isfinite(np.asarray(sharded)).all(), f"{np.isnan(np.asarray(sharded)).sum()} NaN of {sharded.size}"
    np.testing.assert_allclose(sharded, experts_dense(*problem), rtol=1e-5, atol=1e-5)


def test_grouped_reads_each_chosen_expert_once():
    """The grouped dispatch's slots are the distinct chosen experts (never one per token copy): with fewer
    token copies than experts, the chosen ones in order and then unused slots; otherwise every expert."""
    idx = jnp.asarray([[5, 1], [1, 6]], jnp.int32)
    slots, used = chosen_experts(idx, 8)
    assert slots.shape == (4,)
    np.testing.assert_array_equal(np.asarray(slots)[np.asarray(used)], [1, 5, 6])
    assert not bool(used[3])
    slots, used = chosen_experts(jnp.zeros((5, 2), jnp.int32), 8)   # 10 copies >= 8 experts: all of them
    np.testing.assert_array_equal(slots, np.arange(8))
    assert bool(used.all())
    # Many tokens on one expert and idle experts: still the dense reference.
    x, up, down, weights, _ = random_problem(7, 4)
    idx = jnp.asarray([[2, 3]] * 4, jnp.int32)
    np.testing.assert_allclose(experts_grouped(x, up, down, weights, idx), experts_dense(x, up, down, weights, idx),
                               rtol=1e-5, atol=1e-5)
