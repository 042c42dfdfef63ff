"""The two training runs of the miniature TwoTower experiment, as functions the `experiments/` scripts
(and tests) call:

1. `train_ar_tower`: a Nemotron-H tower trained from scratch, next-token, on the offline data
   (`twotower_jax.data`): it becomes the frozen context tower.
2. `train_denoiser`: a TwoTower whose denoiser starts as a copy of that tower (adaLN at identity) and
   is trained with the block-wise masked-diffusion objective while the context tower stays frozen.

Each writes its training state under `workdir/` (orbax `CheckpointManager`, `metrics.jsonl`) and the
result as one of our checkpoints at `workdir/checkpoint` (loadable by `generate --checkpoint`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from twotower_jax.checkpoint.hf import TOWER, TWO_TOWER
from twotower_jax.checkpoint.load import load_checkpoint
from twotower_jax.checkpoint.orbax_io import save_params_orbax
from twotower_jax.config import NemotronHConfig, tiny
from twotower_jax.data import MASK_ID, PADDED_VOCAB_SIZE, TrainingStream
from twotower_jax.tower import Impl, NemotronH
from twotower_jax.training.loop import Stage, TrainConfig, train
from twotower_jax.training.objective import (T_MIN, ar_loss, blockwise_context, denoiser_logits, diffusion_loss,
                                             masked_mean)
from twotower_jax.two_tower import TwoTower, identity_adaln_params, two_tower_params_from_tower

CHECKPOINT = "checkpoint"
RUN_FILE = "run.json"


def demo_config(hidden_size: int = 64) -> NemotronHConfig:
    """The miniature backbone: every Nemotron-H layer kind but the dense MLP (the release has none),
    GQA, n_groups 2, top-2 of 4 non-gated relu² experts plus a shared expert; byte vocabulary. Widths
    scale with `hidden_size` (Mamba inner = 2·hidden). Small widths keep a 16-token denoiser pass close
    to a 1-token decode step in cost on a CPU, the regime where block diffusion can pay."""
    h = hidden_size
    if h % 8:
        raise ValueError(f"hidden_size must be a multiple of 8, got {h}")
    return tiny(pattern="M*EM*E", vocab_size=PADDED_VOCAB_SIZE, hidden_size=h,
                num_attention_heads=4, num_key_value_heads=2, head_dim=h // 4,
                mamba_num_heads=8, mamba_head_dim=h // 4, ssm_state_size=32, n_groups=2, chunk_size=16,
                n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=h,
                moe_shared_expert_intermediate_size=h, routed_scaling_factor=1.0,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    seq_len: int = 128
    batch_size: int = 32
    task_fraction: float = 0.7
    block_size: Optional[int] = 16   # task answers start on block boundaries (TrainingStream); None: packed
    seed: int = 0

    def stream(self, block_size: Optional[int] = -1) -> TrainingStream:
        """The stream, laid out for `block_size` (default: this setting's)."""
        return TrainingStream(self.seq_len, self.batch_size, self.seed, task_fraction=self.task_fraction,
                              block_size=self.block_size if block_size == -1 else block_size)


@dataclasses.dataclass(frozen=True)
class DenoiserRecipe:
    """How the denoiser trains beyond the optimizer settings. The defaults are SPEC §5 at one block size;
    the rest are the experiment's variants, each named in its results.

    curriculum: ((block size, fraction of the steps), ...) trained before the final `data.block_size`,
      e.g. ((32, 0.5),): the first half of the steps with blocks of 32, the rest with 16 (the release's
      32 → 16). Every stage lays the data out for its own block size.
    t_low, t_high: t ~ U[t_low, t_high] per example (SPEC: U[1e-3, 1]).
    answers_only: the loss averages over masked answer positions only (a task's answer, its EOS and the
      filler after it) instead of every masked position (SPEC: all text).
    """
    curriculum: tuple[tuple[int, float], ...] = ()
    t_low: float = T_MIN
    t_high: float = 1.0
    answers_only: bool = False

    def is_spec_objective(self) -> bool:
        return self.t_low == T_MIN and self.t_high == 1.0 and not self.answers_only


def variant_diffusion_loss(denoiser_params, context_params, batch, rng, *, model: TwoTower, block_size: int,
                           mask_token_id: int, t_low: float, t_high: float, answers_only: bool):
    """The SPEC §5 objective with the experiment's variants (`DenoiserRecipe`): t ~ U[t_low, t_high], and
    with `answers_only` the mean over masked answer positions (`batch` = (tokens, answers)). Built from
    the library objective's pieces; with the SPEC settings it equals `diffusion_loss`."""
    tokens, answers = batch if answers_only else (batch, None)
    t_rng, mask_rng = jax.random.split(rng)
    t = jax.random.uniform(t_rng, (tokens.shape[0],), jnp.float32, t_low, t_high)
    masked = jax.random.uniform(mask_rng, tokens.shape) < t[:, None]
    noisy = jnp.where(masked, mask_token_id, tokens)
    context = blockwise_context(model.context, context_params, tokens, block_size)
    logits = denoiser_logits(model, denoiser_params, noisy, context, t)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    scored = masked if answers is None else masked & answers
    loss = masked_mean(ce, scored)
    accuracy = masked_mean(jnp.argmax(logits, -1) == tokens, scored)
    return loss, {"loss": loss, "masked_accuracy": accuracy, "masked_fraction": masked.mean()}


def _write_run(workdir: Path, **record) -> None:
    (workdir / RUN_FILE).write_text(json.dumps(record, indent=2, default=str))


def train_ar_tower(workdir: str | Path, train_cfg: TrainConfig, data: DataSettings = DataSettings(),
                   config: Optional[NemotronHConfig] = None, *, stop_after: Optional[int] = None,
                   progress: Optional[bool] = None, on_log: Optional[Callable] = None, mesh=None,
                   grad_accum: int = 1, remat: str = "none") -> Path:
    """Trains a tower from scratch; returns the path of its checkpoint (None if stopped early). `mesh`,
    `grad_accum`: as `loop.train`; `remat`: `Impl.remat` of the tower."""
    workdir = Path(workdir)
    config = config or demo_config()
    model = NemotronH(config, impl=Impl(remat=remat))
    params = model.init_params(jax.random.key(train_cfg.seed))
    stream = data.stream()
    workdir.mkdir(parents=True, exist_ok=True)
    _write_run(workdir, stage="ar", train=dataclasses.asdict(train_cfg), data=dataclasses.asdict(data),
               config=config.to_hf_dict())
    params = train(functools.partial(ar_loss, model=model), params, None, stream.batch, train_cfg, workdir,
                   stop_after=stop_after, progress=progress, on_log=on_log, mesh=mesh, grad_accum=grad_accum)
    if stop_after is not None and stop_after < train_cfg.steps:
        return None
    save_params_orbax(workdir / CHECKPOINT, TOWER, config, params, overwrite=True)
    return workdir / CHECKPOINT


def denoiser_stages(model: TwoTower, data: DataSettings, steps: int, recipe: DenoiserRecipe) -> list[Stage]:
    """The curriculum as `loop.Stage`s: each (block size, fraction) of `recipe.curriculum`, then
    `data.block_size` for the remaining steps."""
    stages, until = [], 0
    for block_size, fraction in (*recipe.curriculum, (data.block_size, None)):
        until = steps if fraction is None else until + int(round(fraction * steps))
        if data.seq_len % block_size:
            raise ValueError(f"seq_len {data.seq_len} is not a multiple of the curriculum's block size {block_size}")
        stream = data.stream(block_size)
        if recipe.is_spec_objective():   # with the routers' loads (metrics; the bias update when enabled)
            loss = functools.partial(diffusion_loss, model=model, block_size=block_size, mask_token_id=MASK_ID,
                                     expert_load=True)
        else:
            loss = functools.partial(variant_diffusion_loss, model=model, block_size=block_size,
                                     mask_token_id=MASK_ID, t_low=recipe.t_low, t_high=recipe.t_high,
                                     answers_only=recipe.answers_only)
        batches = stream.batch_with_answers if recipe.answers_only else stream.batch
        stages.append(Stage(min(until, steps), loss, batches))
    return stages


def train_denoiser(context_checkpoint: str | Path, workdir: str | Path, train_cfg: TrainConfig,
                   data: DataSettings = DataSettings(), *, recipe: DenoiserRecipe = DenoiserRecipe(),
                   stop_after: Optional[int] = None, progress: Optional[bool] = None,
                   on_log: Optional[Callable] = None, mesh=None, grad_accum: int = 1, remat: str = "none") -> Path:
    """Trains the denoiser of a TwoTower built on a frozen AR tower checkpoint; returns the TwoTower
    checkpoint path (None if stopped early). Blocks of `data.block_size` (after `recipe.curriculum`).
    `mesh`, `grad_accum`: as `loop.train`; `remat`: `Impl.remat` (the frozen context pass needs none)."""
    if train_cfg.expert_bias_update_rate and not recipe.is_spec_objective():
        raise ValueError("expert_bias_update_rate needs the SPEC objective (the variant losses report no "
                         "router loads)")
    workdir = Path(workdir)
    kind, config, context = load_checkpoint(context_checkpoint)
    if kind != TOWER:
        raise ValueError(f"{context_checkpoint}: expected a single-tower checkpoint, got {kind}")
    if data.block_size is None:
        raise ValueError("the denoiser trains on blocks: data.block_size must be set")
    model = TwoTower(config, impl=Impl(remat=remat))
    adaln = identity_adaln_params(model, jax.random.key(train_cfg.seed))
    params = two_tower_params_from_tower(context, adaln)
    workdir.mkdir(parents=True, exist_ok=True)
    _write_run(workdir, stage="denoiser", context_checkpoint=str(context_checkpoint),
               train=dataclasses.asdict(train_cfg), data=dataclasses.asdict(data), recipe=dataclasses.asdict(recipe))
    stages = denoiser_stages(model, data, train_cfg.steps, recipe)
    denoiser = train(stages, params["denoiser"], params["context"], None, train_cfg, workdir,
                     stop_after=stop_after, progress=progress, on_log=on_log, mesh=mesh, grad_accum=grad_accum)
    if stop_after is not None and stop_after < train_cfg.steps:
        return None
    save_params_orbax(workdir / CHECKPOINT, TWO_TOWER, config, {"context": params["context"], "denoiser": denoiser},
                      overwrite=True)
    return workdir / CHECKPOINT
