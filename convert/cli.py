"""Convert checkpoints between the HF layout and our orbax format, streaming one tensor / layer at a time.

    python -m convert --hf-dir IN --out OUT [--dtype bfloat16|float32] [--overwrite]    HF/torch → orbax
    python -m convert --orbax-dir IN --out OUT [--overwrite]                           orbax → HF safetensors

The input may be a single Nemotron-H tower or a TwoTower (detected from the tensor names), as
`model.safetensors`, sharded safetensors with `model.safetensors.index.json`, or PyTorch `.bin`/`.pt`
state dicts. Every tensor is checked against the model's shapes; on any error nothing is left at OUT.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Optional, Sequence

import jax.numpy as jnp
from safetensors.numpy import save_file

from convert.sources import open_source
from twotower_jax.checkpoint.hf import (INDEX_FILE, CheckpointError, hf_tensors_from_params, iter_params,
                                        kind_of_names, read_config, rules_and_shapes)
from twotower_jax.checkpoint.mapping import group_of
from twotower_jax.checkpoint.orbax_io import open_orbax_checkpoint, write_orbax_checkpoint
from twotower_jax.checkpoint.staging import staged_directory
from twotower_jax.config import ConfigError, encode_special_floats
from twotower_jax.progress import Progress

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def convert_hf_to_orbax(hf_dir, out, dtype: str = "bfloat16", overwrite: bool = False,
                        progress: bool = False) -> dict:
    """Streams a HF/torch checkpoint into an orbax checkpoint at `out`. Returns the summary."""
    start = time.perf_counter()
    config = read_config(hf_dir)
    source = open_source(hf_dir)
    kind = kind_of_names(source.names())
    rules, shapes = rules_and_shapes(kind, config)
    bar = Progress(len(rules), progress, unit="params")
    counts = write_orbax_checkpoint(out, kind, config, iter_params(source, rules, shapes, DTYPES[dtype]), dtype,
                                    overwrite=overwrite, on_param=bar.step)
    return {"direction": "hf->orbax", "kind": kind, **counts, "seconds": round(time.perf_counter() - start, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def convert_orbax_to_hf(orbax_dir, out, overwrite: bool = False) -> dict:
    """Writes an orbax checkpoint back in the HF tensor layout (one safetensors shard per layer group)."""
    start = time.perf_counter()
    counts = {"tensors": 0, "parameters": 0, "bytes": 0}
    with staged_directory(out, overwrite) as tmp:
        kind, config, groups = open_orbax_checkpoint(orbax_dir)
        rules, _ = rules_and_shapes(kind, config)
        weight_map: dict[str, str] = {}
        for shard, (group, tree) in enumerate(groups, start=1):
            nested = tree
            for key in reversed(group):
                nested = {key: nested}
            tensors = hf_tensors_from_params([r for r in rules if group_of(r.path) == group], nested)
            fname = f"model-{shard:05d}.safetensors"
            save_file(tensors, str(tmp / fname))
            weight_map.update({name: fname for name in tensors})
            counts["tensors"] += len(tensors)
            counts["parameters"] += sum(int(v.size) for v in tensors.values())
            counts["bytes"] += sum(int(v.nbytes) for v in tensors.values())
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": counts["bytes"]},
                                                  "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(encode_special_floats(config.to_hf_dict()), indent=2))
    return {"direction": "orbax->hf", "kind": kind, **counts, "seconds": round(time.perf_counter() - start, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-dir", help="HF-layout checkpoint (config.json + safetensors or .bin/.pt)")
    source.add_argument("--orbax-dir", help="orbax checkpoint written by this tool, to write back as HF")
    p.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="stored dtype (HF → orbax)")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.hf_dir:
            summary = convert_hf_to_orbax(args.hf_dir, args.out, args.dtype, args.overwrite,
                                          progress=sys.stderr.isatty())
        else:
            summary = convert_orbax_to_hf(args.orbax_dir, args.out, args.overwrite)
    except (CheckpointError, ConfigError, FileExistsError) as e:
        parser.exit(1, f"error: {e}\n")
    print(f"converted {summary['kind']} ({summary['direction']}): {summary['tensors']} tensors, "
          f"{summary['parameters']:,} parameters, {summary['bytes']:,} bytes, {summary['seconds']} s, "
          f"peak RSS {summary['peak_rss_mb']} MiB")
    return 0
