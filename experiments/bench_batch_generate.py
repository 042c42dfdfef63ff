"""batch_generate throughput on the packaged demo model: rows/s and tokens/s per mode and batch size.

  python experiments/bench_batch_generate.py --out experiments/results/batch_generate_cpu.json

For each (mode, batch size) the job runs twice over the same `--rows` prompts into fresh outputs: the
first run compiles (its programs stay cached in the process), the second is timed. rows/s and tokens/s are
over the second run's wall time (reading, batching, writing with fsync included; loading the checkpoint
not); tokens are the tokens kept in the output rows (cut at EOS). tokens/pass: generated tokens per pass
each row took part in (AR 1; diffusion: denoiser passes; self-speculation: context passes).
"""
from __future__ import annotations

import json
import platform
import random
import tempfile
from pathlib import Path

import jax
from absl import app, flags

from twotower_jax import batch_generate

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "JSON file (a .md table is written next to it)", required=True)
flags.DEFINE_integer("rows", 64, "prompts per run")
flags.DEFINE_integer("max_new_tokens", 32, "new tokens per row (EOS ends rows earlier)")
flags.DEFINE_list("modes", ["ar", "mock_ar", "diffusion", "self_speculative"], "modes")
flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "batch sizes")


def prompts(n: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        word = "".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(3, 8)))
        rows.append({"id": i, "prompt": f"{rng.choice(['copy', 'reverse', 'sort'])} {word}="})
    return rows


def main(_):
    work = Path(tempfile.mkdtemp(prefix="bench_batch_generate_"))
    (work / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts(FLAGS.rows)))
    results = []
    for mode in FLAGS.modes:
        for batch in map(int, FLAGS.batch_sizes):
            knobs = ["--block-size", "16", "--steps-per-block", "16", "--confidence-threshold", "0.8"]
            base = ["--checkpoint", "demo", "--input", str(work / "in.jsonl"), "--mode", mode, "--batch-size",
                    str(batch), "--max-new-tokens", str(FLAGS.max_new_tokens), "--progress", "off", *knobs]
            for run in ("compile", "timed"):
                out = work / f"{mode}_{batch}_{run}.jsonl"
                summary = batch_generate.run(batch_generate.build_parser().parse_args(base + ["--output", str(out)]))
            row = {"mode": mode, "batch_size": batch, **{k: summary[k] for k in (
                "rows", "kept_tokens", "wall_seconds", "rows_per_second", "tokens_per_second", "tokens_per_pass",
                "compile_seconds")}}
            print(row, flush=True)
            results.append(row)
    meta = {"device": str(jax.devices()[0]), "machine": platform.processor() or platform.machine(),
            "rows": FLAGS.rows, "max_new_tokens": FLAGS.max_new_tokens, "diffusion": "S=T=16, gamma=0.8, greedy"}
    Path(FLAGS.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    lines = ["| mode | batch | rows/s | tokens/s | tokens/pass | tokens kept |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['batch_size']} | {r['rows_per_second']:.1f} | {r['tokens_per_second']:.0f} | "
                     f"{r['tokens_per_pass']:.2f} | {r['kept_tokens']} |")
    Path(FLAGS.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
