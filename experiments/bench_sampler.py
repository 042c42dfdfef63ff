"""Sampler throughput per placement: AR, mock-AR and mask diffusion on `single`, `towers`, `sharded`
(experts + dense weights split, the rules table) and `sharded` with experts only, same prompts, tokens/s
and the ratio to `single` in the same run. `towers`/`sharded` use every visible device (`--devices N`:
the first N; `--data D`: batch rows over D of them). Prints a table and writes JSON.

Compile time is excluded: each configuration runs once first (compile + warm-up), then --repeats timed
runs (the samplers' own run-only `seconds`), median reported. Every placement's tokens are checked
against `single`'s.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python experiments/bench_sampler.py --out experiments/results/sampler_cpu.json
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

from bench_common import write_results
from bench_tower import bench_config
from twotower_jax.sampling.ar import generate_ar, generate_mock_ar
from twotower_jax.sampling.diffusion import generate_mask_diffusion
from twotower_jax.sharding import SHARD_AXIS, Placement, make_mesh, resolve
from twotower_jax.tower import Impl, count_params
from twotower_jax.two_tower import TwoTower

PLACEMENTS = {
    "single": resolve("single"),
    "towers": resolve("towers"),
    "sharded": resolve("sharded"),
    "sharded/experts-only": Placement("sharded", (("expert", SHARD_AXIS),)),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", default="M*EME")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps-per-block", type=int, default=8)
    parser.add_argument("--confidence-threshold", type=float, default=0.9)
    parser.add_argument("--modes", nargs="+", default=["ar", "mock_ar", "diffusion"])
    parser.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    parser.add_argument("--devices", type=int, default=None,
                        help="towers/sharded on the first N devices (default: every visible device)")
    parser.add_argument("--data", type=int, default=1, help="the meshes' data axis (batch rows split over it)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    config = bench_config(args.pattern)
    model = TwoTower(config, impl=Impl(moe="dense"))  # the CLI's CPU default; `sharded` uses expert_parallel
    params = model.random_params(seed=0, scale=0.2)  # peaked enough that confidences do not tie
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, config.vocab_size, args.prompt_length - 3 * i).tolist() for i in range(args.batch)]
    meshes = {name: make_mesh(p) if p.kind == "single" else make_mesh(p, n_devices=args.devices, data=args.data)
              for name, p in PLACEMENTS.items()}
    generators = {
        "ar": lambda name: generate_ar(model, params, prompts, args.max_new_tokens, placement=PLACEMENTS[name],
                                       mesh=meshes[name]),
        "mock_ar": lambda name: generate_mock_ar(model, params, prompts, args.max_new_tokens,
                                                 placement=PLACEMENTS[name], mesh=meshes[name]),
        "diffusion": lambda name: generate_mask_diffusion(
            model, params, prompts, args.max_new_tokens, block_size=args.block_size,
            steps_per_block=args.steps_per_block, confidence_threshold=args.confidence_threshold,
            placement=PLACEMENTS[name], mesh=meshes[name]),
    }

    rows = []
    for mode in args.modes:
        reference = None
        for name in args.placements:
            first = generators[mode](name)  # compile + first run
            runs = [generators[mode](name) for _ in range(args.repeats)]
            seconds = float(np.median([r.stats["seconds"] for r in runs]))
            tokens = first.stats["generated_tokens"]
            row = {"mode": mode, "placement": name, "mesh": dict(meshes[name].shape), "tokens": tokens, "ms": seconds * 1e3,
                   "tokens_per_s": tokens / seconds, "compile_s": first.stats["compile_seconds"],
                   "first_run_ms": first.stats["seconds"] * 1e3}
            if "tokens_per_denoiser_pass" in first.stats:
                row["tokens_per_denoiser_pass"] = first.stats["tokens_per_denoiser_pass"]
            if reference is None:
                reference = (first.tokens, row["tokens_per_s"])
            row["same_tokens_as_first"] = first.tokens == reference[0] and all(r.tokens == first.tokens for r in runs)
            row["vs_single"] = row["tokens_per_s"] / reference[1]
            rows.append(row)
            print(f"{mode} {name}: {row['tokens_per_s']:.0f} tokens/s", flush=True)

    print(f"\nSamplers, TwoTower pattern {args.pattern} ({count_params(params) / 1e6:.2f}M params), batch {args.batch}, "
          f"prompts {args.prompt_length - 3 * (args.batch - 1)}..{args.prompt_length} tokens, {args.max_new_tokens} new "
          f"tokens (no EOS), diffusion S={args.block_size} T={args.steps_per_block} γ={args.confidence_threshold}, "
          f"float32, {jax.device_count()} {jax.devices()[0].platform} devices, median of {args.repeats}, compile excluded")
    print(f"{'mode':>9} {'placement':>21} {'ms':>9} {'tokens/s':>9} {'vs single':>10} {'same tokens':>12} {'compile s':>10}")
    for r in rows:
        print(f"{r['mode']:>9} {r['placement']:>21} {r['ms']:>9.1f} {r['tokens_per_s']:>9.0f} {r['vs_single']:>9.2f}x "
              f"{str(r['same_tokens_as_first']):>12} {r['compile_s']:>10.1f}")
    if args.out:
        write_results(args.out, rows, args, params=count_params(params))


if __name__ == "__main__":
    main()
