"""The fastest mask diffusion can possibly be against AR on this machine, whatever the denoiser learned.

With one denoising step per block (T = 1) the sampler commits all S positions of a block in a single
denoiser pass: no trained denoiser can need fewer passes, so the tokens/s of that schedule is an upper
bound on diffusion's speed-up over AR decoding for the model's size and block size, independent of
quality. This script measures that bound at batch 1 for the demo architecture at several widths
(`twotower_jax.training.recipes.demo_config`; speed does not depend on the weights, so they are random
and EOS is off: every run generates exactly --new-tokens tokens), next to the per-piece costs that
explain it, each timed inside one compiled loop (no per-call overhead): one AR decode step, one
denoiser pass over S positions, one context-tower extension over S positions.

Whole generations use the public samplers exactly as `sweep_sampler.py` times them (run seconds only,
compile excluded), AR and diffusion interleaved round by round, medians.

    python experiments/bench_diffusion_ceiling.py --out experiments/results/diffusion_ceiling_cpu.json
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from bench_common import write_results
from twotower_jax.data import MASK_ID
from twotower_jax.sampling.ar import generate_ar
from twotower_jax.sampling.diffusion import generate_mask_diffusion
from twotower_jax.training.recipes import demo_config
from twotower_jax.two_tower import TwoTower

PROMPT_WIDTH = 24   # the sweep's prompt width (the longest held-out task prompt)


def whole_generations(model, params, prompt, new_tokens: int, block_sizes, rounds: int) -> dict:
    """Median run ms of AR (1 and `new_tokens` tokens) and of one-pass-per-block diffusion per S."""
    runs = {"ar_1": lambda: generate_ar(model, params, [prompt], 1, prompt_width=PROMPT_WIDTH),
            "ar": lambda: generate_ar(model, params, [prompt], new_tokens, prompt_width=PROMPT_WIDTH)}
    for s in block_sizes:
        runs[f"S{s}"] = functools.partial(
            generate_mask_diffusion, model, params, [prompt], max_new_tokens=new_tokens, block_size=s,
            steps_per_block=1, mask_token_id=MASK_ID, confidence_threshold=1.0, prompt_width=PROMPT_WIDTH)
    for run in runs.values():   # compile and warm up
        run(), run()
    times = {k: [] for k in runs}
    for _ in range(rounds):     # interleaved, so slow phases of a shared machine hit every mode alike
        for k, run in runs.items():
            result = run()
            assert k == "ar_1" or result.stats["generated_tokens"] == new_tokens, (k, result.stats)
            times[k].append(result.stats["seconds"])
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def piece_costs(model, params, prompt, block_size: int, new_tokens: int, rounds: int) -> dict:
    """Median µs of one decode step, one denoiser pass over `block_size` positions and one context
    extension over them, each from a compiled loop of n dependent calls minus the same program with none,
    with the cache capacity the samplers use (prompt + new tokens: attention reads all of it). n: as many
    decode steps and extensions as fit that capacity, 16 denoiser passes.

    Every piece's output is used, as in the samplers: each decode step's argmax is the next step's token
    and each denoiser pass's logits are reduced (max over all positions and the vocabulary) into the carry,
    so XLA cannot drop the LM head or the layers that feed only it (an earlier version discarded the
    logits: the demo pattern ends in a MoE layer whose output reaches only the LM head, so both were
    removed and a decode step looked about half as costly as it is). Extensions keep the samplers'
    `logits_at="none"`: the samplers never read those logits, so the trailing MoE layer and the head are
    legitimately skipped there too. Each program also returns the cache, so its prefill is never dropped
    from the n = 0 baseline."""
    capacity = PROMPT_WIDTH + new_tokens
    loops = {"decode_step": new_tokens, "denoiser_pass": 16, "extend": new_tokens // block_size}
    tokens = jnp.asarray([prompt + [0] * (PROMPT_WIDTH - len(prompt))], jnp.int32)
    valid = jnp.arange(PROMPT_WIDTH)[None] < len(prompt)
    block = jnp.full((1, block_size), MASK_ID, jnp.int32)

    def prefilled(p):
        return model.context.prefill(p["context"], tokens, valid, capacity=capacity, logits_at="none")[1]

    def decode(p, n):
        def step(i, carry):
            logits, cache = model.context.decode_step(p["context"], carry[0], carry[1])
            return jnp.argmax(logits, -1).astype(jnp.int32), cache
        return jax.lax.fori_loop(0, n, step, (jnp.full((1,), 70, jnp.int32), prefilled(p)))

    def denoise(p, n):
        cache = prefilled(p)
        # The canvas depends on the carry, so XLA cannot hoist the (otherwise loop-invariant) pass.
        step = lambda i, x: x + jnp.max(model.denoise(p, block + (x > 1e30), cache, jnp.ones((1,))))
        return cache, jax.lax.fori_loop(0, n, step, 0.0)

    def extend(p, n):
        step = lambda i, c: model.context.extend(p["context"], block, c, logits_at="none")[1]
        return jax.lax.fori_loop(0, n, step, prefilled(p))

    compiled = {(name, n): jax.jit(functools.partial(fn, n=n)).lower(params).compile()
                for name, fn in (("decode_step", decode), ("denoiser_pass", denoise), ("extend", extend))
                for n in (0, loops[name])}
    for c in compiled.values():
        jax.block_until_ready(c(params))
    times = {k: [] for k in compiled}
    for _ in range(rounds):
        for k, c in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(c(params))
            times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {name: 1e6 * (med[(name, n)] - med[(name, 0)]) / n for name, n in loops.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="16,32,64", help="hidden sizes of the demo architecture")
    parser.add_argument("--block-sizes", default="8,16,32,64")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    block_sizes = [int(s) for s in args.block_sizes.split(",")]
    prompt = [1] + [ord(c) + 4 for c in "reverse qzkwmbbfe="]   # a held-out-length task prompt
    rows = []
    print(f"{'hidden':>6} {'S':>3} {'AR ms':>7} {'diff ms':>8} {'ceiling':>8}   pieces (µs): decode step | "
          f"S-token denoiser pass | S-token extend")
    for width in (int(w) for w in args.widths.split(",")):
        model = TwoTower(demo_config(width))
        params = model.init_params(jax.random.key(0))
        whole = whole_generations(model, params, prompt, args.new_tokens, block_sizes, args.rounds)
        for s in block_sizes:
            pieces = piece_costs(model, params, prompt, s, args.new_tokens, args.rounds)
            row = {"hidden_size": width, "block_size": s, "new_tokens": args.new_tokens,
                   "ar_prefill_ms": whole["ar_1"], "ar_ms": whole["ar"], "one_pass_diffusion_ms": whole[f"S{s}"],
                   "ceiling_speedup": whole["ar"] / whole[f"S{s}"],
                   **{f"{k}_us": v for k, v in pieces.items()},
                   "pass_plus_extend_in_decode_steps": (pieces["denoiser_pass"] + pieces["extend"])
                   / pieces["decode_step"]}
            rows.append(row)
            print(f"{width:6d} {s:3d} {row['ar_ms']:7.2f} {row['one_pass_diffusion_ms']:8.2f} "
                  f"{row['ceiling_speedup']:7.2f}×   {pieces['decode_step']:6.1f} | "
                  f"{pieces['denoiser_pass']:7.1f} | {pieces['extend']:7.1f}  "
                  f"(pass + extend = {row['pass_plus_extend_in_decode_steps']:.1f} decode steps for {s} tokens)")
    if args.out:
        write_results(args.out, rows, args)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
