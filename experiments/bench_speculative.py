"""Self-speculative decoding vs AR on the demo model's held-out tasks, one run on this machine.

  python experiments/bench_speculative.py --out experiments/results/speculative_cpu.json

Batched over `--n_tasks` held-out tasks (greedy, EOS stop, 16-token budget): identity with AR, tokens per
context pass (verify + rollback, and verify only), the committed-tokens histogram. Wall-clock: the first
`--n_timed` tasks one at a time (batch 1), median of `--repeats`, compile excluded, AR in the same run.
Rollback "states" (default: no second pass) for every S, "replay" for `--replay_block_sizes`.
Also: AR's own log-prob disagreement between its two paths (a prefill of AR's output text vs AR's decode
steps, same tokens) next to self-speculation's, and the cost of the rollback itself (rebuilding the Mamba
states at the accepted length vs the verify pass, jitted, batch 1, S = 16).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from twotower_jax.checkpoint.load import load_checkpoint
from twotower_jax.data import EOS_ID, MASK_ID, TASK_KINDS, eval_set, prompt_ids
from twotower_jax.evaluation import timed_one_at_a_time
from twotower_jax.sampling.ar import generate_ar
from twotower_jax.sampling.speculative import generate_self_speculative
from twotower_jax.two_tower import TwoTower

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "JSON file", required=True)
flags.DEFINE_integer("n_tasks", 64, "held-out tasks (batched)")
flags.DEFINE_integer("n_timed", 16, "tasks timed one at a time")
flags.DEFINE_integer("repeats", 3, "timed runs per task (median)")
flags.DEFINE_list("block_sizes", ["4", "8", "16"], "block sizes S")
flags.DEFINE_list("replay_block_sizes", ["8"], "block sizes S also run with rollback='replay'")


def ar_prefill_gap(model, params, prompts, reference):
    """max |log-prob of AR's tokens under a prefill of AR's text − AR's own (decode-step) log-probs|."""
    texts = [p + g for p, g in zip(prompts, reference.tokens)]
    width = max(map(len, texts)) - 1
    tokens = np.zeros((len(texts), width), np.int32)
    valid = np.zeros_like(tokens, bool)
    for r, t in enumerate(texts):
        tokens[r, width - len(t) + 1:] = t[:-1]
        valid[r, width - len(t) + 1:] = True
    logits, _ = model.context.prefill(params["context"], jnp.asarray(tokens), jnp.asarray(valid), prefill_chunk=None)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    gap = 0.0
    for r, (p, g) in enumerate(zip(prompts, reference.tokens)):
        at = width - len(texts[r]) + len(p) + np.arange(len(g))
        gap = max(gap, float(np.abs(logp[r, at, np.asarray(g)] - np.asarray(reference.logprobs[r])).max(initial=0)))
    return gap


def rollback_cost(model, params, prompt, s=16, repeats=20):
    """Seconds of a verify pass (extend_truncatable over S tokens) and of truncate_extension (the rollback)."""
    from twotower_jax.tower import truncate_extension
    context = model.context
    _, cache = context.prefill(params["context"], jnp.asarray([prompt]), capacity=len(prompt) + s, logits_at="none")
    block = jnp.asarray([prompt[-1:] * s], jnp.int32)
    verify = jax.jit(context.extend_truncatable)
    cut = jax.jit(lambda c, e, start, keep: truncate_extension(c, e, start, keep))
    logits, extended, extensions = jax.block_until_ready(verify(params["context"], block, cache))
    jax.block_until_ready(cut(extended, extensions, cache.length, jnp.asarray([s // 2])))

    def best(fn):
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - begin)
        return float(np.median(times))
    return (best(lambda: verify(params["context"], block, cache)),
            best(lambda: cut(extended, extensions, cache.length, jnp.asarray([s // 2]))))


def main(argv):
    del argv
    _, config, params = load_checkpoint("demo")
    model = TwoTower(config)
    prompts = [prompt_ids(t) for t in eval_set(TASK_KINDS, FLAGS.n_tasks, seed=1234)]
    common = dict(eos_token_id=EOS_ID, prompt_width=max(map(len, prompts)))
    timed = prompts[:FLAGS.n_timed]

    def ar(p):
        return generate_ar(model, params, p, 16, **common)
    reference = ar(prompts)
    tok, sec = timed_one_at_a_time(ar, timed, FLAGS.repeats)
    rows = [{"mode": "ar", "tokens_per_second": tok / sec, "timed_tokens": tok, "timed_seconds": sec,
             "tokens_per_context_pass": 1.0}]
    rows[0]["ar_prefill_vs_decode_max_logprob_diff"] = ar_prefill_gap(model, params, prompts, reference)
    verify_s, rollback_s = rollback_cost(model, params, prompts[0])
    rows[0]["verify_pass_seconds_s16_b1"], rows[0]["rollback_seconds_s16_b1"] = verify_s, rollback_s
    print(rows[0], flush=True)
    runs = [(int(s), "states") for s in FLAGS.block_sizes] + [(int(s), "replay") for s in FLAGS.replay_block_sizes]
    for s, rollback in runs:
        def spec(p, s=s, rollback=rollback):
            return generate_self_speculative(model, params, p, 16, block_size=s, mask_token_id=MASK_ID,
                                             rollback=rollback, **common)
        batched = spec(prompts)
        single = [spec([p]) for p in timed]
        tok, sec = timed_one_at_a_time(spec, timed, FLAGS.repeats)
        st = batched.stats
        rows.append({
            "mode": "self_speculative", "block_size": s, "draft_steps": 1, "rollback": rollback,
            "identical_to_ar": batched.tokens == reference.tokens,
            "max_logprob_diff": max((abs(a - b) for x, y in zip(batched.logprobs, reference.logprobs)
                                     for a, b in zip(x, y)), default=0.0),
            "tokens_per_context_pass": st["tokens_per_context_pass"],
            "tokens_per_verify_pass": st["tokens_per_verify_pass"],
            "acceptance_histogram": st["acceptance_histogram"],
            "row_tokens_per_context_pass_min": min(st["row_tokens_per_context_pass"]),
            "batched_verify_passes": st["verify_passes"], "batched_rollback_passes": st["rollback_passes"],
            "batch1_tokens_per_context_pass": sum(r.stats["generated_tokens"] for r in single) / sum(
                r.stats["verify_passes"] + r.stats["rollback_passes"] for r in single),
            "batch1_tokens_per_verify_pass": sum(r.stats["generated_tokens"] for r in single) / sum(
                r.stats["verify_passes"] for r in single),
            "batch1_rollback_share": sum(r.stats["rollback_passes"] for r in single) / sum(
                r.stats["verify_passes"] for r in single),
            "tokens_per_second": tok / sec, "timed_tokens": tok, "timed_seconds": sec,
            "speedup_vs_ar": (tok / sec) / rows[0]["tokens_per_second"],
        })
        print(rows[-1], flush=True)
    Path(FLAGS.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    app.run(main)
