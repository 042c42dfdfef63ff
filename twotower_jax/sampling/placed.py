"""Running a sampler on a placement (`twotower_jax.sharding`): compiled whole, or as per-tower pieces.

`single` and `sharded` compile the whole generation loop as one program over the placement's mesh,
params in with their `NamedSharding`s, batch inputs split over the mesh's `data` axis (when the batch
divides), outputs replicated. `towers` runs per-tower compiled pieces, each on its tower's group of
devices, with explicit transfers between them (see `ar.py` / `diffusion.py` for why); `compile_pieces`
compiles those ahead of time so compile time is never counted as run time.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import time
import weakref
from typing import Callable, NamedTuple, Optional

import jax
import numpy as np

from twotower_jax.sampling.timing import compile_and_run, compiled_for, signature
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


# Host-side fast path. A generation call used to place the params (`device_put` over every leaf, a no-op
# copy-wise but ~100 leaves of Python work), derive their shardings and the compiled executable's
# signature from every leaf, each call: 5-15 ms of host time per generation at batch 1 on the 2-core CPU,
# more than the demo model's whole generation (experiments/results/overhead_cpu.md). Now the placed params,
# their signature and the jitted programs are kept per params tree (by the identity of its leaves, checked
# through weak references: an entry dies with the caller's arrays) and per-call work is on the few small
# batch inputs only. `FAST_PATH = False` restores the old per-call path (kept for that comparison).
FAST_PATH = True
_MAX_PLACED = 4


class _Placed:
    """One params tree placed for a (placement, mesh): the placed tree, its compiled-signature part, and the
    jitted programs and input shardings made for it."""

    def __init__(self, placed, refs):
        self.placed, self.refs = placed, refs
        self.signature = signature(placed)
        self.leaf_specs = tuple((leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(placed))
        self.jitted: dict = {}


_placed: "collections.OrderedDict[tuple, _Placed]" = collections.OrderedDict()


def _forget(key, _ref=None):
    _placed.pop(key, None)


def placed_params(params, placement: Placement, mesh: jax.sharding.Mesh) -> _Placed:
    """`place_params(params, placement, mesh)`, kept while the caller's leaves live (`_Placed`)."""
    leaves, treedef = jax.tree.flatten(params)
    key = (placement, mesh, treedef, tuple(map(id, leaves)))
    entry = _placed.get(key)
    if entry is not None and all(ref() is leaf for ref, leaf in zip(entry.refs, leaves)):
        _placed.move_to_end(key)
        return entry
    placed = place_params(params, placement, mesh)
    try:
        refs = tuple(weakref.ref(leaf, functools.partial(_forget, key)) for leaf in leaves)
    except TypeError:   # a leaf without weak references (e.g. a Python scalar): not kept
        return _Placed(placed, ())
    entry = _placed[key] = _Placed(placed, refs)
    if len(_placed) > _MAX_PLACED:
        _placed.popitem(last=False)
    return entry


class TowerGroups(NamedTuple):
    """The `towers` placement's two device groups for one batch: each tower's mesh, its placed params
    (the context tower's tree, and the denoiser's as `{"denoiser": ...}`, the layout `TwoTower`'s denoiser
    functions take) and a function giving a batch tree's shardings on that group."""
    context_mesh: jax.sharding.Mesh
    denoiser_mesh: jax.sharding.Mesh
    context_params: dict
    denoiser_params: dict
    context_at: Callable
    denoiser_at: Callable


def tower_groups(params, mesh: jax.sharding.Mesh, batch: int) -> TowerGroups:
    """Splits `params` over the `towers` mesh's groups (through `placed_params`' cached fast path) and
    gives the per-group batch shardings the per-tower samplers (`ar.py`, `diffusion.py`,
    `speculative.py`) place their inputs and transfers with. `batch`: rows of the generation."""
    context_mesh, denoiser_mesh = tower_mesh(mesh, "context"), tower_mesh(mesh, "denoiser")
    placed = placed_params(params, "towers", mesh).placed
    return TowerGroups(context_mesh, denoiser_mesh, placed["context"], {"denoiser": placed["denoiser"]},
                       lambda tree: batch_shardings(tree, context_mesh, batch),
                       lambda tree: batch_shardings(tree, denoiser_mesh, batch))


def _input_shardings(inputs, mesh):
    batch = inputs[0].shape[0] if inputs and getattr(inputs[0], "ndim", 0) else None
    return tuple(batch_shardings(list(inputs), mesh, batch))


def run_placed(loop: Callable, placement: Placement, mesh: jax.sharding.Mesh, params, *inputs, **statics):
    """Runs `loop(params, *inputs, **statics)` compiled over `mesh`: params placed by the placement's rules,
    inputs whose first dimension is the batch (that of the first input) split over `data`, the other inputs
    and every output replicated. Returns (outputs, compile_seconds, run_seconds)."""
    if not FAST_PATH:
        return _run_placed_legacy(loop, placement, mesh, params, *inputs, **statics)
    entry = placed_params(params, placement, mesh)
    if not entry.refs:
        return _run_placed_legacy(loop, placement, mesh, params, *inputs, **statics)
    input_sig = tuple((np.shape(x), np.result_type(x).str) for x in inputs)
    job = (loop, tuple(sorted(statics.items())), input_sig)
    kept = entry.jitted.get(job)
    if kept is None:
        input_shardings = _input_shardings(inputs, mesh)
        treedef = jax.tree.structure(entry.placed)
        fn = _placed_jit(loop, job[1], placement, mesh, treedef, entry.leaf_specs, input_shardings)
        with jax.set_mesh(mesh):  # the expert_parallel MoE finds its mesh axis here while tracing
            compiled, compile_s = compiled_for(fn, entry.placed, *jax.device_put(inputs, input_shardings))
        kept = entry.jitted[job] = (compiled, input_shardings)
    else:
        compile_s = 0.0
    compiled, input_shardings = kept
    inputs = jax.device_put(inputs, input_shardings)
    start = time.perf_counter()
    outputs = jax.block_until_ready(compiled(entry.placed, *inputs))
    return outputs, compile_s, time.perf_counter() - start


def _run_placed_legacy(loop: Callable, placement: Placement, mesh: jax.sharding.Mesh, params, *inputs, **statics):
    """The per-call path: params placed, shardings and signature derived from every leaf, each call."""
    params = place_params(params, placement, mesh)
    input_shardings = _input_shardings(inputs, mesh)
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
