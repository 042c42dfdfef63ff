"""Train the denoiser of a TwoTower on a frozen AR tower (SPEC §5): both towers start as copies of the
tower (adaLN at identity); only the denoiser side trains, on the block-wise masked-diffusion objective.

  python experiments/train_denoiser.py --context_checkpoint runs/ar/checkpoint --workdir runs/denoiser

Resumes from `--workdir` if a run is there. Writes metrics.jsonl, orbax training checkpoints and, at the
end, the TwoTower at WORKDIR/checkpoint (usable by `generate --checkpoint` and experiments/sweep_sampler.py).
"""
from absl import app, flags

from train_flags import FLAGS, data_settings, define_training_flags, train_config
from twotower_jax.training.recipes import train_denoiser

define_training_flags(steps=1500, peak_lr=1e-3, final_lr=1e-5, data_seed=1)
flags.DEFINE_string("context_checkpoint", None, "the frozen AR tower (train_ar.py's WORKDIR/checkpoint)",
                    required=True)


def main(argv):
    del argv
    path = train_denoiser(FLAGS.context_checkpoint, FLAGS.workdir, train_config(), data_settings(),
                          stop_after=FLAGS.stop_after)
    print(f"TwoTower checkpoint: {path}" if path else f"stopped after step {FLAGS.stop_after}; rerun to resume")


if __name__ == "__main__":
    app.run(main)
