"""Running a sampler on a placement (`twotower_jax.sharding`): compiled whole, or as per-tower pieces.

`single` and `sharded` compile the whole generation loop as one program over the placement's mesh,
params in with their `NamedSharding`s, outputs replicated. `towers` runs per-tower compiled pieces with
explicit transfers between them (see `ar.py` / `diffusion.py` for why); `compile_pieces` compiles those
ahead of time so compile time is never counted as run time.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax

from twotower_jax.sampling.timing import compile_and_run, compiled_for
from twotower_jax.sharding import Placement, param_shardings, place_params, replicated


@functools.lru_cache(maxsize=None)
def _placed_jit(loop: Callable, statics: tuple, placement: Placement, mesh: jax.sharding.Mesh, treedef,
                leaf_specs: tuple, n_inputs: int):
    # One jitted object per (loop, static arguments, placement, param structure): jax caches the
    # lowering and compilation on that object, so a repeat call compiles nothing.
    shapes = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaf_specs])
    rep = replicated(mesh)
    return jax.jit(functools.partial(loop, **dict(statics)),
                   in_shardings=(param_shardings(shapes, placement, mesh),) + (rep,) * n_inputs,
                   out_shardings=rep)


def run_placed(loop: Callable, placement: Placement, mesh: jax.sharding.Mesh, params, *inputs, **statics):
    """Runs `loop(params, *inputs, **statics)` compiled over `mesh`: params placed by the placement's rules,
    the other inputs and every output replicated. Returns (outputs, compile_seconds, run_seconds)."""
    params = place_params(params, placement, mesh)
    leaves, treedef = jax.tree.flatten(params)
    fn = _placed_jit(loop, tuple(sorted(statics.items())), placement, mesh, treedef,
                     tuple((leaf.shape, leaf.dtype) for leaf in leaves), len(inputs))
    with jax.set_mesh(mesh):  # the expert_parallel MoE finds its mesh axis here while tracing
        return compile_and_run(fn, params, *inputs)


def on(tree, sharding):
    """Abstract copies of `tree`'s leaves (arrays or structs) placed on `sharding`, for ahead-of-time lowering."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def compile_pieces(*pieces):
    """`pieces`: (jitted, args) pairs. Returns ([compiled], seconds) — compiled ahead of time from the args
    (arrays or `on(...)` structs; kept for repeat calls), so the generation loop that follows runs only."""
    compiled = [compiled_for(jitted, *args) for jitted, args in pieces]
    return [c for c, _ in compiled], sum(seconds for _, seconds in compiled)


def placed_model(model, placement: Placement):
    """The model as the placement runs it: `sharded` splits routed experts with the expert_parallel MoE
    dispatch; `towers` keeps each tower on one device, where that dispatch has no mesh axis to use."""
    if placement.kind == "sharded" and model.impl.moe != "expert_parallel":
        return dataclasses.replace(model, impl=dataclasses.replace(model.impl, moe="expert_parallel"))
    if placement.kind == "towers" and model.impl.moe == "expert_parallel":
        raise ValueError("the expert_parallel MoE dispatch splits experts over devices; use it with the "
                         "'sharded' placement, not 'towers' (each tower there lives on one device)")
    return model
