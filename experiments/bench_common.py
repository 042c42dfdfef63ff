"""Timing and result writing shared by the `bench_*.py` scripts (imported as a sibling module, like
`bench_sampler` imports `bench_tower`): compile first, then time runs alone, median reported."""
from __future__ import annotations

import json
import platform
import time

import jax
import numpy as np


def median_seconds(compiled, args, repeats: int) -> float:
    """Median wall seconds of `compiled(*args)` after one warm-up run."""
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def compile_and_time(fn, args, repeats: int):
    """(median run seconds, compile seconds, output) of `jax.jit(fn)(*args)`; compile never counted as run."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    return median_seconds(compiled, args, repeats), compile_s, compiled(*args)


def write_results(path, rows, args, **meta) -> None:
    """`{"meta": ..., "rows": rows}` as JSON: the arguments, devices, jax version and host, plus `meta`."""
    meta = {"args": vars(args), "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
            "host": platform.processor() or platform.machine(), **meta}
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
