"""The miniature-experiment pipeline end to end on a tiny config: train an AR tower, train a denoiser on
it (frozen), and sweep the samplers over the resulting checkpoint."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from twotower_jax.checkpoint.hf import TOWER, TWO_TOWER
from twotower_jax.checkpoint.load import load_checkpoint
from twotower_jax.config import tiny
from twotower_jax.data import PADDED_VOCAB_SIZE
from twotower_jax.training.loop import TrainConfig, read_metrics
from twotower_jax.training.recipes import DataSettings, train_ar_tower, train_denoiser

ROOT = Path(__file__).resolve().parent.parent


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    config = tiny(pattern="M*E", vocab_size=PADDED_VOCAB_SIZE, chunk_size=8)
    data = DataSettings(seq_len=32, batch_size=2, block_size=16, task_fraction=0.5)
    cfg = TrainConfig(steps=2, warmup_steps=1, log_every=1, save_every=2)
    tower = train_ar_tower(root / "ar", cfg, data, config, progress=False)
    two_tower = train_denoiser(tower, root / "denoiser", cfg, data, progress=False)
    return root, tower, two_tower


def test_recipes_write_loadable_checkpoints_and_freeze_the_context(trained):
    root, tower, two_tower = trained
    kind, _, tower_params = load_checkpoint(tower)
    assert kind == TOWER
    kind, config, params = load_checkpoint(two_tower)
    assert kind == TWO_TOWER and config.vocab_size == PADDED_VOCAB_SIZE
    # the TwoTower's context tower is the AR tower, bit for bit; the denoiser moved away from it
    import jax
    jax.tree.map(np.testing.assert_array_equal, params["context"], tower_params)
    assert not np.array_equal(params["denoiser"]["embeddings"]["embedding"], tower_params["embeddings"]["embedding"])
    for stage in ("ar", "denoiser"):
        assert [r["step"] for r in read_metrics(root / stage)] == [1, 2]
        assert json.loads((root / stage / "run.json").read_text())["stage"] == stage


def test_sweep_rows_carry_the_promised_fields(trained):
    _, _, two_tower = trained
    sweep = _load_script("sweep_sampler")
    rows = sweep.sweep(two_tower, sweep.QUICK_SETTINGS, n_tasks=4, n_timed=1, repeats=1, mock_ar=False, log=lambda r: None)
    assert [r["mode"] for r in rows] == ["ar", "diffusion"]
    for row in rows:
        for key in ("mode", "accuracy", "tokens_per_second", "relative_accuracy", "speedup_vs_ar", "agreement_with_ar",
                    "perplexity", "repetition"):
            assert key in row, key
        assert 0.0 <= row["accuracy"] <= 1.0 and row["tokens_per_second"] > 0
    diffusion = rows[1]
    assert (diffusion["confidence_threshold"], diffusion["block_size"], diffusion["steps_per_block"]) == (0.8, 16, 16)
    assert diffusion["tokens_per_denoiser_pass"] > 0
    assert rows[0]["speedup_vs_ar"] == 1.0
    assert sweep.grid(["0.5", "1.0"], ["8"], ["S", "4"]) == [(0.5, 8, 8), (1.0, 8, 8), (0.5, 8, 4), (1.0, 8, 4)]
