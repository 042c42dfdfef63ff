"""Sweep the mask-diffusion sampler of a trained TwoTower against its own AR decoding: quality vs speed.

  python experiments/sweep_sampler.py --checkpoint demo --out experiments/results/sweep_demo.json
  python experiments/sweep_sampler.py --checkpoint DIR --out FILE.json --quick     # AR and γ=0.8, S=T=16 only

Every setting generates answers for the same held-out tasks (`twotower_jax.data.eval_set`), greedy by
default: quality from one batched run over all of them, speed from running the first `--n_timed` one
prompt at a time (batch 1, the latency-bound regime of the release's measurements). One JSON row per setting: mode, confidence_threshold (γ), block_size (S), steps_per_block (T),
accuracy (exact match), relative_accuracy (÷ AR's), agreement_with_ar (identical answers), perplexity (the
context tower's, of the generated tokens) with repetition (repeated 3-grams), tokens_per_denoiser_pass,
tokens_per_second (generated tokens up to and including EOS ÷ run seconds at batch 1, compile excluded) and
speedup_vs_ar. AR and every diffusion setting are measured in the same run. Unless --quick, each block size
also runs with T = 1 (every block in one denoiser pass): no denoiser can be faster than that schedule, so
its speed-up is this machine's ceiling for that S, whatever the quality. A PNG plots relative accuracy
against speed-up, one line per (S, T) over γ. Unless --quick, a `self_spec` row runs self-speculative decoding
(AR's exact output, drafted by the denoiser; its tok/pass column is tokens per context-tower pass).
"""
from __future__ import annotations

import json
import statistics
import platform
import time
from pathlib import Path

from absl import app, flags

import jax

from twotower_jax.checkpoint.hf import TWO_TOWER
from twotower_jax.checkpoint.load import load_checkpoint, resolve_checkpoint
from twotower_jax.data import EOS_ID, MASK_ID, TASK_KINDS, accuracy, eval_set, prompt_ids
from twotower_jax.evaluation import agreement, continuation_perplexity, repetition_rate, timed_one_at_a_time
from twotower_jax.sampling.ar import generate_ar, generate_mock_ar
from twotower_jax.sampling.diffusion import generate_mask_diffusion
from twotower_jax.sampling.speculative import generate_self_speculative
from twotower_jax.two_tower import TwoTower

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "demo", "TwoTower checkpoint directory, or 'demo' for the packaged model")
flags.DEFINE_string("out", None, "JSON file to write (the plot goes next to it as .png)", required=True)
flags.DEFINE_bool("quick", False, "AR and diffusion at γ=0.8, S=T=16 only, fewer timed prompts and repeats "
                  "(all --n_tasks scored)")
flags.DEFINE_integer("n_tasks", 512, "held-out tasks scored per setting (kinds round-robin)")
flags.DEFINE_integer("n_timed", 32, "of those, tasks timed one at a time (batch 1) for tokens/s")
flags.DEFINE_integer("repeats", 3, "timed runs per task and setting (median)")
flags.DEFINE_list("gammas", ["0.5", "0.6", "0.7", "0.8", "0.9", "0.95", "1.0"], "confidence thresholds")
flags.DEFINE_list("block_sizes", ["8", "16", "32"], "block sizes S")
flags.DEFINE_list("steps", ["S"], "steps per block T: integers or 'S' (= block size)")
flags.DEFINE_bool("mock_ar", True, "also run mock-AR (the denoiser decoding one token per pass)")
flags.DEFINE_integer("self_speculative", 16, "also run self-speculative decoding (AR's output) at this block size; "
                     "0: off")
flags.DEFINE_bool("one_pass", True, "also run T = 1 per block size: every block in one denoiser pass, the fastest "
                  "schedule any denoiser allows (its speed-up bounds every other setting's)")
flags.DEFINE_float("temperature", 0.0, "sampling temperature (0: greedy)")
flags.DEFINE_integer("seed", 0, "sampling seed")


def _row(mode, result, timing, tasks, prompts, model, params, reference=None, **setting):
    """Quality from the batched run over all tasks (batched == row by row), speed from `timing`."""
    generated = result.tokens
    tokens, seconds = timing
    return {
        "mode": mode, **setting,
        "accuracy": accuracy(tasks, generated),
        "accuracy_by_kind": {kind: accuracy(*zip(*[(t, g) for t, g in zip(tasks, generated) if t.kind == kind]))
                             for kind in dict.fromkeys(t.kind for t in tasks)},
        "agreement_with_ar": agreement(generated, reference, EOS_ID) if reference is not None else 1.0,
        "perplexity": continuation_perplexity(model.context, params["context"], prompts, generated),
        "repetition": repetition_rate(generated),
        "tokens_per_denoiser_pass": result.stats.get("tokens_per_denoiser_pass"),
        "tokens_per_context_pass": result.stats.get("tokens_per_context_pass"),
        "acceptance_histogram": result.stats.get("acceptance_histogram"),
        "denoiser_passes": result.stats.get("denoiser_passes"),
        "generated_tokens": sum(len(g) for g in generated),
        "timed_tokens": tokens,
        "timed_seconds": seconds,
        "tokens_per_second": tokens / seconds,
    }


QUICK_SETTINGS = [(0.8, 16, 16)]


def grid(gammas, block_sizes, steps) -> list[tuple[float, int, int]]:
    """(γ, S, T) settings; a step count of "S" means T = S."""
    return [(float(g), int(s), int(s) if t == "S" else int(t)) for s in block_sizes for t in steps for g in gammas]


def sweep(checkpoint, settings, n_tasks: int, n_timed: int, repeats: int, *, mock_ar: bool = True,
          temperature: float = 0.0, seed: int = 0, self_speculative: int = 0, log=print) -> list[dict]:
    """AR (the reference), optionally mock-AR, then mask diffusion at each (γ, S, T); one dict per run."""
    kind, config, params = load_checkpoint(checkpoint)
    if kind != TWO_TOWER:
        raise ValueError(f"{checkpoint}: the sweep needs a TwoTower checkpoint, got {kind}")
    model = TwoTower(config)
    tasks = eval_set(TASK_KINDS, n_tasks, seed=1234)
    prompts = [prompt_ids(t) for t in tasks]
    timed = prompts[:n_timed]   # eval_set deals the kinds round-robin, so any prefix mixes them
    # One prompt width for every call: all prompt lengths share one compiled program per setting.
    common = dict(eos_token_id=EOS_ID, temperature=temperature, seed=seed,
                  prompt_width=max(len(p) for p in prompts))
    budget = 16   # answers + EOS fit 16 tokens (twotower_jax.data.tasks)

    def measure(mode, generate, reference=None, **setting):
        result = generate(prompts)
        row = _row(mode, result, timed_one_at_a_time(generate, timed, repeats), tasks, prompts, model, params, reference,
                   **setting)
        log(row)
        return row, result

    ar, ar_result = measure("ar", lambda p: generate_ar(model, params, p, max_new_tokens=budget, **common))
    rows, reference = [ar], ar_result.tokens
    if mock_ar:
        rows.append(measure("mock_ar", lambda p: generate_mock_ar(model, params, p, max_new_tokens=budget,
                                                                  **common), reference)[0])
    if self_speculative:
        rows.append(measure("self_spec", lambda p: generate_self_speculative(
            model, params, p, max_new_tokens=budget, block_size=self_speculative, mask_token_id=MASK_ID, **common),
            reference, block_size=self_speculative, steps_per_block=1)[0])
    for gamma, block, steps in settings:
        def diffusion(p, gamma=gamma, block=block, steps=steps):
            return generate_mask_diffusion(model, params, p, max_new_tokens=max(budget, block), block_size=block,
                                           steps_per_block=steps, mask_token_id=MASK_ID,
                                           confidence_threshold=gamma, **common)
        rows.append(measure("diffusion", diffusion, reference, confidence_threshold=gamma, block_size=block,
                            steps_per_block=steps)[0])
    for row in rows:
        row["relative_accuracy"] = row["accuracy"] / ar["accuracy"] if ar["accuracy"] else float("nan")
        row["speedup_vs_ar"] = row["tokens_per_second"] / ar["tokens_per_second"]
    return rows


def pass_costs(model, params, prompt, prompt_width: int, block: int = 16, repeats: int = 20) -> dict:
    """Milliseconds per piece at batch 1, from whole-sampler runs that differ in one thing (medians):
    AR prefill (1 new token), one AR decode step ((16 tokens − 1 token) / 15, no EOS stop), and one
    denoiser pass over a block ((T = S passes at γ = 1 − one pass at T = 1) / (S − 1)). This is the cost
    model behind the speed-ups: diffusion pays when tokens/pass exceeds pass ÷ decode step."""
    def median_ms(run):
        run()
        return 1e3 * statistics.median(run().stats["seconds"] for _ in range(repeats))

    def ar(n):
        return lambda: generate_ar(model, params, [prompt], max_new_tokens=n, prompt_width=prompt_width)

    def diffusion(steps, gamma):
        return lambda: generate_mask_diffusion(model, params, [prompt], max_new_tokens=block, block_size=block,
                                               steps_per_block=steps, mask_token_id=MASK_ID,
                                               confidence_threshold=gamma, prompt_width=prompt_width)
    prefill, ar_all = median_ms(ar(1)), median_ms(ar(block))
    one_pass, all_passes = median_ms(diffusion(1, 0.0)), median_ms(diffusion(block, 1.0))
    decode = (ar_all - prefill) / (block - 1)
    denoiser_pass = (all_passes - one_pass) / (block - 1)
    return {"ar_prefill_ms": prefill, "ar_decode_step_ms": decode, "diffusion_one_pass_total_ms": one_pass,
            "denoiser_pass_ms": denoiser_pass, "denoiser_pass_over_decode_step": denoiser_pass / decode,
            "block_size": block}


def table(rows) -> str:
    head = f"{'mode':9} {'γ':>5} {'S':>3} {'T':>3} {'acc':>6} {'rel':>6} {'agree':>6} {'ppl':>6} {'rep':>5} " \
           f"{'tok/pass':>8} {'tok/s':>8} {'×AR':>6}"
    lines = [head]
    for r in rows:
        def f(key, spec):
            v = r.get(key)
            return format(v, spec) if v is not None else "-"
        lines.append(f"{r['mode']:9} {f('confidence_threshold', '5.2f'):>5} {f('block_size', 'd'):>3} "
                     f"{f('steps_per_block', 'd'):>3} {r['accuracy']:6.3f} {r['relative_accuracy']:6.3f} "
                     f"{r['agreement_with_ar']:6.3f} {r['perplexity']:6.2f} {r['repetition']:5.3f} "
                     f"{f('tokens_per_context_pass' if r['mode'] == 'self_spec' else 'tokens_per_denoiser_pass', '8.2f'):>8} {r['tokens_per_second']:8.1f} {r['speedup_vs_ar']:6.2f}")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    """Two panels: accuracy vs AR against tokens per denoiser pass (the hardware-independent frontier, with
    the issue's targets 0.987 and 3.0 dashed) and against wall-clock throughput vs AR (this machine's)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_pass, by_time) = plt.subplots(1, 2, figsize=(11.5, 4.4))
    diffusion = [r for r in rows if r["mode"] == "diffusion"]
    for s, t in sorted({(r["block_size"], r["steps_per_block"]) for r in diffusion}):
        pts = sorted((r for r in diffusion if r["block_size"] == s and r["steps_per_block"] == t),
                     key=lambda r: r["confidence_threshold"])
        for ax, x in ((by_pass, "tokens_per_denoiser_pass"), (by_time, "speedup_vs_ar")):
            ax.plot([r[x] for r in pts], [r["relative_accuracy"] for r in pts], "o-", label=f"S={s}, T={t}")
            for r in pts:
                ax.annotate(f"γ={r['confidence_threshold']:g}", (r[x], r["relative_accuracy"]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
    # AR and self-speculation on the throughput panel; mock-AR (a mode the denoiser was not trained for) is
    # left off both, so the y axis shows the differences between the settings that work
    for r in rows:
        if r["mode"] in ("ar", "self_spec"):
            by_time.plot([r["speedup_vs_ar"]], [r["relative_accuracy"]], "k^" if r["mode"] == "ar" else "kv")
            by_time.annotate(r["mode"], (r["speedup_vs_ar"], r["relative_accuracy"]), fontsize=8,
                             xytext=(4, -10), textcoords="offset points")
    shown = [r["relative_accuracy"] for r in rows if r["mode"] != "mock_ar"] + [0.987]
    low, high = min(shown), max(shown)
    for ax in (by_pass, by_time):
        ax.axhline(0.987, color="grey", lw=0.6, ls="--")
        ax.set_ylim(low - 0.1 * (high - low) - 0.005, high + 0.1 * (high - low) + 0.005)
        ax.set_ylabel("task accuracy vs AR")
    by_pass.axvline(3.0, color="grey", lw=0.6, ls="--")
    by_pass.set_xlabel("tokens per denoiser pass")
    by_pass.set_title("quality per denoiser pass (any hardware)")
    by_time.axvline(1.0, color="grey", lw=0.6, ls=":")
    by_time.set_xlabel("throughput vs AR (tokens/s ratio, same run, batch 1)")
    by_time.set_title("wall clock on this machine")
    by_pass.legend(fontsize=8)
    fig.suptitle("Miniature TwoTower: mask diffusion vs AR (mock-AR off-scale, in the table)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    start = time.perf_counter()
    checkpoint = resolve_checkpoint(FLAGS.checkpoint)
    n_tasks = FLAGS.n_tasks
    n_timed = min(FLAGS.n_timed, 16 if FLAGS.quick else n_tasks)
    repeats = min(FLAGS.repeats, 2) if FLAGS.quick else FLAGS.repeats
    settings = QUICK_SETTINGS if FLAGS.quick else grid(FLAGS.gammas, FLAGS.block_sizes, FLAGS.steps)
    if FLAGS.one_pass and not FLAGS.quick:
        settings += [(1.0, int(s), 1) for s in FLAGS.block_sizes if (1.0, int(s), 1) not in settings]
    rows = sweep(checkpoint, settings, n_tasks, n_timed, repeats, mock_ar=FLAGS.mock_ar and not FLAGS.quick,
                 temperature=FLAGS.temperature, seed=FLAGS.seed,
                 self_speculative=0 if FLAGS.quick else FLAGS.self_speculative, log=lambda r: None)
    _, config, params = load_checkpoint(checkpoint)
    prompt = prompt_ids(eval_set(TASK_KINDS, 1, seed=1234)[0])
    costs = pass_costs(TwoTower(config), params, prompt, prompt_width=24, repeats=5 if FLAGS.quick else 20)
    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"checkpoint": str(FLAGS.checkpoint), "quick": FLAGS.quick, "n_tasks": n_tasks, "n_timed": n_timed,
            "timing_batch_size": 1, "repeats": repeats,
            "temperature": FLAGS.temperature, "machine": f"{platform.processor() or platform.machine()}, "
            f"{jax.device_count()} {jax.default_backend()} device(s)", "jax": jax.__version__,
            "wall_seconds": round(time.perf_counter() - start, 1), "pass_costs": costs}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(table(rows))
    print("batch-1 costs (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in costs.items() if k != "block_size"))
    print(f"wrote {out} and {out.with_suffix('.png')} ({meta['wall_seconds']} s)")


if __name__ == "__main__":
    app.run(main)
