"""HF checkpoint loading and writing: round trips, shards, and every failure named."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch", reason="HF oracle (torch, transformers) not installed")
pytest.importorskip("transformers", reason="HF oracle (torch, transformers) not installed")
import torch  # noqa: E402
import transformers  # noqa: E402
from hf_oracle import hf_logits  # noqa: E402

from twotower_jax import generate
from twotower_jax.checkpoint.hf import (CheckpointError, hf_tensors_from_params, load_hf_tower, save_hf_tower,
                                        write_hf_tensors)
from twotower_jax.checkpoint.load import checkpoint_dtype, load_checkpoint
from twotower_jax.checkpoint.mapping import keeps_float32, tower_rules
from twotower_jax.config import encode_special_floats, tiny
from twotower_jax.tower import NemotronH

CONFIG = tiny(pattern="M*E-")


@pytest.fixture(scope="module")
def params():
    """O(1)-scale random params (every leaf drawn, none left at its init constant)."""
    return NemotronH(CONFIG).random_params(seed=0, scale=0.5)


def tree_equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_save_load_round_trip_is_bit_exact(tmp_path, params):
    save_hf_tower(tmp_path, CONFIG, params)
    config, loaded = load_hf_tower(tmp_path)
    assert config == CONFIG
    assert tree_equal(loaded, params)


def test_sharded_checkpoint_with_index_loads_the_same(tmp_path, params):
    save_hf_tower(tmp_path, CONFIG, params, max_shard_bytes=20_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert tree_equal(load_hf_tower(tmp_path)[1], params)


def test_transformers_reads_our_checkpoint_and_agrees(tmp_path, params):
    save_hf_tower(tmp_path, CONFIG, params)
    hf_model = transformers.NemotronHForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for layer in hf_model.model.layers:
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = (0.0, float("inf"))
    tokens = np.random.default_rng(1).integers(3, CONFIG.vocab_size, (2, 11))
    expected = hf_logits(hf_model, tokens)
    ours, _ = NemotronH(CONFIG).prefill(params, jnp.asarray(tokens))
    assert np.abs(np.asarray(ours) - expected).max() / np.abs(expected).max() < 1e-4


def test_transformers_sharded_save_loads(tmp_path, hf_tower):
    hf_model, _, config, params = hf_tower("all_types")
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert tree_equal(load_hf_tower(tmp_path)[1], params)


def test_bfloat16_load_keeps_router_bias_float32(tmp_path, params):
    save_hf_tower(tmp_path, CONFIG, params)
    _, loaded = load_hf_tower(tmp_path, dtype=jnp.bfloat16)
    assert loaded["layers_0"]["mixer"]["in_proj"]["kernel"].dtype == jnp.bfloat16
    assert loaded["layers_2"]["mixer"]["e_score_correction_bias"].dtype == np.float32


def test_default_dtype_is_the_checkpoints_own(tmp_path, params):
    """`generate --dtype auto` (the default) loads in `checkpoint_dtype`: BF16 weights (with the release's
    float32 router biases) load as BF16, a float32 checkpoint stays float32, and so does the demo."""
    assert generate.build_parser().parse_args(["--checkpoint", "x"]).dtype == "auto"

    def as_release(path, x):
        return x if keeps_float32(tuple(k.key for k in path)) else np.asarray(x.astype(jnp.bfloat16))
    bf16 = jax.tree_util.tree_map_with_path(as_release, params)
    save_hf_tower(tmp_path / "bf16", CONFIG, bf16, max_shard_bytes=20_000)
    assert checkpoint_dtype(tmp_path / "bf16") == jnp.bfloat16
    _, _, loaded = load_checkpoint(tmp_path / "bf16", dtype=None)
    assert loaded["layers_0"]["mixer"]["in_proj"]["kernel"].dtype == jnp.bfloat16
    assert loaded["layers_2"]["mixer"]["e_score_correction_bias"].dtype == np.float32
    assert tree_equal(loaded, bf16)

    save_hf_tower(tmp_path / "f32", CONFIG, params)
    assert checkpoint_dtype(tmp_path / "f32") == np.float32
    _, _, loaded = load_checkpoint(tmp_path / "f32", dtype=None)
    assert {x.dtype for x in jax.tree.leaves(loaded)} == {np.dtype(np.float32)} and tree_equal(loaded, params)
    assert checkpoint_dtype("demo") == np.float32  # the packaged demo is stored in float32 (its manifest)


def _write(tmp_path, tensors, config=CONFIG):
    write_hf_tensors(tmp_path, config.to_hf_dict(), tensors)
    return tmp_path


def _tensors(params):
    return hf_tensors_from_params(tower_rules(CONFIG), params)


def test_missing_tensor_is_named(tmp_path, params):
    tensors = _tensors(params)
    del tensors["backbone.layers.0.mixer.dt_bias"], tensors["backbone.layers.2.mixer.experts.5.up_proj.weight"]
    with pytest.raises(CheckpointError) as e:
        load_hf_tower(_write(tmp_path, tensors))
    assert "2 missing tensor(s)" in str(e.value)
    assert "backbone.layers.0.mixer.dt_bias" in str(e.value)
    assert "backbone.layers.2.mixer.experts.5.up_proj.weight" in str(e.value)


def test_unexpected_tensor_is_named(tmp_path, params):
    tensors = _tensors(params)
    tensors["backbone.layers.1.mixer.rotary.inv_freq"] = np.zeros(4, np.float32)
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\): backbone.layers.1.mixer.rotary.inv_freq"):
        load_hf_tower(_write(tmp_path, tensors))


def test_wrong_shape_is_named(tmp_path, params):
    tensors = _tensors(params)
    tensors["backbone.layers.1.mixer.k_proj.weight"] = np.zeros((8, CONFIG.hidden_size), np.float32)
    with pytest.raises(CheckpointError, match=r"backbone.layers.1.mixer.k_proj.weight has shape \(8, 32\), "
                                              r"expected \(16, 32\)"):
        load_hf_tower(_write(tmp_path, tensors))


def test_truncated_file_is_named(tmp_path, params):
    save_hf_tower(tmp_path, CONFIG, params)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_tower(tmp_path)


def test_index_naming_absent_shard(tmp_path, params):
    save_hf_tower(tmp_path, CONFIG, params, max_shard_bytes=20_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="names shard files that do not exist"):
        load_hf_tower(tmp_path)


def test_config_that_does_not_match_tensors(tmp_path, params):
    wrong = CONFIG.replace(pattern="M*EM")  # layer 3 is a dense MLP in the tensors, Mamba in the config
    with pytest.raises(CheckpointError) as e:
        load_hf_tower(_write(tmp_path, _tensors(params), config=wrong))
    assert "backbone.layers.3.mixer.in_proj.weight" in str(e.value)        # missing
    assert "backbone.layers.3.mixer.up_proj.weight" in str(e.value)        # unexpected


def test_bad_config_json_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_tower(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(encode_special_floats(dict(CONFIG.to_hf_dict(), n_groups=3))))
    with pytest.raises(CheckpointError, match=r"mamba_num_heads \(4\) must be divisible by n_groups \(3\)"):
        load_hf_tower(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(encode_special_floats(CONFIG.to_hf_dict())))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_tower(tmp_path)
