"""Copy a trained TwoTower into the package as the demo model (`--checkpoint demo`), with a README that
records how it was made (the commands, their flags and seeds, the final training metrics).

  python experiments/package_demo.py --ar_workdir runs/ar --denoiser_workdir runs/denoiser \
      --commands "python experiments/train_ar.py ..." --commands "python experiments/train_denoiser.py ..."
"""
import json
from pathlib import Path

from absl import app, flags

from twotower_jax.checkpoint.hf import TWO_TOWER
from twotower_jax.checkpoint.load import DEMO_DIR, load_checkpoint
from twotower_jax.checkpoint.orbax_io import save_params_orbax
from twotower_jax.generate import BYTE_TOKENIZER_FILE
from twotower_jax.tower import count_params
from twotower_jax.training.loop import read_metrics
from twotower_jax.training.recipes import CHECKPOINT, RUN_FILE

FLAGS = flags.FLAGS
flags.DEFINE_string("ar_workdir", None, "train_ar.py's --workdir", required=True)
flags.DEFINE_string("denoiser_workdir", None, "train_denoiser.py's --workdir", required=True)
flags.DEFINE_multi_string("commands", [], "the exact commands that made the runs, in order")
flags.DEFINE_multi_string("notes", [], "paragraphs after the commands (e.g. how an interrupted run was resumed)")
flags.DEFINE_string("out", str(DEMO_DIR), "where the packaged checkpoint goes")


def _last(workdir: Path) -> dict:
    record = read_metrics(workdir)[-1]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}


def main(argv):
    del argv
    ar, den = Path(FLAGS.ar_workdir), Path(FLAGS.denoiser_workdir)
    kind, config, params = load_checkpoint(den / CHECKPOINT)
    if kind != TWO_TOWER:
        raise ValueError(f"{den / CHECKPOINT} is not a TwoTower checkpoint")
    out = Path(FLAGS.out)
    save_params_orbax(out, TWO_TOWER, config, params, dtype_name="float32", overwrite=True)
    (out / BYTE_TOKENIZER_FILE).write_text(json.dumps(
        {"type": "bytes", "pad": 0, "bos": 1, "eos": 2, "mask": 3, "byte_offset": 4}, indent=2) + "\n")
    runs = {name: json.loads((w / RUN_FILE).read_text()) for name, w in (("ar", ar), ("denoiser", den))}
    lines = [
        "# The packaged demo TwoTower (`--checkpoint demo`)",
        "",
        f"A miniature TwoTower ({config.pattern}, hidden {config.hidden_size}, byte vocabulary "
        f"{config.vocab_size}; {count_params(params['context']):,} params per tower), trained from scratch on a "
        "2-core CPU with this repository's own code and offline data (`twotower_jax.data`). Stored in float32.",
        "",
        "Its tasks (`twotower_jax/data/tasks.py`): copy, reverse and sort of 3..8 lowercase letters, and sums "
        "of two 1..2-digit numbers, in equal shares. A prompt is held out iff the CRC32 of its text falls in one "
        "bucket of ten; training never sees a held-out prompt, and every evaluation (sweep, `make demo`) uses "
        "held-out prompts only.",
        "",
        "## How it was made",
        "",
        "```bash",
        *FLAGS.commands,
        "```",
        "",
        *[line for note in FLAGS.notes for line in (note, "")],
        "Training is deterministic in its flags (data and noise are pure functions of seed and step; an",
        "interrupted run resumes exactly), so these commands reproduce the weights up to floating-point",
        "differences between machines.",
        "",
        "## Settings and final metrics",
        "",
    ]
    for name, workdir in (("ar", ar), ("denoiser", den)):
        run = dict(runs[name])
        run.pop("config", None)
        lines += [f"**{name}**: `{json.dumps(run)}`", "", f"last logged step: `{json.dumps(_last(workdir))}`", ""]
    lines += ["Sampler quality and speed of this checkpoint: `experiments/results/sweep_demo.md`.", ""]
    (out / "README.md").write_text("\n".join(lines))
    print(f"packaged {out}")


if __name__ == "__main__":
    app.run(main)
