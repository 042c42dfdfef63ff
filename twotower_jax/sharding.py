"""Where params, caches and batches live: meshes and `NamedSharding`s for the three placements, on any
number of devices.

A mesh has the named axes `data` (batch rows), `expert` and `tensor` (the two model-parallel axes), all
Auto (GSPMD propagates the param shardings through the program, SPEC §9). Placements on N devices:

* `single`  – everything on one device (a 1-device mesh).
* `sharded` – both towers over all N devices: mesh (data, expert, tensor) = (d, N / (d·t), t). Routed
  experts are split over `expert` (the `expert_parallel` MoE dispatch); the dense weights (embeddings and
  LM head along the vocabulary, Mamba in/out projections, attention q/o projections, shared-expert and
  dense-MLP up/down, the denoiser's adaLN projection) over `expert` × `tensor`; norms, router, k/v
  projections and the other small params are replicated. Params are replicated over `data`.
* `towers`  – each tower on its own half of the devices: mesh (tower, data, expert, tensor) =
  (2, d, N / (2·d·t), t); the context tower, its LM head and its cache on group 0, the denoiser on
  group 1 (it reads a copy of the context cache sent to its group), each group split by the `sharded`
  rules inside it. N = 2 is the release's `place_towers_on_devices` (one device per tower). The towers
  run one after the other (SPEC §4.1), so this splits memory, not work.

Batch rows (token batches, caches, sampler state) are split over `data` where the batch divides evenly,
otherwise replicated; on the model axes they are replicated. A param dimension that does not divide
evenly over its mesh axes stays whole.

The only place that decides a sharding is `RULES` (placement → logical axis → mesh axes) read through
`PARAM_LOGICAL_AXES` (param leaf → logical axes). A placement is a name, or a `Placement` with its own
rules (the benchmarks use that to measure a rule before it goes into the table).

Meshes may be `jax.sharding.AbstractMesh`es (`abstract_mesh`): shardings and `param_bytes_per_device`
then need no devices, e.g. for 8 devices in a process that has 2.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from twotower_jax.layers.moe import EXPERT_AXIS

DATA_AXIS = "data"
TENSOR_AXIS = "tensor"
TOWER_AXIS = "tower"
SHARD_AXIS = EXPERT_AXIS  # the expert_parallel MoE looks its mesh axis up by this name
MESH_AXES = (DATA_AXIS, EXPERT_AXIS, TENSOR_AXIS)
MODEL_AXES = (EXPERT_AXIS, TENSOR_AXIS)  # the model-parallel axes: dense weights split over both

AnyMesh = Union[Mesh, AbstractMesh]

# Logical axes of each param leaf, matched on the end of its path; a leaf not listed has none
# (replicated). Dense projections name the dimension the rules may split; the other one is "embed".
PARAM_LOGICAL_AXES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("experts_up",), ("expert", "embed", "expert_mlp")),   # (E, D, F)
    (("experts_down",), ("expert", "expert_mlp", "embed")),  # (E, F, D)
    (("embeddings", "embedding"), ("vocab", "embed")),       # (V, D)
    (("lm_head", "kernel"), ("embed", "vocab")),             # (D, V)
    (("in_proj", "kernel"), ("embed", "mamba_in")),          # (D, 2I + 2GN + H)
    (("out_proj", "kernel"), ("mamba_inner", "embed")),      # (I, D)
    (("q_proj", "kernel"), ("embed", "heads")),              # (D, Hq·hd)
    (("o_proj", "kernel"), ("heads", "embed")),              # (Hq·hd, D)
    (("k_proj", "kernel"), ("embed", "kv_heads")),           # (D, Hkv·hd): 2 KV heads, replicated
    (("v_proj", "kernel"), ("embed", "kv_heads")),
    (("up_proj", "kernel"), ("embed", "mlp")),               # shared expert / `-` layer (D, F)
    (("down_proj", "kernel"), ("mlp", "embed")),             # (F, D)
    (("t_block_1", "kernel"), ("embed", "adaln")),           # denoiser's adaLN projection (D, 3D)
)
# The logical axis "tower" indexes the top-level key of a TwoTower param tree (a single tower is "context").
TOWERS = ("context", "denoiser")
# Logical axis of batch rows (inputs, caches, sampler state: their first dimension).
BATCH = "batch"

_SPLIT = {"expert": EXPERT_AXIS, "vocab": MODEL_AXES, "mamba_in": MODEL_AXES, "mamba_inner": MODEL_AXES,
          "heads": MODEL_AXES, "mlp": MODEL_AXES, "adaln": MODEL_AXES, BATCH: DATA_AXIS}

# THE table: per placement, which mesh axes each logical axis is split over (absent: not split). Inside
# each tower's group, `towers` uses the `sharded` rules.
RULES: dict[str, dict[str, Union[str, tuple[str, ...]]]] = {
    "single": {},
    "towers": {"tower": TOWER_AXIS, **_SPLIT},
    "sharded": dict(_SPLIT),
}
DEVICES_NEEDED = {"single": 1, "towers": 2, "sharded": 2}
PLACEMENTS = tuple(RULES)


@dataclasses.dataclass(frozen=True)
class Placement:
    """A placement kind (`single` | `towers` | `sharded`) with its logical → mesh axes rules (hashable)."""
    kind: str
    rules: tuple[tuple[str, Union[str, tuple[str, ...]]], ...]

    @property
    def rule_map(self) -> dict[str, tuple[str, ...]]:
        return {k: (v,) if isinstance(v, str) else tuple(v) for k, v in self.rules}


PlacementLike = Union[str, Placement]


def resolve(placement: PlacementLike) -> Placement:
    """A `Placement` from a name (rules from `RULES`) or a `Placement` (checked)."""
    kind = placement.kind if isinstance(placement, Placement) else placement
    if kind not in RULES:
        raise ValueError(f"unknown placement {kind!r}; expected one of {', '.join(PLACEMENTS)}")
    if isinstance(placement, Placement):
        return placement
    return Placement(kind, tuple(sorted(RULES[kind].items())))


def group_placement(placement: PlacementLike) -> Placement:
    """The rules inside one tower's group of a `towers` placement (its `sharded` rules; other placements
    are returned as they are)."""
    p = resolve(placement)
    if p.kind != "towers":
        return p
    return Placement("sharded", tuple((k, v) for k, v in p.rules if k != "tower"))


# --- meshes -------------------------------------------------------------------------------------------

def mesh_shape(placement: PlacementLike, n_devices: int, *, data: int = 1, tensor: int = 1) -> dict[str, int]:
    """The axis sizes of a placement's mesh on `n_devices` devices (checked): `single` (1, 1, 1);
    `sharded` (data, n / (data·tensor), tensor); `towers` (2, data, n / (2·data·tensor), tensor)."""
    p = resolve(placement)
    if not (isinstance(data, int) and data >= 1 and isinstance(tensor, int) and tensor >= 1):
        raise ValueError(f"data and tensor must be integers >= 1, got {data}, {tensor}")
    if p.kind == "single":
        if n_devices != 1 or data != 1 or tensor != 1:
            raise ValueError(f"placement 'single' runs on one device (asked for {n_devices} devices, data={data}, "
                             f"tensor={tensor}); use 'sharded' or 'towers' for more")
        return {DATA_AXIS: 1, EXPERT_AXIS: 1, TENSOR_AXIS: 1}
    groups = 2 if p.kind == "towers" else 1
    step = groups * data * tensor
    if n_devices < DEVICES_NEEDED[p.kind] or n_devices % step:
        raise ValueError(f"placement {p.kind!r} on {n_devices} devices with data={data}, tensor={tensor}: the "
                         f"device count must be a multiple of {step} (at least {DEVICES_NEEDED[p.kind]})")
    shape = {DATA_AXIS: data, EXPERT_AXIS: n_devices // step, TENSOR_AXIS: tensor}
    return {TOWER_AXIS: 2, **shape} if groups == 2 else shape


def _default_count(kind: str, available: int, data: int, tensor: int) -> int:
    """Every available device (rounded down to what the mesh shape allows); `single`: one."""
    if kind == "single":
        return 1
    step = (2 if kind == "towers" else 1) * data * tensor
    return max(available // step * step, min(available, DEVICES_NEEDED[kind]))


def make_mesh(placement: PlacementLike, devices: Optional[Sequence[jax.Device]] = None, *,
              n_devices: Optional[int] = None, data: int = 1, tensor: int = 1) -> Mesh:
    """The mesh of a placement over `devices` (default: `jax.devices()`): `single` uses the first one;
    `sharded` and `towers` use `n_devices` of them (default: all, for `towers` rounded down to an even
    count) as `mesh_shape` lays them out. Axes are Auto so GSPMD propagates the param shardings."""
    p = resolve(placement)
    devices = list(jax.devices() if devices is None else devices)
    need = DEVICES_NEEDED[p.kind]
    if len(devices) < need:
        platform = devices[0].platform if devices else "none"
        raise ValueError(
            f"placement {p.kind!r} needs {need} devices, found {len(devices)} ({platform}); on CPU run with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={need}")
    n = _default_count(p.kind, len(devices), data, tensor) if n_devices is None else n_devices
    if n > len(devices):
        raise ValueError(f"asked for {n} devices, found {len(devices)} ({devices[0].platform}); on CPU run with "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
    shape = mesh_shape(p, n, data=data, tensor=tensor)
    return Mesh(np.array(devices[:n], dtype=object).reshape(tuple(shape.values())), tuple(shape),
                axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def abstract_mesh(placement: PlacementLike, n_devices: int, *, data: int = 1, tensor: int = 1) -> AbstractMesh:
    """The placement's mesh for `n_devices` without devices (for shardings and byte counts, not for running)."""
    shape = mesh_shape(placement, n_devices, data=data, tensor=tensor)
    return AbstractMesh(tuple(shape.values()), tuple(shape), axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def check_mesh(placement: PlacementLike, mesh: AnyMesh) -> None:
    """Raises unless `mesh` is laid out for `placement` (as `make_mesh` makes it)."""
    p = resolve(placement)
    names = tuple(mesh.axis_names)
    want = ((TOWER_AXIS,) if p.kind == "towers" else ()) + MESH_AXES
    if names != want or (p.kind == "single" and mesh.size != 1):
        raise ValueError(f"placement {p.kind!r} needs a mesh with axes {want}"
                         f"{' on one device' if p.kind == 'single' else ''} (sharding.make_mesh); got axes {names} "
                         f"on {mesh.size} devices")


def tower_mesh(mesh: AnyMesh, tower: str) -> AnyMesh:
    """The group of devices holding `tower` in a `towers` mesh (its slice along the `tower` axis: a mesh
    with axes (data, expert, tensor)); a mesh without a `tower` axis holds both towers and is returned as is.
    With one device per group, it is `single`'s mesh on that device, so a tower's work there compiles to the
    same program as on `single`."""
    if tower not in TOWERS:
        raise ValueError(f"unknown tower {tower!r}; expected one of {TOWERS}")
    if TOWER_AXIS not in mesh.axis_names:
        return mesh
    if tuple(mesh.axis_names)[0] != TOWER_AXIS:
        raise ValueError(f"the {TOWER_AXIS!r} axis must come first, got axes {mesh.axis_names}")
    names, types = tuple(mesh.axis_names)[1:], tuple(mesh.axis_types)[1:]
    if isinstance(mesh, AbstractMesh):
        return AbstractMesh(tuple(mesh.axis_sizes)[1:], names, axis_types=types)
    return Mesh(mesh.devices[TOWERS.index(tower)], names, axis_types=types)


def device_ids(mesh: AnyMesh, tower: Optional[str] = None) -> list[int]:
    """Device ids of `mesh` (or of `tower`'s group of a `towers` mesh) in mesh order; for an abstract mesh,
    positions 0..N-1 (the keys `param_bytes_per_device` uses)."""
    if isinstance(mesh, AbstractMesh):
        ids = list(range(mesh.size))
        if tower is not None and TOWER_AXIS in mesh.axis_names:
            group = mesh.size // 2
            start = TOWERS.index(tower) * group
            return ids[start:start + group]
        return ids
    return [d.id for d in np.asarray(tower_mesh(mesh, tower).devices if tower else mesh.devices).reshape(-1)]


_positions = device_ids  # the earlier private name


def replicated(mesh: AnyMesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def model_parallel_size(mesh: AnyMesh) -> int:
    """Devices one copy of the params is split over (a `towers` mesh: within a group)."""
    shape = dict(mesh.shape)
    return math.prod(shape.get(axis, 1) for axis in MODEL_AXES)


# --- params -------------------------------------------------------------------------------------------

def logical_axes(path: Sequence[str]) -> tuple[Optional[str], ...] | None:
    """The logical axes of the param leaf at `path` (None: a leaf without split-able axes)."""
    path = tuple(path)
    for suffix, axes in PARAM_LOGICAL_AXES:
        if path[-len(suffix):] == suffix:
            return axes
    return None


def _spec(axes: Sequence[Optional[str]], shape: Sequence[int], rules: Mapping[str, tuple[str, ...]],
          mesh: AnyMesh) -> PartitionSpec:
    """Each dimension split over its logical axis' mesh axes (those of size > 1 on `mesh`, each used once);
    a dimension that does not divide evenly stays whole."""
    sizes, used, spec = dict(mesh.shape), set(), []
    for axis, size in zip(axes, shape):
        mesh_axes = tuple(a for a in rules.get(axis, ()) if sizes.get(a, 1) > 1 and a not in used)
        if mesh_axes and size % math.prod(sizes[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def _tower_of(path: Sequence[str]) -> str:
    return path[0] if path and path[0] in TOWERS else "context"


def param_sharding(path: Sequence[str], shape: Sequence[int], placement: PlacementLike, mesh: AnyMesh
                   ) -> NamedSharding:
    """The sharding of one param leaf. `path` is its key path (e.g. ("denoiser", "layers_1", "mixer",
    "experts_up")); a path without a tower key is a single tower, placed as the context tower."""
    p = resolve(placement)
    if p.kind == "towers":
        mesh = tower_mesh(mesh, _tower_of(path))
    axes = logical_axes(path)
    if axes is None:
        return replicated(mesh)
    if len(axes) != len(shape):
        raise ValueError(f"param {'/'.join(path)} has shape {tuple(shape)}, expected logical axes {axes}")
    return NamedSharding(mesh, _spec(axes, shape, p.rule_map, mesh))


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_shardings(params, placement: PlacementLike, mesh: AnyMesh):
    """A tree of `NamedSharding`s like `params` (arrays or `jax.eval_shape` structs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: param_sharding(_keys(path), leaf.shape, placement, mesh), params)


def place_params(params, placement: PlacementLike, mesh: Mesh):
    """`params` put onto the placement's shardings (leaves already there are not copied)."""
    return jax.device_put(params, param_shardings(params, placement, mesh))


def sharding_for(placement: PlacementLike, mesh: AnyMesh) -> Callable[[tuple, jax.ShapeDtypeStruct], NamedSharding]:
    """For `restore_orbax_checkpoint(dir, sharding_for(...))`: each array restored straight onto its device(s)."""
    resolve(placement)
    return lambda path, struct: param_sharding(path, struct.shape, placement, mesh)


def param_bytes_per_device(params, placement: PlacementLike, mesh: AnyMesh) -> dict[int, int]:
    """Bytes of params each device holds under `placement` on `mesh`, from the shardings alone (`params`
    may be `jax.eval_shape` structs; nothing is allocated). Keys: device ids (a `Mesh`) or positions
    0..N-1 in mesh order (an `AbstractMesh`); every device of the mesh is a key."""
    p = resolve(placement)
    out = dict.fromkeys(device_ids(mesh), 0)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = _keys(path)
        s = param_sharding(keys, leaf.shape, p, mesh)
        nbytes = math.prod(s.shard_shape(tuple(leaf.shape))) * np.dtype(leaf.dtype).itemsize
        for device in device_ids(mesh, _tower_of(keys) if p.kind == "towers" else None):
            out[device] += nbytes
    return out


def balance_table(params, placement: PlacementLike, mesh: AnyMesh) -> dict:
    """Per-device param bytes against the ideal split (total ÷ devices): {"placement", "devices", "total_bytes",
    "ideal_bytes", "per_device": {id: bytes}, "max_bytes", "max_over_ideal"}."""
    per = param_bytes_per_device(params, placement, mesh)
    total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
    ideal = total / len(per)
    return {"placement": resolve(placement).kind, "devices": len(per), "mesh": dict(mesh.shape),
            "total_bytes": total, "ideal_bytes": ideal, "per_device": per, "max_bytes": max(per.values()),
            "max_over_ideal": max(per.values()) / ideal}


# --- batches and caches -------------------------------------------------------------------------------

def batch_sharding(shape: Sequence[int], mesh: AnyMesh, batch: Optional[int]) -> NamedSharding:
    """Rows split over the mesh's `data` axis when the leaf's first dimension is the batch (`batch`) and
    divides evenly; otherwise replicated (scalars, odd batches, meshes without data parallelism)."""
    data = dict(mesh.shape).get(DATA_AXIS, 1)
    if batch is not None and data > 1 and len(shape) >= 1 and shape[0] == batch and batch % data == 0:
        return NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return replicated(mesh)


def batch_shardings(tree, mesh: AnyMesh, batch: Optional[int]):
    """`batch_sharding` for every leaf of `tree` (arrays or structs)."""
    return jax.tree.map(lambda x: batch_sharding(x.shape if hasattr(x, "shape") else np.shape(x), mesh, batch), tree)


def constrain_batch(tree, mesh: Mesh, batch: Optional[int]):
    """Inside a jitted function: `tree`'s values pinned to `batch_shardings` (so a compiled piece's outputs
    have a known layout, ready for the next piece or a transfer)."""
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(x.shape, mesh, batch)), tree)


def cache_shardings(cache, placement: PlacementLike, mesh: AnyMesh, tower: str = "context"):
    """Shardings for a cache pytree: rows over `data` (when the batch divides), replicated over the model
    axes; for `towers`, on `tower`'s group (the context cache lives with the context tower; the denoiser reads
    a copy on its own group)."""
    p = resolve(placement)
    where = tower_mesh(mesh, tower) if p.kind == "towers" else mesh
    return batch_shardings(cache, where, getattr(cache, "batch_size", None))


def devices_of(tree) -> set:
    """Every device any leaf of `tree` has a shard on (for checks and tests)."""
    return set().union(*(leaf.sharding.device_set for leaf in jax.tree.leaves(tree)))


def describe(placement: PlacementLike, mesh: AnyMesh) -> Mapping[str, str]:
    """A short human-readable summary (for benchmark tables and logs)."""
    p = resolve(placement)
    return {"placement": p.kind,
            "rules": ",".join(f"{a}->{'+'.join(m)}" for a, m in sorted(p.rule_map.items())) or "-",
            "mesh": "x".join(f"{a}={s}" for a, s in dict(mesh.shape).items()),
            "devices": ",".join(str(d) for d in device_ids(mesh))}
