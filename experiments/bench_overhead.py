"""Sampler overhead on this machine: what the samplers cost beyond the forward passes they run, with each fast
path next to the old one in the same run.

1. **AR per token vs the bare decode step** (demo architecture at --widths, batch 1, random weights, EOS off).
   Bare step: a compiled loop of decode steps whose logits are used (the argmax feeds the next step), minus
   the same program with no step. AR per token: (`generate_ar` for N tokens − for 1 token) / (N − 1), run
   seconds (in-program) and wall seconds (the whole Python call).
2. **Diffusion's fixed cost per generation**: one block of S = 16 tokens committed in one denoiser pass
   (T = 1), minus the pieces the program must run (the prompt's prefill and one denoiser pass, each a
   compiled program of its own); run seconds and wall seconds. "legacy" is the old host path
   (`placed.FAST_PATH = False`: params placed, shardings and compiled signature derived from every leaf,
   per call), "fast" the current one.
3. **Batched decoding**: one tower decode step of the 22.7M-parameter config (hidden 512, `MEM*EMEM`,
   16 experts top-4, vocab 4096: `HF_CONFIG` of /work/shared/tools/peer_bench.py, copied below) at batch 1
   and 8, one step at a time with a host sync after each (what a serving loop pays), 64-token prompt, cache
   capacity 1024; MoE dispatch "gather" (legacy: a private copy of each token's k experts' weights) vs
   "grouped" (tokens grouped by expert, `auto`'s decode choice now).

Compile first, then time: every program and sampler runs twice before timing, then --rounds interleaved
rounds (every variant once per round, so a slow phase of the shared machine hits all alike); medians
reported (and minima in the JSON).

    python experiments/bench_overhead.py --out experiments/results/overhead_cpu.json
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import write_results
from twotower_jax.config import NemotronHConfig
from twotower_jax.data import MASK_ID
from twotower_jax.sampling import placed
from twotower_jax.sampling.ar import generate_ar
from twotower_jax.sampling.diffusion import generate_mask_diffusion
from twotower_jax.tower import Impl, NemotronH, count_params
from twotower_jax.training.recipes import demo_config
from twotower_jax.two_tower import TwoTower

PROMPT_WIDTH = 24
PROMPT = [1] + [ord(c) + 4 for c in "reverse qzkwmbbfe="]
# /work/shared/tools/peer_bench.py HF_CONFIG (the 22.7M config, also run by side_by_side.py).
HF_CONFIG = {
    "hidden_size": 512, "num_hidden_layers": 8, "hybrid_override_pattern": "MEM*EMEM",
    "mamba_num_heads": 8, "mamba_head_dim": 64, "ssm_state_size": 64, "n_groups": 2, "conv_kernel": 4,
    "chunk_size": 128, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
    "n_routed_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 256, "n_shared_experts": 1,
    "moe_shared_expert_intermediate_size": 512, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.5,
    "norm_topk_prob": True, "vocab_size": 4096, "layer_norm_epsilon": 1e-5, "rope_theta": 10000,
    "tie_word_embeddings": False,
}


def _stats(times):
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "n": len(times)}


def interleaved(runs: dict, rounds: int) -> dict:
    """runs: name -> callable returning run seconds (or None: wall only). Returns name -> {wall, run} lists."""
    for run in runs.values():   # compile and warm up
        run(), run()
    wall, inside = {k: [] for k in runs}, {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            start = time.perf_counter()
            seconds = run()
            wall[k].append(time.perf_counter() - start)
            if seconds is not None:
                inside[k].append(seconds)
    return {k: {"wall": _stats(wall[k]), **({"run": _stats(inside[k])} if inside[k] else {})} for k in runs}


def _with_host_path(fast: bool, fn):
    def run():
        old = placed.FAST_PATH
        placed.FAST_PATH = fast
        try:
            return fn().stats["seconds"]
        finally:
            placed.FAST_PATH = old
    return run


def _timed_program(compiled, *args):
    def run():
        jax.block_until_ready(compiled(*args))
    return run


def sampler_overheads(width: int, new_tokens: int, rounds: int) -> dict:
    model = TwoTower(demo_config(width))
    params = model.init_params(jax.random.key(0))
    context = model.context
    tokens = jnp.asarray([[0] * (PROMPT_WIDTH - len(PROMPT)) + PROMPT], jnp.int32)
    valid = tokens != 0
    block = jnp.full((1, 16), MASK_ID, jnp.int32)
    n_steps, n_passes = new_tokens - 1, 8

    def prefill(p, capacity):
        return context.prefill(p["context"], tokens, valid, capacity=capacity, logits_at="none")[1]

    def decode(p, n):   # the AR sampler's capacity: prompt + new tokens - 1
        cache = prefill(p, PROMPT_WIDTH + new_tokens - 1)
        step = lambda i, c: (lambda out: (jnp.argmax(out[0], -1).astype(jnp.int32), out[1]))(
            context.decode_step(p["context"], c[0], c[1]))
        return jax.lax.fori_loop(0, n, step, (tokens[:, -1], cache))

    def denoise(p, n):  # the canvas depends on the carry (no hoisting); every logit is used
        cache = prefill(p, PROMPT_WIDTH + 16)
        step = lambda i, x: x + jnp.max(model.denoise(p, block + (x > 1e30), cache, jnp.ones((1,))))
        return cache, jax.lax.fori_loop(0, n, step, 0.0)

    programs = {"decode_n": functools.partial(decode, n=n_steps), "decode_0": functools.partial(decode, n=0),
                "pass_n": functools.partial(denoise, n=n_passes), "pass_0": functools.partial(denoise, n=0),
                "prefill_16": lambda p: prefill(p, PROMPT_WIDTH + 16)}
    runs = {k: _timed_program(jax.jit(f).lower(params).compile(), params) for k, f in programs.items()}
    ar = lambda n: functools.partial(generate_ar, model, params, [PROMPT], n, prompt_width=PROMPT_WIDTH)
    diffusion = functools.partial(generate_mask_diffusion, model, params, [PROMPT], max_new_tokens=16, block_size=16,
                                  steps_per_block=1, mask_token_id=MASK_ID, confidence_threshold=1.0,
                                  prompt_width=PROMPT_WIDTH)
    for path, fast in (("legacy", False), ("fast", True)):
        runs[f"ar_1/{path}"] = _with_host_path(fast, ar(1))
        runs[f"ar_n/{path}"] = _with_host_path(fast, ar(new_tokens))
        runs[f"diffusion_1block/{path}"] = _with_host_path(fast, diffusion)
    t = interleaved(runs, rounds)

    def med(k, kind="wall"):
        return t[k][kind]["median_ms"]

    bare_step = (med("decode_n") - med("decode_0")) / n_steps
    one_pass = (med("pass_n") - med("pass_0")) / n_passes
    row = {"width": width, "new_tokens": new_tokens, "bare_decode_step_ms": bare_step, "denoiser_pass_ms": one_pass,
           "prefill_ms": med("prefill_16"), "timings": t}
    for path in ("legacy", "fast"):
        for kind in ("run", "wall"):
            per_token = (med(f"ar_n/{path}", kind) - med(f"ar_1/{path}", kind)) / (new_tokens - 1)
            row[f"ar_per_token_{kind}_ms/{path}"] = per_token
            row[f"ar_per_token_over_bare_step_{kind}/{path}"] = per_token / bare_step
            row[f"diffusion_fixed_{kind}_ms/{path}"] = (med(f"diffusion_1block/{path}", kind) - med("prefill_16")
                                                        - one_pass)
            row[f"ar_fixed_{kind}_ms/{path}"] = med(f"ar_1/{path}", kind) - med("decode_0")
    return row


def batched_decode(batches, moe_impls, steps: int, rounds: int) -> dict:
    config = NemotronHConfig.from_hf_dict(dict(HF_CONFIG))
    params = jax.device_put(NemotronH(config).random_params(seed=0, scale=0.02))
    rng = np.random.default_rng(0)
    states, times = {}, {}
    for moe in moe_impls:
        model = NemotronH(config, impl=Impl(moe=moe))
        for batch in batches:
            prompt = jnp.asarray(rng.integers(4, config.vocab_size, (batch, 64)), jnp.int32)
            logits, cache = model.prefill(params, prompt, capacity=1024)
            states[(moe, batch)] = [model, jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache]
    for r in range(rounds * steps + 3):
        for key, st in states.items():
            model, token, cache = st
            start = time.perf_counter()
            logits, cache = model.decode_step(params, token, cache)
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            jax.block_until_ready((token, cache))
            if r >= 3:
                times.setdefault(key, []).append(time.perf_counter() - start)
            st[1], st[2] = token, cache
    out = {"params": count_params(params)}
    for (moe, batch), v in times.items():
        out[f"{moe}/b{batch}"] = _stats(v)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="64,512", help="hidden sizes of the demo architecture (sections 1-2)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--decode-steps", type=int, default=10, help="section 3: steps per round")
    parser.add_argument("--sections", default="1,3")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows, decode = [], None
    if "1" in args.sections:
        for width in (int(w) for w in args.widths.split(",")):
            rows.append(sampler_overheads(width, args.new_tokens, args.rounds))
            r = rows[-1]
            print(f"\nhidden {width}: bare decode step {r['bare_decode_step_ms']:.3f} ms, denoiser pass "
                  f"{r['denoiser_pass_ms']:.3f} ms, prefill {r['prefill_ms']:.3f} ms (medians)")
            print(f"{'':34s} {'legacy':>10s} {'fast':>10s}")
            for name, key in (("AR per token, run (ms)", "ar_per_token_run_ms"),
                              ("AR per token, wall (ms)", "ar_per_token_wall_ms"),
                              ("AR per token / bare step, run", "ar_per_token_over_bare_step_run"),
                              ("AR per token / bare step, wall", "ar_per_token_over_bare_step_wall"),
                              ("AR fixed cost, run (ms)", "ar_fixed_run_ms"),
                              ("AR fixed cost, wall (ms)", "ar_fixed_wall_ms"),
                              ("diffusion fixed cost, run (ms)", "diffusion_fixed_run_ms"),
                              ("diffusion fixed cost, wall (ms)", "diffusion_fixed_wall_ms")):
                print(f"{name:34s} {r[key + '/legacy']:10.3f} {r[key + '/fast']:10.3f}")
    if "3" in args.sections:
        decode = batched_decode((1, 8), ("gather", "grouped"), args.decode_steps, args.rounds)
        print(f"\n22.7M config ({decode['params'] / 1e6:.1f}M params), one decode step with a host sync, median ms:")
        print(f"{'moe':>8s} {'batch 1':>9s} {'batch 8':>9s} {'b8 / b1':>8s}")
        for moe in ("gather", "grouped"):
            b1, b8 = decode[f"{moe}/b1"]["median_ms"], decode[f"{moe}/b8"]["median_ms"]
            decode[f"{moe}/b8_over_b1"] = b8 / b1
            print(f"{moe:>8s} {b1:9.2f} {b8:9.2f} {b8 / b1:7.2f}x")
    if args.out:
        write_results(args.out, rows, args, batched_decode=decode)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
