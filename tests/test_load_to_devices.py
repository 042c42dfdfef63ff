"""Checkpoints loaded straight onto devices: each param read, cast and put onto its sharding one at a
time (HF safetensors) or group by group (orbax), never the whole model in host memory."""
import gc
import json
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_convert import SHRUNK_REAL, leaves_equal

from convert.cli import convert_hf_to_orbax
from twotower_jax import generate, sharding
from twotower_jax.checkpoint.hf import (CheckpointError, hf_tensors_from_params, load_hf_tower, load_hf_two_tower,
                                        rules_and_shapes, save_hf_tower, save_hf_two_tower, write_hf_tensors)
from twotower_jax.checkpoint.load import load_checkpoint
from twotower_jax.checkpoint.mapping import keeps_float32, tower_rules
from twotower_jax.config import tiny
from twotower_jax.tower import NemotronH
from twotower_jax.two_tower import TwoTower

CONFIG = tiny(pattern="M*E-E")
PLACEMENT = "sharded"


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() >= 2, "run with XLA_FLAGS=--xla_force_host_platform_device_count=2"
    return sharding.make_mesh(PLACEMENT)


@pytest.fixture(scope="module")
def two_tower_params():
    return TwoTower(CONFIG).random_params(seed=3)


def keys(path):
    return tuple(k.key for k in path)


def assert_on_shardings(params, sharding_for):
    """Every leaf is a device array on exactly the sharding `sharding_for` gives its path."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        assert isinstance(leaf, jax.Array), keys(path)
        expected = sharding_for(keys(path), jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        assert leaf.sharding == expected, (keys(path), leaf.sharding, expected)


def test_hf_load_onto_sharded_mesh_equals_host_load(tmp_path, mesh, two_tower_params):
    save_hf_two_tower(tmp_path, CONFIG, two_tower_params, max_shard_bytes=50_000)
    sharding_for = sharding.sharding_for(PLACEMENT, mesh)
    config, placed = load_hf_two_tower(tmp_path, sharding_for=sharding_for)
    assert config == CONFIG
    assert_on_shardings(placed, sharding_for)
    experts = placed["denoiser"]["layers_2"]["mixer"]["experts_up"]
    assert len(experts.sharding.device_set) == 2
    assert experts.addressable_shards[0].data.shape[0] < CONFIG.n_routed_experts  # each device holds its share
    _, host = load_hf_two_tower(tmp_path)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
    assert leaves_equal(placed, host) and leaves_equal(placed, two_tower_params)


def test_hf_load_onto_devices_casts_and_keeps_router_bias_float32(tmp_path, mesh, two_tower_params):
    tower = two_tower_params["context"]
    save_hf_tower(tmp_path, CONFIG, tower)
    sharding_for = sharding.sharding_for(PLACEMENT, mesh)
    kind, _, placed = load_checkpoint(tmp_path, jnp.bfloat16, sharding_for)
    assert kind == "tower"
    assert_on_shardings(placed, sharding_for)
    for path, leaf in jax.tree_util.tree_flatten_with_path(placed)[0]:
        assert leaf.dtype == (np.float32 if keeps_float32(keys(path)) else jnp.bfloat16), keys(path)
    assert leaves_equal(placed, load_hf_tower(tmp_path, dtype=jnp.bfloat16)[1])


def test_orbax_load_onto_devices_casts_while_reading(tmp_path, mesh, two_tower_params):
    save_hf_two_tower(tmp_path / "hf", CONFIG, two_tower_params)
    convert_hf_to_orbax(tmp_path / "hf", tmp_path / "orbax", dtype="float32")
    sharding_for = sharding.sharding_for(PLACEMENT, mesh)
    kind, _, placed = load_checkpoint(tmp_path / "orbax", jnp.bfloat16, sharding_for)
    assert kind == "two_tower"
    assert_on_shardings(placed, sharding_for)
    assert leaves_equal(placed, load_hf_two_tower(tmp_path / "hf", dtype=jnp.bfloat16)[1])  # same rounding


def test_bad_tensor_is_named_when_loading_onto_devices(tmp_path, mesh):
    tensors = hf_tensors_from_params(tower_rules(CONFIG), NemotronH(CONFIG).random_params(seed=1))
    tensors["backbone.layers.2.mixer.experts.3.up_proj.weight"] = np.zeros((5, CONFIG.hidden_size), np.float32)
    write_hf_tensors(tmp_path, CONFIG.to_hf_dict(), tensors)
    with pytest.raises(CheckpointError, match=r"backbone.layers.2.mixer.experts.3.up_proj.weight has shape \(5, 32\)"):
        load_hf_tower(tmp_path, sharding_for=sharding.sharding_for(PLACEMENT, mesh))


def test_cli_loads_hf_straight_onto_the_placement(tmp_path, capsys, monkeypatch, mesh, two_tower_params):
    save_hf_two_tower(tmp_path, CONFIG, two_tower_params)
    loaded = []

    def spy(*args, **kwargs):
        result = load_checkpoint(*args, **kwargs)
        loaded.append(result[2])
        return result
    monkeypatch.setattr(generate, "load_checkpoint", spy)
    tokens = {}
    for placement in ("single", PLACEMENT):
        assert generate.main(["--checkpoint", str(tmp_path), "--mode", "ar", "--placement", placement, "--json",
                              "--prompt-ids", "5,6,7", "--max-new-tokens", "5", "--eos-token-id", "-1"]) == 0
        tokens[placement] = json.loads(capsys.readouterr().out)["tokens"]
    assert tokens["single"] == tokens[PLACEMENT]
    assert_on_shardings(loaded[-1], sharding.sharding_for(PLACEMENT, mesh))
    assert {x.dtype for x in jax.tree.leaves(loaded[-1])} == {np.dtype(np.float32)}  # --dtype auto: as stored


def test_shrunk_real_layout_loads_onto_devices_with_bounded_host_memory(tmp_path, mesh):
    """The real TwoTower's names and layout (52 layers, 2,250 tensors across shards) at shrunk sizes,
    loaded onto the 2-device mesh. tracemalloc traces host allocations made through Python/NumPy (the
    tensors read from safetensors, casts, the expert stacks) but not XLA's device buffers, which on CPU
    come from XLA's own allocator: device memory is not host memory, and that is what is measured. (On
    CPU `device_put` can alias a NumPy buffer; the loader copies on the device so the host array goes.)
    The traced peak stays under 3x the largest tensor, where reading the checkpoint first would need
    all of it."""
    params = TwoTower(SHRUNK_REAL).random_params(seed=0)
    save_hf_two_tower(tmp_path, SHRUNK_REAL, params, max_shard_bytes=2_000_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) >= 5
    largest = max(x.nbytes for x in jax.tree.leaves(params))
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    del params
    rules_and_shapes("two_tower", SHRUNK_REAL)  # model tracing: Python objects that do not grow with tensor sizes
    sharding_for = sharding.sharding_for(PLACEMENT, mesh)
    gc.collect()
    tracemalloc.start()
    _, placed = load_hf_two_tower(tmp_path, sharding_for=sharding_for)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"\nHF -> {PLACEMENT} mesh of {mesh.devices.size}: {total:,} bytes; largest tensor {largest:,} bytes; peak "
          f"traced host allocation {peak:,} bytes ({peak / largest:.2f}x largest, {peak / total:.3f}x checkpoint)")
    assert total > 10 * largest
    assert peak <= 3 * largest
    assert_on_shardings(placed, sharding_for)
    assert leaves_equal(placed, TwoTower(SHRUNK_REAL).random_params(seed=0))
