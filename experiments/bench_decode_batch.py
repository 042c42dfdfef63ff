"""Batched decoding on this machine: one tower decode step of the 22.7M-parameter config (hidden 512,
`MEM*EMEM`, 16 experts top-4, vocab 4096: `bench_overhead.HF_CONFIG`) at batch 1 and batch 8, for the
current default and each candidate fast path in the same run, and the same step taken apart by layer type.

Parts timed, each its own compiled program whose outputs are returned (so nothing is dead code):
- `step`: `NemotronH.decode_step` (logits used: the argmax feeds the next step), 64-token prompt, cache
  capacity 1024, cache donated, a host sync after every step (what a serving loop pays);
- `attention` / `mamba` / `moe`: one `Block` of that type on a fixed (b, 1, d) input against its layer
  cache (donated and fed back; attention at a fixed fill of 65 slots), returning the new hidden state;
- `head`: norm_f + LM head on a (b, 1, d) hidden state, returning the float32 logits;
- `prefill`: a 256-token prompt at batch 1 (`logits_at="last"`), to show a decode path does not slow it.

Every (variant, batch, part) program is compiled and run twice first; then --rounds rounds, each running
every program --steps times in turn (interleaved, so a slow phase of the shared CPU hits all alike).
Medians of the per-call times are reported, minima in brackets (and in the JSON). Variants (`VARIANTS`):
"old" (one key tile of the whole capacity at decode, the path before this benchmark), "new" (the default:
decode key tiles of 128) and "new_noynn" (the same with XLA:CPU's own dot kernels instead of YNNPACK
fusions). Results and their reading: experiments/results/decode_batch_cpu.md.

    cd experiments && python bench_decode_batch.py --out results/decode_batch_cpu.json
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import write_results
from bench_overhead import HF_CONFIG
from twotower_jax.cache import CausalContext
from twotower_jax.config import ATTENTION, MAMBA, MOE, NemotronHConfig
from twotower_jax.tower import Block, Impl, NemotronH, count_params

PROMPT, CAPACITY, PREFILL_LEN = 64, 1024, 256
# name -> (Impl, XLA compiler options of every timed program): each candidate decode path.
NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}   # XLA:CPU's own dot kernels instead of YNNPACK fusions
VARIANTS = {
    # the decode path before this benchmark: one key tile of the whole capacity (1024 slots read, and
    # copied into the batched-dot layout by XLA:CPU, per step whatever the fill)
    "old": (Impl(attention_decode_k_chunk=None), {}),
    "new": (Impl(), {}),            # the default now: decode key tiles of 128, tiles past the fill skipped
    "new_noynn": (Impl(), NO_YNN),
}
PARTS = ("step", "attention", "mamba", "moe", "head")


def _layer_index(config, letter):
    return config.pattern.index(letter)


def build(config, params, impl: Impl, options: dict, batch: int, part: str, rng):
    """run() -> None: one call of one program, compiled with XLA `options`; its state (cache, token)
    lives in the closure."""
    model = NemotronH(config, impl=impl)
    jit = functools.partial(jax.jit, compiler_options=options or None)
    prompt = jnp.asarray(rng.integers(4, config.vocab_size, (batch, PROMPT)), jnp.int32)
    if part == "prefill":
        tokens = jnp.asarray(rng.integers(4, config.vocab_size, (batch, PREFILL_LEN)), jnp.int32)
        fn = jit(lambda p, t: model.prefill(p, t, capacity=PREFILL_LEN, logits_at="last")[0])
        return lambda: jax.block_until_ready(fn(params, tokens))
    logits, cache = model.prefill(params, prompt, capacity=CAPACITY)
    if part == "step":
        state = [jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache]
        step = jit(model.decode_step, donate_argnums=2)   # decode_step inlined: the same program

        def run():
            logits, state[1] = step(params, state[0], state[1])
            state[0] = jnp.argmax(logits, -1).astype(jnp.int32)
            jax.block_until_ready((state[0], state[1]))
        return run
    x = jnp.asarray(rng.standard_normal((batch, 1, config.hidden_size)), jnp.float32)
    if part == "head":
        fn = jit(lambda p, x: model.module.apply({"params": p}, x, method=lambda m, h: m.logits(m.norm_f(h))))
        return lambda: jax.block_until_ready(fn(params, x))
    letter = {"attention": ATTENTION, "mamba": MAMBA, "moe": MOE}[part]
    i = _layer_index(config, letter)
    block = Block(config, letter, impl=impl)
    layer_params = params[f"layers_{i}"]
    start = cache.length
    key_valid = jax.lax.dynamic_update_slice(cache.key_valid, jnp.ones((batch, 1), bool), (0, start))
    valid = jnp.ones((batch, 1), bool)

    def apply(p, x, layer_cache, start, key_valid):   # start, key_valid traced, as in the decode step
        context = None if letter == MOE else CausalContext(layer_cache, start, key_valid)
        return block.apply({"params": p}, x, context, valid, None, False)

    fn = jit(apply, donate_argnums=() if letter == MOE else 2)
    state = [cache.layers[i]]

    def run():
        h, new_cache = fn(layer_params, x, state[0], start, key_valid)
        if letter != MOE:
            state[0] = new_cache
        jax.block_until_ready(h)
    return run


def stats(times):
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "n": len(times)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--parts", default=",".join(PARTS) + ",prefill")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="calls per program per round")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = NemotronHConfig.from_hf_dict(dict(HF_CONFIG))
    params = jax.device_put(NemotronH(config).random_params(seed=0, scale=0.02))
    rng = np.random.default_rng(0)
    variants = args.variants.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    runs = {}
    for part in args.parts.split(","):
        for name in variants:
            for batch in ([1] if part == "prefill" else batches):
                run = build(config, params, *VARIANTS[name], batch, part, rng)
                run(), run()                       # compile, warm up
                runs[(name, part, batch)] = run
    times = {k: [] for k in runs}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for key, run in runs.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - start)
        load.append(os.getloadavg()[0])
    rows = [{"variant": v, "part": p, "batch": b, **stats(t)} for (v, p, b), t in times.items()]
    med = {(r["variant"], r["part"], r["batch"]): r["median_ms"] for r in rows}
    low = {(r["variant"], r["part"], r["batch"]): r["min_ms"] for r in rows}
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"22.7M config ({count_params(params) / 1e6:.1f}M params), {jax.devices()[0].platform}, "
          f"median ms of {args.rounds} x {args.steps} interleaved calls; load avg 1-min over the run "
          f"{min(load):.1f}-{max(load):.1f}; {uptime}")
    print("median ms (min ms in brackets); ratio = last batch / first batch, of medians [of minima]")
    print(f"{'part':>10} {'variant':>10} " + " ".join(f"{'b' + str(b):>16}" for b in batches) + "  ratio")
    for part in args.parts.split(","):
        for name in variants:
            if part == "prefill":
                print(f"{part:>10} {name:>10} {med[(name, part, 1)]:>8.2f} [{low[(name, part, 1)]:5.2f}]")
                continue
            cells = " ".join(f"{med[(name, part, b)]:>8.2f} [{low[(name, part, b)]:5.2f}]" for b in batches)
            first, last = (name, part, batches[0]), (name, part, batches[-1])
            print(f"{part:>10} {name:>10} {cells}  {med[last] / med[first]:5.2f}x [{low[last] / low[first]:4.2f}x]")
    if args.out:
        write_results(args.out, rows, args, load_avg_1min=load, uptime=uptime,
                      variants={k: {"impl": dataclasses.asdict(VARIANTS[k][0]), "compiler_options": VARIANTS[k][1]}
                                for k in variants})


if __name__ == "__main__":
    main()
