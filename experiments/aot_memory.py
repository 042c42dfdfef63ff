"""What the real 30B programs would hold, compiled ahead of time from abstract shapes (nothing allocated).

For each context length L: the context tower's prefill of L tokens into a cache of L + 128 slots (the
last position's logits only) and one denoiser pass (S = 16) against an L-token context cache, in the
real config (`nano_30b_a3b()`), bfloat16, MoE dispatch `ragged`, batch 1, on the platform at hand. Prints
`memory_analysis()` (temp = XLA's scratch, output = results) as a table and writes JSON.

    python experiments/aot_memory.py --contexts 1024,4096,16384,32768 --out experiments/results/aot_memory.json

`--legacy` measures a checkout from before `logits_at` / chunked prefill existed (prefill then returns
the logits of every position: that is what the old API computed), so the same script gives the
"before" rows: `PYTHONPATH=<old checkout> python experiments/aot_memory.py --legacy ...`.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp

from twotower_jax.cache import init_cache
from twotower_jax.config import nano_30b_a3b
from twotower_jax.tower import Impl, NemotronH
from twotower_jax.two_tower import TwoTower

GiB = 2 ** 30
EXTRA_SLOTS = 128


def _cache_struct(config, batch: int, capacity: int, dtype):
    return jax.eval_shape(lambda: init_cache(config, batch, capacity, dtype))


def measure(fn, *args) -> dict:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    return {"temp_gib": m.temp_size_in_bytes / GiB, "output_gib": m.output_size_in_bytes / GiB,
            "argument_gib": m.argument_size_in_bytes / GiB, "compile_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="1024,4096,16384,32768")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--moe", default="ragged")
    parser.add_argument("--legacy", action="store_true", help="the API before logits_at / chunked prefill")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args()

    config = nano_30b_a3b()
    dtype = jnp.bfloat16
    two_tower = TwoTower(config, dtype, dtype, Impl(moe=args.moe))
    tower = NemotronH(config, dtype, dtype, Impl(moe=args.moe))
    params = two_tower.param_shapes()
    rows = []
    for length in map(int, args.contexts.split(",")):
        capacity = length + EXTRA_SLOTS
        tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
        if args.legacy:
            prefill = measure(lambda p, t: tower.prefill(p, t, capacity=capacity), params["context"], tokens)
        else:
            prefill = measure(lambda p, t: tower.prefill(p, t, capacity=capacity, logits_at="last"),
                              params["context"], tokens)
        rows.append({"program": "prefill", "context": length, **prefill})
        print(f"prefill  L={length:>6}  temp {prefill['temp_gib']:7.2f} GiB  output {prefill['output_gib']:6.2f} GiB"
              f"  (compile {prefill['compile_s']:.0f} s)", flush=True)
        cache = _cache_struct(config, 1, capacity, dtype)
        block = jax.ShapeDtypeStruct((1, args.block_size), jnp.int32)
        t = jax.ShapeDtypeStruct((1,), jnp.float32)
        denoise = measure(two_tower.denoise, params, block, cache, t)
        rows.append({"program": f"denoise S={args.block_size}", "context": length, **denoise})
        print(f"denoise  L={length:>6}  temp {denoise['temp_gib']:7.2f} GiB  output {denoise['output_gib']:6.2f} GiB"
              f"  (compile {denoise['compile_s']:.0f} s)", flush=True)

    print("\n| program | context | temp GiB | output GiB |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['program']} | {row['context']:,} | {row['temp_gib']:.2f} | {row['output_gib']:.2f} |")
    for program in sorted({r["program"] for r in rows}):
        temps = [r for r in rows if r["program"] == program]
        print(f"{program}: temp growth {temps[0]['context']:,} → {temps[-1]['context']:,}: "
              f"{temps[-1]['temp_gib'] - temps[0]['temp_gib']:.2f} GiB")
    if args.out:
        meta = {"args": vars(args), "platform": jax.devices()[0].platform, "jax": jax.__version__,
                "host": platform.machine()}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
