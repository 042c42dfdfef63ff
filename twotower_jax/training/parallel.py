"""What the training step (`loop.make_train_step`) needs on a mesh: trainable params, their AdamW state and the frozen tower sharded by one
rules table, the batch split over `data`, gradient accumulation, donated state.

Layout (`TRAIN_PLACEMENT`): the inference `sharded` rules (`twotower_jax.sharding.RULES`: routed experts
over `expert`, dense weights over `expert` × `tensor`) plus FSDP — every param's `embed` dimension split
over `data` — for the trainable params, their optimizer moments (which mirror the params, so the same
path-suffix rules place them) and the frozen context tower alike. Batch rows go over `data`. XLA's SPMD
partitioner inserts the gathers and reduce-scatters; nothing here names a collective.

Gradient accumulation splits the batch into `grad_accum` micro-batches (rows i, i + k, i + 2k, … for
micro-batch i of k, so each one stays spread over `data`) and averages their gradients weighted by each
micro-batch's loss weight: a loss that averages over a varying number of positions reports it as
`metrics["loss_weight"]` (default: equal weights), so k micro-batches give the gradient of the whole
batch's loss, not a mean of means. Each micro-batch gets the step's key folded with its index.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from twotower_jax import sharding

# The inference `sharded` rules plus FSDP: each param's `embed` dimension over `data`.
TRAIN_PLACEMENT = sharding.Placement(
    "sharded", tuple(sorted({**sharding.RULES["sharded"], "embed": sharding.DATA_AXIS}.items())))
LOSS_WEIGHT = "loss_weight"


def train_mesh(devices=None, *, n_devices: Optional[int] = None, data: int = 1, tensor: int = 1) -> Mesh:
    """A (data, expert, tensor) mesh for training: `data`-way data parallel (and FSDP), the rest of the
    devices split experts (and dense weights) over `expert` × `tensor`."""
    return sharding.make_mesh("sharded", devices, n_devices=n_devices, data=data, tensor=tensor)


def state_shardings(tree, mesh: Mesh):
    """Shardings for params, optimizer state or the frozen tower (arrays or `jax.eval_shape` structs):
    each leaf by the logical axes its path ends with (optimizer moments end with their param's path)."""
    return sharding.param_shardings(tree, TRAIN_PLACEMENT, mesh)


def batch_shardings(batch, mesh: Mesh):
    """A batch (an array or a tuple of arrays, rows first) split over `data`."""
    rows = jax.tree.leaves(batch)[0].shape[0]
    return sharding.batch_shardings(batch, mesh, rows)


def accumulated_grads(loss_fn, params, frozen, batch, rng, grad_accum: int):
    """(gradient, metrics) of `loss_fn` over `batch` in `grad_accum` micro-batches (module docstring)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (_, metrics), grads = grad_fn(params, frozen, batch, rng)
        return grads, metrics

    def micro(i):   # rows i, i + k, i + 2k, ... (i may be traced)
        return jax.tree.map(lambda x: jnp.take(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]),
                                               i, axis=1), batch)

    def body(carry, i):
        grads_sum, metrics_sum, weight_sum = carry
        (_, metrics), grads = grad_fn(params, frozen, micro(i), jax.random.fold_in(rng, i))
        weight = jnp.asarray(metrics.get(LOSS_WEIGHT, 1.0), jnp.float32)
        grads_sum = jax.tree.map(lambda a, g: a + weight * g, grads_sum, grads)
        metrics_sum = jax.tree.map(lambda a, m: a + weight * m, metrics_sum, metrics)
        return (grads_sum, metrics_sum, weight_sum + weight), None

    first_metrics = jax.eval_shape(lambda: grad_fn(params, frozen, micro(0), rng)[0][1])
    zeros = (jax.tree.map(jnp.zeros_like, params),
             jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), first_metrics), jnp.float32(0))
    (grads, metrics, weight), _ = jax.lax.scan(body, zeros, jnp.arange(grad_accum))
    grads = jax.tree.map(lambda g: g / weight, grads)
    metrics = jax.tree.map(lambda m: m / weight, metrics)
    if LOSS_WEIGHT in metrics:
        metrics[LOSS_WEIGHT] = weight
    return grads, metrics


def check_grad_accum(grad_accum: int, batch_rows: int, mesh: Optional[Mesh] = None) -> None:
    data = dict(mesh.shape).get(sharding.DATA_AXIS, 1) if mesh is not None else 1
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum must be an integer >= 1, got {grad_accum!r}")
    if batch_rows % (grad_accum * data):
        raise ValueError(f"batch of {batch_rows} rows does not split into grad_accum={grad_accum} micro-batches "
                         f"over data={data} devices (needs a multiple of {grad_accum * data})")


def place_train_state(params, opt_state, frozen, mesh: Mesh):
    """params, optimizer state and the frozen tower put onto their training shardings."""
    return (jax.device_put(params, state_shardings(params, mesh)),
            jax.device_put(opt_state, state_shardings(opt_state, mesh)),
            jax.device_put(frozen, state_shardings(frozen, mesh)) if frozen is not None else None)


def per_device_bytes(tree, mesh: Mesh) -> dict[Any, int]:
    """Bytes each device holds of `tree` under the training layout (from the shardings; nothing allocated)."""
    return sharding.param_bytes_per_device(tree, TRAIN_PLACEMENT, mesh)
