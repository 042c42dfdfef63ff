"""The gradient the SSD kernels share: a kernel computes the forward pass; its VJP is the chunked XLA
scan's (`ssd_chunked`), recomputed from the saved inputs. The kernels carry no backward of their own:
training runs the same math as `ssd_chunked` either way, and the forward kernel is what decode and
prefill use."""
from __future__ import annotations

import functools
from typing import Callable

import jax

from twotower_jax.ops.ssd import ssd_chunked


def with_chunked_backward(forward: Callable) -> Callable:
    """`forward(x, dt, A, B, C, initial_state, chunk_size, interpret) -> (y, final_state)`, made
    differentiable in its six array inputs by the VJP of `ssd_chunked(..., chunk_size=chunk_size)`.
    `chunk_size` and `interpret` are static (a kernel with a fixed chunk passes it as `chunk_size`)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
    def scan(x, dt, A, B, C, initial_state, chunk_size, interpret):
        return forward(x, dt, A, B, C, initial_state, chunk_size, interpret)

    def scan_fwd(x, dt, A, B, C, initial_state, chunk_size, interpret):
        out = forward(x, dt, A, B, C, initial_state, chunk_size, interpret)
        return out, (x, dt, A, B, C, initial_state)

    def scan_bwd(chunk_size, interpret, residuals, cotangents):
        del interpret
        _, vjp = jax.vjp(functools.partial(ssd_chunked, chunk_size=chunk_size), *residuals)
        return vjp(cotangents)

    scan.defvjp(scan_fwd, scan_bwd)
    return scan
