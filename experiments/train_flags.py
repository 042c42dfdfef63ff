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
    # scale: a mesh, several processes, memory
    flags.DEFINE_integer("mesh_data", 0, "train sharded on a mesh of every device with this many data-parallel "
                         "(FSDP) groups, experts split over the rest (training/parallel.py); 0: one device")
    flags.DEFINE_integer("grad_accum", 1, "micro-batches per step (batch_size must split evenly)")
    flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "rematerialisation per layer of the trained tower")
    flags.DEFINE_float("expert_bias_update_rate", 0.0, "aux-loss-free router balancing (Megatron's 1e-3 when on)")
    flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator HOST:PORT (multi-host)")
    flags.DEFINE_integer("num_processes", None, "jax.distributed: number of processes")
    flags.DEFINE_integer("process_id", None, "jax.distributed: this process's index")


def scale_settings() -> dict:
    """Joins a multi-process job when its flags (or a detected cluster) say so — call first in main —
    and returns the `train_*` keyword arguments for the mesh, accumulation and remat."""
    from twotower_jax import distributed
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    mesh = None
    if FLAGS.mesh_data:
        from twotower_jax.training.parallel import train_mesh
        mesh = train_mesh(data=FLAGS.mesh_data)
    return {"mesh": mesh, "grad_accum": FLAGS.grad_accum, "remat": FLAGS.remat}


def train_config() -> TrainConfig:
    return TrainConfig(steps=FLAGS.steps, peak_lr=FLAGS.peak_lr, final_lr=FLAGS.final_lr,
                       warmup_steps=FLAGS.warmup_steps, decay_fraction=FLAGS.decay_fraction, seed=FLAGS.seed,
                       save_every=FLAGS.save_every, expert_bias_update_rate=FLAGS.expert_bias_update_rate)


def data_settings() -> DataSettings:
    return DataSettings(seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size, task_fraction=FLAGS.task_fraction,
                        block_size=FLAGS.block_size or None, seed=FLAGS.data_seed)
