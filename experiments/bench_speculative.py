"""Self-speculative decoding vs AR on the demo model's held-out tasks, one run on this machine.

  python experiments/bench_speculative.py --out experiments/results/speculative_cpu.json

Batched over `--n_tasks` held-out tasks (greedy, EOS stop, 16-token budget): identity with AR, tokens per
context pass (verify + rollback, and verify only), the committed-tokens histogram. Wall-clock: the first
`--n_timed` tasks one at a time (batch 1), median of `--repeats`, compile excluded, AR in the same run.
"""
from __future__ import annotations

import json
from pathlib import Path

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
    for s in map(int, FLAGS.block_sizes):
        def spec(p, s=s):
            return generate_self_speculative(model, params, p, 16, block_size=s, mask_token_id=MASK_ID, **common)
        batched = spec(prompts)
        single = [spec([p]) for p in timed]
        tok, sec = timed_one_at_a_time(spec, timed, FLAGS.repeats)
        st = batched.stats
        rows.append({
            "mode": "self_speculative", "block_size": s, "draft_steps": 1,
            "identical_to_ar": batched.tokens == reference.tokens,
            "max_logprob_diff": max((abs(a - b) for x, y in zip(batched.logprobs, reference.logprobs)
                                     for a, b in zip(x, y)), default=0.0),
            "tokens_per_context_pass": st["tokens_per_context_pass"],
            "tokens_per_verify_pass": st["tokens_per_verify_pass"],
            "acceptance_histogram": st["acceptance_histogram"],
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
    print(rows[0])
    Path(FLAGS.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    app.run(main)
