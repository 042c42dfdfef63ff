"""Command line generation.

    python -m twotower_jax.generate --checkpoint DIR --mode {ar,mock_ar,diffusion,self_speculative} --prompt-ids 5,6,7 --json

`--checkpoint` is a HF-layout directory or an orbax checkpoint made by `python -m convert`, holding a
single Nemotron-H tower (AR only) or a TwoTower (all modes; AR uses the context tower); `demo` names the
small TwoTower shipped in the package.

`--prompt-ids` may repeat (one batch row each, left-padded); `--prompt TEXT` (also repeatable) needs a
`tokenizer.json` in the checkpoint directory and the `tokenizers` package, or a checkpoint marked with
`byte_tokenizer.json` (the demo model: BOS + UTF-8 bytes, `twotower_jax.data.ByteTokenizer`). Prints one JSON object with
`tokens` (generated ids per row, cut after EOS), `logprobs` and `stats` when `--json` is given.

It is a thin layer over `twotower_jax.engine.Engine`: the prompts become requests 0..n-1, run in
power-of-two prompt buckets (`--max-new-tokens` exactly, not bucketed). `--streams row` (the default) gives
row r the seed `--seed` + r, as the samplers' int seed does; `--streams request` gives request r the stream
fold_in(key(seed), r) that `batch_generate` and the engine use by default. `--stop TEXT` (repeatable) cuts
every row at the first occurrence of a stop string in its decoded text.

`--placement` puts the model on one device, each tower on its own half of the devices, or both towers
split over every device (`twotower_jax.sharding`; `--devices N` uses the first N); a checkpoint is
restored straight onto it. `--ssd-impl` and `--moe-impl` pick implementations of the Mamba scan and the MoE
dispatch (same math).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax import sharding
from twotower_jax.checkpoint.hf import TWO_TOWER, read_config
from twotower_jax.checkpoint.load import checkpoint_dtype, load_checkpoint, resolve_checkpoint, stored_kind
from twotower_jax.checkpoint.mapping import keeps_float32
from twotower_jax.checkpoint.orbax_io import is_orbax_checkpoint, read_manifest, restore_orbax_checkpoint
from twotower_jax.ops.ssd import SSD_IMPL_NAMES
from twotower_jax.plan import device_memory_limit, gib, memory_plan, parse_bytes
from twotower_jax.engine import DTYPES, MODES, Engine, GenerationConfig, Request, load_tokenizer, merge_stats, next_pow2
from twotower_jax.tower import Impl, NemotronH
from twotower_jax.two_tower import TwoTower

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"   # marks checkpoints trained on twotower_jax.data's byte ids
MOE_IMPLS = {"auto": "auto", "simple": "dense", "ragged": "ragged", "grouped": "grouped",
             "gather": "gather"}  # CLI name -> Impl.moe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m twotower_jax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF-layout directory (config.json + safetensors), orbax "
                   "checkpoint from `python -m convert`, or `demo` (the small TwoTower shipped in the package)")
    p.add_argument("--mode", choices=MODES, default="ar")
    p.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                   help="comma-separated token ids; repeat for a batch")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="text prompt (needs tokenizer.json in the checkpoint, or the demo model's byte "
                        "tokenizer); repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=["auto"] + sorted(DTYPES), default="auto",
                   help="params and compute dtype; auto: the checkpoint's own (bfloat16 for the release; router "
                        "biases stay float32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eos-token-id", type=int, default=None,
                   help="stop a row at this id (default: the checkpoint's eos_token_id; -1: never stop)")
    p.add_argument("--block-size", type=int, default=16, help="diffusion: block size S")
    p.add_argument("--steps-per-block", type=int, default=16, help="diffusion: max denoising steps T per block")
    p.add_argument("--confidence-threshold", type=float, default=0.9, help="diffusion: commit threshold γ")
    p.add_argument("--mask-token-id", type=int, default=3, help="diffusion: the [MASK] id")
    p.add_argument("--draft-steps", type=int, default=1,
                   help="self_speculative: denoiser passes per drafted block (1: argmax everywhere; more: the "
                        "diffusion commit rule with --confidence-threshold); output = AR's whatever the value")
    p.add_argument("--placement", choices=sharding.PLACEMENTS, default="single",
                   help="single: one device; towers: context tower on one half of the devices, denoiser on "
                        "the other (one device each on 2); sharded: both towers' experts and dense weights split "
                        "over every device (twotower_jax.sharding)")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="towers/sharded: use the first N devices (default: every visible device)")
    p.add_argument("--device-memory", type=parse_bytes, default=None, metavar="BYTES",
                   help="per-device memory for the up-front plan check, e.g. 80GiB (default: what the runtime "
                        "reports; none on CPU)")
    p.add_argument("--ssd-impl", choices=sorted(SSD_IMPL_NAMES), default=None,
                   help="Mamba scan: reference (sequential), xla (chunked), pallas (Triton kernel), mosaic (Mosaic "
                        "GPU kernel, Hopper), auto (the default: xla everywhere until a kernel passes on a GPU)")
    p.add_argument("--moe-impl", choices=sorted(MOE_IMPLS), default="auto",
                   help="MoE dispatch: simple (dense reference), ragged, grouped, gather (legacy); auto: grouped for "
                        "decode-sized calls, "
                        "else simple on CPU and ragged elsewhere (sharded: always the expert-parallel dispatch)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeatable; needs the checkpoint's tokenizer): each row is cut before its "
                        "first occurrence")
    p.add_argument("--streams", choices=["row", "request"], default="row",
                   help="random streams: row r uses seed + r (the samplers' int seed; default), or request r uses "
                        "fold_in(key(seed), r) (the engine's and batch_generate's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected comma-separated integers") from None
    if not ids:
        raise ValueError(f"--prompt-ids {text!r} is empty")
    return ids


def _load_tokenizer(directory: Path):
    tokenizer = load_tokenizer(directory)
    if tokenizer is None:
        raise ValueError(f"--prompt needs {directory / 'tokenizer.json'}; give --prompt-ids instead")
    return tokenizer


def implementation(args: argparse.Namespace) -> Impl:
    """The model's `Impl` from --ssd-impl / --moe-impl / --placement (checked together)."""
    if args.placement == "sharded":
        if args.moe_impl != "auto":
            raise ValueError(f"--placement sharded splits the experts over devices with the expert-parallel MoE "
                             f"dispatch; drop --moe-impl {args.moe_impl} (or use --placement single/towers)")
        moe = "expert_parallel"
    else:
        moe = MOE_IMPLS[args.moe_impl]
    impl = Impl(moe=moe)
    return impl if args.ssd_impl is None else dataclasses.replace(impl, scan=SSD_IMPL_NAMES[args.ssd_impl])


def load(directory: Path, dtype, args: argparse.Namespace, mesh):
    """(kind, config, params): an orbax checkpoint restored straight onto the placement's shardings (never
    whole on one device); a HF-layout one read tensor by tensor, each put onto its sharding before the
    next is read (never whole in host memory)."""
    if not is_orbax_checkpoint(directory):
        kind, config, params = load_checkpoint(directory, dtype, sharding.sharding_for(args.placement, mesh))
    else:
        kind = read_manifest(directory)["kind"]
        _check_kind(kind, args)
        kind, config, params = restore_orbax_checkpoint(directory, sharding.sharding_for(args.placement, mesh))

        def cast(path, x):  # on the array's own devices
            return x if keeps_float32(tuple(k.key for k in path)) or x.dtype == dtype else x.astype(dtype)
        params = jax.tree_util.tree_map_with_path(cast, params)
    _check_kind(kind, args)
    return kind, config, params


def check_fits(directory: Path, kind: str, dtype, args: argparse.Namespace, mesh, prompts) -> None:
    """Refuses, before anything is loaded, a run whose params and caches exceed a device's memory (the
    `twotower_jax.plan` plan, without compiling: the programs' scratch comes on top)."""
    limit = args.device_memory
    if limit is None:
        limit = device_memory_limit(np.asarray(mesh.devices).reshape(-1)[0])
    if limit is None:
        return
    shape = dict(mesh.shape)
    new_tokens, mode = args.max_new_tokens, args.mode
    if mode == "self_speculative":  # diffusion's towers and caches, the cache with its rejected-draft slots
        n, s = args.max_new_tokens, args.block_size
        mode, new_tokens = "diffusion", min(n * s, len(prompts) * (n - 1) + s)
    plan = memory_plan(read_config(directory), mode=mode, placement=args.placement, n_devices=mesh.size,
                       data=shape.get("data", 1), tensor=shape.get("tensor", 1), batch=len(prompts),
                       context=max(map(len, prompts)), new_tokens=new_tokens, block_size=args.block_size,
                       dtype=dtype, compile=False, device_memory=limit, two_tower_params=kind == TWO_TOWER)
    if not plan.fits():
        raise ValueError(f"this run does not fit: params + caches need {gib(plan.peak)} on the fullest device, "
                         f"which has {gib(limit)} (try --placement towers/sharded on more devices, bfloat16, "
                         f"or a smaller batch/context)\n{plan.table()}")


def _check_kind(kind: str, args: argparse.Namespace) -> None:
    if args.placement == "towers" and kind != TWO_TOWER:
        raise ValueError("--placement towers puts a TwoTower's two towers on two devices; this checkpoint is a "
                         "single Nemotron-H tower (use --placement single or sharded)")


def run(args: argparse.Namespace) -> dict:
    directory = resolve_checkpoint(args.checkpoint)
    if not directory.is_dir():
        raise ValueError(f"--checkpoint {directory}: no such directory")
    if bool(args.prompt_ids) == bool(args.prompt):
        raise ValueError("give prompts either as --prompt-ids or as --prompt, not both and not neither")
    tokenizer = _load_tokenizer(directory) if (args.prompt or args.stop) else None
    prompts = ([_parse_ids(t) for t in args.prompt_ids] if args.prompt_ids
               else [tokenizer.encode(t) for t in args.prompt])
    if args.mode == "diffusion" and (args.top_k or args.top_p != 1.0):
        raise ValueError("--top-k/--top-p are AR sampling options; diffusion samples with --temperature only")
    config = GenerationConfig(
        mode=args.mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, eos_token_id=args.eos_token_id, block_size=args.block_size,
        steps_per_block=args.steps_per_block, confidence_threshold=args.confidence_threshold,
        mask_token_id=args.mask_token_id, draft_steps=args.draft_steps, streams=args.streams)

    dtype = checkpoint_dtype(directory) if args.dtype == "auto" else DTYPES[args.dtype]
    impl = implementation(args)
    # Fails early, with the fix, when devices are missing.
    mesh = sharding.make_mesh(args.placement, n_devices=args.devices)
    check_fits(directory, stored_kind(directory), dtype, args, mesh, prompts)
    kind, model_config, params = load(directory, dtype, args, mesh)
    if kind == TWO_TOWER:
        model = TwoTower(model_config, dtype=dtype, param_dtype=dtype, impl=impl)
    elif args.mode != "ar":
        raise ValueError(f"--mode {args.mode} needs a TwoTower checkpoint (context_tower.*, denoiser_tower.*); "
                         f"{directory} is a single Nemotron-H tower, which can only run --mode ar")
    else:
        model = NemotronH(model_config, dtype=dtype, param_dtype=dtype, impl=impl)
    engine = Engine(model, params, tokenizer=tokenizer, placement=args.placement, mesh=mesh,
                    batch_size=next_pow2(len(prompts)), bucket_new_tokens=False)
    requests = [Request(id=i, prompt_ids=p, stop=tuple(args.stop)) for i, p in enumerate(prompts)]
    done = engine.generate(requests, config)
    stats = merge_stats(engine.last_batches, len(requests))
    stats.pop("sum_row_passes", None)
    out = {"mode": args.mode, "tokens": [c.tokens for c in done], "logprobs": [c.logprobs for c in done],
           "stats": stats}
    if tokenizer is not None:
        out["text"] = [c.text for c in done]
        out["finish_reason"] = [c.finish_reason for c in done]
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        out = run(args)
    except ValueError as e:  # bad arguments, configs and checkpoints (CheckpointError is a ValueError)
        parser.exit(2, f"error: {e}\n")
    if args.json:
        print(json.dumps(out))
    else:
        for i, row in enumerate(out["tokens"]):
            print(f"row {i}: {out['text'][i] if 'text' in out else row}")
        s = out["stats"]
        passes = (f"{s['denoiser_passes']} denoiser + {s['context_passes']} context passes"
                  if "denoiser_passes" in s else f"{s['forward_passes']} forward passes")
        if "tokens_per_denoiser_pass" in s:
            passes += f" ({s['tokens_per_denoiser_pass']:.2f} tokens per denoiser pass)"
        if "tokens_per_context_pass" in s:
            passes += (f" ({s['tokens_per_context_pass']:.2f} tokens per context pass, "
                       f"{s['tokens_per_verify_pass']:.2f} per verify pass)")
        print(f"{s['generated_tokens']} tokens, {passes}, {s['seconds']:.3f} s (+ {s['compile_seconds']:.1f} s compile)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
