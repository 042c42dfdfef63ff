"""The one table between HF/torch tensor names and layouts and our params (SPEC §6).

Each `TensorRule` maps one of our param leaves to the HF tensor(s) it is made of, with the HF shapes
expected and the layout change both ways. The loader, the writer and (later) the converter all read
this table; nothing else knows a tensor name.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from twotower_jax.config import ATTENTION, MAMBA, MLP, MOE, NemotronHConfig

ParamPath = tuple[str, ...]


def get_path(tree, path: ParamPath):
    """The leaf (or subtree) of a nested dict at `path`."""
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: ParamPath, value) -> None:
    """Sets `value` at `path` in a nested dict, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _transpose(arrays):
    return arrays[0].T


def _untranspose(array):
    return [array.T]


def _identity(arrays):
    return arrays[0]


def _unidentity(array):
    return [array]


def _conv_to_ours(arrays):       # torch [C, 1, K] -> ours (K, C)
    return arrays[0][:, 0, :].T


def _conv_to_hf(array):
    return [array.T[:, None, :]]


def _stack_transposed(arrays):   # E × torch [out, in] -> ours (E, in, out)
    return np.stack([a.T for a in arrays])


def _unstack_transposed(array):
    return [a.T for a in array]


_KINDS: dict[str, tuple[Callable, Callable]] = {
    "copy": (_identity, _unidentity),
    "linear": (_transpose, _untranspose),
    "conv": (_conv_to_ours, _conv_to_hf),
    "stacked_linear": (_stack_transposed, _unstack_transposed),
}


@dataclasses.dataclass(frozen=True)
class TensorRule:
    path: ParamPath                            # our param leaf
    hf_names: tuple[str, ...]                  # the HF tensor(s) it is built from
    hf_shapes: tuple[tuple[int, ...], ...]     # their expected shapes
    kind: str                                  # a key of _KINDS

    def to_ours(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return _KINDS[self.kind][0](list(arrays))

    def to_hf(self, array: np.ndarray) -> list[np.ndarray]:
        return _KINDS[self.kind][1](array)


def tower_rules(config: NemotronHConfig, hf_prefix: str = "backbone.", head_name: str = "lm_head.weight",
                path_prefix: ParamPath = ()) -> list[TensorRule]:
    """Rules for one tower whose tensors are named `{hf_prefix}...` with its LM head at `head_name`."""
    c = config
    d, v = c.hidden_size, c.vocab_size
    rules: list[TensorRule] = []

    def add(path: ParamPath, names, shapes, kind):
        names = (names,) if isinstance(names, str) else tuple(names)
        shapes = (shapes,) if isinstance(shapes[0], int) else tuple(shapes)
        rules.append(TensorRule(path_prefix + path, names, shapes, kind))

    add(("embeddings", "embedding"), f"{hf_prefix}embeddings.weight", (v, d), "copy")
    add(("norm_f", "weight"), f"{hf_prefix}norm_f.weight", (d,), "copy")
    add(("lm_head", "kernel"), head_name, (v, d), "linear")
    for i, layer_type in enumerate(c.pattern):
        hf = f"{hf_prefix}layers.{i}."
        ours = (f"layers_{i}",)
        mixer = ours + ("mixer",)
        add(ours + ("norm", "weight"), hf + "norm.weight", (d,), "copy")
        if layer_type == MAMBA:
            inner, h = c.mamba_intermediate_size, c.mamba_num_heads
            add(mixer + ("in_proj", "kernel"), hf + "mixer.in_proj.weight", (c.mamba_in_proj_size, d), "linear")
            add(mixer + ("conv1d", "kernel"), hf + "mixer.conv1d.weight", (c.conv_dim, 1, c.conv_kernel), "conv")
            if c.use_conv_bias:
                add(mixer + ("conv1d", "bias"), hf + "mixer.conv1d.bias", (c.conv_dim,), "copy")
            for name in ("A_log", "D", "dt_bias"):
                add(mixer + (name,), hf + f"mixer.{name}", (h,), "copy")
            add(mixer + ("norm", "weight"), hf + "mixer.norm.weight", (inner,), "copy")
            add(mixer + ("out_proj", "kernel"), hf + "mixer.out_proj.weight", (d, inner), "linear")
        elif layer_type == ATTENTION:
            q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
            for name, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                add(mixer + (name, "kernel"), hf + f"mixer.{name}.weight", (out, d), "linear")
            add(mixer + ("o_proj", "kernel"), hf + "mixer.o_proj.weight", (d, q), "linear")
        elif layer_type == MOE:
            e, f, fs = c.n_routed_experts, c.moe_intermediate_size, c.moe_shared_expert_intermediate_size
            add(mixer + ("gate_weight",), hf + "mixer.gate.weight", (e, d), "copy")
            add(mixer + ("e_score_correction_bias",), hf + "mixer.gate.e_score_correction_bias", (e,), "copy")
            add(mixer + ("experts_up",), [hf + f"mixer.experts.{j}.up_proj.weight" for j in range(e)],
                [(f, d)] * e, "stacked_linear")
            add(mixer + ("experts_down",), [hf + f"mixer.experts.{j}.down_proj.weight" for j in range(e)],
                [(d, f)] * e, "stacked_linear")
            add(mixer + ("shared_experts", "up_proj", "kernel"), hf + "mixer.shared_experts.up_proj.weight",
                (fs, d), "linear")
            add(mixer + ("shared_experts", "down_proj", "kernel"), hf + "mixer.shared_experts.down_proj.weight",
                (d, fs), "linear")
        elif layer_type == MLP:
            f = c.intermediate_size
            add(mixer + ("up_proj", "kernel"), hf + "mixer.up_proj.weight", (f, d), "linear")
            add(mixer + ("down_proj", "kernel"), hf + "mixer.down_proj.weight", (d, f), "linear")
    return rules


def adaln_rules(config: NemotronHConfig, path_prefix: ParamPath = ("denoiser",)) -> list[TensorRule]:
    """The denoiser's timestep conditioning: t_embedder, t_block and one scale_shift_table per layer."""
    d = config.hidden_size
    emb = 256  # the sinusoid width (layers/adaln.py)
    rules = [
        TensorRule(path_prefix + ("t_embedder", "mlp_0", "kernel"), ("t_embedder.mlp.0.weight",), ((d, emb),), "linear"),
        TensorRule(path_prefix + ("t_embedder", "mlp_0", "bias"), ("t_embedder.mlp.0.bias",), ((d,),), "copy"),
        TensorRule(path_prefix + ("t_embedder", "mlp_2", "kernel"), ("t_embedder.mlp.2.weight",), ((d, d),), "linear"),
        TensorRule(path_prefix + ("t_embedder", "mlp_2", "bias"), ("t_embedder.mlp.2.bias",), ((d,),), "copy"),
        TensorRule(path_prefix + ("t_block_1", "kernel"), ("t_block.1.weight",), ((3 * d, d),), "linear"),
        TensorRule(path_prefix + ("t_block_1", "bias"), ("t_block.1.bias",), ((3 * d,),), "copy"),
    ]
    rules += [TensorRule(path_prefix + (f"layers_{i}", "scale_shift_table"), (f"scale_shift_tables.{i}",),
                         ((3, d),), "copy") for i in range(config.num_layers)]
    return rules


def group_of(path: ParamPath) -> ParamPath:
    """The group a param belongs to (saved, streamed and sharded together): its layer or top-level
    module, per tower."""
    return path[:2] if path[0] in ("context", "denoiser") else path[:1]


def two_tower_rules(config: NemotronHConfig) -> list[TensorRule]:
    """The release's TwoTower layout (SPEC §6), each group's rules contiguous (a layer's adaLN table
    comes with the rest of that layer)."""
    rules = (tower_rules(config, "context_tower.", "context_lm_head.weight", ("context",))
             + tower_rules(config, "denoiser_tower.", "lm_head.weight", ("denoiser",))
             + adaln_rules(config))
    first_seen: dict[ParamPath, int] = {}
    return sorted(rules, key=lambda r: first_seen.setdefault(group_of(r.path), len(first_seen)))


# Tensors kept in float32 whatever the requested dtype (router bias; the release stores it in fp32).
FLOAT32_PATHS_SUFFIXES = (("e_score_correction_bias",),)


def keeps_float32(path: ParamPath) -> bool:
    return any(path[-len(s):] == s for s in FLOAT32_PATHS_SUFFIXES)
