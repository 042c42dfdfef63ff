"""One tower's prefill and decode throughput (tokens/s) at a few batch sizes and lengths, per MoE dispatch.
Prints a table and writes JSON. Compile time is excluded (AOT-compiled first, then a warm-up run); each time
is the median of --repeats runs. Ratios are against the dense dispatch in the same run.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python experiments/bench_tower.py --out experiments/results/tower_cpu.json
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import median_seconds, write_results
from twotower_jax.config import tiny
from twotower_jax.tower import Impl, NemotronH, count_params

MOE_IMPLS = ("dense", "ragged", "grouped", "gather")


def bench_config(pattern: str):
    """A small tower with the real model's structure (every layer type, GQA, grouped Mamba, top-k MoE)."""
    return tiny(pattern=pattern, vocab_size=2048, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                head_dim=32, mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=16, n_groups=2, chunk_size=32,
                n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
                moe_shared_expert_intermediate_size=256, intermediate_size=256)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", default="M*EME")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256], help="prefill lengths")
    parser.add_argument("--decode-steps", type=int, default=16, help="decode steps per timed run (one program)")
    parser.add_argument("--context", type=int, default=128, help="tokens in the cache before decoding")
    parser.add_argument("--moe", nargs="+", default=list(MOE_IMPLS), choices=MOE_IMPLS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    config = bench_config(args.pattern)
    params = NemotronH(config).random_params(seed=0, scale=0.05)
    rng = np.random.default_rng(0)

    rows = []
    for batch in args.batch:
        for moe in args.moe:
            model = NemotronH(config, impl=Impl(moe=moe))
            for length in args.lengths:
                tokens = jnp.asarray(rng.integers(4, config.vocab_size, (batch, length)), jnp.int32)
                compiled = jax.jit(lambda p, t: model.prefill(p, t)[0]).lower(params, tokens).compile()
                seconds = median_seconds(compiled, (params, tokens), args.repeats)
                rows.append({"phase": "prefill", "batch": batch, "length": length, "moe": moe, "ms": seconds * 1e3,
                             "tokens_per_s": batch * length / seconds})

            def decode(p, cache, token, model=model):
                def step(_, carry):
                    token, cache = carry
                    logits, cache = model.decode_step(p, token, cache)
                    return jnp.argmax(logits, -1).astype(jnp.int32), cache
                return jax.lax.fori_loop(0, args.decode_steps, step, (token, cache))[0]

            prompt = jnp.asarray(rng.integers(4, config.vocab_size, (batch, args.context)), jnp.int32)
            _, cache = model.prefill(params, prompt, capacity=args.context + args.decode_steps)
            token = prompt[:, -1]
            compiled = jax.jit(decode).lower(params, cache, token).compile()
            seconds = median_seconds(compiled, (params, cache, token), args.repeats)
            rows.append({"phase": "decode", "batch": batch, "length": args.context, "moe": moe, "ms": seconds * 1e3,
                         "tokens_per_s": batch * args.decode_steps / seconds})
    for r in rows:
        ref = next(x for x in rows if x["moe"] == "dense" and all(x[k] == r[k] for k in ("phase", "batch", "length")))
        r["vs_dense"] = r["tokens_per_s"] / ref["tokens_per_s"]

    print(f"One tower, pattern {args.pattern}, {count_params(params) / 1e6:.2f}M params, D={config.hidden_size} "
          f"V={config.vocab_size} E={config.n_routed_experts} top-{config.num_experts_per_tok}, float32, "
          f"{jax.devices()[0].platform}, median of {args.repeats}, compile excluded; decode = {args.decode_steps} "
          f"steps after {args.context} cached tokens")
    print(f"{'phase':>8} {'batch':>6} {'length':>7} {'moe':>7} {'ms':>9} {'tokens/s':>10} {'vs dense':>9}")
    for r in rows:
        print(f"{r['phase']:>8} {r['batch']:>6} {r['length']:>7} {r['moe']:>7} {r['ms']:>9.2f} "
              f"{r['tokens_per_s']:>10.0f} {r['vs_dense']:>8.2f}x")
    if args.out:
        write_results(args.out, rows, args, params=count_params(params))


if __name__ == "__main__":
    main()
