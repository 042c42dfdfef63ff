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

# (ShardingFor is defined with the HF loader, which takes the same argument.)
from twotower_jax.checkpoint.hf import CheckpointError, ShardingFor, read_config_json, rules_and_shapes
from twotower_jax.checkpoint.mapping import ParamPath, get_path, group_of, keeps_float32, set_path
from twotower_jax.checkpoint.staging import staged_directory
from twotower_jax.config import NemotronHConfig, encode_special_floats

FORMAT = "twotower-jax-orbax/1"
MANIFEST = "twotower_jax.json"
PARAMS_DIR = "params"


def is_orbax_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MANIFEST).is_file()


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
            set_path(buffer, path[len(group):], value)
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


def stored_dtype(directory: str | os.PathLike) -> np.dtype:
    """The dtype the checkpoint's floating params are stored in (the manifest's; router biases excepted)."""
    return np.dtype(read_manifest(directory)["dtype"])  # "bfloat16" resolves once jax has registered ml_dtypes


def open_orbax_checkpoint(directory: str | os.PathLike, sharding_for: Optional[ShardingFor] = None, dtype=None):
    """Returns (kind, config, groups); `groups` yields (group path, params subtree) one group at a time,
    each array restored onto `sharding_for(path, ShapeDtypeStruct)` when given, else as host NumPy, in
    `dtype` (cast while reading; None: as stored; `keeps_float32` params stay float32)."""
    directory = Path(directory).absolute()  # orbax refuses relative paths
    manifest = read_manifest(directory)
    config = NemotronHConfig.from_hf_dict(read_config_json(directory))
    kind = manifest["kind"]
    _, shapes = rules_and_shapes(kind, config)
    stored = np.dtype(manifest["dtype"] if dtype is None else dtype)

    def restore_groups():
        checkpointer = ocp.StandardCheckpointer()
        for name in manifest["groups"]:
            group = tuple(name.split("."))

            def abstract(path, leaf, group=group):
                full = group + tuple(k.key for k in path)
                dtype = np.float32 if keeps_float32(full) else stored
                sharding = sharding_for(full, jax.ShapeDtypeStruct(leaf.shape, dtype)) if sharding_for else None
                return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=sharding)

            target = jax.tree_util.tree_map_with_path(abstract, get_path(shapes, group))
            try:
                yield group, checkpointer.restore(directory / PARAMS_DIR / name, target)
            except Exception as e:
                raise CheckpointError(f"{directory}: cannot restore group {name} ({e})") from e

    return kind, config, restore_groups()


def restore_orbax_checkpoint(directory: str | os.PathLike, sharding_for: Optional[ShardingFor] = None, dtype=None):
    """Returns (kind, config, params). With `sharding_for(path, ShapeDtypeStruct) -> Sharding`, each array
    is restored straight onto its sharding (no full copy on one device); otherwise as host NumPy arrays.
    `dtype`: the floating params' dtype, cast while reading (None: as stored)."""
    kind, config, groups = open_orbax_checkpoint(directory, sharding_for, dtype)
    params: dict = {}
    for group, tree in groups:
        set_path(params, group, tree)
    return kind, config, params


def save_params_orbax(out: str | os.PathLike, kind: str, config: NemotronHConfig, params, *,
                      dtype_name: str = "float32", overwrite: bool = False) -> dict:
    """Writes an in-memory param tree (e.g. freshly trained) as our checkpoint, in the mapping table's
    group order, floats cast to `dtype_name` (the router bias stays float32)."""
    rules, _ = rules_and_shapes(kind, config)
    dtype = np.dtype(dtype_name)

    def leaves():
        for rule in rules:
            value = np.asarray(get_path(params, rule.path))
            yield rule.path, value if keeps_float32(rule.path) else value.astype(dtype)
    return write_orbax_checkpoint(out, kind, config, leaves(), dtype_name, overwrite=overwrite)
