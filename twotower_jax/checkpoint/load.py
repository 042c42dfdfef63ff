"""Load any checkpoint this package reads: a HF-layout directory (single tower or TwoTower) or one of
our orbax checkpoints. Returns (kind, config, params) with floating params in the requested dtype,
optionally put straight onto their devices as they are read."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax.checkpoint.hf import (TWO_TOWER, CheckpointError, ShardingFor, checkpoint_kind, load_hf_tower,
                                        load_hf_two_tower, safetensors_float_dtype)
from twotower_jax.checkpoint.orbax_io import (is_orbax_checkpoint, read_manifest, restore_orbax_checkpoint,
                                             stored_dtype)


DEMO = "demo"
DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_two_tower"
# The dtypes params are loaded in; a checkpoint stored in another float type loads as float32.
LOAD_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16))


def resolve_checkpoint(name: str | os.PathLike) -> Path:
    """A checkpoint directory, with the name `demo` standing for the small TwoTower shipped in the package
    (trained by experiments/train_ar.py + train_denoiser.py; see its README.md)."""
    if str(name) == DEMO:
        if not (DEMO_DIR / "twotower_jax.json").is_file():
            raise CheckpointError(f"the packaged demo checkpoint is missing at {DEMO_DIR}")
        return DEMO_DIR
    return Path(name)


def checkpoint_dtype(directory: str | os.PathLike) -> np.dtype:
    """The checkpoint's own dtype, which `python -m twotower_jax.generate --dtype auto` (the default) loads
    it in: for our orbax checkpoints (and `demo`) the stored dtype from the manifest; for a HF directory
    the dtype of its floating tensors, read from the safetensors headers without loading any tensor
    (BF16 for the release; the dtype with the most bytes when mixed, so the release's float32 router
    biases do not count). float16/float64 checkpoints give float32. Params that `keeps_float32` names
    stay float32 whatever this says."""
    directory = resolve_checkpoint(directory)
    dtype = stored_dtype(directory) if is_orbax_checkpoint(directory) else safetensors_float_dtype(directory)
    return dtype if dtype in LOAD_DTYPES else np.dtype(np.float32)


def stored_kind(directory: str | os.PathLike) -> str:
    """A single tower or a TwoTower, read without loading any tensor (orbax: the manifest; HF: the names)."""
    directory = resolve_checkpoint(directory)
    return read_manifest(directory)["kind"] if is_orbax_checkpoint(directory) else checkpoint_kind(directory)


def load_checkpoint(directory: str | os.PathLike, dtype=jnp.float32, sharding_for: Optional[ShardingFor] = None):
    """(kind, config, params). `directory` may also be `demo` (see `resolve_checkpoint`); `dtype` None means
    the checkpoint's own (`checkpoint_dtype`).

    With `sharding_for(path, ShapeDtypeStruct) -> Sharding` (e.g. `twotower_jax.sharding.sharding_for(
    placement, mesh)`) each param goes straight onto its sharding as it is read, cast on the way: a HF
    checkpoint one tensor at a time (the host holds a few tensors, never the model), an orbax one group
    by group. Without it a HF checkpoint gives host NumPy arrays and an orbax one arrays on the default
    device."""
    directory = resolve_checkpoint(directory)
    dtype = checkpoint_dtype(directory) if dtype is None else dtype
    if is_orbax_checkpoint(directory):
        kind, config, params = restore_orbax_checkpoint(directory, sharding_for, dtype=dtype)
        if sharding_for is None:
            params = jax.tree.map(jnp.asarray, params)
        return kind, config, params
    kind = checkpoint_kind(directory)
    load = load_hf_two_tower if kind == TWO_TOWER else load_hf_tower
    config, params = load(directory, dtype=dtype, sharding_for=sharding_for)
    return kind, config, params
