"""Blockwise attention (the default: online softmax over key/query tiles, filled slots only) against the
dense reference path (concatenated keys, one dense mask over the whole cache capacity), in one run:
tower prefill and decode at a long context, and the three samplers. Prints a table, writes JSON.
Compile time is excluded (compiled first, warm-up run, median of --repeats).

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python experiments/bench_attention.py \\
        --out experiments/results/attention_cpu.json
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import median_seconds, write_results
from bench_tower import bench_config
from twotower_jax.sampling.ar import generate_ar, generate_mock_ar
from twotower_jax.sampling.diffusion import generate_mask_diffusion
from twotower_jax.tower import Impl, count_params
from twotower_jax.two_tower import TwoTower

IMPLS = ("dense", "blockwise")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", default="M*EME")
    parser.add_argument("--context", type=int, default=4096, help="prefill length / cached tokens for decode")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--sampler-prompt", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = bench_config(args.pattern)
    base = TwoTower(config, impl=Impl(moe="auto"))
    params = base.random_params(seed=0, scale=0.05)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(4, config.vocab_size, (1, args.context)), jnp.int32)
    sampler_prompts = [rng.integers(4, config.vocab_size, args.sampler_prompt).tolist()]

    rows = []
    for impl in IMPLS:
        model = dataclasses.replace(base, impl=dataclasses.replace(base.impl, attention=impl))
        tower = model.context
        prefill = jax.jit(lambda p, t, tower=tower: tower.prefill(p, t, logits_at="last")[0]).lower(
            params["context"], prompt).compile()
        seconds = median_seconds(prefill, (params["context"], prompt), args.repeats)
        rows.append({"what": f"prefill {args.context}", "attention": impl, "ms": seconds * 1e3,
                     "tokens_per_s": args.context / seconds})

        def decode(p, cache, token, tower=tower):
            def step(_, carry):
                token, cache = carry
                logits, cache = tower.decode_step(p, token, cache)
                return jnp.argmax(logits, -1).astype(jnp.int32), cache
            return jax.lax.fori_loop(0, args.decode_steps, step, (token, cache))[0]

        _, cache = tower.prefill(params["context"], prompt, capacity=args.context + args.decode_steps, logits_at="none")
        compiled = jax.jit(decode).lower(params["context"], cache, prompt[:, -1]).compile()
        seconds = median_seconds(compiled, (params["context"], cache, prompt[:, -1]), args.repeats)
        rows.append({"what": f"decode after {args.context}", "attention": impl, "ms": seconds * 1e3,
                     "tokens_per_s": args.decode_steps / seconds})

        samplers = {"AR": lambda: generate_ar(model, params, sampler_prompts, args.new_tokens),
                    "mock-AR": lambda: generate_mock_ar(model, params, sampler_prompts, args.new_tokens),
                    "diffusion": lambda: generate_mask_diffusion(model, params, sampler_prompts, args.new_tokens,
                                                                 confidence_threshold=0.8)}
        for name, run in samplers.items():
            run()   # compiles; later runs reuse the executable
            times = [run().stats["seconds"] for _ in range(args.repeats)]
            seconds = float(np.median(times))
            rows.append({"what": f"{name} {args.sampler_prompt}+{args.new_tokens}", "attention": impl,
                         "ms": seconds * 1e3, "tokens_per_s": args.new_tokens / seconds})
    for r in rows:
        ref = next(x for x in rows if x["attention"] == "dense" and x["what"] == r["what"])
        r["vs_dense"] = r["tokens_per_s"] / ref["tokens_per_s"]

    print(f"TwoTower towers of pattern {args.pattern}, {count_params(params['context']) / 1e6:.2f}M params each, "
          f"float32, {jax.devices()[0].platform}, median of {args.repeats}, compile excluded")
    print(f"{'what':>26} {'attention':>10} {'ms':>9} {'tokens/s':>10} {'vs dense':>9}")
    for r in rows:
        print(f"{r['what']:>26} {r['attention']:>10} {r['ms']:>9.2f} {r['tokens_per_s']:>10.0f} {r['vs_dense']:>8.2f}x")
    if args.out:
        write_results(args.out, rows, args, params=count_params(params["context"]))


if __name__ == "__main__":
    main()
