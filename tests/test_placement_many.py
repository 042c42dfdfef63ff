"""Placements on meshes of any size: 4 and 8 CPU devices, data-parallel rows, the real config's memory split.

The suite runs with 2 CPU devices (jax cannot change its device count once started), so the tests named
`*_eight_*` run in one subprocess with 8 (`test_eight_device_tests_in_a_subprocess`), which pays jax's start
once for all of them and compiles with the suite's cheap XLA settings (tests/xla_test_flags.py: the reference
run uses the same ones, so tokens are compared like for like). With 8 devices visible (e.g. run directly with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`) they run in-process and the subprocess test skips.

The real-config byte counts need no devices: they use abstract meshes.
"""
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from twotower_jax import generate, sharding
from twotower_jax.config import nano_30b_a3b, tiny
from twotower_jax.sampling.ar import generate_ar, generate_mock_ar
from twotower_jax.sampling.diffusion import generate_mask_diffusion
from twotower_jax.sampling.placed import placed_model
from twotower_jax.sampling.speculative import generate_self_speculative
from twotower_jax.tower import Impl
from twotower_jax.two_tower import TwoTower
from xla_test_flags import xla_flags

EIGHT = jax.device_count() >= 8
needs_eight = pytest.mark.skipif(not EIGHT, reason="needs 8 devices: runs in test_eight_device_tests_in_a_subprocess")

# Every split the rules make divides by 8 here: 8 experts, vocabulary 96, Mamba in_proj 2·64 + 2·2·8 + 8 = 168,
# out_proj / q_proj / o_proj 64 / 32 / 32 rows, shared expert 24.
CONFIG = tiny(pattern="M*E", mamba_num_heads=8)
MODEL = TwoTower(CONFIG, impl=Impl(moe="dense"))
PROMPTS = [[5, 6, 7], [9]]
MODES = {
    "ar": (generate_ar, dict(max_new_tokens=6)),
    "mock_ar": (generate_mock_ar, dict(max_new_tokens=6, temperature=1.0, top_k=40, seed=11)),
    "diffusion": (generate_mask_diffusion, dict(max_new_tokens=8, block_size=4, steps_per_block=3,
                                                confidence_threshold=0.5, temperature=0.7, seed=3)),
    "self_speculative": (generate_self_speculative, dict(max_new_tokens=6, block_size=3)),   # greedy: = AR
}
# (placement, devices, data): every placement on 8 devices, `towers` on 4 (two devices per tower), and rows
# split over `data` (towers on 8: two groups of data 2 × expert 2; AR there runs on the context group, i.e.
# `sharded` with data 2 on 4 devices). `sharded` on 4 devices (2 of the 8 experts per device) is left out:
# several experts per device are covered on 2 devices (tests/test_placement.py), and each mesh here costs
# the subprocess ~14 CPU s of compiles.
MESHES = [("towers", 4, 1), ("towers", 8, 1), ("sharded", 8, 1), ("towers", 8, 2)]


# --- in-process (any device count) ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_shapes():
    begin = time.perf_counter()
    shapes = TwoTower(nano_30b_a3b(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).param_shapes()
    return shapes, time.perf_counter() - begin


@pytest.mark.parametrize("placement", ["towers", "sharded"])
def test_real_config_splits_within_10_percent_of_ideal_on_8_devices(real_shapes, placement):
    shapes, seconds = real_shapes
    assert seconds < 60  # eval_shape only: nothing allocated
    mesh = sharding.abstract_mesh(placement, 8)
    table = sharding.balance_table(shapes, placement, mesh)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
    assert table["total_bytes"] == total and 126e9 < total < 127e9  # ≈31.6B params per tower in BF16
    per_device = table["per_device"]
    assert sorted(per_device) == list(range(8))
    assert max(per_device.values()) <= 1.10 * total / 8, {d: round(b / 1e9, 2) for d, b in per_device.items()}
    assert min(per_device.values()) >= 0.95 * total / 8
    if placement == "towers":  # each tower on its own 4 devices
        context = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes["context"]))
        assert sum(per_device[d] for d in range(4)) >= context
    # The same count from real shardings on a concrete mesh (the 2 devices here): both towers split in two.
    two = sharding.balance_table(shapes, placement, sharding.make_mesh(placement, n_devices=2))
    assert two["max_over_ideal"] <= 1.01 and sorted(two["per_device"]) == [d.id for d in jax.devices()[:2]]


def test_mesh_shapes_and_their_errors():
    assert sharding.mesh_shape("sharded", 8) == {"data": 1, "expert": 8, "tensor": 1}
    assert sharding.mesh_shape("sharded", 8, data=2, tensor=2) == {"data": 2, "expert": 2, "tensor": 2}
    assert sharding.mesh_shape("towers", 8) == {"tower": 2, "data": 1, "expert": 4, "tensor": 1}
    assert sharding.mesh_shape("towers", 2) == {"tower": 2, "data": 1, "expert": 1, "tensor": 1}
    assert sharding.mesh_shape("single", 1) == {"data": 1, "expert": 1, "tensor": 1}
    with pytest.raises(ValueError, match="must be a multiple of 4"):
        sharding.mesh_shape("towers", 6, data=2)  # 6 is not 2 groups × data 2 × k
    with pytest.raises(ValueError, match="runs on one device"):
        sharding.mesh_shape("single", 2)
    with pytest.raises(ValueError, match="asked for 4 devices, found 2"):
        sharding.make_mesh("sharded", jax.devices()[:2], n_devices=4)
    with pytest.raises(ValueError, match="needs a mesh with axes"):
        generate_ar(MODEL, MODEL.param_shapes(), PROMPTS, 2, placement="towers", mesh=sharding.make_mesh("sharded"))
    abstract = sharding.abstract_mesh("towers", 8)
    assert dict(sharding.tower_mesh(abstract, "denoiser").shape) == {"data": 1, "expert": 4, "tensor": 1}
    # Rule entries are tuples of mesh axes; a dimension that does not divide stays whole.
    mesh = sharding.abstract_mesh("sharded", 8, tensor=2)
    assert sharding.param_sharding(("layers_0", "mixer", "in_proj", "kernel"), (32, 168), "sharded",
                                   mesh).spec == P(None, ("expert", "tensor"))
    assert sharding.param_sharding(("layers_0", "mixer", "in_proj", "kernel"), (32, 100), "sharded",
                                   mesh).spec == P(None, None)
    assert sharding.param_sharding(("layers_2", "mixer", "experts_up"), (8, 32, 16), "sharded",
                                   mesh).spec == P("expert", None, None)


# --- 8 devices (a subprocess from the 2-device suite) ----------------------------------------------------

def test_eight_device_tests_in_a_subprocess():
    if EIGHT:
        pytest.skip("8 devices in this process: the *_eight_* tests run directly")
    env = dict(os.environ, XLA_FLAGS=xla_flags(8))
    begin = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0",
                           __file__, "-k", "eight and not subprocess"],
                          env=env, capture_output=True, text=True, timeout=1200, cwd=os.path.dirname(__file__))
    print(proc.stdout[-6000:], f"\nsubprocess: {time.perf_counter() - begin:.1f} s")
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout


@pytest.fixture(scope="module")
def params():
    return MODEL.random_params(seed=1, scale=0.7)


@pytest.fixture(scope="module")
def generated(params):
    runs = {}

    def get(mode, placement="single", devices=1, data=1):
        key = (mode, placement, devices, data)
        if key not in runs:
            fn, kwargs = MODES[mode]
            mesh = sharding.make_mesh(placement, n_devices=devices, data=data)
            runs[key] = fn(MODEL, params, PROMPTS, placement=placement, mesh=mesh, **kwargs)
        return runs[key]
    return get


@needs_eight
def test_eight_params_land_on_each_group(params):
    devices = jax.devices()
    towers = sharding.place_params(params, "towers", sharding.make_mesh("towers"))
    assert sharding.devices_of(towers["context"]) == set(devices[:4])
    assert sharding.devices_of(towers["denoiser"]) == set(devices[4:8])
    experts = towers["denoiser"]["layers_2"]["mixer"]["experts_up"]
    assert experts.sharding.spec == P("expert", None, None) and {s.data.shape[0] for s in experts.addressable_shards} == {2}

    placed = sharding.place_params(params, "sharded", sharding.make_mesh("sharded"))
    assert sharding.devices_of(placed) == set(devices[:8])
    tower = placed["context"]
    for path, spec, dim in [(("layers_2", "mixer", "experts_up"), P("expert", None, None), 0),
                            (("layers_0", "mixer", "in_proj", "kernel"), P(None, "expert"), 1),
                            (("layers_0", "mixer", "out_proj", "kernel"), P("expert", None), 0),
                            (("layers_1", "mixer", "q_proj", "kernel"), P(None, "expert"), 1),
                            (("layers_1", "mixer", "o_proj", "kernel"), P("expert", None), 0),
                            (("layers_2", "mixer", "shared_experts", "up_proj", "kernel"), P(None, "expert"), 1),
                            (("layers_2", "mixer", "shared_experts", "down_proj", "kernel"), P("expert", None), 0),
                            (("embeddings", "embedding"), P("expert", None), 0), (("lm_head", "kernel"), P(None, "expert"), 1)]:
        leaf = tower
        for key in path:
            leaf = leaf[key]
        assert leaf.sharding.spec == spec, path
        assert leaf.addressable_shards[0].data.shape[dim] == leaf.shape[dim] // 8, path
    assert tower["layers_1"]["mixer"]["k_proj"]["kernel"].sharding.spec == P(None, None)  # 2 KV heads: replicated
    assert placed_model(MODEL, sharding.resolve("towers"), sharding.make_mesh("towers")).impl.moe == "expert_parallel"
    assert placed_model(MODEL, sharding.resolve("towers"), sharding.make_mesh("towers", n_devices=2)) == MODEL

    # data = 2: params replicated over `data`, batch rows split over it.
    mesh = sharding.make_mesh("sharded", n_devices=4, data=2)
    assert dict(mesh.shape) == {"data": 2, "expert": 2, "tensor": 1}
    cache = MODEL.context.init_cache(2, 4)
    placed_cache = jax.device_put(cache, sharding.cache_shardings(cache, "sharded", mesh))
    kv = placed_cache.layers[1].k
    assert kv.sharding.spec == P("data") and {s.data.shape[0] for s in kv.addressable_shards} == {1}
    assert placed_cache.length.sharding.spec == P()
    odd = MODEL.context.init_cache(3, 4)  # 3 rows do not divide over data = 2: replicated
    assert sharding.cache_shardings(odd, "sharded", mesh).layers[1].k.spec == P()


@needs_eight
@pytest.mark.parametrize("mode", list(MODES))
def test_eight_every_placement_on_4_and_8_devices_generates_the_single_device_tokens(generated, mode):
    reference = generated(mode)
    counters = [k for k in reference.stats if k.endswith("passes") or k == "generated_tokens"]
    for placement, devices, data in MESHES:
        result = generated(mode, placement, devices, data)
        where = f"{placement} on {devices} devices, data={data}"
        assert result.tokens == reference.tokens, where
        for row, expected in zip(result.logprobs, reference.logprobs):
            np.testing.assert_allclose(row, expected, atol=1e-5, err_msg=where)
        assert {k: result.stats[k] for k in counters} == {k: reference.stats[k] for k in counters}, where
        assert result.stats["placement"] == placement


@needs_eight
def test_eight_self_speculative_is_ar_on_4_and_8_devices(generated):
    """Greedy self-speculation = AR token for token on every mesh of `MESHES` (towers: drafts on the
    denoiser's group, verify on the context's), log-probs within 1e-5 (+1e-5 relative: a chunked verify
    pass vs one-token decode steps, see tests/test_speculative.py)."""
    for placement, devices, data in [("single", 1, 1)] + MESHES:
        spec, ar = generated("self_speculative", placement, devices, data), generated("ar", placement, devices, data)
        where = f"{placement} on {devices} devices, data={data}"
        assert spec.tokens == ar.tokens, where
        for row, expected in zip(spec.logprobs, ar.logprobs):
            np.testing.assert_allclose(row, expected, atol=1e-5, rtol=1e-5, err_msg=where)


@needs_eight
def test_eight_cli_uses_every_device_or_devices_n(capsys):
    argv = ["--checkpoint", "demo", "--mode", "diffusion", "--prompt", "copy abc=", "--json", "--max-new-tokens", "8",
            "--block-size", "4", "--steps-per-block", "4"]
    outputs = {}
    for extra in (["--placement", "sharded"], ["--placement", "towers", "--devices", "4"]):
        assert generate.main(argv + extra) == 0
        outputs[extra[1]] = json.loads(capsys.readouterr().out)
    # Both towers split over all 8 devices, and each tower on 2 of 4, generate the same (the demo's 4 experts
    # do not divide over 8: they stay whole there, the dense weights split).
    assert outputs["sharded"]["tokens"] == outputs["towers"]["tokens"] and outputs["sharded"]["tokens"][0]
    assert outputs["sharded"]["stats"]["placement"] == "sharded" and outputs["towers"]["stats"]["placement"] == "towers"
    assert generate.build_parser().parse_args(["--checkpoint", "x", "--prompt-ids", "5"]).devices is None
    assert sharding.make_mesh("sharded").size == 8 and sharding.make_mesh("towers", n_devices=4).size == 4
