"""The optimisation and data flags that train_ar.py and train_denoiser.py share (absl), with each script's
own defaults, and their conversion to `TrainConfig` / `DataSettings`."""
from absl import flags

from twotower_jax.training.loop import TrainConfig
from twotower_jax.training.recipes import DataSettings

FLAGS = flags.FLAGS


def define_training_flags(*, steps: int, peak_lr: float, final_lr: float, data_seed: int) -> None:
    flags.DEFINE_string("workdir", None, "run directory (created; resumed if it holds a run)", required=True)
    flags.DEFINE_integer("steps", steps, "optimizer steps")
    flags.DEFINE_integer("batch_size", 16, "sequences per step")
    flags.DEFINE_integer("seq_len", 128, "tokens per sequence (a multiple of block_size)")
    flags.DEFINE_integer("block_size", 16, "diffusion block size S (task answers start on block boundaries); "
                     "0: no alignment (documents packed back to back, for the AR tower)")
    flags.DEFINE_float("task_fraction", 0.8, "share of task tokens (the rest: stdlib docstring corpus)")
    flags.DEFINE_float("peak_lr", peak_lr, "learning rate after warmup")
    flags.DEFINE_float("final_lr", final_lr, "learning rate at the end of the decay")
    flags.DEFINE_integer("warmup_steps", 100, "linear warmup steps")
    flags.DEFINE_float("decay_fraction", 0.2, "final fraction of steps spent decaying")
    flags.DEFINE_integer("seed", 0, "init / noise seed")
    flags.DEFINE_integer("data_seed", data_seed, "training stream seed")
    flags.DEFINE_integer("save_every", 250, "checkpoint interval (steps)")
    flags.DEFINE_integer("stop_after", None, "stop after this step (resume later with the same flags)")


def train_config() -> TrainConfig:
    return TrainConfig(steps=FLAGS.steps, peak_lr=FLAGS.peak_lr, final_lr=FLAGS.final_lr,
                       warmup_steps=FLAGS.warmup_steps, decay_fraction=FLAGS.decay_fraction, seed=FLAGS.seed,
                       save_every=FLAGS.save_every)


def data_settings() -> DataSettings:
    return DataSettings(seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size, task_fraction=FLAGS.task_fraction,
                        block_size=FLAGS.block_size or None, seed=FLAGS.data_seed)
