"""Memory plan: what a generation run holds on each device, before anything is loaded or allocated.

Per device: the params under the placement's shardings (`sharding.param_bytes_per_device`), the caches
(the context tower's KV + Mamba states for batch × (prompt + new tokens), with the denoiser's copy on its
own group under `towers`), and the largest scratch (`temp`) of the programs the mode runs, from XLA's
memory analysis of those programs compiled ahead of time from shapes alone. The programs run one after
another, so a device needs params + caches + the largest temp.

    python -m twotower_jax.plan --config nano-30b-a3b --placement towers --devices 8 \\
        --device-memory 80GiB --batch 1 --context 8192 --mode diffusion

Temps come from the platform at hand (its name is in the plan): XLA:GPU and XLA:TPU lower some programs
differently from XLA:CPU (on CPU the bf16 expert matmuls of the real config alone take a weight-sized
scratch; experiments/results/aot_memory.md), so a CPU plan's temp is an upper-bound estimate of the
layout, not a GPU measurement. Without enough devices of that platform to compile on, the CLI compiles on
N fake CPU devices and says so; `--no-compile` gives params and caches only (exact, instant).

`--train`: the plan of one denoiser training step (SPEC §5, `training.objective.diffusion_loss`) instead,
per device: the trainable denoiser's master weights (`--master-dtype`, default float32), its AdamW state
(two moments in the master dtype, plus step counts), the frozen context tower (in the compute `--dtype`),
and the step's scratch — activations, gradients and the optimizer update's temporaries — from XLA's memory
analysis of the step compiled ahead of time (`--seq-len` tokens of L = N·S per row, `--batch` rows over the
mesh's `data` axis, `--grad-accum` micro-batches). The layout is the training one (`TRAIN_RULES`): the
inference `sharded` rules (experts over `expert`, dense weights over `expert` × `tensor`) plus FSDP (every
param's `embed` dimension over `data`) for the params, their moments and the frozen tower alike.

    python -m twotower_jax.plan --train --config nano-30b-a3b --devices 8 --data 8 --device-memory 80GiB \
        --batch 8 --seq-len 4096 --block-size 16
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import sys
import time
from typing import Optional, Sequence

import numpy as np

MODES = ("ar", "mock_ar", "diffusion")
CONFIG_PRESETS = ("nano-30b-a3b", "tiny")
_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str) -> int:
    """'80GiB', '80 GB', '1.5e9' → bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a byte count (e.g. 80GiB, 40GB, 1e9)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def gib(n: Optional[float]) -> str:
    """Bytes as GiB, or MiB/KiB when small (so a tiny model's plan does not read as zeros)."""
    if n is None:
        return "-"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if n >= size / 10:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2 ** 10:.2f} KiB"


@dataclasses.dataclass
class MemoryPlan:
    """Per-device bytes of one run. `programs`: name → {"devices": [ids], "temp": bytes} (empty when not
    compiled); `compiled_on`: the platform whose compiler gave the temps (None: not compiled)."""
    description: dict
    params: dict[int, int]
    caches: dict[int, int]
    programs: dict[str, dict]
    compiled_on: Optional[str]
    device_memory: Optional[int]

    def temp(self, device: int) -> int:
        return max([p["temp"] for p in self.programs.values() if device in p["devices"]], default=0)

    def total(self, device: int) -> int:
        return self.params[device] + self.caches[device] + self.temp(device)

    @property
    def peak(self) -> int:
        return max(self.total(d) for d in self.params)

    def fits(self) -> bool:
        return self.device_memory is None or self.peak <= self.device_memory

    def table(self) -> str:
        d = self.description
        head = (f"memory plan: {d['config']} ({d['dtype']}), mode {d['mode']}, placement {d['placement']} on "
                f"{len(self.params)} device(s) {d['mesh']}, batch {d['batch']}, context {d['context']} + "
                f"{d['new_tokens']} new tokens")
        temp_note = (f"temp: XLA memory analysis compiled on {self.compiled_on}" if self.compiled_on
                     else "temp: not compiled (--no-compile)")
        lines = [head, temp_note, "", "| device | params | caches | temp | total |",
                 "|---|---|---|---|---|"]
        for device in self.params:
            lines.append(f"| {device} | {gib(self.params[device])} | {gib(self.caches[device])} | "
                         f"{gib(self.temp(device))} | {gib(self.total(device))} |")
        for name, program in self.programs.items():
            lines.append(f"program {name}: temp {gib(program['temp'])} on devices {program['devices']}")
        if self.device_memory is not None:
            verdict = "fits" if self.fits() else "DOES NOT FIT"
            lines.append(f"device memory {gib(self.device_memory)}: peak {gib(self.peak)}, {verdict}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"description": self.description, "params": self.params, "caches": self.caches,
                "programs": self.programs, "compiled_on": self.compiled_on, "device_memory": self.device_memory,
                "peak": self.peak, "fits": self.fits(),
                "per_device_total": {d: self.total(d) for d in self.params}}


def memory_plan(config, *, mode: str = "diffusion", placement="single", n_devices: int = 1, data: int = 1,
                tensor: int = 1, batch: int = 1, context: int = 1024, new_tokens: int = 128, block_size: int = 16,
                dtype=None, moe: str = "ragged", compile: bool = True, devices=None,
                device_memory: Optional[int] = None, two_tower_params: Optional[bool] = None) -> MemoryPlan:
    """The plan of `mode` for a TwoTower (or, for `ar`, one tower) of `config` (see the module docstring).

    `devices`: the devices to compile on (default: the default backend's if it has `n_devices`, else the
    CPU's); `compile=False` leaves `programs` empty. `two_tower_params`: whether both towers' params are
    loaded (default: all modes but `ar`; `generate --mode ar` on a TwoTower checkpoint loads both)."""
    import jax
    import jax.numpy as jnp

    from twotower_jax import sharding
    from twotower_jax.tower import Impl, NemotronH
    from twotower_jax.two_tower import TwoTower

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    for name, value in (("batch", batch), ("context", context), ("new_tokens", new_tokens), ("block_size", block_size)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    dtype = jnp.bfloat16 if dtype is None else dtype
    kind = sharding.resolve(placement).kind
    both = mode != "ar" if two_tower_params is None else two_tower_params
    if not both and kind == "towers":   # one tower's params: all of them on the context group
        kind, n_devices = ("sharded", n_devices // 2) if n_devices > 2 else ("single", 1)
    mesh, compiled_on = _plan_mesh(kind, n_devices, data, tensor, compile, devices)

    impl = Impl(moe=moe)
    model = TwoTower(config, dtype, dtype, impl) if both else NemotronH(config, dtype, dtype, impl)
    shapes = model.param_shapes()
    params_bytes = sharding.param_bytes_per_device(shapes, kind, mesh)
    ids = list(params_bytes)

    tower = model.context if both else model
    capacity = context + new_tokens
    cache = jax.eval_shape(lambda: tower.init_cache(batch, capacity))
    caches = dict.fromkeys(ids, 0)
    holders = ["context"] + ([] if mode == "ar" or kind != "towers" else ["denoiser"])
    for holder in holders:
        shardings = sharding.cache_shardings(cache, kind, mesh, tower=holder)
        group = sharding.device_ids(mesh, holder if kind == "towers" else None)
        per = _cache_bytes(cache, shardings, group)
        for device, nbytes in per.items():
            caches[device] += nbytes

    programs = {}
    if compile:
        programs = compile_programs(model, mode, kind, mesh, batch=batch, context=context, new_tokens=new_tokens,
                                    block_size=block_size)
    description = {"config": _config_name(config), "dtype": jnp.dtype(dtype).name,
                   "mode": mode, "placement": kind, "mesh": dict(mesh.shape), "batch": batch, "context": context,
                   "new_tokens": new_tokens, "block_size": block_size}
    return MemoryPlan(description, params_bytes, caches, programs, compiled_on, device_memory)


def device_memory_limit(device) -> Optional[int]:
    """What the runtime says one device can hold (GPU/TPU: `bytes_limit`); None where it does not say (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:   # some backends do not implement it
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def _config_name(config) -> str:
    return f"{len(config.pattern)} layers, hidden {config.hidden_size}, {config.n_routed_experts} experts"


def _cache_bytes(cache, shardings, group: Sequence[int]) -> dict[int, int]:
    """Bytes per device of `cache` under `shardings` over a group of devices (given in mesh order); a
    sharding over an abstract mesh is reported by mesh position."""
    import jax
    out = dict.fromkeys(group, 0)
    for leaf, s in zip(jax.tree.leaves(cache), jax.tree.leaves(shardings)):
        nbytes = math.prod(s.shard_shape(tuple(leaf.shape))) * np.dtype(leaf.dtype).itemsize
        for device in group:
            out[device] += nbytes
    return out


def compile_programs(model, mode: str, placement, mesh, *, batch: int = 1, context: int = 1024,
                     new_tokens: int = 128, block_size: int = 16) -> dict:
    """AOT-compiles, from shapes alone (nothing allocated), the programs `mode` runs for `model` (a TwoTower,
    or a tower for `ar`) under `placement` on `mesh`: the context prefill (last-position logits), then the
    decode step (`ar`) or the context extension and the denoiser pass over 1 (`mock_ar`) or `block_size`
    (`diffusion`) tokens. Each compiles over its tower's devices (`towers`: its group) with params on the
    placement's shardings, batch rows over `data`, and the MoE dispatch the samplers use (`placed_model`).
    Returns name → {"devices", "argument", "output", "temp" (bytes per device), "compile_seconds"}."""
    import jax
    import jax.numpy as jnp

    from twotower_jax import sharding
    from twotower_jax.sampling.placed import placed_model
    from twotower_jax.two_tower import TwoTower

    kind = sharding.resolve(placement).kind
    shapes = model.param_shapes()   # before the dispatch is chosen: params do not depend on it
    model = placed_model(model, sharding.resolve(kind), mesh)
    tower = model.context if isinstance(model, TwoTower) else model
    capacity = context + new_tokens
    shardings = sharding.param_shardings(shapes, kind, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    context_mesh, denoiser_mesh = sharding.tower_mesh(mesh, "context"), sharding.tower_mesh(mesh, "denoiser")
    context_params = params["context"] if tower is not model else params

    def struct(shape, dtype, where):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(shape, where, batch))

    def cache_on(where):
        cache = jax.eval_shape(lambda: tower.init_cache(batch, capacity))
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache,
                            sharding.batch_shardings(cache, where, batch))

    step = 1 if mode in ("ar", "mock_ar") else block_size
    programs = {
        "context_prefill": (context_mesh, lambda p, tokens: tower.prefill(p, tokens, capacity=capacity,
                                                                          logits_at="last"),
                            (context_params, struct((batch, context), jnp.int32, context_mesh))),
    }
    if mode == "ar":
        programs["context_decode_step"] = (context_mesh, tower.decode_step,
                                           (context_params, struct((batch,), jnp.int32, context_mesh),
                                            cache_on(context_mesh)))
    else:
        programs[f"context_extend_{step}"] = (
            context_mesh, lambda p, tokens, cache: tower.extend(p, tokens, cache, logits_at="none"),
            (context_params, struct((batch, step), jnp.int32, context_mesh), cache_on(context_mesh)))
        programs[f"denoiser_pass_{step}"] = (
            denoiser_mesh, lambda p, tokens, cache, t: model.denoise(p, tokens, cache, t),
            ({"denoiser": params["denoiser"]}, struct((batch, step), jnp.int32, denoiser_mesh),
             cache_on(denoiser_mesh), struct((batch,), jnp.float32, denoiser_mesh)))
    out = {}
    for name, (where, fn, args) in programs.items():
        begin = time.perf_counter()
        with jax.set_mesh(where):
            compiled = jax.jit(fn).lower(*args).compile()
        stats = compiled.memory_analysis()
        out[name] = {"devices": sharding.device_ids(where), "argument": int(stats.argument_size_in_bytes),
                     "output": int(stats.output_size_in_bytes), "temp": int(stats.temp_size_in_bytes),
                     "compile_seconds": time.perf_counter() - begin}
    return out


def _plan_mesh(kind: str, n_devices: int, data: int, tensor: int, compile: bool, devices):
    """(mesh, where it compiles): an abstract mesh when nothing compiles; otherwise a real one over
    `devices` (default: the runtime's, else the CPU's), "platform (device kind)"."""
    import jax

    from twotower_jax import sharding
    if not compile:
        return sharding.abstract_mesh(kind, n_devices, data=data, tensor=tensor), None
    sharding.mesh_shape(kind, n_devices, data=data, tensor=tensor)   # a bad layout fails before devices are sought
    pool = list(devices) if devices is not None else jax.devices()
    if len(pool) < n_devices:
        pool = jax.devices("cpu")
    if len(pool) < n_devices:
        raise ValueError(f"compiling the plan for {n_devices} devices needs {n_devices} devices of one platform; "
                         f"found {len(pool)} ({pool[0].platform}). Run `python -m twotower_jax.plan` (it sets up "
                         f"fake CPU devices) or pass compile=False")
    mesh = sharding.make_mesh(kind, pool, n_devices=n_devices, data=data, tensor=tensor)
    return mesh, f"{pool[0].platform} ({pool[0].device_kind})"


# --- training ------------------------------------------------------------------------------------------

def train_placement():
    """The training layout (`twotower_jax.training.parallel.TRAIN_PLACEMENT`: the inference `sharded` rules
    plus FSDP, `embed` over `data`)."""
    from twotower_jax.training.parallel import TRAIN_PLACEMENT
    return TRAIN_PLACEMENT


@dataclasses.dataclass
class TrainMemoryPlan:
    """Per-device bytes of one training step: `params` (trainable master weights), `optimizer` (AdamW
    state), `frozen` (the context tower), and the compiled step's scratch (`program["temp"]`: activations,
    gradients, update temporaries), all keyed by device position; `program` is None when not compiled."""
    description: dict
    params: dict[int, int]
    optimizer: dict[int, int]
    frozen: dict[int, int]
    batch: dict[int, int]
    program: Optional[dict]
    compiled_on: Optional[str]
    device_memory: Optional[int]
    counts: dict

    def temp(self, device: int) -> int:
        return self.program["temp"] if self.program else 0

    def state(self, device: int) -> int:
        """What stays resident between steps: params, optimizer state, frozen tower."""
        return self.params[device] + self.optimizer[device] + self.frozen[device]

    def total(self, device: int) -> int:
        return self.state(device) + self.batch[device] + self.temp(device)

    @property
    def peak(self) -> int:
        return max(self.total(d) for d in self.params)

    def fits(self) -> bool:
        return self.device_memory is None or self.peak <= self.device_memory

    def table(self, fold: bool = True) -> str:
        d = self.description
        head = (f"training memory plan: {d['config']}, master {d['master_dtype']} / compute {d['dtype']}, "
                f"{len(self.params)} device(s) {d['mesh']} (FSDP over data, experts over expert), batch "
                f"{d['batch']} x {d['seq_len']} tokens (block {d['block_size']}, grad_accum {d['grad_accum']}, "
                f"remat {d['remat']}, MoE {d['moe']})")
        c = self.counts
        counts = (f"params: {c['trainable']:,} trainable (denoiser), {c['frozen']:,} frozen (context tower); "
                  f"AdamW: 2 moments in {d['master_dtype']}")
        temp_note = (f"activations: XLA memory analysis of the step compiled on {self.compiled_on} "
                     f"(compile {self.program['compile_seconds']:.0f} s)" if self.program
                     else "activations: not compiled (--no-compile)")
        if self.program and self.compiled_on and self.compiled_on.startswith("cpu") and "E" in d["pattern"]:
            temp_note += ("\nnote: XLA:CPU expands the MoE dispatch over all experts (ragged_dot: ~139 GB of scratch per "
                          "MoE layer for one 4096-token row of the real config); a GPU/TPU compile is the number to use")
        lines = [head, counts, temp_note, "", "| device | params | optimizer | frozen | batch | activations | total |",
                 "|---|---|---|---|---|---|---|"]
        rows: dict[tuple, list[int]] = {}
        for device in self.params:
            key = (self.params[device], self.optimizer[device], self.frozen[device], self.batch[device],
                   self.temp(device))
            rows.setdefault(key if fold else (device,) + key, []).append(device)
        for key, devices in rows.items():
            p, o, f, b, t = key[-5:]
            name = (f"{devices[0]}–{devices[-1]}" if len(devices) > 1 else str(devices[0]))
            lines.append(f"| {name} | {gib(p)} | {gib(o)} | {gib(f)} | {gib(b)} | "
                         f"{gib(t) if self.program else '-'} | {gib(p + o + f + b + t)} |")
        if self.device_memory is not None:
            verdict = "fits" if self.fits() else "DOES NOT FIT"
            lines.append(f"device memory {gib(self.device_memory)}: peak {gib(self.peak)}, {verdict}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"description": self.description, "counts": self.counts, "params": self.params,
                "optimizer": self.optimizer, "frozen": self.frozen, "batch": self.batch, "program": self.program,
                "compiled_on": self.compiled_on, "device_memory": self.device_memory, "peak": self.peak,
                "fits": self.fits(), "per_device_total": {d: self.total(d) for d in self.params}}


def train_state_shapes(config, *, dtype=None, master_dtype=None):
    """(model, master params, AdamW state, frozen context tower) as `jax.eval_shape` structs: the denoiser
    in `master_dtype`, its optimizer state (`training.loop.make_optimizer`), the context tower in `dtype`."""
    import jax.numpy as jnp
    dtype = jnp.dtype(jnp.bfloat16 if dtype is None else dtype)
    master_dtype = jnp.dtype(jnp.float32 if master_dtype is None else master_dtype)
    return _train_state_shapes(config, dtype, master_dtype)


@functools.lru_cache(maxsize=4)   # tracing the real model's init takes a while; shapes are immutable
def _train_state_shapes(config, dtype, master_dtype):
    import jax

    from twotower_jax.training.loop import TrainConfig, make_optimizer
    from twotower_jax.two_tower import TwoTower

    model = TwoTower(config, dtype, master_dtype)
    shapes = model.param_shapes()
    master = shapes["denoiser"]
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), shapes["context"])
    opt_state = jax.eval_shape(make_optimizer(TrainConfig(steps=1000, warmup_steps=0)).init, master)
    return model, master, opt_state, frozen


def _count(tree) -> int:
    import jax
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def memory_plan_train(config, *, n_devices: int = 1, data: int = 1, tensor: int = 1, batch: int = 1,
                      seq_len: int = 4096, block_size: int = 16, grad_accum: int = 1, dtype=None,
                      master_dtype=None, mask_token_id: int = 3, moe: str = "ragged", remat: str = "none",
                      compile: bool = True, devices=None, device_memory: Optional[int] = None) -> TrainMemoryPlan:
    """The training-step plan (module docstring, `--train`). `batch` is the global batch (rows over
    `data`); `compile=False` gives the exact resident bytes (params, optimizer, frozen tower) only."""
    import jax
    import jax.numpy as jnp

    from twotower_jax import sharding

    for name, value in (("batch", batch), ("seq_len", seq_len), ("block_size", block_size),
                        ("grad_accum", grad_accum)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if seq_len % block_size:
        raise ValueError(f"seq_len {seq_len} must be a multiple of block_size {block_size} (L = N·S)")
    if batch % (grad_accum * data):
        raise ValueError(f"batch {batch} must split into grad_accum={grad_accum} micro-batches over data={data} "
                         f"(a multiple of {grad_accum * data})")
    dtype = jnp.bfloat16 if dtype is None else dtype
    master_dtype = jnp.float32 if master_dtype is None else master_dtype
    kind = "single" if n_devices == 1 else "sharded"
    mesh, compiled_on = _plan_mesh(kind, n_devices, data, tensor, compile, devices)
    placement = train_placement()
    model, master, opt_state, frozen = train_state_shapes(config, dtype=dtype, master_dtype=master_dtype)
    params_b = sharding.param_bytes_per_device(master, placement, mesh)
    optimizer_b = sharding.param_bytes_per_device(opt_state, placement, mesh)
    frozen_b = sharding.param_bytes_per_device(frozen, placement, mesh)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    token_sharding = sharding.batch_sharding(tokens.shape, mesh, batch)
    batch_b = dict.fromkeys(params_b, math.prod(token_sharding.shard_shape(tokens.shape)) * 4)

    program = None
    if compile:
        program = compile_train_step(model, master, opt_state, frozen, mesh, batch=batch, seq_len=seq_len,
                                     block_size=block_size, grad_accum=grad_accum, dtype=dtype,
                                     mask_token_id=mask_token_id, moe=moe, remat=remat)
    description = {"config": _config_name(config), "dtype": jnp.dtype(dtype).name,
                   "master_dtype": jnp.dtype(master_dtype).name, "mode": "train", "placement": "train (FSDP)",
                   "mesh": dict(mesh.shape), "batch": batch, "seq_len": seq_len, "block_size": block_size,
                   "grad_accum": grad_accum, "pattern": config.pattern, "moe": moe, "remat": remat}
    counts = {"trainable": _count(master), "frozen": _count(frozen), "optimizer": _count(opt_state)}
    return TrainMemoryPlan(description, params_b, optimizer_b, frozen_b, batch_b, program, compiled_on,
                           device_memory, counts)


def train_step_fn(model, *, block_size: int, grad_accum: int, dtype, mask_token_id: int = 3):
    """(master, opt_state, frozen, tokens, rng) → (master, opt_state, loss): the denoiser's training step
    with bf16 (`dtype`) compute on `master` weights cast per step, gradients and AdamW in the master dtype,
    `grad_accum` micro-batches (rows i, i + k, ... as `training.parallel` splits them) summed in a scan."""
    import jax
    import jax.numpy as jnp
    import optax

    from twotower_jax.training.loop import TrainConfig, make_optimizer
    from twotower_jax.training.objective import diffusion_loss

    optimizer = make_optimizer(TrainConfig(steps=1000, warmup_steps=0))

    def loss_fn(master, frozen, tokens, rng):
        params = jax.tree.map(lambda p: p.astype(dtype), master)
        loss, _ = diffusion_loss(params, frozen, tokens, rng, model=model, block_size=block_size,
                                 mask_token_id=mask_token_id)
        return loss

    grad_fn = jax.value_and_grad(loss_fn)

    def step(master, opt_state, frozen, tokens, rng):
        if grad_accum == 1:
            loss, grads = grad_fn(master, frozen, tokens, rng)
        else:
            rows = tokens.shape[0] // grad_accum
            micro = tokens.reshape(rows, grad_accum, tokens.shape[1]).swapaxes(0, 1)

            def body(carry, xs):
                loss_sum, grad_sum = carry
                i, chunk = xs
                loss, grads = grad_fn(master, frozen, chunk, jax.random.fold_in(rng, i))
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, master)
            (loss, grads), _ = jax.lax.scan(body, (jnp.float32(0), zeros), (jnp.arange(grad_accum), micro))
            loss, grads = loss / grad_accum, jax.tree.map(lambda g: g / grad_accum, grads)
        updates, opt_state = optimizer.update(grads, opt_state, master)
        return optax.apply_updates(master, updates), opt_state, loss

    return step


@functools.lru_cache(maxsize=None)
def _denoiser_remat_class():
    from twotower_jax.tower import NemotronH
    from twotower_jax.two_tower import TwoTower

    @dataclasses.dataclass(frozen=True)
    class DenoiserRemat(TwoTower):
        """A TwoTower whose context tower runs without remat (it is frozen: nothing to recompute)."""
        @property
        def context(self) -> NemotronH:
            impl = dataclasses.replace(self.impl, remat="none")
            return NemotronH(self.config, self.dtype, self.param_dtype, impl)
    return DenoiserRemat


def _DenoiserRemat(*args):
    return _denoiser_remat_class()(*args)


def compile_train_step(model, master, opt_state, frozen, mesh, *, batch: int, seq_len: int, block_size: int,
                       grad_accum: int = 1, dtype=None, mask_token_id: int = 3, moe: str = "ragged",
                       remat: str = "none") -> dict:
    """AOT-compiles the training step from shapes alone (params, optimizer state and frozen tower on the
    training shardings, donated state, tokens over `data`) and returns XLA's per-device memory analysis:
    {"devices", "argument", "output", "alias", "temp", "compile_seconds"}."""
    import jax
    import jax.numpy as jnp

    from twotower_jax import sharding
    from twotower_jax.sampling.placed import placed_model

    dtype = jnp.bfloat16 if dtype is None else dtype
    placement = train_placement()
    # remat: each denoiser layer under nn.remat with that policy (`tower.Impl.remat`: none | full | dots); the
    # frozen context pass has no backward, so it runs as it is (`_DenoiserRemat`)
    model = dataclasses.replace(model, impl=dataclasses.replace(model.impl, moe=moe))
    if remat != "none":
        model = _DenoiserRemat(model.config, model.dtype, model.param_dtype,
                               dataclasses.replace(model.impl, remat=remat))
    model = placed_model(model, sharding.resolve("sharded" if mesh.size > 1 else "single"), mesh)
    step = train_step_fn(model, block_size=block_size, grad_accum=grad_accum, dtype=dtype,
                         mask_token_id=mask_token_id)

    def on(tree):
        shardings = sharding.param_shardings(tree, placement, mesh)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    args = (on(master), on(opt_state), on(frozen),
            jax.ShapeDtypeStruct((batch, seq_len), jnp.int32,
                                 sharding=sharding.batch_sharding((batch, seq_len), mesh, batch)),
            jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                 sharding=sharding.replicated(mesh)))
    out_shardings = (sharding.param_shardings(master, placement, mesh),
                     sharding.param_shardings(opt_state, placement, mesh), sharding.replicated(mesh))
    begin = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, out_shardings=out_shardings, donate_argnums=(0, 1)).lower(*args).compile()
    stats = compiled.memory_analysis()
    return {"devices": sharding.device_ids(mesh), "argument": int(stats.argument_size_in_bytes),
            "output": int(stats.output_size_in_bytes), "alias": int(stats.alias_size_in_bytes),
            "temp": int(stats.temp_size_in_bytes), "compile_seconds": time.perf_counter() - begin}


def config_from_args(args):
    from twotower_jax import config as configs
    if args.checkpoint:
        from twotower_jax.checkpoint.hf import read_config
        from twotower_jax.checkpoint.load import resolve_checkpoint
        return read_config(resolve_checkpoint(args.checkpoint))
    return configs.nano_30b_a3b() if args.config == "nano-30b-a3b" else configs.tiny()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m twotower_jax.plan", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint directory (its config.json / manifest), or 'demo'")
    source.add_argument("--config", choices=CONFIG_PRESETS, help="a preset config")
    p.add_argument("--mode", choices=MODES, default="diffusion")
    p.add_argument("--placement", choices=("single", "towers", "sharded"), default="single")
    p.add_argument("--devices", type=int, default=1, help="devices the placement uses")
    p.add_argument("--data", type=int, default=1, help="mesh data axis (batch rows)")
    p.add_argument("--tensor", type=int, default=1, help="mesh tensor axis")
    p.add_argument("--device-memory", type=parse_bytes, default=None, help="per device, e.g. 80GiB")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024, help="prompt tokens")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--moe-impl", default="ragged", help="MoE dispatch outside expert-parallel groups")
    p.add_argument("--no-compile", action="store_true", help="params and caches only (no AOT compile)")
    train = p.add_argument_group("training (--train: one denoiser training step instead of generation)")
    train.add_argument("--train", action="store_true", help="plan a training step (FSDP layout; --placement unused)")
    train.add_argument("--seq-len", type=int, default=4096, help="tokens per training row, L = N·S")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    train.add_argument("--remat", choices=("none", "full", "dots"), default="none",
                       help="per-layer rematerialisation policy of the compiled step")
    train.add_argument("--master-dtype", choices=("float32", "bfloat16"), default="float32",
                       help="trainable weights and AdamW moments")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import jax
    # Fake CPU devices to compile an N-device plan on a machine that has fewer (set before any backend starts).
    if not args.no_compile and args.devices > 1:
        try:
            jax.config.update("jax_num_cpu_devices", max(args.devices, 2))
        except Exception:  # backends already started (e.g. XLA_FLAGS set): use what exists
            pass
    import jax.numpy as jnp
    try:
        config = config_from_args(args)
        if args.train:
            plan = memory_plan_train(config, n_devices=args.devices, data=args.data, tensor=args.tensor,
                                     batch=args.batch, seq_len=args.seq_len, block_size=args.block_size,
                                     grad_accum=args.grad_accum, dtype=jnp.dtype(args.dtype),
                                     master_dtype=jnp.dtype(args.master_dtype), moe=args.moe_impl, remat=args.remat,
                                     compile=not args.no_compile, device_memory=args.device_memory)
            print(json.dumps(plan.to_json(), indent=2) if args.json else plan.table())
            return 0 if plan.fits() else 1
        plan = memory_plan(config, mode=args.mode, placement=args.placement, n_devices=args.devices,
                           data=args.data, tensor=args.tensor, batch=args.batch, context=args.context,
                           new_tokens=args.max_new_tokens, block_size=args.block_size,
                           dtype=jnp.dtype(args.dtype), moe=args.moe_impl, compile=not args.no_compile,
                           device_memory=args.device_memory)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_json(), indent=2) if args.json else plan.table())
    return 0 if plan.fits() else 1


if __name__ == "__main__":
    sys.exit(main())
