"""Nemotron-H architecture config: one frozen dataclass, built from a HF `config.json` or a preset.

The layer pattern string is the single source of truth for which layer is which:
`M` Mamba-2, `E` mixture of experts, `*` attention, `-` dense MLP.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

MAMBA, MOE, ATTENTION, MLP = "M", "E", "*", "-"
LAYER_TYPES = (MAMBA, MOE, ATTENTION, MLP)

# HF `layers_block_type` names (current and legacy) -> pattern letters.
_HF_BLOCK_TYPE_TO_LETTER = {
    "linear_attention": MAMBA,
    "mamba": MAMBA,
    "moe": MOE,
    "full_attention": ATTENTION,
    "attention": ATTENTION,
    "mlp": MLP,
}
_LETTER_TO_HF_BLOCK_TYPE = {MAMBA: "linear_attention", MOE: "moe", ATTENTION: "full_attention", MLP: "mlp"}


# What transformers assumes for a field absent from config.json (its NemotronHConfig defaults), so that
# a config.json describes the same model here as there. vocab_size and hidden_size are required.
_HF_DEFAULTS = dict(
    layer_norm_epsilon=1e-5, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    mamba_num_heads=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
    use_conv_bias=True, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=7688,
    moe_shared_expert_intermediate_size=7688, routed_scaling_factor=1.0, norm_topk_prob=True, n_group=1,
    topk_group=1, intermediate_size=21504, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
# Older config.json spellings of the same fields.
_HF_ALIASES = {"n_groups": "mamba_n_groups", "conv_kernel": "mamba_d_conv", "chunk_size": "mamba_chunk_size"}


class ConfigError(ValueError):
    """A config that does not describe a model this package can build."""


@dataclasses.dataclass(frozen=True)
class NemotronHConfig:
    """Architecture of one Nemotron-H tower (SPEC §2). Field names follow HF's `config.json`.

    Defaults are Nemotron-3-Nano-30B-A3B's values (see `nano_30b_a3b`), not transformers' defaults.
    """

    vocab_size: int
    hidden_size: int
    pattern: str
    layer_norm_epsilon: float = 1e-5
    # attention (`*`)
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    # Mamba-2 (`M`)
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    # Optional lower bound on dt after softplus. NVIDIA/Megatron/mamba_ssm use none; HF's prefill clamps
    # at `time_step_min`, which is why this is off unless set explicitly (SPEC §8).
    dt_floor: float | None = None
    # MoE (`E`)
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1856
    moe_shared_expert_intermediate_size: int = 3712
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    # dense MLP (`-`)
    intermediate_size: int = 1856
    # special tokens
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def mamba_intermediate_size(self) -> int:
        """I = heads × head_dim."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the depthwise conv: x (I) | B (G·N) | C (G·N)."""
        return self.mamba_intermediate_size + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_size(self) -> int:
        """in_proj output: z (I) | xBC (I + 2GN) | dt (H)."""
        return self.mamba_intermediate_size + self.conv_dim + self.mamba_num_heads

    def layer_indices(self, layer_type: str) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.pattern) if t == layer_type)

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        need(isinstance(self.pattern, str) and len(self.pattern) > 0, "pattern must be a non-empty string")
        bad = sorted({c for c in self.pattern if c not in LAYER_TYPES})
        need(not bad, f"pattern {self.pattern!r} has unknown layer letters {bad}; allowed: M (Mamba-2), "
                      "E (MoE), * (attention), - (dense MLP)")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel",
                     "chunk_size", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "intermediate_size", "n_group", "topk_group"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(self.moe_shared_expert_intermediate_size >= 0, "moe_shared_expert_intermediate_size must be >= 0")
        need(self.layer_norm_epsilon > 0, f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
             f"({self.num_key_value_heads})")
        need(self.mamba_num_heads % self.n_groups == 0,
             f"mamba_num_heads ({self.mamba_num_heads}) must be divisible by n_groups ({self.n_groups})")
        need(self.conv_kernel >= 2, f"conv_kernel must be >= 2, got {self.conv_kernel}")
        need(self.num_experts_per_tok <= self.n_routed_experts,
             f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts ({self.n_routed_experts})")
        need(self.n_routed_experts % self.n_group == 0,
             f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})")
        need(self.topk_group <= self.n_group, f"topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        if self.n_group > 1:
            need(self.n_routed_experts // self.n_group >= 2, "group-limited routing needs >= 2 experts per group")
            need(self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
                 "num_experts_per_tok exceeds the experts available in topk_group groups")
        need(self.dt_floor is None or self.dt_floor >= 0, f"dt_floor must be None or >= 0, got {self.dt_floor}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            need(0 <= value < self.vocab_size, f"{name} ({value}) is outside the vocabulary [0, {self.vocab_size})")

    # ---- HF config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], **overrides) -> "NemotronHConfig":
        """Builds the config from a parsed Nemotron-H `config.json`.

        Accepts the layer pattern as `hybrid_override_pattern` or as a `layers_block_type` list, and
        infinities written as `{"__float__": "Infinity"}`. Unsupported architecture options raise.
        """
        d = _decode_special_floats(dict(raw))
        pattern = _pattern_from_hf(d)
        n_layers = d.get("num_hidden_layers")
        if n_layers is not None and "hybrid_override_pattern" in d and n_layers != len(pattern):
            raise ConfigError(f"num_hidden_layers ({n_layers}) does not match the length of "
                              f"hybrid_override_pattern ({len(pattern)}: {pattern!r})")
        if d.get("tie_word_embeddings", False):
            raise ConfigError("tie_word_embeddings=True is not supported: Nemotron-H has an untied LM head")
        for key, allowed in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
            if d.get(key, allowed) != allowed:
                raise ConfigError(f"{key}={d[key]!r} is not supported (only {allowed!r})")
        for key in ("use_bias", "mamba_proj_bias", "attention_bias", "mlp_bias"):
            if d.get(key, False):
                raise ConfigError(f"{key}=True is not supported: Nemotron-H projections have no bias")
        if d.get("moe_latent_size") is not None:
            raise ConfigError("moe_latent_size is not supported (Nemotron-3-Nano has no MoE latent projection)")
        if d.get("n_shared_experts", 1) != 1:
            raise ConfigError(f"n_shared_experts={d['n_shared_experts']} is not supported (only 1)")
        fields = {name: _hf_field(d, name, default) for name, default in _HF_DEFAULTS.items()}
        if isinstance(fields["eos_token_id"], (list, tuple)):  # several EOS ids: the first stops generation
            fields["eos_token_id"] = fields["eos_token_id"][0]
        fields.update(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], pattern=pattern,
                      routed_scaling_factor=float(fields["routed_scaling_factor"]))
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides) -> "NemotronHConfig":
        with open(path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_hf_dict(raw, **overrides)
        except KeyError as e:
            raise ConfigError(f"{path}: required field {e.args[0]!r} is missing") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` fields of this config (what `save_pretrained` would write)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("pattern", "dt_floor")}
        d.update(
            architectures=["NemotronHForCausalLM"],
            model_type="nemotron_h",
            layers_block_type=[_LETTER_TO_HF_BLOCK_TYPE[c] for c in self.pattern],
            tie_word_embeddings=False,
            mlp_hidden_act="relu2",
            mamba_hidden_act="silu",
            use_bias=False,
            mamba_proj_bias=False,
            attention_bias=False,
            mlp_bias=False,
            n_shared_experts=1,
            # No dt clamp in our model unless dt_floor is set; tell HF the same.
            time_step_limit=[0.0, float("inf")],
        )
        return d

    def replace(self, **changes) -> "NemotronHConfig":
        return dataclasses.replace(self, **changes)


def encode_special_floats(obj):
    """inf/nan → `{"__float__": "Infinity"}` as HF writes them, so config.json stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj).replace("inf", "Infinity").replace("nan", "NaN")}
    if isinstance(obj, dict):
        return {k: encode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_special_floats(v) for v in obj]
    return obj


def _hf_field(d: Mapping[str, Any], name: str, default):
    for key in (name, _HF_ALIASES.get(name)):
        if key is not None and d.get(key) is not None:
            return d[key]
    return default


def _decode_special_floats(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {k: _decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_special_floats(v) for v in obj]
    return obj


def _pattern_from_hf(d: Mapping[str, Any]) -> str:
    if "hybrid_override_pattern" in d and d["hybrid_override_pattern"] is not None:
        pattern = d["hybrid_override_pattern"]
        if not isinstance(pattern, str):
            raise ConfigError(f"hybrid_override_pattern must be a string, got {type(pattern).__name__}")
        return pattern
    block_types = d.get("layers_block_type")
    if block_types is None:
        raise ConfigError("config has neither hybrid_override_pattern nor layers_block_type")
    if not isinstance(block_types, list):
        raise ConfigError(f"layers_block_type must be a list, got {type(block_types).__name__}")
    unknown = sorted({t for t in block_types if t not in _HF_BLOCK_TYPE_TO_LETTER})
    if unknown:
        raise ConfigError(f"layers_block_type has unknown layer types {unknown}; "
                          f"allowed: {sorted(_HF_BLOCK_TYPE_TO_LETTER)}")
    return "".join(_HF_BLOCK_TYPE_TO_LETTER[t] for t in block_types)


# ---- presets -------------------------------------------------------------------------------------
NANO_30B_A3B_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


def nano_30b_a3b() -> NemotronHConfig:
    """Nemotron-3-Nano-30B-A3B, the backbone of both TwoTower towers (SPEC §2): the field defaults."""
    return NemotronHConfig(vocab_size=131072, hidden_size=2688, pattern=NANO_30B_A3B_PATTERN)


def tiny(pattern: str = "ME*-M*E", **overrides) -> NemotronHConfig:
    """A few-thousand-parameter config with every layer type, n_groups > 1 and GQA, for tests and demos."""
    fields = dict(
        vocab_size=96, hidden_size=32, pattern=pattern, layer_norm_epsilon=1e-5,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, conv_kernel=4, chunk_size=8,
        n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24, routed_scaling_factor=2.5, norm_topk_prob=True,
        n_group=1, topk_group=1, intermediate_size=20,
    )
    fields.update(overrides)
    return NemotronHConfig(**fields)
