"""MoE dispatch benchmark: dense (reference) vs ragged vs grouped vs gather (legacy) vs expert_parallel, at decode and prefill
token counts. Prints a table and writes JSON. Compile time is excluded (AOT-compiled first); each time
is the median of --repeats runs. On CPU these numbers compare dispatches on this host only.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python experiments/bench_moe.py --out experiments/results/moe_cpu.json
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import compile_and_time, write_results
from twotower_jax.layers.moe import (EXPERT_AXIS, experts_dense, experts_expert_parallel, experts_gather,
                                     experts_grouped, experts_ragged)

DISPATCHES = {"dense": experts_dense, "ragged": experts_ragged, "grouped": experts_grouped, "gather": experts_gather,
              "expert_parallel": experts_expert_parallel}


def problem(tokens, experts, k, d, f, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((tokens, d)), dtype)
    up = jnp.asarray(rng.standard_normal((experts, d, f)) / np.sqrt(d), dtype)
    down = jnp.asarray(rng.standard_normal((experts, f, d)) / np.sqrt(f), dtype)
    idx = jnp.asarray(np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]), jnp.int32)
    weights = jnp.asarray(rng.uniform(0.1, 1, (tokens, k)), jnp.float32)
    return x, up, down, weights, idx


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4, 512])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--expert-width", type=int, default=128)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    mesh = jax.make_mesh((jax.device_count(),), (EXPERT_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))

    rows = []
    for tokens in args.tokens:
        inputs = problem(tokens, args.experts, args.top_k, args.hidden, args.expert_width, dtype)
        with jax.set_mesh(mesh):  # every dispatch timed under the same mesh context
            measured = {name: compile_and_time(fn, inputs, args.repeats) for name, fn in DISPATCHES.items()}
        reference_s, _, reference = measured["dense"]
        for name, (seconds, _, out) in measured.items():
            err = float(jnp.max(jnp.abs(out - reference)) / jnp.max(jnp.abs(reference)))
            rows.append({"tokens": tokens, "dispatch": name, "ms": seconds * 1e3,
                         "speedup_vs_dense": reference_s / seconds, "max_rel_err_vs_dense": err})

    print(f"MoE dispatch, E={args.experts} top-{args.top_k} D={args.hidden} F={args.expert_width} {args.dtype}, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), median of {args.repeats}, compile excluded")
    print(f"{'tokens':>7} {'dispatch':>16} {'ms':>9} {'vs dense':>9} {'rel err':>9}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['dispatch']:>16} {r['ms']:>9.3f} {r['speedup_vs_dense']:>8.2f}x "
              f"{r['max_rel_err_vs_dense']:>9.1e}")
    if args.out:
        write_results(args.out, rows, args)


if __name__ == "__main__":
    main()
