"""Running a sampler on a placement (`twotower_jax.sharding`): compiled whole, or as per-tower pieces.

`single` and `sharded` compile the whole generation loop as one program over the placement's mesh,
params in with their `NamedSharding`s, batch inputs split over the mesh's `data` axis (when the batch
divides), outputs replicated. `towers` runs per-tower compiled pieces, each on its tower's group of
devices, with explicit transfers between them (see `ar.py` / `diffusion.py` for why); `compile_pieces`
compiles those ahead of time so compile time is never counted as run time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Optional

import jax

from twotower_jax.sampling.timing import compile_and_run, compiled_for
from twotower_jax.sharding import (
    EXPERT_AXIS, Placement, batch_shardings, check_mesh, make_mesh, param_shardings, place_params,
    replicated, tower_mesh)


@functools.lru_cache(maxsize=None)
def _placed_jit(loop: Callable, statics: tuple, placement: Placement, mesh: jax.sharding.Mesh, treedef,
                leaf_specs: tuple, input_shardings: tuple):
    # One jitted object per (loop, static arguments, placement, param structure, input layout): jax caches
    # the lowering and compilation on that object, so a repeat call compiles nothing.
    shapes = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaf_specs])
    return jax.jit(functools.partial(loop, **dict(statics)),
                   in_shardings=(param_shardings(shapes, placement, mesh),) + input_shardings,
                   out_shardings=replicated(mesh))


def run_placed(loop: Callable, placement: Placement, mesh: jax.sharding.Mesh, params, *inputs, **statics):
    """Runs `loop(params, *inputs, **statics)` compiled over `mesh`: params placed by the placement's rules,
    inputs whose first dimension is the batch (that of the first input) split over `data`, the other inputs
    and every output replicated. Returns (outputs, compile_seconds, run_seconds)."""
    params = place_params(params, placement, mesh)
    batch = inputs[0].shape[0] if inputs and getattr(inputs[0], "ndim", 0) else None
    input_shardings = tuple(batch_shardings(list(inputs), mesh, batch))
    inputs = jax.device_put(inputs, input_shardings)
    leaves, treedef = jax.tree.flatten(params)
    fn = _placed_jit(loop, tuple(sorted(statics.items())), placement, mesh, treedef,
                     tuple((leaf.shape, leaf.dtype) for leaf in leaves), input_shardings)
    with jax.set_mesh(mesh):  # the expert_parallel MoE finds its mesh axis here while tracing
        return compile_and_run(fn, params, *inputs)


def on(tree, sharding):
    """Abstract copies of `tree`'s leaves (arrays or structs) placed on `sharding` (one sharding for every
    leaf, or a tree of them like `tree`), for ahead-of-time lowering."""
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding)


def compile_pieces(*pieces):
    """`pieces`: (jitted, args) or (jitted, args, mesh) tuples; a piece with a mesh is traced under
    `jax.set_mesh(mesh)` (where the expert_parallel MoE finds its axis). Returns ([compiled], seconds) —
    compiled ahead of time from the args (arrays or `on(...)` structs; kept for repeat calls), so the
    generation loop that follows runs only."""
    compiled = []
    for jitted, args, *mesh in pieces:
        with jax.set_mesh(mesh[0]) if mesh else contextlib.nullcontext():
            compiled.append(compiled_for(jitted, *args))
    return [c for c, _ in compiled], sum(seconds for _, seconds in compiled)


def placement_mesh(placement: Placement, mesh: Optional[jax.sharding.Mesh]) -> jax.sharding.Mesh:
    """`mesh` checked against the placement, or the placement's default mesh (every visible device)."""
    if mesh is None:
        return make_mesh(placement)
    check_mesh(placement, mesh)
    return mesh


def placed_model(model, placement: Placement, mesh: Optional[jax.sharding.Mesh] = None):
    """The model with the MoE dispatch the placement runs: the expert_parallel dispatch wherever the routed
    experts are split, i.e. the (tower group's) mesh has more than one device on the `expert` axis and the
    expert count divides over them (`sharded`, and `towers` with groups bigger than one device); otherwise
    the model's own dispatch (one device per tower runs it as `single` does). Experts that do not divide
    stay whole on every device (the rules), so there an expert_parallel model falls back to `auto`.
    Without a mesh, `sharded` is taken to split the experts (its 2-device default)."""
    if placement.kind == "single":
        return model
    if mesh is None:
        devices = 2 if placement.kind == "sharded" else 1
    else:
        devices = dict(tower_mesh(mesh, "context").shape).get(EXPERT_AXIS, 1)
    split = devices > 1 and model.config.n_routed_experts % devices == 0
    moe = "expert_parallel" if split else (
        "auto" if model.impl.moe == "expert_parallel" and devices > 1 else model.impl.moe)
    if moe == model.impl.moe:
        return model
    return dataclasses.replace(model, impl=dataclasses.replace(model.impl, moe=moe))
