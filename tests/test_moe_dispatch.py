"""Every MoE dispatch == the dense reference (fp32, ≤ 1e-5), on one and two devices, with idle experts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax.config import tiny
from twotower_jax.layers.moe import (EXPERT_AXIS, MoE, experts_dense, experts_expert_parallel, experts_gather,
                                     experts_ragged)
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


@pytest.mark.parametrize("tokens", [1, 3, 40])  # 1 and 3 tokens leave most of the 8 experts idle
def test_dispatches_equal_dense(tokens):
    problem = random_problem(tokens, tokens)
    idle = 8 - len(np.unique(np.asarray(problem[4])))
    assert tokens > 3 or idle > 0
    reference = experts_dense(*problem)
    for dispatch in (experts_ragged, experts_gather):
        np.testing.assert_allclose(dispatch(*problem), reference, rtol=1e-5, atol=1e-5)
    with jax.set_mesh(expert_mesh()):
        sharded = jax.jit(experts_expert_parallel)(*problem)
    np.testing.assert_allclose(sharded, reference, rtol=1e-5, atol=1e-5)


def test_moe_module_and_tower_with_sharded_experts():
    cfg = tiny()
    x = jax.random.normal(jax.random.key(1), (2, 5, cfg.hidden_size))
    params = MoE(cfg).init(jax.random.key(2), x)
    reference = MoE(cfg, impl="dense").apply(params, x)
    np.testing.assert_allclose(MoE(cfg, impl="gather").apply(params, x), reference, rtol=1e-5, atol=1e-5)
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
    from twotower_jax.layers.moe import GATHER_MAX_TOKENS, resolve_moe_impl
    assert resolve_moe_impl("auto", 1, "cpu") == resolve_moe_impl("auto", GATHER_MAX_TOKENS, "gpu") == "gather"
    assert resolve_moe_impl("auto", GATHER_MAX_TOKENS + 1, "cpu") == "dense"
    assert resolve_moe_impl("auto", 512, "gpu") == "ragged"
    assert resolve_moe_impl("ragged", 1, "cpu") == "ragged"   # an explicit choice is kept
