"""The training objective's context pass: one call (`objective.blockwise_context`: a single causal pass,
block-boundary Mamba states from its scan inputs) against the serial version it replaced
(`objective.blockwise_context_by_blocks`: L/S tower extensions, one block at a time), in one run. Also the
whole denoiser loss + gradient step with each. A third version, `one_call_impl_tiles`, is the one call
with the model's own attention tiles (`attention_tile=None`: 512 queries × 1,024 keys), as it was before
the pass got its own square tiles. Prints a table, writes JSON; compile excluded (all versions compiled
first and warmed up, then timed in turns — one run of each per round — so that a shared machine's load
falls on all of them alike; median of --repeats rounds, wall and process CPU time).

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python experiments/bench_context_pass.py \\
        --out experiments/results/context_pass_cpu.json
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import write_results
from bench_tower import bench_config
from twotower_jax.tower import Impl, count_params
from twotower_jax.training import objective
from twotower_jax.two_tower import TwoTower

VERSIONS = {"one_call": objective.blockwise_context, "by_blocks": objective.blockwise_context_by_blocks,
            "one_call_impl_tiles": functools.partial(objective.blockwise_context, attention_tile=None)}


def timed_in_turns(compiled: dict, args: dict, repeats: int) -> dict:
    """{name: (median wall s, median process CPU s)}: one warm-up each, then `repeats` rounds of one run of
    every version in turn."""
    for name, fn in compiled.items():
        jax.block_until_ready(fn(*args[name]))
    wall = {name: [] for name in compiled}
    cpu = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, fn in compiled.items():
            w, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args[name]))
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return {name: (float(np.median(wall[name])), float(np.median(cpu[name]))) for name in compiled}


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
            compiled, fn_args, compile_s = {}, {}, {}
            for name, context_fn in VERSIONS.items():
                if what == "context pass":
                    fn = functools.partial(context_fn, model.context, block_size=args.block_size)
                    fn_args[name] = (params["context"], tokens)
                else:
                    def loss(denoiser, context_params, tokens, context_fn=context_fn):
                        noisy, masked, t = objective.noise_tokens(jax.random.key(0), tokens, 3)
                        context = context_fn(model.context, context_params, tokens, args.block_size)
                        logits = objective.denoiser_logits(model, denoiser, noisy, context, t)
                        return jnp.mean(jnp.where(masked, -jax.nn.log_softmax(logits)[..., 0], 0.0))
                    fn = jax.grad(loss)
                    fn_args[name] = (params["denoiser"], params["context"], tokens)
                start = time.perf_counter()
                compiled[name] = jax.jit(fn).lower(*fn_args[name]).compile()
                compile_s[name] = time.perf_counter() - start
            for name, (seconds, cpu_seconds) in timed_in_turns(compiled, fn_args, args.repeats).items():
                rows.append({"what": what, "version": name, "batch": args.batch, "length": length,
                             "blocks": length // args.block_size, "ms": seconds * 1e3, "cpu_ms": cpu_seconds * 1e3,
                             "compile_s": compile_s[name]})
                print(rows[-1], flush=True)
    print(f"\n{count_params(params['context']) / 1e6:.2f}M params per tower, pattern {args.pattern}, "
          f"block {args.block_size}, batch {args.batch}")
    print("| what | length | blocks | by_blocks ms (CPU ms) | one_call ms (CPU ms) | speed-up wall (CPU) | "
          "one_call_impl_tiles ms (CPU ms) | speed-up wall (CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["version"] != "by_blocks":
            continue
        cells = [r["what"], str(r["length"]), str(r["blocks"]), f"{r['ms']:.1f} ({r['cpu_ms']:.0f})"]
        for name in ("one_call", "one_call_impl_tiles"):
            x = next(x for x in rows if x["version"] == name and x["what"] == r["what"] and x["length"] == r["length"])
            x["speedup_vs_by_blocks"] = r["ms"] / x["ms"]
            x["cpu_speedup_vs_by_blocks"] = r["cpu_ms"] / x["cpu_ms"]
            cells += [f"{x['ms']:.1f} ({x['cpu_ms']:.0f})",
                      f"{x['speedup_vs_by_blocks']:.2f}x ({x['cpu_speedup_vs_by_blocks']:.2f}x)"]
        print("| " + " | ".join(cells) + " |")
    if args.out:
        write_results(args.out, rows, args, params_per_tower=count_params(params["context"]))


if __name__ == "__main__":
    main()
