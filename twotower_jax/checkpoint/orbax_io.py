"""Our checkpoint format: orbax items, one per layer group, written so that a half-written one never
restores.

    OUT/config.json          the HF-style model config
    OUT/params/<group>/      one orbax item per group ("context.layers_3", "embeddings", ...)
    OUT/twotower_jax.json    manifest (format, kind, dtype, groups, counts), written last

Writing goes to a temporary sibling directory that is renamed to OUT only after everything, manifest
included, is on disk; a failure removes it. Groups are saved as soon as they are complete, so the host
holds one layer's params at a time, never the model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from twotower_jax.checkpoint.hf import CheckpointError, read_config_json, rules_and_shapes
from twotower_jax.checkpoint.mapping import ParamPath, group_of, keeps_float32
from twotower_jax.checkpoint.staging import staged_directory
from twotower_jax.config import NemotronHConfig, encode_special_floats

FORMAT = "twotower-jax-orbax/1"
MANIFEST = "twotower_jax.json"
PARAMS_DIR = "params"

ShardingFor = Callable[[ParamPath, jax.ShapeDtypeStruct], Optional[jax.sharding.Sharding]]


def is_orbax_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def _set(tree: dict, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def write_orbax_checkpoint(out: str | os.PathLike, kind: str, config: NemotronHConfig,
                           params: Iterable[tuple[ParamPath, np.ndarray]], dtype_name: str, *,
                           overwrite: bool = False, on_param: Optional[Callable[[ParamPath], None]] = None) -> dict:
    """Writes (path, array) pairs, grouped as they arrive, as a checkpoint at `out`. Returns counts."""
    checkpointer = ocp.StandardCheckpointer()
    counts = {"tensors": 0, "parameters": 0, "bytes": 0}
    groups: list[str] = []
    with staged_directory(out, overwrite) as tmp:
        (tmp / PARAMS_DIR).mkdir()

        def flush(group, tree):
            name = ".".join(group)
            checkpointer.save(tmp / PARAMS_DIR / name, tree)
            checkpointer.wait_until_finished()  # the host copy can go before the next group is read
            groups.append(name)

        current, buffer = None, {}
        for path, value in params:
            group = group_of(path)
            if group != current and buffer:
                flush(current, buffer)
                buffer = {}
                if ".".join(group) in groups:
                    raise ValueError(f"params of group {'.'.join(group)} arrive in two runs; they must be contiguous")
            current = group
            _set(buffer, path[len(group):], value)
            counts["tensors"] += 1
            counts["parameters"] += int(value.size)
            counts["bytes"] += int(value.nbytes)
            if on_param is not None:
                on_param(path)
        if buffer:
            flush(current, buffer)
        (tmp / "config.json").write_text(json.dumps(encode_special_floats(config.to_hf_dict()), indent=2))
        manifest = {"format": FORMAT, "kind": kind, "dtype": dtype_name, "groups": groups, **counts}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: only a finished write has it
    return counts


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST}; not a finished twotower-jax checkpoint")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def iter_orbax_groups(directory: str | os.PathLike, sharding_for: Optional[ShardingFor] = None):
    """Yields (group path, params subtree) one group at a time. Also returns the kind and config first
    as ("__meta__", (kind, config)) so callers can stream without a second read."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    config = NemotronHConfig.from_hf_dict(read_config_json(directory))
    kind = manifest["kind"]
    _, shapes = rules_and_shapes(kind, config)
    stored = np.dtype(manifest["dtype"]) if manifest["dtype"] != "bfloat16" else jax.numpy.bfloat16
    yield "__meta__", (kind, config)
    checkpointer = ocp.StandardCheckpointer()
    for name in manifest["groups"]:
        group = tuple(name.split("."))
        subtree = shapes
        for key in group:
            subtree = subtree[key]

        def abstract(path, leaf, group=group):
            full = group + tuple(k.key for k in path)
            dtype = np.float32 if keeps_float32(full) else stored
            struct = jax.ShapeDtypeStruct(leaf.shape, dtype)
            sharding = sharding_for(full, struct) if sharding_for is not None else None
            return struct if sharding is None else jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=sharding)

        target = jax.tree_util.tree_map_with_path(abstract, subtree)
        try:
            yield group, checkpointer.restore(directory / PARAMS_DIR / name, target)
        except Exception as e:
            raise CheckpointError(f"{directory}: cannot restore group {name} ({e})") from e


def restore_orbax_checkpoint(directory: str | os.PathLike, sharding_for: Optional[ShardingFor] = None):
    """Returns (kind, config, params). With `sharding_for(path, ShapeDtypeStruct) -> Sharding`, each array
    is restored straight onto its sharding (no full copy on one device); otherwise as host NumPy arrays."""
    groups = iter_orbax_groups(directory, sharding_for)
    _, (kind, config) = next(groups)
    params: dict = {}
    for group, tree in groups:
        _set(params, group, tree)
    return kind, config, params
