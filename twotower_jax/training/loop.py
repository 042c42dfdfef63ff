"""The training loop: optax AdamW on a warmup-stable-decay schedule with gradient clipping, orbax
`CheckpointManager` saves, exact resume, JSON-lines metrics and a progress bar.

A loss has the signature `loss_fn(trainable, frozen, tokens, rng) -> (loss, metrics)`. Only `trainable`
gets gradients and updates; `frozen` (the context tower when training the denoiser) is passed through
unchanged. Exact resume rests on two facts: the batch of step s is a pure function of s (`batch_fn(s)`),
and so is its RNG key (`fold_in(key(seed), s)`); a resumed run restores params and optimizer state saved
after step s and then computes exactly what the uninterrupted run computed.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from twotower_jax import distributed
from twotower_jax.progress import Progress
from twotower_jax.training import load_balance, parallel

LossFn = Callable[[Any, Any, jax.Array, jax.Array], tuple[jax.Array, dict]]
BatchFn = Callable[[int], Any]
METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a curriculum: steps up to and including `until_step` use `loss_fn` on `batch_fn`'s
    batches (e.g. the denoiser's block size 32, then 16). The optimizer state and the learning-rate
    schedule run on across stages."""
    until_step: int
    loss_fn: LossFn
    batch_fn: BatchFn


def stage_at(stages, step: int) -> Stage:
    """The stage that trains step `step` (1-based); the last stage covers any later step."""
    for stage in stages:
        if step <= stage.until_step:
            return stage
    return stages[-1]
CHECKPOINTS_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. The schedule warms up linearly to `peak_lr`, holds it, and spends the last
    `decay_fraction` of the steps decaying linearly to `final_lr` (warmup-stable-decay)."""
    steps: int
    peak_lr: float = 1e-3
    final_lr: float = 1e-5
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    seed: int = 0
    save_every: int = 200
    log_every: int = 10
    keep_checkpoints: int = 2
    # Aux-loss-free router balancing (training.load_balance; Megatron's rate when enabled: 1e-3). Acts
    # when the loss reports "expert_load" (diffusion_loss(..., expert_load=True)); 0 only logs the loads.
    expert_bias_update_rate: float = 0.0

    def __post_init__(self):
        problems = []
        if self.steps < 1:
            problems.append(f"steps={self.steps} must be >= 1")
        if not 0 <= self.warmup_steps <= self.steps:
            problems.append(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps}]")
        if not 0.0 <= self.decay_fraction <= 1.0:
            problems.append(f"decay_fraction={self.decay_fraction} must be in [0, 1]")
        if self.peak_lr <= 0 or self.final_lr < 0:
            problems.append(f"learning rates must be positive (peak_lr={self.peak_lr}, final_lr={self.final_lr})")
        if self.save_every < 1 or self.log_every < 1:
            problems.append("save_every and log_every must be >= 1")
        if problems:
            raise ValueError("bad TrainConfig: " + "; ".join(problems))


def wsd_schedule(cfg: TrainConfig) -> optax.Schedule:
    decay_steps = int(round(cfg.decay_fraction * cfg.steps))
    stable_steps = max(cfg.steps - cfg.warmup_steps - decay_steps, 0)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.peak_lr, max(cfg.warmup_steps, 1)),
         optax.constant_schedule(cfg.peak_lr),
         optax.linear_schedule(cfg.peak_lr, cfg.final_lr, max(decay_steps, 1))],
        boundaries=[cfg.warmup_steps, cfg.warmup_steps + stable_steps])


def _decays(params) -> Any:
    """Weight decay on weight matrices only: not on norms, biases, A_log, D, dt_bias or adaLN tables."""
    def decays(path, x):
        return x.ndim >= 2 and getattr(path[-1], "key", None) != "scale_shift_table"
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(wsd_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_decays))


@functools.lru_cache(maxsize=8)
def make_train_step(loss_fn: LossFn, cfg: TrainConfig, mesh: Optional[Mesh] = None, grad_accum: int = 1):
    """(params, opt_state, frozen, batch, rng, step) → (params, opt_state, metrics), jitted, params and
    optimizer state donated; cached per (loss, config, mesh, grad_accum) so a resumed or repeated run in
    the same process reuses the compiled step.

    With a `mesh` the inputs are expected on the training layout (`parallel.state_shardings`,
    `parallel.batch_shardings`; `parallel.place_train_state` puts them there) and the new state is
    pinned to it. `grad_accum` > 1 splits the batch into that many micro-batches
    (`parallel.accumulated_grads`)."""
    optimizer, schedule = make_optimizer(cfg), wsd_schedule(cfg)

    def train_step(params, opt_state, frozen, batch, rng, step):
        grads, metrics = parallel.accumulated_grads(loss_fn, params, frozen, batch, rng, grad_accum)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        loads = metrics.pop(load_balance.METRIC, None)
        if loads is not None:
            if cfg.expert_bias_update_rate:
                params = load_balance.update_expert_bias(params, loads, cfg.expert_bias_update_rate)
            metrics = {**metrics, **load_balance.load_metrics(loads)}
        if mesh is not None:   # pin the new state to its layout (GSPMD could pick another for outputs)
            params = jax.lax.with_sharding_constraint(params, parallel.state_shardings(params, mesh))
            opt_state = jax.lax.with_sharding_constraint(opt_state, parallel.state_shardings(opt_state, mesh))
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": schedule(step)}
        return params, opt_state, metrics
    return jax.jit(train_step, donate_argnums=(0, 1))


class MetricsLog:
    """Appends one JSON object per logged step; on resume, drops records past the restored step so
    the file always describes one run."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _to_float(tree) -> dict:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def _on_devices(batch, mesh: Optional[Mesh], grad_accum: int):
    """A step's batch (an array or a tuple of arrays, rows first) on device: rows over the mesh's `data`
    axis (each process transferring only its own devices' rows), or on the default device."""
    parallel.check_grad_accum(grad_accum, len(jax.tree.leaves(batch)[0]), mesh)
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    return jax.tree.map(distributed.global_array, batch, parallel.batch_shardings(batch, mesh))


def train(loss_fn: LossFn | Sequence[Stage], params: Any, frozen: Any, batch_fn: Optional[BatchFn], cfg: TrainConfig,
          workdir: str | Path, *, stop_after: Optional[int] = None, progress: Optional[bool] = None,
          on_log: Optional[Callable[[dict], None]] = None, mesh: Optional[Mesh] = None,
          grad_accum: int = 1) -> Any:
    """Trains `params` for `cfg.steps` steps (resuming from the newest checkpoint in `workdir` if any) and
    returns the final params. Saves every `save_every` steps and at the end; logs every `log_every`.

    `loss_fn` is one loss for every step (with `batch_fn`), or a curriculum: a sequence of `Stage`s
    (then `batch_fn` is None), each step trained by the stage it falls in (`stage_at`). A batch may be
    an array or a tuple of arrays (passed to the loss as they come).

    `stop_after=k` stops after step k as an interruption would (after saving), for tests and for
    splitting long runs. Steps are numbered 1..steps; step s trains on `batch_fn(s - 1)`.

    `mesh`: train sharded on it (`training/parallel.py`: params, optimizer state and `frozen` on the
    training layout, batch rows over `data`); with several processes (`twotower_jax.distributed`)
    every process runs `train` with the same arguments, computes the same global batch and feeds its
    own devices' rows; all of them write the checkpoint, process 0 the metrics. `grad_accum`: micro-
    batches per step (the batch's rows must split evenly, times the mesh's `data` size).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # A private copy: the jitted step donates its params buffers, and the caller's must stay valid.
    params = jax.tree.map(jnp.array, params)
    opt_state = make_optimizer(cfg).init(params)
    if mesh is not None:
        params, opt_state, frozen = parallel.place_train_state(params, opt_state, frozen, mesh)
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True)
    done = 0
    with ocp.CheckpointManager((workdir / CHECKPOINTS_DIR).absolute(), options=options) as manager:
        latest = manager.latest_step()
        if latest is not None:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
            state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
            params, opt_state, done = state["params"], state["opt_state"], latest
        log = MetricsLog(workdir / METRICS_FILE, done) if jax.process_index() == 0 else None
        stages = [Stage(cfg.steps, loss_fn, batch_fn)] if callable(loss_fn) else list(loss_fn)
        if not stages or (batch_fn is not None and not callable(loss_fn)):
            raise ValueError("train needs a loss and batch_fn, or a non-empty sequence of Stages and batch_fn=None")
        base_key = jax.random.key(cfg.seed)
        last = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        bar = Progress(cfg.steps, progress, unit="steps", start=done)
        started = time.perf_counter()
        for step in range(done + 1, last + 1):
            stage = stage_at(stages, step)
            step_fn = make_train_step(stage.loss_fn, cfg, mesh, grad_accum)
            tokens = _on_devices(stage.batch_fn(step - 1), mesh, grad_accum)
            params, opt_state, metrics = step_fn(params, opt_state, frozen, tokens,
                                                 jax.random.fold_in(base_key, step), step - 1)
            if step % cfg.log_every == 0 or step == last:
                record = {"step": step, **_to_float(metrics), "seconds": round(time.perf_counter() - started, 3)}
                if log is not None:
                    log.write(record)
                if on_log is not None:
                    on_log(record)
                bar.update(step, f"loss {record['loss']:.4f}")
            if step % cfg.save_every == 0 or step == last:
                manager.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
        manager.wait_until_finished()
    return params
