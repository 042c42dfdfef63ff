"""Auxiliary-loss-free load balancing of the MoE routers during training, as Megatron-LM does it
(`moe_router_enable_expert_bias`, `get_updated_expert_bias`; DeepSeek-V3's scheme, arXiv 2408.15664):
after every step each router's `e_score_correction_bias` moves by

    rate · sign(mean load − load_e)          (load_e: tokens routed to expert e in the global batch)

so under-used experts become more likely to be chosen and over-used ones less. The bias only decides
which experts are chosen (the mixing weights are the unbiased scores, SPEC §2), so it gets no gradient
and the optimizer never moves it; this update does. Megatron all-reduces the counts over its
tensor × context × data groups; here the step is one SPMD program over the global batch, so the counts
already are global. Megatron's default rate when enabled is 1e-3.

The MoE layer records its load (`tokens_per_expert`, (E,) float32: assignments, top-k per token) in
Flax's "intermediates" collection; `expert_loads` collects it from an `apply(..., mutable=...)`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

LOAD_NAME = "tokens_per_expert"
BIAS_NAME = "e_score_correction_bias"
METRIC = "expert_load"   # the key a loss reports its loads under


def expert_loads(intermediates) -> dict[tuple[str, ...], jax.Array]:
    """{module path of the MoE layer (e.g. ("layers_2", "mixer")): its load (E,)} from an intermediates
    collection (each recorded call's load summed)."""
    loads = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
        keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if LOAD_NAME in keys:
            layer = keys[:keys.index(LOAD_NAME)]
            loads[layer] = loads.get(layer, 0) + leaf
    return loads


def load_metrics(loads: dict) -> dict[str, jax.Array]:
    """Scalars for the metrics log: the most and least loaded expert over the mean load, averaged over
    the MoE layers (1.0 and 1.0 when perfectly balanced)."""
    if not loads:
        return {}
    stacked = jnp.stack([jnp.asarray(v, jnp.float32) for v in loads.values()])     # (layers, E)
    mean = jnp.maximum(stacked.mean(-1), 1e-9)
    return {"expert_load_max_over_mean": (stacked.max(-1) / mean).mean(),
            "expert_load_min_over_mean": (stacked.min(-1) / mean).mean()}


def update_expert_bias(params: Any, loads: dict, rate: float) -> Any:
    """`params` with every recorded MoE layer's `e_score_correction_bias` moved by
    rate · sign(mean load − load) (see the module docstring); other leaves untouched."""
    params = jax.tree.map(lambda x: x, params)   # a new tree (dict copies), leaves shared

    def copy_path(tree, keys):
        node = tree
        for key in keys:
            node[key] = dict(node[key])
            node = node[key]
        return node

    for layer, load in loads.items():
        node = copy_path(params, layer)
        if BIAS_NAME not in node:
            raise KeyError(f"no {BIAS_NAME} under {'/'.join(layer)} for a recorded expert load")
        load = jnp.asarray(load, jnp.float32)
        offset = load.mean() - load
        node[BIAS_NAME] = (node[BIAS_NAME] + rate * jnp.sign(offset)).astype(node[BIAS_NAME].dtype)
    return params
