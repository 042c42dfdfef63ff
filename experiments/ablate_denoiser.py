"""Score several trained TwoTowers (denoiser ablations on one AR tower) on the same held-out tasks: AR and
mask diffusion at γ = 0.8, S = T = 16 (the issue's target setting), greedy; one table.

  python experiments/ablate_denoiser.py --out experiments/results/ablation_denoiser.json \
      --run "spec, curriculum 32:0.5=runs/den/checkpoint" --run "answers only, curriculum 32:0.5=runs/den_ans/checkpoint"

Quality only (tokens/s is the sweep's job): each row is `sweep_sampler.sweep` with one timed prompt.
The run's recipe (steps, curriculum, loss variant) is read from its workdir's run.json.
"""
import json
from pathlib import Path

from absl import app, flags

from sweep_sampler import QUICK_SETTINGS, sweep

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("run", [], "NAME=CHECKPOINT_DIR (WORKDIR/checkpoint of train_denoiser.py)")
# --out (JSON; a .md table goes next to it) and --n_tasks are sweep_sampler's flags, shared.


def main(argv):
    del argv
    entries = []
    for item in FLAGS.run:
        name, checkpoint = item.rsplit("=", 1)
        ar, diffusion = sweep(checkpoint, QUICK_SETTINGS, FLAGS.n_tasks, n_timed=1, repeats=1, mock_ar=False,
                              log=lambda r: None)
        run = json.loads((Path(checkpoint).parent / "run.json").read_text())
        entries.append({"run": name, "checkpoint": checkpoint, "recipe": run.get("recipe"), "train": run["train"],
                        "ar_accuracy": ar["accuracy"], "ar_by_kind": ar["accuracy_by_kind"],
                        "diffusion_accuracy": diffusion["accuracy"], "diffusion_by_kind": diffusion["accuracy_by_kind"],
                        "relative_accuracy": diffusion["accuracy"] / ar["accuracy"],
                        "tokens_per_denoiser_pass": diffusion["tokens_per_denoiser_pass"],
                        "agreement_with_ar": diffusion["agreement_with_ar"]})
        print(entries[-1], flush=True)
    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n_tasks": FLAGS.n_tasks, "setting": "greedy, γ=0.8, S=T=16", "runs": entries}, indent=2))
    lines = ["| run | steps | AR acc | diffusion acc | vs AR | tokens/pass | agree w/ AR | diffusion by kind |",
             "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in e["diffusion_by_kind"].items())
        lines.append(f"| {e['run']} | {e['train']['steps']} | {e['ar_accuracy']:.3f} | {e['diffusion_accuracy']:.3f} | "
                     f"{e['relative_accuracy']:.3f} | {e['tokens_per_denoiser_pass']:.2f} | {e['agreement_with_ar']:.3f} | "
                     f"{kinds} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
