"""Train a Nemotron-H tower from scratch, next-token, on the offline data: the context tower of the
miniature TwoTower experiment.

  python experiments/train_ar.py --workdir runs/ar --steps 3000 --hidden_size 64

Resumes from `--workdir` if a run is there. Writes metrics.jsonl, orbax training checkpoints and, at
the end, the tower as a checkpoint at WORKDIR/checkpoint (usable by `python -m twotower_jax.generate`).
"""
from absl import app, flags

from twotower_jax import distributed
from train_flags import FLAGS, data_settings, define_training_flags, scale_settings, train_config
from twotower_jax.training.recipes import demo_config, train_ar_tower

define_training_flags(steps=3000, peak_lr=2e-3, final_lr=2e-5, data_seed=0)
flags.DEFINE_integer("hidden_size", 64, "width of the demo backbone (recipes.demo_config)")


def main(argv):
    del argv
    scale = scale_settings()
    path = train_ar_tower(FLAGS.workdir, train_config(), data_settings(), demo_config(FLAGS.hidden_size),
                          stop_after=FLAGS.stop_after, **scale)
    print(f"tower checkpoint: {path}" if path else f"stopped after step {FLAGS.stop_after}; rerun to resume")
    distributed.shutdown()   # a multi-process job: leave it before exit (see distributed.shutdown)


if __name__ == "__main__":
    app.run(main)
