"""Where params and caches live: meshes and `NamedSharding`s for the three placements.

Placements (all on at most 2 devices, SPEC §4's `place_towers_on_devices` is `towers`):

* `single`  – everything on one device (a 1-device mesh).
* `towers`  – the context tower, its LM head and its cache on device 0; the denoiser on device 1 (the
  denoiser reads a copy of the context cache sent to its device). Memory is split, work is not: the
  context tower and the denoiser run one after the other (SPEC §4.1), so this is for models that do
  not fit on one device, not for speed.
* `sharded` – both towers on both devices, each tower's routed experts split over the mesh axis
  `expert` (the `expert_parallel` MoE dispatch) and its embeddings and LM head split along the
  vocabulary; everything else, caches included, replicated. The vocabulary split measured within noise
  of experts-only on CPU (experiments/results/sampler_cpu.md); it is in the table for memory (the real
  embeddings + LM head are ≈1.4 GB per BF16 tower).

The only place that decides a sharding is `RULES` (placement → logical axis → mesh axis) read through
`PARAM_LOGICAL_AXES` (param leaf → logical axes). A placement is a name, or a `Placement` with its own
rules (the benchmarks use that to measure a rule before it goes into the table).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from twotower_jax.layers.moe import EXPERT_AXIS

TOWER_AXIS = "tower"
SHARD_AXIS = EXPERT_AXIS  # the expert_parallel MoE looks its mesh axis up by this name

# Logical axes of each param leaf, matched on the end of its path; a leaf not listed has none
# (replicated). Attention, Mamba and norm params are small next to the experts and the vocabulary.
PARAM_LOGICAL_AXES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("experts_up",), ("expert", "embed", "mlp")),          # (E, D, F)
    (("experts_down",), ("expert", "mlp", "embed")),        # (E, F, D)
    (("embeddings", "embedding"), ("vocab", "embed")),      # (V, D)
    (("lm_head", "kernel"), ("embed", "vocab")),            # (D, V)
)
# The logical axis "tower" indexes the top-level key of a TwoTower param tree (a single tower is "context").
TOWERS = ("context", "denoiser")

# THE table: per placement, which mesh axis each logical axis is split over (absent: not split).
RULES: dict[str, dict[str, str]] = {
    "single": {},
    "towers": {"tower": TOWER_AXIS},
    "sharded": {"expert": SHARD_AXIS, "vocab": SHARD_AXIS},
}
MESH_AXIS = {"single": SHARD_AXIS, "towers": TOWER_AXIS, "sharded": SHARD_AXIS}
DEVICES_NEEDED = {"single": 1, "towers": 2, "sharded": 2}
PLACEMENTS = tuple(RULES)


@dataclasses.dataclass(frozen=True)
class Placement:
    """A placement kind (`single` | `towers` | `sharded`) with its logical → mesh axis rules (hashable)."""
    kind: str
    rules: tuple[tuple[str, str], ...]

    @property
    def rule_map(self) -> dict[str, str]:
        return dict(self.rules)


PlacementLike = Union[str, Placement]


def resolve(placement: PlacementLike) -> Placement:
    """A `Placement` from a name (rules from `RULES`) or a `Placement` (checked)."""
    kind = placement.kind if isinstance(placement, Placement) else placement
    if kind not in RULES:
        raise ValueError(f"unknown placement {kind!r}; expected one of {', '.join(PLACEMENTS)}")
    if isinstance(placement, Placement):
        return placement
    return Placement(kind, tuple(sorted(RULES[kind].items())))


def make_mesh(placement: PlacementLike, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The mesh of a placement: 1 device for `single`, 2 for `towers` (axis `tower`) and `sharded`
    (axis `expert`). Axes are Auto (not Explicit) so GSPMD propagates the param shardings."""
    p = resolve(placement)
    devices = list(jax.devices() if devices is None else devices)
    need = DEVICES_NEEDED[p.kind]
    if len(devices) < need:
        platform = devices[0].platform if devices else "none"
        raise ValueError(
            f"placement {p.kind!r} needs {need} devices, found {len(devices)} ({platform}); on CPU run with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={need}")
    return Mesh(np.array(devices[:need]), (MESH_AXIS[p.kind],),
                axis_types=(jax.sharding.AxisType.Auto,))


def tower_mesh(mesh: Mesh, tower: str) -> Mesh:
    """The 1-device mesh holding `tower` ("context" → device 0, "denoiser" → device 1 of a towers mesh;
    the only device of a 1-device mesh). It is `single`'s mesh on that device, so a tower's work there
    compiles to the same program as on `single`."""
    if tower not in TOWERS:
        raise ValueError(f"unknown tower {tower!r}; expected one of {TOWERS}")
    devices = mesh.devices.reshape(-1)
    index = TOWERS.index(tower) if len(devices) > 1 else 0
    return make_mesh("single", devices[index:index + 1])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def logical_axes(path: Sequence[str]) -> tuple[Optional[str], ...] | None:
    """The logical axes of the param leaf at `path` (None: a leaf without split-able axes)."""
    path = tuple(path)
    for suffix, axes in PARAM_LOGICAL_AXES:
        if path[-len(suffix):] == suffix:
            return axes
    return None


def param_sharding(path: Sequence[str], shape: Sequence[int], placement: PlacementLike, mesh: Mesh
                   ) -> NamedSharding:
    """The sharding of one param leaf. `path` is its key path (e.g. ("denoiser", "layers_1", "mixer",
    "experts_up")); a path without a tower key is a single tower, placed as the context tower."""
    p = resolve(placement)
    rules = p.rule_map
    if TOWER_AXIS in rules.values():
        tower = path[0] if path and path[0] in TOWERS else "context"
        return replicated(tower_mesh(mesh, tower))
    axes = logical_axes(path)
    if axes is None:
        return replicated(mesh)
    if len(axes) != len(shape):
        raise ValueError(f"param {'/'.join(path)} has shape {tuple(shape)}, expected logical axes {axes}")
    spec = []
    for axis, size in zip(axes, shape):
        mesh_axis = rules.get(axis)
        # A dimension that does not divide evenly stays whole (e.g. an odd vocabulary).
        spec.append(mesh_axis if mesh_axis is not None and size % mesh.shape[mesh_axis] == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*spec))


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_shardings(params, placement: PlacementLike, mesh: Mesh):
    """A tree of `NamedSharding`s like `params` (arrays or `jax.eval_shape` structs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: param_sharding(_keys(path), leaf.shape, placement, mesh), params)


def place_params(params, placement: PlacementLike, mesh: Mesh):
    """`params` put onto the placement's shardings (leaves already there are not copied)."""
    return jax.device_put(params, param_shardings(params, placement, mesh))


def sharding_for(placement: PlacementLike, mesh: Mesh) -> Callable[[tuple, jax.ShapeDtypeStruct], NamedSharding]:
    """For `restore_orbax_checkpoint(dir, sharding_for(...))`: each array restored straight onto its device(s)."""
    resolve(placement)
    return lambda path, struct: param_sharding(path, struct.shape, placement, mesh)


def cache_shardings(cache, placement: PlacementLike, mesh: Mesh, tower: str = "context"):
    """Shardings for a cache pytree: replicated over the placement's mesh; for `towers`, on `tower`'s
    device (the context cache lives with the context tower; the denoiser reads a copy on its own)."""
    p = resolve(placement)
    where = tower_mesh(mesh, tower) if p.kind == "towers" else mesh
    return jax.tree.map(lambda _: replicated(where), cache)


def devices_of(tree) -> set:
    """Every device any leaf of `tree` has a shard on (for checks and tests)."""
    return set().union(*(leaf.sharding.device_set for leaf in jax.tree.leaves(tree)))


def describe(placement: PlacementLike, mesh: Mesh) -> Mapping[str, str]:
    """A short human-readable summary (for benchmark tables and logs)."""
    p = resolve(placement)
    return {"placement": p.kind, "rules": ",".join(f"{a}->{m}" for a, m in p.rules) or "-",
            "devices": ",".join(str(d.id) for d in mesh.devices.reshape(-1))}
