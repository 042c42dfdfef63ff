"""Read and write Nemotron-H checkpoints in the Hugging Face layout (config.json + safetensors).

Tensors are read one at a time straight from the safetensors files (never the whole model in host
memory), every shape is checked against the mapping table, and missing or unexpected tensors are
reported by name. Given `sharding_for(path, ShapeDtypeStruct) -> Sharding`, each param is put onto its
sharding as soon as it is built and its host copy dropped before the next tensor is read, so the host
holds a few tensors at a time, never the model.
"""
from __future__ import annotations

import functools
import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import jax  # (importing jax also registers the bfloat16 numpy dtype that safetensors needs)
import ml_dtypes  # noqa: F401
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from twotower_jax.checkpoint.mapping import (ParamPath, TensorRule, get_path, keeps_float32, set_path, tower_rules,
                                             two_tower_rules)
from twotower_jax.config import ConfigError, NemotronHConfig, encode_special_floats

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_NAMES_SHOWN = 12

# Where each param goes: (param path, its ShapeDtypeStruct) -> a Sharding, or None to keep it on the host
# (`twotower_jax.sharding.sharding_for(placement, mesh)` makes one).
ShardingFor = Callable[[ParamPath, jax.ShapeDtypeStruct], Optional[jax.sharding.Sharding]]


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it claims to be."""


def _names(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_NAMES_SHOWN])
    return shown + (f", ... ({len(names) - _MAX_NAMES_SHOWN} more)" if len(names) > _MAX_NAMES_SHOWN else "")


def read_config_json(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def tensor_files(directory: str | os.PathLike) -> dict[str, Path]:
    """Maps every tensor name in the checkpoint to the safetensors file holding it."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = {name: directory / fname for name, fname in weight_map.items()}
        absent = sorted({str(p) for p in files.values() if not p.is_file()})
        if absent:
            raise CheckpointError(f"{index} names shard files that do not exist: {absent}")
        return files
    single = directory / SINGLE_FILE
    candidates = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
    if not candidates:
        raise CheckpointError(f"{directory}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files")
    files: dict[str, Path] = {}
    for path in candidates:
        for name in _open(path).keys():
            files[name] = path
    return files


def _open(path: Path):
    try:
        return safe_open(str(path), framework="np")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e


class SafetensorsSource:
    """The tensors of a HF directory (one file, or shards with an index), read one at a time."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = directory
        self._files = tensor_files(directory)
        self._handles: dict[Path, object] = {}

    def names(self) -> set[str]:
        return set(self._files)

    def get(self, name: str) -> np.ndarray:
        path = self._files[name]
        handle = self._handles.get(path) or self._handles.setdefault(path, _open(path))
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({e})") from e


def _read(source, name: str, shape) -> np.ndarray:
    array = source.get(name)
    if tuple(array.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name} has shape {tuple(array.shape)}, expected {tuple(shape)}")
    return array


def build_param(source, rule: TensorRule, dtype) -> np.ndarray:
    """One param leaf in our layout and `dtype`, from its HF tensor(s). A rule built from several tensors
    (the E per-expert matrices of a stacked expert weight) is filled one tensor at a time into a
    preallocated array, so the host holds the result plus one expert, never all E plus their stack."""
    if len(rule.hf_names) == 1:
        return rule.to_ours([_read(source, rule.hf_names[0], rule.hf_shapes[0])]).astype(dtype, copy=False)
    out = None
    for j, (name, shape) in enumerate(zip(rule.hf_names, rule.hf_shapes)):
        part = rule.to_ours([_read(source, name, shape)])  # a stack of one: (1, ...)
        if out is None:
            out = np.empty((len(rule.hf_names),) + part.shape[1:], dtype)
        out[j] = part[0]
        del part
    return out


def iter_params(source, rules: list[TensorRule], target_shapes: Mapping, dtype=np.float32):
    """Yields (param path, host array) for each rule, one at a time, converted to our layout and `dtype`
    (float32 where `keeps_float32`). Nothing is kept between items: a consumer that drops each array
    before asking for the next holds one param (plus the tensor being read) at a time.

    `source` has `names()` and `get(name)`; `target_shapes` is our param tree (e.g. from `jax.eval_shape`).
    Missing and unexpected tensors are reported (by name) before anything is read; every source shape
    and every produced shape is checked.
    """
    available = source.names()
    expected = {name for rule in rules for name in rule.hf_names}
    missing, unexpected = expected - available, available - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {_names(unexpected)}")
        raise CheckpointError("checkpoint does not match the config: " + "; ".join(parts))
    dtype = np.dtype(dtype)
    for rule in rules:
        target = get_path(target_shapes, rule.path)
        value = build_param(source, rule, np.dtype(np.float32) if keeps_float32(rule.path) else dtype)
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"param {'/'.join(rule.path)} built with shape {value.shape}, model expects "
                                  f"{tuple(target.shape)}")
        item = rule.path, value
        del value
        yield item
        del item  # on resume: the generator holds no param while the next one is read


def put_on_sharding(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array onto `sharding` (each device receives only its shard), in buffers XLA owns, so the host
    array can be freed as soon as this returns. Blocks until the transfer is done."""
    array = jax.device_put(value, sharding)
    if any(d.platform == "cpu" for d in sharding.device_set):
        # On CPU `device_put` may alias the NumPy buffer (zero copy): the device array would then keep the
        # host array alive (a shard that is a view keeps its whole tensor). A copy made on the device
        # gives XLA its own buffer and lets the host array go.
        array = array.copy()
    return array.block_until_ready()


def read_params(directory: str | os.PathLike, rules: list[TensorRule], target_shapes: Mapping,
                dtype=np.float32, sharding_for: Optional[ShardingFor] = None) -> dict:
    """Builds our nested param dict from a HF directory's tensors through `rules` (see `iter_params`).
    With `sharding_for`, each param is put onto `sharding_for(path, ShapeDtypeStruct)` (a leaf given None
    stays a host array) and its host copy dropped before the next tensor is read; without it, the params
    are host NumPy arrays."""
    params: dict = {}
    try:
        for path, value in iter_params(SafetensorsSource(directory), rules, target_shapes, dtype):
            if sharding_for is not None:
                sharding = sharding_for(path, jax.ShapeDtypeStruct(value.shape, value.dtype))
                if sharding is not None:
                    value = put_on_sharding(value, sharding)
            set_path(params, path, value)
            del value  # the host copy goes before the next tensor is read
    except CheckpointError as e:
        raise CheckpointError(f"{directory}: {e}") from e
    return params


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_MAX_HEADER_BYTES = 100 * 2**20


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets); no tensor data is read."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER_BYTES:
                raise ValueError(f"header of {size} bytes")
            return json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from e


def safetensors_float_dtype(directory: str | os.PathLike) -> np.dtype:
    """The dtype a HF directory stores its floating tensors in, from the safetensors headers only (no
    tensor data is read). With mixed dtypes (e.g. the release's float32 router biases among BF16
    weights) it is the dtype holding the most bytes."""
    bytes_by_dtype: dict[str, int] = {}
    for path in sorted(set(tensor_files(directory).values())):
        for name, entry in _safetensors_header(path).items():
            if name == "__metadata__" or entry.get("dtype") not in _SAFETENSORS_DTYPES:
                continue
            start, end = entry.get("data_offsets", (0, 0))
            bytes_by_dtype[entry["dtype"]] = bytes_by_dtype.get(entry["dtype"], 0) + int(end) - int(start)
    if not bytes_by_dtype:
        raise CheckpointError(f"{directory}: no floating-point tensors")
    return np.dtype(_SAFETENSORS_DTYPES[max(bytes_by_dtype, key=bytes_by_dtype.get)])


TOWER, TWO_TOWER = "tower", "two_tower"


def kind_of_names(names: Iterable[str]) -> str:
    """TWO_TOWER if the tensors are named `context_tower.*` / `denoiser_tower.*`, else TOWER."""
    return TWO_TOWER if any(n.startswith(("context_tower.", "denoiser_tower.")) for n in names) else TOWER


def checkpoint_kind(directory: str | os.PathLike) -> str:
    return kind_of_names(tensor_files(directory))


@functools.lru_cache(maxsize=8)
def rules_and_shapes(kind: str, config: NemotronHConfig):
    """The mapping table and our abstract param tree for a checkpoint kind (cached: tracing a 52-layer
    model for `eval_shape` costs seconds and tens of MB of Python objects). Treat the result as read-only."""
    from twotower_jax.tower import NemotronH
    from twotower_jax.two_tower import TwoTower

    if kind == TWO_TOWER:
        return two_tower_rules(config), TwoTower(config).param_shapes()
    return tower_rules(config), NemotronH(config).param_shapes()


def read_config(directory, overrides=None) -> NemotronHConfig:
    try:
        return NemotronHConfig.from_hf_dict(read_config_json(directory), **(overrides or {}))
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{directory}/config.json: {e}") from e


def _load_hf(directory, kind: str, dtype, sharding_for, config_overrides) -> tuple[NemotronHConfig, dict]:
    config = read_config(directory, config_overrides)
    rules, shapes = rules_and_shapes(kind, config)
    return config, read_params(directory, rules, shapes, dtype, sharding_for)


def load_hf_tower(directory: str | os.PathLike, dtype=np.float32, sharding_for: Optional[ShardingFor] = None,
                  **config_overrides) -> tuple[NemotronHConfig, dict]:
    """Loads a single-tower Nemotron-H checkpoint (`backbone.*` + `lm_head.weight`): (config, params).
    Host NumPy params, or with `sharding_for` each put onto its sharding as it is read (see `read_params`)."""
    return _load_hf(directory, TOWER, dtype, sharding_for, config_overrides)


def load_hf_two_tower(directory: str | os.PathLike, dtype=np.float32, sharding_for: Optional[ShardingFor] = None,
                      **config_overrides) -> tuple[NemotronHConfig, dict]:
    """Loads a TwoTower checkpoint in the release's layout (SPEC §6): (config, {"context", "denoiser"}).
    Host NumPy params, or with `sharding_for` each put onto its sharding as it is read (see `read_params`)."""
    if checkpoint_kind(directory) != TWO_TOWER:
        raise CheckpointError(f"{directory} is a single-tower checkpoint (backbone.*): it has no denoiser tower, "
                              "so it cannot run diffusion or mock-AR; use --mode ar")
    return _load_hf(directory, TWO_TOWER, dtype, sharding_for, config_overrides)


def write_hf_tensors(directory: str | os.PathLike, config_dict: dict, tensors: Mapping[str, np.ndarray],
                     max_shard_bytes: Optional[int] = None) -> None:
    """Writes config.json and the tensors as one `model.safetensors`, or as shards with an index."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(encode_special_floats(config_dict), indent=2))
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}  # callers may pass views
    if max_shard_bytes is None:
        save_file(tensors, str(directory / SINGLE_FILE))
        return
    shards: list[dict] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname))
        weight_map.update({name: fname for name in shard})
    total = sum(a.nbytes for a in tensors.values())
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2))


def hf_tensors_from_params(rules: list[TensorRule], params: Mapping) -> dict[str, np.ndarray]:
    """Our params → HF-named tensors (the inverse of `read_params`)."""
    out = {}
    for rule in rules:
        for name, array in zip(rule.hf_names, rule.to_hf(np.asarray(get_path(params, rule.path)))):
            out[name] = np.ascontiguousarray(array)  # to_hf transposes; safetensors writes raw buffers
    return out


def save_hf_two_tower(directory: str | os.PathLike, config: NemotronHConfig, params: Mapping,
                      max_shard_bytes: Optional[int] = None) -> None:
    """Writes a TwoTower checkpoint in the release's tensor layout (SPEC §6)."""
    write_hf_tensors(directory, config.to_hf_dict(), hf_tensors_from_params(two_tower_rules(config), params),
                     max_shard_bytes)


def save_hf_tower(directory: str | os.PathLike, config: NemotronHConfig, params: Mapping,
                  max_shard_bytes: Optional[int] = None) -> None:
    """Writes a single-tower checkpoint that `transformers`' NemotronHForCausalLM and `load_hf_tower` read."""
    write_hf_tensors(directory, config.to_hf_dict(), hf_tensors_from_params(tower_rules(config), params),
                     max_shard_bytes)
