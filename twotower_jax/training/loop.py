"""The training loop: optax AdamW on a warmup-stable-decay schedule with gradient clipping, orbax
`CheckpointManager` saves, exact resume, JSON-lines metrics and a progress bar.

A loss has the signature `loss_fn(trainable, frozen, tokens, rng) -> (loss, metrics)`. Only `trainable`
gets gradients and updates; `frozen` (the context tower when training the denoiser) is passed through
unchanged. Exact resume rests on two facts: the batch of step s is a pure function of s (`batch_fn(s)`),
and so is its RNG key (`fold_in(key(seed), s)`); a resumed run restores params and optimizer state saved
after step s and then computes exactly what the uninterrupted run computed.

A batch_fn that reads a stream (the text pipeline's `TextBatches`) is a `DataFeed`: it has
`data_state()` (a JSON-serialisable dict: its position, before the next batch it will return) and
`restore_data_state(state)`. Its state is an item of the same orbax checkpoint step as params and
optimizer state (item `data`, one state per process, keyed by process index: each host reads its own
shard), so the three are written together and a resumed run reads on exactly where the saved one was.
A feed with `process_local = True` returns only this process's rows; the global batch is the
concatenation of every process's rows in process order (`distributed.process_local_array`).

Checkpoint step layout: `<workdir>/checkpoints/<step>/state` (params, opt_state) and, with data feeds,
`<step>/data` (JSON). Steps written before the data item existed hold one unnamed item (`default`):
they resume as before for pure batch_fns; a run with a data feed refuses them (no data position).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

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
STATE_ITEM, DATA_ITEM, LEGACY_ITEM = "state", "data", "default"   # items of a checkpoint step
DATA_FORMAT = "twotower_jax.loop.data_state/1"


@runtime_checkable
class DataFeed(Protocol):
    """A batch_fn whose position is checkpointed (module docstring). `process_local` (optional attribute,
    default False): it returns this process's rows only."""

    def __call__(self, index: int) -> Any: ...

    def data_state(self) -> dict: ...

    def restore_data_state(self, state: dict) -> None: ...


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


def _on_devices(batch, mesh: Optional[Mesh], grad_accum: int, process_local: bool = False):
    """A step's batch (an array or a tuple of arrays, rows first) on device: rows over the mesh's `data`
    axis, or on the default device. A global batch (every process computed it whole): each process
    transfers only its own devices' rows. A `process_local` batch (this process's b rows): the global
    batch is every process's rows in process order, P·b rows (`distributed.process_local_array`)."""
    processes = jax.process_count() if process_local else 1
    parallel.check_grad_accum(grad_accum, len(jax.tree.leaves(batch)[0]) * processes, mesh)
    if mesh is None:
        if processes > 1:
            raise ValueError(f"process-local batches from {processes} processes need a mesh spanning them (mesh=)")
        return jax.tree.map(jnp.asarray, batch)
    if not process_local:
        return jax.tree.map(distributed.global_array, batch, parallel.batch_shardings(batch, mesh))
    whole = jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] * processes, *x.shape[1:]), x.dtype), batch)
    return jax.tree.map(distributed.process_local_array, batch, parallel.batch_shardings(whole, mesh))


def _data_feeds(stages) -> list:
    """The distinct `DataFeed`s among the stages' batch_fns, in stage order."""
    feeds = []
    for stage in stages:
        if isinstance(stage.batch_fn, DataFeed) and not any(stage.batch_fn is f for f in feeds):
            feeds.append(stage.batch_fn)
    return feeds


def _data_item(feeds) -> dict:
    """The checkpoint's `data` item: every process's feed states (gathered; process 0 writes the JSON)."""
    states = distributed.allgather_json([feed.data_state() for feed in feeds])
    return {"format": DATA_FORMAT, "process_count": len(states),
            "processes": {str(index): state for index, state in enumerate(states)}}


def _restore_feeds(feeds, item: Optional[dict], step: int) -> None:
    """Puts each feed back where it was when step `step` was saved (this process's states)."""
    if not feeds:
        return
    if item is None:
        raise ValueError(
            f"checkpoint step {step} holds no data position (item {DATA_ITEM!r}): it was written without a data "
            f"feed, or before data state moved into the checkpoint. Resuming would restart the data stream; "
            f"start a new workdir (or train on with the batch_fn it was written with)")
    if item.get("format") != DATA_FORMAT:
        raise ValueError(f"checkpoint step {step}: unknown data item format {item.get('format')!r}")
    if item["process_count"] != jax.process_count():
        raise ValueError(f"checkpoint step {step} was written by {item['process_count']} processes, each reading its "
                         f"own shard; resuming exactly needs as many (this run has {jax.process_count()})")
    states = item["processes"][str(jax.process_index())]
    if len(states) != len(feeds):
        raise ValueError(f"checkpoint step {step} holds {len(states)} data feed state(s), this run has {len(feeds)}")
    for feed, state in zip(feeds, states):
        feed.restore_data_state(state)


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
    every process runs `train` with the same arguments and either computes the same global batch and
    feeds its own devices' rows, or (a batch_fn with `process_local = True`, e.g. `TextBatches` over its
    host's shard) returns its own rows, and the global batch is every process's rows in process order;
    all of them write the checkpoint (with each one's data position when batch_fn is a `DataFeed`),
    process 0 the metrics. `grad_accum`: micro-batches per step (the global batch's rows must split
    evenly, times the mesh's `data` size).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # A private copy: the jitted step donates its params buffers, and the caller's must stay valid.
    params = jax.tree.map(jnp.array, params)
    opt_state = make_optimizer(cfg).init(params)
    if mesh is not None:
        params, opt_state, frozen = parallel.place_train_state(params, opt_state, frozen, mesh)
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True)
    handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(), DATA_ITEM: ocp.JsonCheckpointHandler(),
                LEGACY_ITEM: ocp.StandardCheckpointHandler()}
    stages = [Stage(cfg.steps, loss_fn, batch_fn)] if callable(loss_fn) else list(loss_fn)
    if not stages or (batch_fn is not None and not callable(loss_fn)):
        raise ValueError("train needs a loss and batch_fn, or a non-empty sequence of Stages and batch_fn=None")
    feeds = _data_feeds(stages)
    done = 0
    with ocp.CheckpointManager((workdir / CHECKPOINTS_DIR).absolute(), options=options,
                               item_handlers=handlers) as manager:
        latest = manager.latest_step()
        if latest is not None:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
            saved = set(manager.item_metadata(latest).keys())
            name = STATE_ITEM if STATE_ITEM in saved else LEGACY_ITEM
            items = {name: ocp.args.StandardRestore(abstract)}
            if feeds and DATA_ITEM in saved:
                items[DATA_ITEM] = ocp.args.JsonRestore()
            elif feeds:   # refuse before reading the (possibly large) state
                _restore_feeds(feeds, None, latest)
            restored = manager.restore(latest, args=ocp.args.Composite(**items))
            if feeds:   # the item is there: a checkpoint without one was refused above
                _restore_feeds(feeds, restored[DATA_ITEM], latest)
            params, opt_state, done = restored[name]["params"], restored[name]["opt_state"], latest
        log = MetricsLog(workdir / METRICS_FILE, done) if jax.process_index() == 0 else None
        base_key = jax.random.key(cfg.seed)
        last = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        bar = Progress(cfg.steps, progress, unit="steps", start=done)
        started = time.perf_counter()
        for step in range(done + 1, last + 1):
            stage = stage_at(stages, step)
            step_fn = make_train_step(stage.loss_fn, cfg, mesh, grad_accum)
            tokens = _on_devices(stage.batch_fn(step - 1), mesh, grad_accum,
                                 bool(getattr(stage.batch_fn, "process_local", False)))
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
                items = {STATE_ITEM: ocp.args.StandardSave({"params": params, "opt_state": opt_state})}
                if feeds:   # the data position after step `step`, in the same step directory
                    items[DATA_ITEM] = ocp.args.JsonSave(_data_item(feeds))
                manager.save(step, args=ocp.args.Composite(**items))
        manager.wait_until_finished()
    return params
