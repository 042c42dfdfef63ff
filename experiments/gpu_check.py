"""The GPU check: one command for a lent GPU, under 9 minutes on an H100, writing
experiments/results/gpu_check_<device>.json and .md. Each section is timed and guarded (an error is
recorded, the next section runs), and the whole run keeps to --budget-s:

  ssd          the Mamba-2 scan: sequential (the reference), chunked (XLA), pallas (Triton) and
               pallas_mosaic (Mosaic GPU, Hopper) at the real layer's sizes (H=64, P=64, N=128, G=8),
               lengths 1k and 4k, bf16 x/B/C: max relative error vs the reference and ms, fwd and fwd+bwd;
  moe          the MoE dispatches (dense, ragged, grouped, gather, expert_parallel) at the real expert sizes
               (128 experts, top-6, D=2688, F=1856), bf16, at a decode and a prefill token count:
               max relative error vs dense and ms;
  tower        one tower of a ~1B shrunk Nemotron-3-Nano (the real widths and vocabulary, 6 layers, 16
               experts; random bf16 params): prefill with each scan impl (logits vs chunked, tokens/s)
               and with the fused attention route (cuDNN via jax.nn.dot_product_attention), decode
               tokens/s at batch 1 and 8 with blockwise and fused attention;
  long_decode  decode steps of that tower at batch 1 after a 32k-token prompt, with each way of tiling a
               one-token call's keys (128-key tiles, the default chosen on a CPU; 1024; one tile; fused):
               ms per step and whether the tokens equal the default's;
  samplers     generate_ar, generate_mock_ar and generate_mask_diffusion on a TwoTower of that config:
               tokens/s of a warm run (compile excluded), tokens per denoiser pass;
  memory_plan  the AOT memory plan of the real config on this GPU (`twotower_jax.plan.memory_plan` where
               that module exists; otherwise the real-config prefill lowered and compiled from shapes,
               XLA's memory analysis).

The decision it feeds: `Impl.scan="auto"` stays "chunked" on GPUs (ops/ssd.py, `resolve_scan_impl`) until
this check shows a Pallas kernel equal to the reference and faster than chunked on a real GPU; commit the
JSON with the change that flips it.

    make gpu-check                                   # on the GPU machine (python experiments/gpu_check.py)
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python experiments/gpu_check.py --smoke --out-dir /tmp/gc

`--smoke` runs every section at toy sizes (tiny configs; Pallas in interpret mode) in under a minute on a
CPU: it checks the script, not a GPU. Its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import re
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_* siblings, also when imported

from bench_common import compile_and_time  # noqa: E402

SECTIONS = ("ssd", "moe", "tower", "long_decode", "samplers", "memory_plan")
SCAN_IMPLS = ("sequential", "chunked", "pallas", "pallas_mosaic")


@dataclasses.dataclass(frozen=True)
class Sizes:
    ssd_dims: tuple = (64, 64, 128, 8)            # heads, head_dim, state, groups
    ssd_lengths: tuple = (1024, 4096)
    ssd_batch: int = 1
    ssd_modes: tuple = ("fwd", "fwd+bwd")
    moe_dims: tuple = (128, 6, 2688, 1856)        # experts, top-k, hidden, expert width
    moe_tokens: tuple = (8, 2048)
    prefill: tuple = (1, 2048)                    # batch, length
    decode_batches: tuple = (1, 8)
    decode_context: int = 512
    decode_steps: int = 32
    long_decode_context: int = 32768
    sampler_batch: int = 4
    prompt_length: int = 64
    new_tokens: int = 64
    block_size: int = 16
    steps_per_block: int = 16
    plan_context: int = 4096
    plan_new_tokens: int = 128
    plan_modes: tuple = ("ar", "diffusion")
    repeats: int = 5
    # seconds each section may start new work in (the memory plan gets what is left of --budget-s)
    section_seconds: tuple = (("ssd", 100), ("moe", 40), ("tower", 75), ("long_decode", 90), ("samplers", 75))


SMOKE = Sizes(ssd_dims=(4, 16, 16, 2), ssd_lengths=(40,), ssd_modes=("fwd",), moe_dims=(8, 2, 32, 16),
              moe_tokens=(40,), prefill=(1, 24), decode_batches=(1,), decode_context=8, decode_steps=2,
              long_decode_context=300,
              sampler_batch=2, prompt_length=6, new_tokens=4, block_size=4, steps_per_block=2, plan_context=16,
              plan_new_tokens=4, plan_modes=("ar",), repeats=1,
              section_seconds=(("ssd", 60), ("moe", 30), ("tower", 60), ("long_decode", 30), ("samplers", 60)))


def tower_config(smoke: bool):
    """~1B params: Nemotron-3-Nano's widths and vocabulary with 6 layers (3 Mamba, 2 MoE, 1 attention) and
    16 routed experts (top-6). Smoke: the tiny test config with one layer of each kind that generation uses."""
    from twotower_jax.config import nano_30b_a3b, tiny
    if smoke:
        return tiny(pattern="M*E")
    return dataclasses.replace(nano_30b_a3b(), pattern="MEM*EM", n_routed_experts=16)


def plan_config(smoke: bool):
    from twotower_jax.config import nano_30b_a3b, tiny
    return tiny() if smoke else nano_30b_a3b()


def device_random_params(shapes, seed: int = 0, scale: float = 0.02):
    """N(0, scale²) params drawn on the device in one program (host numpy would take minutes at 1B; small
    trees are drawn on the host, where compiling the draw would take longer)."""
    from twotower_jax.tower import count_params, random_like
    if count_params(shapes) < 10 ** 7:
        return jax.tree.map(jnp.asarray, random_like(shapes, seed, scale))
    leaves, treedef = jax.tree.flatten(shapes)

    @jax.jit
    def draw(key):
        keys = jax.random.split(key, len(leaves))
        return [(jax.random.normal(k, s.shape, jnp.float32) * scale).astype(s.dtype) for k, s in zip(keys, leaves)]

    return jax.tree.unflatten(treedef, draw(jax.random.key(seed)))


def rel_err(tree, reference) -> float:
    errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                  / jnp.maximum(jnp.max(jnp.abs(b.astype(jnp.float32))), 1e-30))
            for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference))]
    return max(errs)


def short_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}"


class Clock:
    """The run's deadline and each section's."""

    def __init__(self, budget_s: float):
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s
        self.section_deadline = self.deadline

    def left(self) -> float:
        return min(self.deadline, self.section_deadline) - time.perf_counter()

    def expired(self) -> bool:
        return self.left() <= 0


# --- sections: each returns a list of row dicts (errors of single measurements become rows) ---

def section_ssd(sizes: Sizes, clock: Clock, smoke: bool):
    from bench_ssd import forward_backward, min_bytes, peak_bandwidth, problem
    from twotower_jax.ops.ssd import ssd_chunked, ssd_sequential
    from twotower_jax.ops.ssd_mosaic import ssd_mosaic
    from twotower_jax.ops.ssd_pallas import ssd_pallas

    scans = {"sequential": ssd_sequential,
             "chunked": functools.partial(ssd_chunked, chunk_size=128),
             "pallas": functools.partial(ssd_pallas, chunk_size=128),
             "pallas_mosaic": ssd_mosaic}
    heads, head_dim, state, groups = sizes.ssd_dims
    peak = peak_bandwidth() if jax.default_backend() == "gpu" else None
    rows = []
    for length in sizes.ssd_lengths:
        inputs = problem(sizes.ssd_batch, length, heads, head_dim, state, groups, jnp.bfloat16)
        rng = np.random.default_rng(1)
        cotangents = (jnp.asarray(rng.standard_normal(inputs[0].shape), jnp.float32),
                      jnp.asarray(rng.standard_normal(inputs[5].shape), jnp.float32))
        for mode in sizes.ssd_modes:
            reference = None
            for name, scan in scans.items():
                row = {"length": length, "mode": mode, "impl": name, "dims": "H{}/P{}/N{}/G{}".format(*sizes.ssd_dims)}
                if clock.expired():
                    rows.append({**row, "status": "skipped: time budget"})
                    continue
                fn = scan if mode == "fwd" else forward_backward(scan, cotangents)
                try:
                    seconds, compile_s, out = compile_and_time(fn, inputs, sizes.repeats)
                except Exception as e:  # noqa: BLE001 - one impl failing must not stop the others
                    rows.append({**row, "status": "error", "error": short_error(e)})
                    continue
                if name == "sequential":
                    reference = out
                row.update(status="ok", ms=seconds * 1e3, compile_s=compile_s,
                           max_rel_err_vs_reference=rel_err(out, reference) if reference is not None else None)
                if peak is not None and mode == "fwd":
                    row["bandwidth_fraction"] = min_bytes(inputs) / seconds / peak
                rows.append(row)
    chunked = {(r["length"], r["mode"]): r["ms"] for r in rows if r["impl"] == "chunked" and "ms" in r}
    for r in rows:
        if "ms" in r and (r["length"], r["mode"]) in chunked:
            r["speedup_vs_chunked"] = chunked[(r["length"], r["mode"])] / r["ms"]
    return rows


def section_moe(sizes: Sizes, clock: Clock, smoke: bool):
    from bench_moe import DISPATCHES, problem
    from twotower_jax.layers.moe import EXPERT_AXIS

    experts, k, hidden, width = sizes.moe_dims
    mesh = jax.make_mesh((1,), (EXPERT_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    rows = []
    for tokens in sizes.moe_tokens:
        inputs = problem(tokens, experts, k, hidden, width, jnp.bfloat16)
        reference = None
        for name, fn in DISPATCHES.items():
            row = {"tokens": tokens, "dispatch": name, "dims": f"E{experts}/k{k}/D{hidden}/F{width}"}
            if clock.expired():
                rows.append({**row, "status": "skipped: time budget"})
                continue
            try:
                with jax.set_mesh(mesh):
                    seconds, compile_s, out = compile_and_time(fn, inputs, sizes.repeats)
            except Exception as e:  # noqa: BLE001
                rows.append({**row, "status": "error", "error": short_error(e)})
                continue
            if name == "dense":
                reference = out
            rows.append({**row, "status": "ok", "ms": seconds * 1e3, "compile_s": compile_s,
                         "max_rel_err_vs_dense": rel_err(out, reference) if reference is not None else None})
    return rows


def _tower(config, scan: str = "auto", attention: str = "blockwise", impl=None):
    from twotower_jax.tower import Impl, NemotronH
    return NemotronH(config, jnp.bfloat16, jnp.bfloat16, impl or Impl(scan=scan, attention=attention))


def _time_decode(model, params, cache, token, steps: int, repeats: int):
    """(median seconds of `steps` greedy decode steps in one program, compile seconds, the tokens (b, steps)):
    each step's argmax is the next step's input, so the logits are used."""
    def decode(p, cache, token):
        def step(carry, _):
            token, cache = carry
            logits, cache = model.decode_step(p, token, cache)
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            return (token, cache), token
        return jax.lax.scan(step, (token, cache), None, length=steps)[1].T

    seconds, compile_s, tokens = compile_and_time(decode, (params, cache, token), repeats)
    return seconds, compile_s, np.asarray(tokens)


def section_tower(sizes: Sizes, clock: Clock, smoke: bool, meta: dict):
    from twotower_jax.tower import count_params

    config = tower_config(smoke)
    shapes = _tower(config).param_shapes()
    meta["tower_params"] = count_params(shapes)
    meta["tower_config"] = {"pattern": config.pattern, "hidden_size": config.hidden_size,
                            "vocab_size": config.vocab_size, "n_routed_experts": config.n_routed_experts,
                            "num_experts_per_tok": config.num_experts_per_tok}
    print(f"  tower: {meta['tower_params'] / 1e6:.1f}M params, pattern {config.pattern}", flush=True)
    params = device_random_params(shapes)
    rng = np.random.default_rng(0)
    rows = []
    batch, length = sizes.prefill
    tokens = jnp.asarray(rng.integers(4, config.vocab_size, (batch, length)), jnp.int32)
    reference = None
    # (scan, attention): the three scans with blockwise attention, then the fused attention route
    # (jax.nn.dot_product_attention: cuDNN for bf16 on GPU) with the chunked scan.
    for scan, attention in (("chunked", "blockwise"), ("pallas", "blockwise"), ("pallas_mosaic", "blockwise"),
                            ("chunked", "fused")):
        row = {"phase": "prefill", "scan": scan, "attention": attention, "batch": batch, "length": length}
        if clock.expired():
            rows.append({**row, "status": "skipped: time budget"})
            continue
        model = _tower(config, scan, attention)
        try:
            seconds, compile_s, logits = compile_and_time(lambda p, t, m=model: m.prefill(p, t, logits_at="last")[0],
                                                          (params, tokens), sizes.repeats)
        except Exception as e:  # noqa: BLE001
            rows.append({**row, "status": "error", "error": short_error(e)})
            continue
        if (scan, attention) == ("chunked", "blockwise"):
            reference = logits
        rows.append({**row, "status": "ok", "ms": seconds * 1e3, "tokens_per_s": batch * length / seconds,
                     "compile_s": compile_s,
                     "max_rel_err_vs_chunked": rel_err(logits, reference) if reference is not None else None})
    for batch, attention in ((b, a) for b in sizes.decode_batches for a in ("blockwise", "fused")):
        model = _tower(config, attention=attention)
        row = {"phase": "decode", "scan": "auto", "attention": attention, "batch": batch,
               "length": sizes.decode_context}
        if clock.expired():
            rows.append({**row, "status": "skipped: time budget"})
            continue
        steps = sizes.decode_steps
        try:
            prompt = jnp.asarray(rng.integers(4, config.vocab_size, (batch, sizes.decode_context)), jnp.int32)
            _, cache = model.prefill(params, prompt, capacity=sizes.decode_context + steps, logits_at="last")
            seconds, compile_s, _ = _time_decode(model, params, cache, prompt[:, -1], steps, sizes.repeats)
        except Exception as e:  # noqa: BLE001
            rows.append({**row, "status": "error", "error": short_error(e)})
            continue
        rows.append({**row, "status": "ok", "ms": seconds * 1e3, "ms_per_step": seconds * 1e3 / steps,
                     "tokens_per_s": batch * steps / seconds, "compile_s": compile_s})
    return rows


def section_long_decode(sizes: Sizes, clock: Clock, smoke: bool):
    """Decode steps of the ~1B tower at batch 1 after a long prompt, with each way of tiling a one-token
    call's keys. The default (`Impl.attention_decode_k_chunk` = 128) was chosen on a CPU, where a tile over
    the whole cache re-lays it out every step; but its tiles run as a loop (capacity/128 iterations per
    attention layer, each a `cond` that skips tiles past the fill), which on a GPU may cost more in loop
    and launch overhead than it saves in reads. Rows: tiles of 128 (default), of 1024 (`attention_k_chunk`),
    one tile over the whole capacity, and the fused route; tokens must equal the default's."""
    from twotower_jax.tower import Impl

    config = tower_config(smoke)
    params = device_random_params(_tower(config).param_shapes())
    fill, steps = sizes.long_decode_context, sizes.decode_steps
    capacity = fill + steps
    prompt = jnp.asarray(np.random.default_rng(1).integers(4, config.vocab_size, (1, fill)), jnp.int32)
    _, cache = _tower(config).prefill(params, prompt, capacity=capacity, logits_at="last")
    one_tile = -(-capacity // 128) * 128
    variants = {"tiles_128": Impl(), "tiles_1024": Impl(attention_decode_k_chunk=None),
                "one_tile": Impl(attention_k_chunk=one_tile, attention_decode_k_chunk=None),
                "fused": Impl(attention="fused")}
    rows, reference = [], None
    for name, impl in variants.items():
        row = {"phase": "decode", "attention_keys": name, "batch": 1, "fill": fill, "steps": steps}
        if clock.expired():
            rows.append({**row, "status": "skipped: time budget"})
            continue
        try:
            seconds, compile_s, tokens = _time_decode(_tower(config, impl=impl), params, cache, prompt[:, -1],
                                                      steps, sizes.repeats)
        except Exception as e:  # noqa: BLE001
            rows.append({**row, "status": "error", "error": short_error(e)})
            continue
        reference = tokens if reference is None else reference
        rows.append({**row, "status": "ok", "ms_per_step": seconds * 1e3 / steps, "compile_s": compile_s,
                     "tokens_equal_default": bool(np.array_equal(tokens, reference))})
    return rows


def section_samplers(sizes: Sizes, clock: Clock, smoke: bool):
    from twotower_jax.sampling.ar import generate_ar, generate_mock_ar
    from twotower_jax.sampling.diffusion import generate_mask_diffusion
    from twotower_jax.tower import Impl
    from twotower_jax.two_tower import TwoTower

    config = tower_config(smoke)
    model = TwoTower(config, jnp.bfloat16, jnp.bfloat16, Impl())
    params = device_random_params(model.param_shapes(), seed=1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, config.vocab_size, sizes.prompt_length - 2 * i).tolist()
               for i in range(sizes.sampler_batch)]
    generators = {
        "ar": lambda: generate_ar(model, params, prompts, sizes.new_tokens),
        "mock_ar": lambda: generate_mock_ar(model, params, prompts, sizes.new_tokens),
        "diffusion": lambda: generate_mask_diffusion(model, params, prompts, sizes.new_tokens,
                                                     block_size=sizes.block_size,
                                                     steps_per_block=sizes.steps_per_block,
                                                     confidence_threshold=0.9),
    }
    rows = []
    for mode, generate in generators.items():
        row = {"mode": mode, "batch": sizes.sampler_batch, "new_tokens": sizes.new_tokens}
        if clock.expired():
            rows.append({**row, "status": "skipped: time budget"})
            continue
        try:
            first = generate()           # compile + first run
            warm = generate()            # the compiled executables again
        except Exception as e:  # noqa: BLE001
            rows.append({**row, "status": "error", "error": short_error(e)})
            continue
        seconds = warm.stats["seconds"]
        row.update(status="ok", ms=seconds * 1e3, tokens=warm.stats["generated_tokens"],
                   tokens_per_s=warm.stats["generated_tokens"] / seconds,
                   compile_s=first.stats["compile_seconds"], same_tokens_twice=first.tokens == warm.tokens)
        if "tokens_per_denoiser_pass" in warm.stats:
            row["tokens_per_denoiser_pass"] = warm.stats["tokens_per_denoiser_pass"]
        rows.append(row)
    return rows


def _device_memory():
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices have none
        stats = {}
    return stats.get("bytes_limit")


def section_memory_plan(sizes: Sizes, clock: Clock, smoke: bool, meta: dict):
    config = plan_config(smoke)
    device_memory = _device_memory()
    rows = []
    try:
        from twotower_jax import plan as plan_module
    except ImportError as e:
        plan_module = None
        meta["memory_plan_module"] = f"not available ({short_error(e)})"
    if plan_module is not None:
        meta["memory_plan_module"] = "twotower_jax.plan"
        for mode in sizes.plan_modes:
            row = {"source": "twotower_jax.plan", "mode": mode, "placement": "single", "batch": 1,
                   "context": sizes.plan_context, "new_tokens": sizes.plan_new_tokens}
            if clock.expired():
                rows.append({**row, "status": "skipped: time budget"})
                continue
            try:
                begin = time.perf_counter()
                plan = plan_module.memory_plan(config, mode=mode, placement="single", n_devices=1, batch=1,
                                               context=sizes.plan_context, new_tokens=sizes.plan_new_tokens,
                                               devices=jax.devices()[:1], device_memory=device_memory)
                summary = plan.to_json()
            except Exception as e:  # noqa: BLE001
                rows.append({**row, "status": "error", "error": short_error(e)})
                continue
            device = next(iter(summary["params"]))
            rows.append({**row, "status": "ok", "seconds": time.perf_counter() - begin,
                         "params_gib": summary["params"][device] / 2 ** 30,
                         "caches_gib": summary["caches"][device] / 2 ** 30,
                         "temp_gib": plan.temp(device) / 2 ** 30, "peak_gib": summary["peak"] / 2 ** 30,
                         "device_memory_gib": None if device_memory is None else device_memory / 2 ** 30,
                         "fits": summary["fits"], "compiled_on": summary["compiled_on"],
                         "plan": summary})
    if plan_module is None or not any(r.get("status") == "ok" for r in rows):
        rows.append(_prefill_memory_analysis(config, sizes, clock))
    return rows


def _prefill_memory_analysis(config, sizes: Sizes, clock: Clock) -> dict:
    """The fallback: the real-config prefill lowered from shapes and compiled here; XLA's memory analysis."""
    row = {"source": "prefill memory_analysis", "mode": "prefill", "batch": 1, "context": sizes.plan_context}
    if clock.expired():
        return {**row, "status": "skipped: time budget"}
    try:
        model = _tower(config)
        shapes = model.param_shapes()
        tokens = jax.ShapeDtypeStruct((1, sizes.plan_context), jnp.int32)
        begin = time.perf_counter()
        compiled = jax.jit(lambda p, t: model.prefill(p, t, logits_at="last")).lower(shapes, tokens).compile()
        stats = compiled.memory_analysis()
        from twotower_jax.tower import count_params
        return {**row, "status": "ok", "seconds": time.perf_counter() - begin,
                "params_gib": count_params(shapes) * 2 / 2 ** 30,
                "temp_gib": stats.temp_size_in_bytes / 2 ** 30, "output_gib": stats.output_size_in_bytes / 2 ** 30,
                "argument_gib": stats.argument_size_in_bytes / 2 ** 30}
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "error", "error": short_error(e)}


# --- driver ---

def run(smoke: bool = False, budget_s: float = 510.0, sections=SECTIONS, out_dir: str | None = None,
        sizes: Sizes | None = None) -> tuple[dict, str]:
    """Runs the sections; writes <out_dir>/gpu_check_<device>[_smoke].{json,md}; returns (results, json path)."""
    sizes = sizes or (SMOKE if smoke else Sizes())
    device = jax.devices()[0]
    clock = Clock(budget_s)
    meta = {"device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
            "jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
            "python": platform.python_version(), "host": platform.node(), "smoke": smoke, "budget_s": budget_s,
            "sizes": dataclasses.asdict(sizes), "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.platform != "gpu" and not smoke:
        print(f"NOTE: no GPU here ({device.platform}): Pallas runs in interpret mode and the numbers say "
              "nothing about a GPU. Use --smoke on a CPU.", flush=True)
    results = {"meta": meta, "sections": {}}
    limits = dict(sizes.section_seconds)
    for name in SECTIONS:
        if name not in sections:
            continue
        begin = time.perf_counter()
        clock.section_deadline = begin + limits.get(name, budget_s)
        print(f"[{begin - clock.start:6.1f}s] {name} ...", flush=True)
        entry = {}
        if clock.expired():
            entry = {"status": "skipped: time budget", "rows": []}
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    fn = globals()[f"section_{name}"]
                    args = (sizes, clock, smoke) + ((meta,) if name in ("tower", "memory_plan") else ())
                    rows = fn(*args)
                    entry = {"status": "ok" if all(r.get("status") == "ok" for r in rows) else "partial",
                             "rows": rows}
                except Exception as e:  # noqa: BLE001 - a failed section is recorded, the next one runs
                    entry = {"status": "error", "error": short_error(e),
                             "traceback": traceback.format_exc().splitlines()[-12:], "rows": []}
            entry["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})
        entry["seconds"] = time.perf_counter() - begin
        results["sections"][name] = entry
        print(f"         {name}: {entry['status']} in {entry['seconds']:.1f}s", flush=True)
    meta["total_seconds"] = time.perf_counter() - clock.start

    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    device_name = re.sub(r"[^a-z0-9]+", "_", device.device_kind.lower()).strip("_")
    stem = f"gpu_check_{device_name}" + ("_smoke" if smoke else "")
    path = os.path.join(out_dir, stem + ".json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    table = markdown(results)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {path} and {stem}.md ({meta['total_seconds']:.0f}s)")
    return results, path


def _jaxlib_version():
    try:
        import jaxlib
        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# GPU check: {meta['device_kind']} ({meta['platform']})", "",
             f"jax {meta['jax']}, jaxlib {meta['jaxlib']}, Python {meta['python']}, {meta['started']}, "
             f"{meta['total_seconds']:.0f}s of a {meta['budget_s']:.0f}s budget"
             + (" — SMOKE RUN (toy sizes; the numbers mean nothing)" if meta["smoke"] else ""), ""]
    if "tower_params" in meta:
        lines += [f"Tower/sampler config: {meta['tower_config']}, {meta['tower_params'] / 1e6:.1f}M params per tower "
                  "(random bf16 weights).", ""]
    if "memory_plan_module" in meta:
        lines += [f"Memory plan: {meta['memory_plan_module']}.", ""]
    for name, entry in results["sections"].items():
        lines += [f"## {name}: {entry['status']} ({entry.get('seconds', 0):.1f}s)", ""]
        if entry.get("error"):
            lines += [f"error: `{entry['error']}`", ""]
        rows = [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in entry.get("rows", [])]
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows]
            lines.append("")
        for w in entry.get("warnings", [])[:5]:
            lines.append(f"- warning: {w}")
        if entry.get("warnings"):
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes, runs on a CPU in under a minute")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new measurements after this many seconds (default 450; smoke 150)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out-dir", default=None, help="default: experiments/results/")
    args = parser.parse_args(argv)
    budget = args.budget_s if args.budget_s is not None else (150.0 if args.smoke else 510.0)
    run(smoke=args.smoke, budget_s=budget, sections=args.sections, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
