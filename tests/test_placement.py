"""Placements (single / towers / sharded) on 2 CPU devices (4 and 8: tests/test_placement_many.py): where
params land, the same tokens as one device in every generation mode, orbax restore onto each placement,
the CLI flags and their errors.

Compiling is the cost here: each (mode, placement) compiles once per session (`generated` caches the
runs), and the CLI tests reuse those programs by asking for the same model and settings."""
import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from convert.cli import convert_hf_to_orbax
from twotower_jax import generate, sharding
from twotower_jax.checkpoint.hf import save_hf_tower, save_hf_two_tower
from twotower_jax.checkpoint.orbax_io import restore_orbax_checkpoint
from twotower_jax.config import tiny
from twotower_jax.sampling.ar import generate_ar, generate_mock_ar
from twotower_jax.sampling.diffusion import generate_mask_diffusion
from twotower_jax.sampling.placed import placed_model
from twotower_jax.tower import Impl
from twotower_jax.two_tower import TwoTower

CONFIG = tiny(pattern="M*E")  # Mamba (conv + SSM cache), attention (KV cache), MoE (experts to split)
MODEL = TwoTower(CONFIG, impl=Impl(moe="dense"))  # what the CLI builds on CPU (`--moe-impl auto`)
PROMPTS = [[5, 6, 7], [9]]  # batch 2, left padding
PLACEMENTS = ("single", "towers", "sharded")
# Each mode's settings; the EOS ids are ones the single-device run hits (asserted), so the per-row stop is
# exercised on every placement.
MODES = {
    "ar": (generate_ar, dict(max_new_tokens=8)),  # greedy
    "mock_ar": (generate_mock_ar, dict(max_new_tokens=8, temperature=1.0, top_k=40, seed=11, eos_token_id=24)),
    "diffusion": (generate_mask_diffusion, dict(max_new_tokens=10, block_size=4, steps_per_block=3,
                                                confidence_threshold=0.5, temperature=0.7, seed=3, eos_token_id=2)),
}


@pytest.fixture(scope="module")
def params():
    return MODEL.random_params(seed=1, scale=0.7)


@pytest.fixture(scope="module")
def generated(params):
    runs = {}

    def get(mode, placement):
        if (mode, placement) not in runs:
            fn, kwargs = MODES[mode]
            runs[mode, placement] = fn(MODEL, params, PROMPTS, placement=placement, **kwargs)
        return runs[mode, placement]
    return get


def leaf(tree, *path):
    for key in path:
        tree = tree[key]
    return tree


def test_params_land_where_the_placement_says(params):
    dev0, dev1 = jax.devices()[:2]
    single = sharding.place_params(params, "single", sharding.make_mesh("single"))
    assert sharding.devices_of(single) == {dev0}

    towers = sharding.place_params(params, "towers", sharding.make_mesh("towers"))
    assert sharding.devices_of(towers["context"]) == {dev0}
    assert sharding.devices_of(towers["denoiser"]) == {dev1}

    mesh = sharding.make_mesh("sharded")
    placed = sharding.place_params(params, "sharded", mesh)
    for tower in ("context", "denoiser"):
        experts = leaf(placed, tower, "layers_2", "mixer", "experts_up")
        assert experts.sharding.spec == P("expert", None, None)
        assert [s.data.shape[0] for s in experts.addressable_shards] == [CONFIG.n_routed_experts // 2] * 2
        assert leaf(placed, tower, "layers_2", "mixer", "experts_down").sharding.spec == P("expert", None, None)
        assert leaf(placed, tower, "embeddings", "embedding").sharding.spec == P("expert", None)
        assert leaf(placed, tower, "lm_head", "kernel").sharding.spec == P(None, "expert")
        # Dense weights split too (on the dimension that divides): Mamba in_proj (32, 100), attention q_proj.
        assert leaf(placed, tower, "layers_0", "mixer", "in_proj", "kernel").sharding.spec == P(None, "expert")
        assert leaf(placed, tower, "layers_1", "mixer", "q_proj", "kernel").sharding.spec == P(None, "expert")
        norm = leaf(placed, tower, "norm_f", "weight")
        assert norm.sharding.spec == P() and norm.sharding.device_set == {dev0, dev1}
    assert sharding.devices_of(placed) == {dev0, dev1}
    assert placed_model(MODEL, sharding.resolve("sharded")).impl.moe == "expert_parallel"
    assert placed_model(MODEL, sharding.resolve("towers")) == MODEL
    np.testing.assert_array_equal(leaf(placed, "denoiser", "layers_2", "mixer", "experts_up"),
                                  leaf(params, "denoiser", "layers_2", "mixer", "experts_up"))

    cache = MODEL.context.init_cache(2, 4)
    for tower, device in (("context", dev0), ("denoiser", dev1)):
        placed_cache = jax.device_put(cache, sharding.cache_shardings(cache, "towers", sharding.make_mesh("towers"),
                                                                      tower))
        assert sharding.devices_of(placed_cache) == {device}
    replicated = jax.device_put(cache, sharding.cache_shardings(cache, "sharded", mesh))
    assert sharding.devices_of(replicated) == {dev0, dev1}


def test_unknown_placement_and_too_few_devices(params):
    with pytest.raises(ValueError, match="unknown placement 'pipeline'; expected one of single, towers, sharded"):
        sharding.make_mesh("pipeline")
    with pytest.raises(ValueError, match="unknown placement"):
        generate_ar(MODEL, params, PROMPTS, 4, placement="pipeline")
    for placement in ("towers", "sharded"):
        with pytest.raises(ValueError, match=f"placement '{placement}' needs 2 devices, found 1 .*"
                                             "xla_force_host_platform_device_count=2"):
            sharding.make_mesh(placement, jax.devices()[:1])
    # One device per tower: the model's own dispatch runs there (expert_parallel, over an `expert` axis of 1, too).
    ep = TwoTower(CONFIG, impl=Impl(moe="expert_parallel"))
    assert placed_model(ep, sharding.resolve("towers"), sharding.make_mesh("towers")) == ep
    assert placed_model(MODEL, sharding.resolve("towers"), sharding.make_mesh("towers")) == MODEL


@pytest.mark.parametrize("mode", list(MODES))
def test_every_placement_generates_what_one_device_does(generated, mode):
    reference = generated(mode, "single")
    eos = MODES[mode][1].get("eos_token_id")
    if eos is not None:  # the settings must exercise the per-row stop
        assert any(len(row) < MODES[mode][1]["max_new_tokens"] and row[-1] == eos for row in reference.tokens)
    counters = [k for k in reference.stats if k.endswith("passes") or k == "generated_tokens"]
    assert counters
    for placement in ("towers", "sharded"):
        result = generated(mode, placement)
        assert result.tokens == reference.tokens, placement
        for row, expected in zip(result.logprobs, reference.logprobs):
            np.testing.assert_allclose(row, expected, atol=1e-5)
        assert {k: result.stats[k] for k in counters} == {k: reference.stats[k] for k in counters}
        assert result.stats["placement"] == placement and result.stats["seconds"] > 0


def test_a_repeat_compiles_nothing(generated, params, backend_compiles):
    for placement in ("towers", "sharded"):
        first = generated("mock_ar", placement)
        fn, kwargs = MODES["mock_ar"]
        before = len(backend_compiles)
        again = fn(MODEL, params, PROMPTS, placement=placement, **kwargs)
        assert again.tokens == first.tokens
        assert len(backend_compiles) == before, f"{placement}: a repeat compiled {len(backend_compiles) - before} programs"


@pytest.fixture(scope="module")
def orbax_checkpoint(tmp_path_factory, params):
    root = tmp_path_factory.mktemp("placement_ckpt")
    save_hf_two_tower(root / "hf", CONFIG, params)
    convert_hf_to_orbax(root / "hf", root / "orbax", dtype="float32")
    save_hf_tower(root / "hf_tower", CONFIG, params["context"])
    return root


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_orbax_restore_onto_each_placement(orbax_checkpoint, params, generated, placement):
    mesh = sharding.make_mesh(placement)
    _, _, restored = restore_orbax_checkpoint(orbax_checkpoint / "orbax", sharding.sharding_for(placement, mesh))
    expected = sharding.param_shardings(params, placement, mesh)
    for (path, array), want in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(expected)):
        assert array.sharding.is_equivalent_to(want, array.ndim), jax.tree_util.keystr(path)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)))
    result = generate_ar(MODEL, restored, PROMPTS, placement=placement, **MODES["ar"][1])
    assert result.tokens == generated("ar", "single").tokens


def run_cli(capsys, *argv):
    assert generate.main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("mode, placement", [("diffusion", "towers"), ("ar", "sharded"), ("mock_ar", "towers")])
def test_cli_placement_runs_and_matches(orbax_checkpoint, capsys, generated, mode, placement):
    kwargs = MODES[mode][1]
    argv = ["--checkpoint", str(orbax_checkpoint / "orbax"), "--mode", mode, "--placement", placement, "--json",
            "--prompt-ids", "5,6,7", "--prompt-ids", "9",
            "--max-new-tokens", str(kwargs["max_new_tokens"]), "--eos-token-id", str(kwargs.get("eos_token_id", -1)),
            "--temperature", str(kwargs.get("temperature", 0.0)), "--seed", str(kwargs.get("seed", 0))]
    argv += {"diffusion": ["--block-size", "4", "--steps-per-block", "3", "--confidence-threshold", "0.5"],
             "mock_ar": ["--top-k", "40"], "ar": []}[mode]
    out = run_cli(capsys, *argv)
    assert out["tokens"] == generated(mode, "single").tokens
    assert out["stats"]["placement"] == placement


def test_cli_implementation_flags():
    parse = generate.build_parser().parse_args
    base = ["--checkpoint", "x", "--prompt-ids", "5"]
    assert generate.implementation(parse(base)).moe == "auto"
    impl = generate.implementation(parse(base + ["--ssd-impl", "reference", "--moe-impl", "gather"]))
    assert (impl.scan, impl.moe) == ("sequential", "gather")
    assert generate.implementation(parse(base + ["--ssd-impl", "xla", "--moe-impl", "simple"])) == Impl("chunked", "dense")
    assert generate.implementation(parse(base + ["--ssd-impl", "pallas"])).scan == "pallas"
    assert generate.implementation(parse(base)).scan == Impl().scan  # no flag: the model's default
    assert generate.implementation(parse(base + ["--placement", "sharded"])).moe == "expert_parallel"


@pytest.mark.parametrize("argv, message", [
    (["--placement", "sharded", "--moe-impl", "ragged"], "--placement sharded splits the experts"),
    (["--placement", "towers", "--checkpoint-kind", "tower"], "--placement towers puts a TwoTower's two towers"),
    (["--placement", "towers", "--one-device"], "placement 'towers' needs 2 devices, found 1"),
    (["--placement", "sharded", "--one-device"], "placement 'sharded' needs 2 devices, found 1"),
])
def test_cli_placement_errors(orbax_checkpoint, capsys, monkeypatch, argv, message):
    directory = orbax_checkpoint / ("hf_tower" if "--checkpoint-kind" in argv else "orbax")
    if "--one-device" in argv:
        one = jax.devices()[:1]
        monkeypatch.setattr(sharding.jax, "devices", lambda *a: one)
    argv = [a for a in argv if a not in ("--checkpoint-kind", "tower", "--one-device")]
    with pytest.raises(SystemExit) as e:
        generate.main(["--checkpoint", str(directory), "--prompt-ids", "5"] + argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.build_parser().parse_args(["--checkpoint", "x", "--placement", "ring"])
