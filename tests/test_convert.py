"""convert/: HF/torch → orbax → HF, streaming, failures that leave nothing behind, sharded restore."""
import json
import subprocess
import sys
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.cli import convert_hf_to_orbax, convert_orbax_to_hf
from convert.cli import main as convert_main
from twotower_jax import generate
from twotower_jax.checkpoint.hf import (hf_tensors_from_params, load_hf_tower, load_hf_two_tower,
                                        rules_and_shapes, save_hf_tower, save_hf_two_tower, write_hf_tensors)
from twotower_jax.checkpoint.mapping import tower_rules, two_tower_rules
from twotower_jax.checkpoint.orbax_io import restore_orbax_checkpoint
from twotower_jax.config import encode_special_floats, nano_30b_a3b, tiny
from twotower_jax.tower import NemotronH
from twotower_jax.two_tower import TwoTower

CONFIG = tiny(pattern="M*E-E")
# The real model's names and layouts (52 layers, its pattern, 8 groups, GQA 32/2) at shrunk sizes.
SHRUNK_REAL = nano_30b_a3b().replace(
    vocab_size=8192, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
    mamba_num_heads=16, mamba_head_dim=4, ssm_state_size=4, n_groups=8, chunk_size=8,
    n_routed_experts=16, num_experts_per_tok=6, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
    intermediate_size=32)


def leaves_equal(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    return [k for k, _ in fa] == [k for k, _ in fb] and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(fa, fb))


def nothing_left(parent, out_name):
    return [p.name for p in parent.iterdir() if out_name in p.name] == []


@pytest.fixture(scope="module")
def two_tower_params():
    return TwoTower(CONFIG).random_params(seed=3)


@pytest.mark.parametrize("kind", ["tower", "two_tower"])
def test_round_trip_hf_orbax_hf_is_bit_exact(tmp_path, two_tower_params, kind):
    params = two_tower_params if kind == "two_tower" else two_tower_params["context"]
    (save_hf_two_tower if kind == "two_tower" else save_hf_tower)(tmp_path / "hf", CONFIG, params)
    summary = convert_hf_to_orbax(tmp_path / "hf", tmp_path / "orbax", dtype="float32")
    assert summary["kind"] == kind and summary["parameters"] == sum(x.size for x in jax.tree.leaves(params))
    restored_kind, config, restored = restore_orbax_checkpoint(tmp_path / "orbax")
    assert (restored_kind, config) == (kind, CONFIG) and leaves_equal(restored, params)
    convert_orbax_to_hf(tmp_path / "orbax", tmp_path / "hf2")
    load = load_hf_two_tower if kind == "two_tower" else load_hf_tower
    assert leaves_equal(load(tmp_path / "hf2")[1], params)


def test_bfloat16_conversion_keeps_router_bias_float32(tmp_path, two_tower_params):
    save_hf_two_tower(tmp_path / "hf", CONFIG, two_tower_params)
    convert_hf_to_orbax(tmp_path / "hf", tmp_path / "orbax", dtype="bfloat16")
    _, _, restored = restore_orbax_checkpoint(tmp_path / "orbax")
    assert restored["denoiser"]["layers_2"]["mixer"]["experts_up"].dtype == jnp.bfloat16
    assert restored["context"]["layers_2"]["mixer"]["e_score_correction_bias"].dtype == np.float32
    np.testing.assert_array_equal(restored["denoiser"]["lm_head"]["kernel"],
                                  two_tower_params["denoiser"]["lm_head"]["kernel"].astype(jnp.bfloat16))


def test_shrunk_real_layout_across_shards_converts_with_bounded_memory(tmp_path):
    model = TwoTower(SHRUNK_REAL)
    params = model.random_params(seed=0)
    save_hf_two_tower(tmp_path / "hf", SHRUNK_REAL, params, max_shard_bytes=2_000_000)
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) >= 5
    names = {n for r in two_tower_rules(SHRUNK_REAL) for n in r.hf_names}
    assert "denoiser_tower.layers.51.mixer.experts.15.down_proj.weight" in names and "scale_shift_tables.51" in names
    largest = max(x.nbytes for x in jax.tree.leaves(params))
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    del params
    rules_and_shapes("two_tower", SHRUNK_REAL)  # model tracing: Python objects that do not grow with tensor sizes
    tracemalloc.start()
    summary = convert_hf_to_orbax(tmp_path / "hf", tmp_path / "orbax", dtype="float32")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"\nconversion: {summary['bytes']:,} bytes in {summary['tensors']} tensors; largest tensor {largest:,} "
          f"bytes; peak traced host allocation {peak:,} bytes ({peak / largest:.1f}x largest, "
          f"{peak / total:.2f}x checkpoint); process peak RSS {summary['peak_rss_mb']} MiB")
    assert summary["bytes"] == total and total > 10 * largest
    # One layer group at a time, never the checkpoint: a few copies of the largest tensor plus a fixed
    # allowance for per-tensor metadata (the shard index and paths of ~2,250 names).
    assert peak < 3 * largest + 4 * 2**20
    assert peak < total / 3
    _, _, restored = restore_orbax_checkpoint(tmp_path / "orbax")
    assert leaves_equal(restored, TwoTower(SHRUNK_REAL).random_params(seed=0))


def _bad_checkpoint(tmp_path, edit):
    params = NemotronH(CONFIG).random_params(seed=1)
    tensors = hf_tensors_from_params(tower_rules(CONFIG), params)
    edit(tensors)
    write_hf_tensors(tmp_path / "hf", CONFIG.to_hf_dict(), tensors)
    return tmp_path / "hf"


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("backbone.layers.0.mixer.A_log"), "missing tensor(s): backbone.layers.0.mixer.A_log"),
    (lambda t: t.update({"backbone.extra.weight": np.zeros(3, np.float32)}), "unexpected tensor(s): backbone.extra.weight"),
    (lambda t: t.update({"backbone.layers.4.mixer.gate.weight": np.zeros((8, 31), np.float32)}),
     "backbone.layers.4.mixer.gate.weight has shape (8, 31), expected (8, 32)"),
])
def test_bad_tensors_fail_by_name_and_leave_nothing(tmp_path, capsys, edit, message):
    hf = _bad_checkpoint(tmp_path, edit)
    with pytest.raises(SystemExit) as e:
        convert_main(["--hf-dir", str(hf), "--out", str(tmp_path / "out")])
    assert e.value.code == 1
    assert message in capsys.readouterr().err
    assert nothing_left(tmp_path, "out")


def test_truncated_shard_and_mismatched_config_leave_nothing(tmp_path, capsys):
    params = NemotronH(CONFIG).random_params(seed=1)
    save_hf_tower(tmp_path / "hf", CONFIG, params, max_shard_bytes=20_000)
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(SystemExit):
        convert_main(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out")])
    assert shard.name in capsys.readouterr().err and nothing_left(tmp_path, "out")

    save_hf_tower(tmp_path / "hf2", CONFIG, params)
    (tmp_path / "hf2" / "config.json").write_text(json.dumps(dict(json.loads(
        (tmp_path / "hf2" / "config.json").read_text()), layers_block_type=["mamba", "attention", "moe", "moe", "moe"])))
    with pytest.raises(SystemExit):
        convert_main(["--hf-dir", str(tmp_path / "hf2"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "unexpected tensor(s): backbone.layers.3.mixer.down_proj.weight" in err
    assert "missing tensor(s): backbone.layers.3.mixer.experts.0.down_proj.weight" in err
    assert nothing_left(tmp_path, "out")


def test_existing_output_refused_unless_overwrite(tmp_path, capsys):
    save_hf_tower(tmp_path / "hf", CONFIG, NemotronH(CONFIG).random_params(seed=1))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        convert_main(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out")])
    assert "exists" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").is_file()
    assert convert_main(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--overwrite"]) == 0
    assert "converted tower (hf->orbax)" in capsys.readouterr().out
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_torch_state_dict_input(tmp_path, two_tower_params):
    torch = pytest.importorskip("torch", reason="HF oracle (torch, transformers) not installed")
    tensors = hf_tensors_from_params(two_tower_rules(CONFIG), two_tower_params)
    state = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()}
    (tmp_path / "hf").mkdir()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(encode_special_floats(CONFIG.to_hf_dict())))
    save_hf_two_tower(tmp_path / "ref", CONFIG, jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16)),
                                                              two_tower_params))
    convert_hf_to_orbax(tmp_path / "hf", tmp_path / "from_torch", dtype="bfloat16")
    convert_hf_to_orbax(tmp_path / "ref", tmp_path / "from_safetensors", dtype="bfloat16")
    assert leaves_equal(restore_orbax_checkpoint(tmp_path / "from_torch")[2],
                        restore_orbax_checkpoint(tmp_path / "from_safetensors")[2])


def test_restore_straight_onto_a_mesh(tmp_path, two_tower_params):
    assert jax.device_count() >= 2
    save_hf_two_tower(tmp_path / "hf", CONFIG, two_tower_params)
    convert_hf_to_orbax(tmp_path / "hf", tmp_path / "orbax", dtype="float32")
    mesh = jax.make_mesh((2,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    P = jax.sharding.PartitionSpec

    def sharding_for(path, struct):  # experts split over the two devices, the rest replicated
        spec = P("model") if path[-1] in ("experts_up", "experts_down") else P()
        return jax.sharding.NamedSharding(mesh, spec)

    _, _, restored = restore_orbax_checkpoint(tmp_path / "orbax", sharding_for)
    experts = restored["denoiser"]["layers_2"]["mixer"]["experts_up"]
    assert experts.sharding.spec == P("model") and len(experts.addressable_shards) == 2
    assert experts.addressable_shards[0].data.shape[0] == CONFIG.n_routed_experts // 2
    assert leaves_equal(jax.tree.map(np.asarray, restored), two_tower_params)


def test_generate_from_converted_equals_hf(tmp_path, capsys, two_tower_params):
    save_hf_two_tower(tmp_path / "hf", CONFIG, two_tower_params)
    convert_hf_to_orbax(tmp_path / "hf", tmp_path / "orbax", dtype="float32")
    common = ["--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--eos-token-id", "-1", "--json",
              "--mode", "diffusion", "--block-size", "4", "--steps-per-block", "4", "--confidence-threshold", "0.3"]
    outputs = []
    for directory in ("hf", "orbax"):
        assert generate.main(["--checkpoint", str(tmp_path / directory)] + common) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0]["tokens"] == outputs[1]["tokens"]


def test_python_dash_m_convert(tmp_path):
    save_hf_tower(tmp_path / "hf", CONFIG, NemotronH(CONFIG).random_params(seed=1))
    run = subprocess.run([sys.executable, "-m", "convert", "--hf-dir", str(tmp_path / "hf"), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "tensors" in run.stdout and "peak RSS" in run.stdout
    run = subprocess.run([sys.executable, "-m", "convert", "--hf-dir", str(tmp_path / "nope"), "--out",
                          str(tmp_path / "out2")], capture_output=True, text=True)
    assert run.returncode != 0 and "config.json" in run.stderr


def test_torch_state_dict_without_torch_is_a_clear_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"not read")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(encode_special_floats(CONFIG.to_hf_dict())))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(SystemExit):
        convert_main(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out")])
    assert "needs torch" in capsys.readouterr().err and nothing_left(tmp_path, "out")
