"""Train a Nemotron-H tower from scratch, next-token, on the offline data: the context tower of the
miniature TwoTower experiment.

  python experiments/train_ar.py --workdir runs/ar --steps 3000 --hidden_size 64

Resumes from `--workdir` if a run is there. Writes metrics.jsonl, orbax training checkpoints and, at
the end, the tower as a checkpoint at WORKDIR/checkpoint (usable by `python -m twotower_jax.generate`).
"""
from absl import app, flags

from twotower_jax.training.loop import TrainConfig
from twotower_jax.training.recipes import DataSettings, demo_config, train_ar_tower

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "run directory (created; resumed if it holds a run)", required=True)
flags.DEFINE_integer("steps", 3000, "optimizer steps")
flags.DEFINE_integer("hidden_size", 64, "width of the demo backbone (recipes.demo_config)")
flags.DEFINE_integer("batch_size", 16, "sequences per step")
flags.DEFINE_integer("seq_len", 128, "tokens per sequence")
flags.DEFINE_float("task_fraction", 0.8, "share of task tokens (the rest: stdlib docstring corpus)")
flags.DEFINE_integer("block_size", 16, "align task answers to blocks of this size")
flags.DEFINE_float("peak_lr", 2e-3, "learning rate after warmup")
flags.DEFINE_float("final_lr", 2e-5, "learning rate at the end of the decay")
flags.DEFINE_integer("warmup_steps", 100, "linear warmup steps")
flags.DEFINE_float("decay_fraction", 0.2, "final fraction of steps spent decaying")
flags.DEFINE_integer("seed", 0, "init / noise seed")
flags.DEFINE_integer("data_seed", 0, "training stream seed")
flags.DEFINE_integer("save_every", 250, "checkpoint interval (steps)")
flags.DEFINE_integer("stop_after", None, "stop after this step (resume later with the same flags)")


def main(argv):
    del argv
    cfg = TrainConfig(steps=FLAGS.steps, peak_lr=FLAGS.peak_lr, final_lr=FLAGS.final_lr,
                      warmup_steps=FLAGS.warmup_steps, decay_fraction=FLAGS.decay_fraction, seed=FLAGS.seed,
                      save_every=FLAGS.save_every)
    data = DataSettings(seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size, task_fraction=FLAGS.task_fraction,
                        block_size=FLAGS.block_size, seed=FLAGS.data_seed)
    path = train_ar_tower(FLAGS.workdir, cfg, data, demo_config(FLAGS.hidden_size), stop_after=FLAGS.stop_after)
    print(f"tower checkpoint: {path}" if path else f"stopped after step {FLAGS.stop_after}; rerun to resume")


if __name__ == "__main__":
    app.run(main)
