"""Train the denoiser of a TwoTower on a frozen AR tower (SPEC §5): both towers start as copies of the
tower (adaLN at identity); only the denoiser side trains, on the block-wise masked-diffusion objective.

  python experiments/train_denoiser.py --context_checkpoint runs/ar/checkpoint --workdir runs/denoiser

Resumes from `--workdir` if a run is there. Writes metrics.jsonl, orbax training checkpoints and, at the
end, the TwoTower at WORKDIR/checkpoint (usable by `generate --checkpoint` and experiments/sweep_sampler.py).
"""
from absl import app, flags

from twotower_jax.training.loop import TrainConfig
from twotower_jax.training.recipes import DataSettings, train_denoiser

FLAGS = flags.FLAGS
flags.DEFINE_string("context_checkpoint", None, "the frozen AR tower (train_ar.py's WORKDIR/checkpoint)",
                    required=True)
flags.DEFINE_string("workdir", None, "run directory (created; resumed if it holds a run)", required=True)
flags.DEFINE_integer("steps", 1500, "optimizer steps")
flags.DEFINE_integer("batch_size", 16, "sequences per step")
flags.DEFINE_integer("seq_len", 128, "tokens per sequence (a multiple of block_size)")
flags.DEFINE_integer("block_size", 16, "diffusion block size S (task answers start on block boundaries)")
flags.DEFINE_float("task_fraction", 0.8, "share of task tokens (the rest: stdlib docstring corpus)")
flags.DEFINE_float("peak_lr", 1e-3, "learning rate after warmup")
flags.DEFINE_float("final_lr", 1e-5, "learning rate at the end of the decay")
flags.DEFINE_integer("warmup_steps", 100, "linear warmup steps")
flags.DEFINE_float("decay_fraction", 0.2, "final fraction of steps spent decaying")
flags.DEFINE_integer("seed", 0, "adaLN init / noise seed")
flags.DEFINE_integer("data_seed", 1, "training stream seed")
flags.DEFINE_integer("save_every", 250, "checkpoint interval (steps)")
flags.DEFINE_integer("stop_after", None, "stop after this step (resume later with the same flags)")


def main(argv):
    del argv
    cfg = TrainConfig(steps=FLAGS.steps, peak_lr=FLAGS.peak_lr, final_lr=FLAGS.final_lr,
                      warmup_steps=FLAGS.warmup_steps, decay_fraction=FLAGS.decay_fraction, seed=FLAGS.seed,
                      save_every=FLAGS.save_every)
    data = DataSettings(seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size, task_fraction=FLAGS.task_fraction,
                        block_size=FLAGS.block_size, seed=FLAGS.data_seed)
    path = train_denoiser(FLAGS.context_checkpoint, FLAGS.workdir, cfg, data, stop_after=FLAGS.stop_after)
    print(f"TwoTower checkpoint: {path}" if path else f"stopped after step {FLAGS.stop_after}; rerun to resume")


if __name__ == "__main__":
    app.run(main)
