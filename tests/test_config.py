import json
import math

import pytest

from twotower_jax.config import ConfigError, NemotronHConfig, nano_30b_a3b, tiny
from twotower_jax.tower import NemotronH, count_params

REAL_HF_FIELDS = {  # the Nano-30B-A3B config.json fields that matter, as NVIDIA ships them
    "vocab_size": 131072, "hidden_size": 2688, "num_hidden_layers": 52,
    "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
    "mamba_num_heads": 64, "mamba_head_dim": 64, "ssm_state_size": 128, "n_groups": 8, "conv_kernel": 4,
    "chunk_size": 128, "n_routed_experts": 128, "num_experts_per_tok": 6, "moe_intermediate_size": 1856,
    "moe_shared_expert_intermediate_size": 3712, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "n_group": 1, "topk_group": 1, "intermediate_size": 1856, "layer_norm_epsilon": 1e-5,
    "mlp_hidden_act": "relu2", "tie_word_embeddings": False, "use_bias": False,
    "time_step_limit": [0.0, {"__float__": "Infinity"}], "eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 0,
}


def spec_param_count() -> int:
    """Per-tower parameter count written out from the SPEC §2 table, independently of the model code."""
    d, v = 2688, 131072
    mamba_inner, heads, state, groups, kernel = 64 * 64, 64, 128, 8, 4
    conv_dim = mamba_inner + 2 * groups * state
    mamba = (d * (2 * mamba_inner + 2 * groups * state + heads) + conv_dim * kernel + conv_dim
             + 3 * heads + mamba_inner + mamba_inner * d)
    moe = 128 * d + 128 + 128 * 2 * d * 1856 + 2 * d * 3712
    attention = d * 32 * 128 + 2 * d * 2 * 128 + 32 * 128 * d
    layers = 23 * mamba + 23 * moe + 6 * attention + 52 * d  # + one pre-norm per layer
    return layers + 2 * v * d + d  # embedding, lm_head, norm_f


def test_real_config_from_hf_json_matches_preset():
    assert NemotronHConfig.from_hf_dict(REAL_HF_FIELDS) == nano_30b_a3b()


def test_real_config_param_count_by_eval_shape():
    shapes = NemotronH(nano_30b_a3b()).param_shapes()  # abstract: nothing allocated
    n = count_params(shapes)
    assert n == spec_param_count()
    assert abs(n / 1e9 - 31.58) < 0.01


def test_layers_block_type_list_and_legacy_names():
    names = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
    d = dict(REAL_HF_FIELDS)
    pattern = d.pop("hybrid_override_pattern")
    d["layers_block_type"] = [names[c] for c in pattern]
    assert NemotronHConfig.from_hf_dict(d).pattern == pattern
    d["layers_block_type"] = ["mamba", "attention", "moe", "mlp"]
    d.pop("num_hidden_layers")
    assert NemotronHConfig.from_hf_dict(d).pattern == "M*E-"


def test_infinity_encoding_round_trip(tmp_path):
    cfg = tiny()
    path = tmp_path / "config.json"
    from twotower_jax.config import encode_special_floats
    path.write_text(json.dumps(encode_special_floats(cfg.to_hf_dict())))
    assert '"__float__": "Infinity"' in path.read_text()
    assert NemotronHConfig.from_json_file(path) == cfg


@pytest.mark.parametrize("changes, message", [
    (dict(num_hidden_layers=51), "num_hidden_layers (51) does not match"),
    (dict(hybrid_override_pattern="MEX*"), "unknown layer letters ['X']"),
    (dict(num_attention_heads=31), "num_attention_heads (31) must be divisible by num_key_value_heads (2)"),
    (dict(mamba_num_heads=60), "mamba_num_heads (60) must be divisible by n_groups (8)"),
    (dict(num_experts_per_tok=200), "num_experts_per_tok (200) exceeds n_routed_experts"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(mlp_hidden_act="silu"), "mlp_hidden_act"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(eos_token_id=131072), "eos_token_id (131072) is outside the vocabulary"),
])
def test_bad_configs_name_the_problem(changes, message):
    d = dict(REAL_HF_FIELDS, **changes)
    if "hybrid_override_pattern" in changes:
        d.pop("num_hidden_layers")
    with pytest.raises(ConfigError) as e:
        NemotronHConfig.from_hf_dict(d)
    assert message in str(e.value)


def test_unknown_block_type_and_missing_pattern():
    d = dict(REAL_HF_FIELDS)
    d.pop("hybrid_override_pattern")
    with pytest.raises(ConfigError, match="neither hybrid_override_pattern nor layers_block_type"):
        NemotronHConfig.from_hf_dict(d)
    d["layers_block_type"] = ["mamba", "conv"]
    with pytest.raises(ConfigError, match=r"unknown layer types \['conv'\]"):
        NemotronHConfig.from_hf_dict(d)


def test_missing_required_field(tmp_path):
    d = dict(REAL_HF_FIELDS)
    d.pop("vocab_size")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="'vocab_size' is missing"):
        NemotronHConfig.from_json_file(path)


def test_derived_sizes_of_real_config():
    c = nano_30b_a3b()
    assert (c.num_layers, c.mamba_intermediate_size, c.conv_dim, c.mamba_in_proj_size) == (52, 4096, 6144, 10304)
    assert (len(c.layer_indices("M")), len(c.layer_indices("E")), len(c.layer_indices("*"))) == (23, 23, 6)
    assert math.isclose(c.routed_scaling_factor, 2.5) and c.dt_floor is None


def test_absent_fields_take_transformers_defaults():
    """A config.json means the same model here as in transformers, including the fields it leaves out."""
    transformers = pytest.importorskip("transformers", reason="HF oracle (torch, transformers) not installed")
    minimal = {"vocab_size": 64, "hidden_size": 32, "hybrid_override_pattern": "M*E-", "mamba_n_groups": 4,
               "eos_token_id": [2, 11]}
    ours = NemotronHConfig.from_hf_dict(minimal)
    theirs = transformers.NemotronHConfig(**minimal)
    for field in ("num_attention_heads", "num_key_value_heads", "head_dim", "mamba_num_heads", "mamba_head_dim",
                  "ssm_state_size", "n_groups", "conv_kernel", "chunk_size", "n_routed_experts",
                  "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
                  "routed_scaling_factor", "intermediate_size", "layer_norm_epsilon", "n_group", "topk_group"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.n_groups == 4 and ours.eos_token_id == 2


def _leaf_paths(tree, prefix=()):
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _leaf_paths(v, prefix + (k,))]
    return [prefix]


@pytest.mark.parametrize("two_tower", [False, True], ids=["tower", "two_tower"])
def test_real_checkpoint_table_covers_every_param_once(two_tower):
    from twotower_jax.checkpoint.mapping import tower_rules, two_tower_rules
    from twotower_jax.two_tower import TwoTower
    config = nano_30b_a3b()
    shapes = TwoTower(config).param_shapes() if two_tower else NemotronH(config).param_shapes()
    rules = two_tower_rules(config) if two_tower else tower_rules(config)
    assert sorted(r.path for r in rules) == sorted(_leaf_paths(shapes))
    names = [n for r in rules for n in r.hf_names]
    assert len(names) == len(set(names))
    hf_params = sum(math.prod(s) for r in rules for s in r.hf_shapes)
    assert hf_params == count_params(shapes)
    d = 2688  # adaLN (SPEC §3/§6): t_embedder 256→D→D, t_block D→3D (with biases), 52 tables (3, D): ≈30.0M
    adaln = 256 * d + d + d * d + d + 3 * d * d + 3 * d + 52 * 3 * d
    assert hf_params == (2 * spec_param_count() + adaln if two_tower else spec_param_count())
