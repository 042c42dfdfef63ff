"""Compile first, then time the run alone: compile time is never reported as run time.

Compiled executables are kept per (jitted function, argument signature), so a repeat call with the same
shapes runs the executable it already has. Lowering and compiling again before every run (even when
jax's caches make it cheap) is not free at batch 1 on a CPU: the fresh executable's first run is
slower than a warm one (cold caches, first-call set-up), by about 1–3 ms for the demo model on the
2-core CPU — more than a whole short generation, and it fell unevenly on the samplers.
"""
from __future__ import annotations

import collections
import time

import jax

_MAX_COMPILED = 256
_compiled: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()


def signature(args) -> tuple:
    """What a compiled executable is specific to: the tree structure and each leaf's shape, dtype,
    weak type and placement (arrays, numpy arrays or `jax.ShapeDtypeStruct`s)."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)),
                           getattr(x, "sharding", None)) for x in leaves)


def compiled_for(jitted, *args):
    """Returns (compiled executable of `jitted` for `args`, seconds spent compiling it now: 0 when kept)."""
    key = (jitted, signature(args))
    if key in _compiled:
        _compiled.move_to_end(key)
        return _compiled[key], 0.0
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    _compiled[key] = compiled
    if len(_compiled) > _MAX_COMPILED:
        _compiled.popitem(last=False)
    return compiled, seconds


def clear_compiled() -> None:
    """Drops every kept executable (with `jax.clear_caches()`, what a long-lived process calls to release
    the memory and memory mappings of programs it will not run again)."""
    _compiled.clear()


def compile_and_run(jitted, *args):
    """Returns (outputs, compile_seconds, run_seconds) for a `jax.jit`-wrapped function.

    Pass the same jitted function each time: a repeat call with the same argument signature reuses the
    compiled executable and reports a compile time of 0.
    """
    compiled, compile_seconds = compiled_for(jitted, *args)
    start = time.perf_counter()
    outputs = jax.block_until_ready(compiled(*args))
    return outputs, compile_seconds, time.perf_counter() - start
