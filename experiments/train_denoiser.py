"""Train the denoiser of a TwoTower on a frozen AR tower (SPEC §5): both towers start as copies of the
tower (adaLN at identity); only the denoiser side trains, on the block-wise masked-diffusion objective.

  python experiments/train_denoiser.py --context_checkpoint runs/ar/checkpoint --workdir runs/denoiser
  python experiments/train_denoiser.py ... --curriculum 32:0.5     # the release's block curriculum 32 -> 16

The objective is SPEC §5 unless a variant flag says otherwise (--t_low/--t_high: the t distribution,
--answers_only: the loss on answer positions only); `run.json` records the recipe.

Resumes from `--workdir` if a run is there. Writes metrics.jsonl, orbax training checkpoints and, at the
end, the TwoTower at WORKDIR/checkpoint (usable by `generate --checkpoint` and experiments/sweep_sampler.py).
"""
from absl import app, flags

from twotower_jax import distributed
from train_flags import FLAGS, data_settings, define_training_flags, scale_settings, train_config
from twotower_jax.training.objective import T_MIN
from twotower_jax.training.recipes import DenoiserRecipe, train_denoiser

define_training_flags(steps=1500, peak_lr=1e-3, final_lr=1e-5, data_seed=1)
flags.DEFINE_string("context_checkpoint", None, "the frozen AR tower (train_ar.py's WORKDIR/checkpoint)",
                    required=True)
flags.DEFINE_list("curriculum", [], "block-size curriculum before --block_size: SIZE:FRACTION of the steps, in "
                  "order (e.g. 32:0.5 = the first half with blocks of 32, then --block_size); empty: none")
flags.DEFINE_float("t_low", T_MIN, "variant: t ~ U[t_low, t_high] (SPEC: U[1e-3, 1])")
flags.DEFINE_float("t_high", 1.0, "variant: t ~ U[t_low, t_high] (SPEC: U[1e-3, 1])")
flags.DEFINE_bool("answers_only", False, "variant: loss over masked answer positions only (SPEC: all text)")


def main(argv):
    del argv
    curriculum = tuple((int(size), float(fraction))
                       for size, fraction in (item.split(":") for item in FLAGS.curriculum))
    recipe = DenoiserRecipe(curriculum=curriculum, t_low=FLAGS.t_low, t_high=FLAGS.t_high,
                            answers_only=FLAGS.answers_only)
    scale = scale_settings()
    path = train_denoiser(FLAGS.context_checkpoint, FLAGS.workdir, train_config(), data_settings(), recipe=recipe,
                          stop_after=FLAGS.stop_after, **scale)
    print(f"TwoTower checkpoint: {path}" if path else f"stopped after step {FLAGS.stop_after}; rerun to resume")
    distributed.shutdown()   # a multi-process job: leave it before exit (see distributed.shutdown)


if __name__ == "__main__":
    app.run(main)
