"""The training objective's context pass: one call (`objective.blockwise_context`: a single causal pass,
block-boundary Mamba states from its scan inputs) against the serial version it replaced
(`objective.blockwise_context_by_blocks`: L/S tower extensions, one block at a time), in one run. Also the
whole denoiser loss + gradient step with each. Prints a table, writes JSON; compile excluded (compiled
first, warm-up run, median of --repeats).

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python experiments/bench_context_pass.py \\
        --out experiments/results/context_pass_cpu.json
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import compile_and_time, write_results
from bench_tower import bench_config
from twotower_jax.tower import Impl, count_params
from twotower_jax.training import objective
from twotower_jax.two_tower import TwoTower

VERSIONS = {"one_call": objective.blockwise_context, "by_blocks": objective.blockwise_context_by_blocks}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", default="M*EME")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = bench_config(args.pattern)
    model = TwoTower(config, impl=Impl(moe="dense"))
    params = model.random_params(seed=0, scale=0.05)
    rng = np.random.default_rng(0)
    rows = []
    for length in args.lengths:
        tokens = jnp.asarray(rng.integers(4, config.vocab_size, (args.batch, length)), jnp.int32)
        for what in ("context pass", "loss + grad"):
            for name, context_fn in VERSIONS.items():
                if what == "context pass":
                    fn = functools.partial(context_fn, model.context, block_size=args.block_size)
                    fn_args = (params["context"], tokens)
                else:
                    def loss(denoiser, context_params, tokens, context_fn=context_fn):
                        noisy, masked, t = objective.noise_tokens(jax.random.key(0), tokens, 3)
                        context = context_fn(model.context, context_params, tokens, args.block_size)
                        logits = objective.denoiser_logits(model, denoiser, noisy, context, t)
                        return jnp.mean(jnp.where(masked, -jax.nn.log_softmax(logits)[..., 0], 0.0))
                    fn = jax.grad(loss)
                    fn_args = (params["denoiser"], params["context"], tokens)
                seconds, compile_s, _ = compile_and_time(fn, fn_args, args.repeats)
                rows.append({"what": what, "version": name, "batch": args.batch, "length": length,
                             "blocks": length // args.block_size, "ms": seconds * 1e3, "compile_s": compile_s})
                print(rows[-1], flush=True)
    print(f"\n{count_params(params['context']) / 1e6:.2f}M params per tower, pattern {args.pattern}, "
          f"block {args.block_size}, batch {args.batch}")
    print("| what | length | blocks | by_blocks ms | one_call ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["version"] != "one_call":
            continue
        ref = next(x for x in rows if x["version"] == "by_blocks" and x["what"] == r["what"] and x["length"] == r["length"])
        r["speedup_vs_by_blocks"] = ref["ms"] / r["ms"]
        print(f"| {r['what']} | {r['length']} | {r['blocks']} | {ref['ms']:.1f} | {r['ms']:.1f} | "
              f"{r['speedup_vs_by_blocks']:.2f}x |")
    if args.out:
        write_results(args.out, rows, args, params_per_tower=count_params(params["context"]))


if __name__ == "__main__":
    main()
