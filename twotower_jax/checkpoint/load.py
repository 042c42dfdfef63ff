"""Load any checkpoint this package reads: a HF-layout directory (single tower or TwoTower) or one of
our orbax checkpoints. Returns (kind, config, params) with floating params in the requested dtype."""
from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp

from twotower_jax.checkpoint.hf import TWO_TOWER, CheckpointError, checkpoint_kind, load_hf_tower, load_hf_two_tower
from twotower_jax.checkpoint.mapping import keeps_float32
from twotower_jax.checkpoint.orbax_io import is_orbax_checkpoint, restore_orbax_checkpoint


DEMO = "demo"
DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_two_tower"


def resolve_checkpoint(name: str | os.PathLike) -> Path:
    """A checkpoint directory, with the name `demo` standing for the small TwoTower shipped in the package
    (trained by experiments/train_ar.py + train_denoiser.py; see its README.md)."""
    if str(name) == DEMO:
        if not (DEMO_DIR / "twotower_jax.json").is_file():
            raise CheckpointError(f"the packaged demo checkpoint is missing at {DEMO_DIR}")
        return DEMO_DIR
    return Path(name)


def load_checkpoint(directory: str | os.PathLike, dtype=jnp.float32):
    """`directory` may also be `demo` (see `resolve_checkpoint`)."""
    directory = resolve_checkpoint(directory)
    if is_orbax_checkpoint(directory):
        kind, config, params = restore_orbax_checkpoint(directory)

        def cast(path, x):
            keys = tuple(k.key for k in path)
            return x if keeps_float32(keys) else jnp.asarray(x, dtype)
        return kind, config, jax.tree_util.tree_map_with_path(cast, params)
    kind = checkpoint_kind(directory)
    load = load_hf_two_tower if kind == TWO_TOWER else load_hf_tower
    config, params = load(directory, dtype=dtype)
    return kind, config, params
