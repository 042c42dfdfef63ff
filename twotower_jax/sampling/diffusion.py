"""Block-wise mask diffusion (SPEC §4.1), the whole generation on device.

Per block of S positions (the last block may be shorter when max_new_tokens is not a multiple of S):
the canvas starts as S × MASK; each denoising step runs the denoiser on the canvas with t = the row's
masked fraction, forbids MASK as an output, picks a candidate per position (argmax, or Gumbel-max of
logits / temperature), scores it by its probability under the unscaled softmax, and commits the
`commit_count` most confident masked positions. After the block the context tower extends its caches
over the committed tokens (skipped after the last block, whose caches nobody reads).

Unlike the release (effectively batch size 1), everything is per row: t, the commit rule, the EOS stop
and truncation; finished rows stay frozen and no longer touch the context caches.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax.sampling.placed import (compile_pieces, on, placed_model, placement_mesh, run_placed,
                                          tower_groups)
from twotower_jax.sampling.prompts import GenerationResult, check_eos, left_pad, row_seeds
from twotower_jax.sampling.tokens import fold_rows, row_keys
from twotower_jax.sharding import PlacementLike, constrain_batch, resolve
from twotower_jax.tower import Params
from twotower_jax.two_tower import TwoTower

MASK_LOGIT = -1e12  # what the release writes into the MASK column before picking


@dataclasses.dataclass(frozen=True)
class DiffusionParams:
    block_size: int = 16
    steps_per_block: int = 16
    mask_token_id: int = 3
    temperature: float = 0.0

    def validate(self, vocab_size: int) -> None:
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size}")
        if not (isinstance(self.steps_per_block, int) and 1 <= self.steps_per_block <= self.block_size):
            raise ValueError(f"steps_per_block must be an integer in [1, block_size={self.block_size}], "
                             f"got {self.steps_per_block}")
        if not 0 <= self.mask_token_id < vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary [0, {vocab_size})")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def commit_count(n_masked, n_confident, step, steps_per_block):
    """How many masked positions a row commits at `step` (SPEC §4.1 step 4).

    Last step: all n. Otherwise the positions with confidence > γ, at least 1, at least
    ceil(n / steps left) so the block always finishes in time, at most n.
    """
    steps_left = steps_per_block - step
    k = jnp.maximum(n_confident, 1)
    k = jnp.maximum(k, -(-n_masked // steps_left))
    k = jnp.where(step == steps_per_block - 1, n_masked, k)
    return jnp.minimum(k, n_masked)


def _denoise_block(model: TwoTower, params, context_cache, keys, block_index, active, width: int,
                   dp: DiffusionParams, threshold, canvas=None, masked=None):
    """Fills one block; `threshold` is γ, a traced scalar. `canvas` (b, width) int32 and `masked` (b, width)
    bool, or None (every position masked): tokens already committed and the positions left to fill (a
    separate mask, so a committed token that is the MASK id itself is never re-filled). Returns (canvas
    (b, width), denoiser passes per row, batched passes)."""
    batch = active.shape[0]
    mask_id = dp.mask_token_id
    if canvas is None:
        canvas = jnp.full((batch, width), mask_id, jnp.int32)
        masked = jnp.ones((batch, width), bool)

    def cond(state):
        step, _, masked, _ = state
        return (step < dp.steps_per_block) & jnp.any(active & jnp.any(masked, axis=-1))

    def body(state):
        step, canvas, masked, row_passes = state
        n_masked = masked.sum(-1)
        running = active & (n_masked > 0)
        t = n_masked.astype(jnp.float32) / width
        logits = model.denoise(params, jnp.where(masked, mask_id, canvas), context_cache, t)
        logits = logits.at[..., mask_id].set(MASK_LOGIT)
        if dp.temperature == 0:
            candidate = jnp.argmax(logits, axis=-1)
        else:
            step_keys = fold_rows(keys, block_index, step)
            gumbel = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[1:], jnp.float32))(step_keys)
            candidate = jnp.argmax(logits / dp.temperature + gumbel, axis=-1)
        probs = jax.nn.softmax(logits, axis=-1)
        confidence = jnp.take_along_axis(probs, candidate[..., None], axis=-1)[..., 0]
        n_confident = (masked & (confidence > threshold)).sum(-1)
        k = jnp.where(running, commit_count(n_masked, n_confident, step, dp.steps_per_block), 0)
        # Rank masked positions by confidence (ties: lower position first); commit the top k.
        order = jnp.argsort(jnp.where(masked, -confidence, jnp.inf), axis=-1, stable=True)
        rank = jnp.argsort(order, axis=-1)
        commit = masked & (rank < k[:, None])
        canvas = jnp.where(commit, candidate.astype(canvas.dtype), canvas)
        return step + 1, canvas, masked & ~commit, row_passes + running.astype(jnp.int32)

    steps, canvas, _, row_passes = jax.lax.while_loop(
        cond, body, (jnp.int32(0), canvas, masked, jnp.zeros((batch,), jnp.int32)))
    return canvas, row_passes, steps


class BlockState(NamedTuple):
    """Diffusion state between blocks (the context cache travels separately): outputs (b, n), lengths (b,),
    finished rows (b,), per-row denoiser / context passes (b,), batched denoiser / context passes ()."""
    out: jax.Array
    lengths: jax.Array
    done: jax.Array
    row_den: jax.Array
    row_ctx: jax.Array
    den: jax.Array
    ctx: jax.Array


def _start_state(batch: int, max_new_tokens: int, pad: int) -> BlockState:
    zeros = jnp.zeros((batch,), jnp.int32)
    return BlockState(jnp.full((batch, max_new_tokens), pad, jnp.int32), jnp.full((batch,), max_new_tokens, jnp.int32),
                      jnp.zeros((batch,), bool), zeros, zeros + 1, jnp.int32(0), jnp.int32(1))  # 1: the prefill


def _run_block(model: TwoTower, params, cache, keys, state: BlockState, block_index, width: int, dp: DiffusionParams,
               eos_token_id: Optional[int], threshold) -> tuple[BlockState, jax.Array]:
    """Denoises block `block_index` (`width` positions) for the rows still running and records it.
    Returns (state, canvas (b, width))."""
    batch = state.done.shape[0]
    active = ~state.done
    canvas, row_passes, passes = _denoise_block(model, params, cache, keys, block_index, active, width, dp,
                                                threshold)
    position = jnp.arange(width)
    if eos_token_id is None:
        first_eos = jnp.full((batch,), width)
    else:
        first_eos = jnp.min(jnp.where(canvas == eos_token_id, position, width), axis=-1)
    # Frozen rows emit pad; tokens after a row's first EOS are cut.
    keep = active[:, None] & (position[None] <= first_eos[:, None])
    out = jax.lax.dynamic_update_slice(state.out, jnp.where(keep, canvas, model.config.pad_token_id),
                                       (0, block_index * dp.block_size))
    hit_eos = active & (first_eos < width)
    lengths = jnp.where(hit_eos, block_index * dp.block_size + first_eos + 1, state.lengths)
    return state._replace(out=out, lengths=lengths, done=state.done | hit_eos, row_den=state.row_den + row_passes,
                          den=state.den + passes), canvas


def _extend_context(model: TwoTower, context_params, cache, canvas, done):
    """The context tower over a committed block, for the rows still running (SPEC §4.1 step 5)."""
    return model.context.extend(context_params, canvas, cache, jnp.broadcast_to(~done[:, None], canvas.shape),
                                logits_at="none")[1]


def _count_extension(state: BlockState) -> BlockState:
    return state._replace(row_ctx=state.row_ctx + ~state.done, ctx=state.ctx + 1)


def _shape(max_new_tokens: int, dp: DiffusionParams) -> tuple[int, int, int]:
    """(full blocks, width of the last partial block (0: none), blocks)."""
    n_full, last_width = divmod(max_new_tokens, dp.block_size)
    return n_full, last_width, n_full + (last_width > 0)


def diffusion_loop(params: Params, tokens, valid, seeds, threshold, *, model: TwoTower, max_new_tokens: int,
                   dp: DiffusionParams, eos_token_id: Optional[int]):
    """The whole generation as one program (traced inside `run_placed`'s jit); the confidence threshold
    γ is an input (float32 scalar), so one compiled program serves every γ. Returns (tokens (b, n),
    lengths (b,), per-row denoiser passes, per-row context passes, batched denoiser passes, batched context
    passes)."""
    batch, prompt_len = tokens.shape
    n_full, last_width, n_blocks = _shape(max_new_tokens, dp)
    keys = row_keys(seeds)
    _, cache = model.context.prefill(params["context"], tokens, valid, capacity=prompt_len + max_new_tokens,
                                    logits_at="none")

    def extend(carry):
        state, cache, canvas = carry
        return _count_extension(state), _extend_context(model, params["context"], cache, canvas, state.done)

    def full_block(carry):
        block_index, state, cache = carry
        state, canvas = _run_block(model, params, cache, keys, state, block_index, dp.block_size, dp, eos_token_id,
                                   threshold)
        another = (block_index + 1 < n_blocks) & ~jnp.all(state.done)
        state, cache = jax.lax.cond(another, extend, lambda c: c[:2], (state, cache, canvas))
        return block_index + 1, state, cache

    state = _start_state(batch, max_new_tokens, model.config.pad_token_id)
    _, state, cache = jax.lax.while_loop(lambda c: (c[0] < n_full) & ~jnp.all(c[1].done), full_block,
                                         (jnp.int32(0), state, cache))
    if last_width:
        state = jax.lax.cond(jnp.all(state.done), lambda s: s, lambda s: _run_block(
            model, params, cache, keys, s, jnp.int32(n_full), last_width, dp, eos_token_id, threshold)[0], state)
    return state.out, state.lengths, state.row_den, state.row_ctx, state.den, state.ctx


@functools.lru_cache(maxsize=None)
def _towers_pieces(model: TwoTower, max_new_tokens: int, dp: DiffusionParams, eos_token_id: Optional[int],
                   context_mesh, denoiser_mesh):
    """Compiled pieces of diffusion on `towers` (one set per model, settings and groups, so repeats compile
    nothing): prefill and block extension (context tower, its group); a block's denoising, one per block
    width (denoiser, its group). Each runs where its committed inputs are; its outputs are pinned to the
    group's batch layout (rows over `data`), the layout the next piece was compiled for."""
    prefill = jax.jit(lambda p, tokens, valid: constrain_batch(model.context.prefill(
        p, tokens, valid, capacity=tokens.shape[1] + max_new_tokens, logits_at="none")[1], context_mesh,
        tokens.shape[0]))
    extend = jax.jit(lambda p, cache, canvas, done: constrain_batch(
        _extend_context(model, p, cache, canvas, done), context_mesh, canvas.shape[0]),
        donate_argnums=1)   # the old cache's buffers hold the new one

    def block(width, p, cache, seeds, state, block_index, threshold):
        state, canvas = _run_block(model, p, cache, row_keys(seeds), state, block_index, width, dp, eos_token_id,
                                   threshold)
        return constrain_batch((state, canvas, jnp.all(state.done)), denoiser_mesh, seeds.shape[0])

    blocks = {w: jax.jit(functools.partial(block, w)) for w in {dp.block_size, max_new_tokens % dp.block_size} if w}
    count = jax.jit(lambda state: constrain_batch(_count_extension(state), denoiser_mesh, state.done.shape[0]))
    return prefill, extend, blocks, count


def _diffusion_towers(model: TwoTower, params: Params, tokens, valid, seeds, threshold, mesh, *, max_new_tokens: int,
                      dp: DiffusionParams, eos_token_id: Optional[int]):
    """Diffusion with the context tower on the towers mesh's group 0 and the denoiser on group 1 (one device
    each on 2 devices; each split by the `sharded` rules inside a bigger group), block by block.

    Why per-tower pieces and not one program: a jitted program runs on one device set with every input
    on it, so one program over both groups would need both towers' params stacked along a `tower` mesh
    axis (the denoiser's adaLN params padded into the context's half) and each tower's work under
    per-group `lax.cond`s, with collectives keeping both groups' loop predicates equal — a param
    layout unlike the checkpoint's and the other placements', restored through a copy. Per-tower pieces
    keep the checkpoint's tree (each tower restored straight onto its group), each piece compiled, the
    denoising steps of a block inside one of them. Per block the host reads one flag (every row done?),
    sends the context cache to the denoiser group and the committed block back: small next to up to
    T denoiser passes of a 30B tower. On one shared CPU it is pure overhead (experiments/results/sampler_cpu.md).

    Returns `diffusion_loop`'s outputs, and compile / run seconds.
    """
    context_mesh, denoiser_mesh, context_params, denoiser_params, context_at, denoiser_at = tower_groups(
        params, mesh, tokens.shape[0])
    batch = tokens.shape[0]
    tokens, valid = jax.device_put((tokens, valid), context_at((tokens, valid)))
    seeds, threshold = jax.device_put((seeds, threshold), denoiser_at((seeds, threshold)))
    n_full, last_width, n_blocks = _shape(max_new_tokens, dp)
    prefill, extend, blocks, count = _towers_pieces(model, max_new_tokens, dp, eos_token_id, context_mesh,
                                                    denoiser_mesh)

    with jax.set_mesh(context_mesh):
        cache_struct = jax.eval_shape(prefill, context_params, tokens, valid)
    start = functools.partial(_start_state, batch, max_new_tokens, model.config.pad_token_id)
    state_struct = jax.eval_shape(start)
    state_struct = on(state_struct, denoiser_at(state_struct))
    index = on(jax.ShapeDtypeStruct((), jnp.int32), denoiser_at(jnp.int32(0)))
    canvas = jax.ShapeDtypeStruct((batch, dp.block_size), jnp.int32)
    canvas, done = on(canvas, context_at(canvas)), on(state_struct.done, context_at(state_struct.done))
    cache_on_context, cache_on_denoiser = context_at(cache_struct), denoiser_at(cache_struct)
    widths = sorted(blocks)
    compiled, compile_s = compile_pieces(
        (prefill, (context_params, tokens, valid), context_mesh),
        (extend, (context_params, on(cache_struct, cache_on_context), canvas, done), context_mesh),
        (count, (state_struct,), denoiser_mesh),
        *[(blocks[w], (denoiser_params, on(cache_struct, cache_on_denoiser), seeds, state_struct, index, threshold),
           denoiser_mesh) for w in widths])
    prefill_c, extend_c, count_c, *block_c = compiled
    block_c = dict(zip(widths, block_c))

    begin = time.perf_counter()
    cache = prefill_c(context_params, tokens, valid)
    state = start()
    state = jax.device_put(state, denoiser_at(state))
    for block_index in range(n_blocks):
        width = dp.block_size if block_index < n_full else last_width
        state, canvas, all_done = block_c[width](denoiser_params, jax.device_put(cache, cache_on_denoiser), seeds,
                                                 state, jax.device_put(jnp.int32(block_index), index.sharding),
                                                 threshold)
        if block_index + 1 == n_blocks or bool(all_done):  # the one host sync per block
            break
        cache = extend_c(context_params, cache, jax.device_put(canvas, context_at(canvas)),
                         jax.device_put(state.done, context_at(state.done)))
        state = count_c(state)
    outputs = jax.block_until_ready((state.out, state.lengths, state.row_den, state.row_ctx, state.den, state.ctx))
    return outputs, compile_s, time.perf_counter() - begin


def generate_mask_diffusion(
    model: TwoTower,
    params: Params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 128,
    block_size: int = 16,
    steps_per_block: int = 16,
    mask_token_id: int = 3,
    temperature: float = 0.0,
    confidence_threshold: float = 0.9,
    eos_token_id: Optional[int] = None,
    seed: Union[int, Sequence[int]] = 0,
    placement: PlacementLike = "single",
    prompt_width: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> GenerationResult:
    """The release's `generate_mask_diffusion`, batched. Returns tokens per row (cut after EOS) and stats.

    `placement`: "single" | "towers" (context tower + cache on one half of the devices, denoiser on the
    other, block by block) | "sharded" (experts and dense weights split over every device), see
    `twotower_jax.sharding`. `mesh`: the devices, from `sharding.make_mesh(placement, ...)` (default: every
    visible device); rows are split over its `data` axis.
    `logprobs` is empty per row: diffusion commits tokens from a changing canvas, and the probability
    of a token at its commit step is not a log-likelihood of the sequence.
    `seed`: an int gives row r the seed `seed + r`; a sequence gives one seed per row.
    `prompt_width`: left-pad every batch to this many tokens (one compiled program for all shorter prompts).
    """
    if not isinstance(model, TwoTower):
        raise ValueError("mask diffusion needs a TwoTower model (context + denoiser towers)")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    dp = DiffusionParams(block_size, steps_per_block, mask_token_id, float(temperature))
    dp.validate(model.config.vocab_size)
    confidence_threshold = float(confidence_threshold)
    if not 0.0 <= confidence_threshold <= 1.0:
        raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}")
    threshold = np.float32(confidence_threshold)
    check_eos(eos_token_id, model.config.vocab_size)
    placement = resolve(placement)
    mesh = placement_mesh(placement, mesh)
    model = placed_model(model, placement, mesh)
    tokens, valid = left_pad(prompts, model.config.pad_token_id, model.config.vocab_size, prompt_width)
    seeds = row_seeds(seed, len(tokens))
    statics = dict(max_new_tokens=max_new_tokens, dp=dp, eos_token_id=eos_token_id)
    if placement.kind == "towers":
        outputs, compile_s, run_s = _diffusion_towers(model, params, tokens, valid, seeds, threshold, mesh, **statics)
    else:
        outputs, compile_s, run_s = run_placed(diffusion_loop, placement, mesh, params, tokens, valid, seeds,
                                               threshold, model=model, **statics)
    out, lengths, row_den, row_ctx, den, ctx = outputs
    lengths, row_den = np.asarray(lengths), np.asarray(row_den)
    out = np.asarray(out)
    toks = [out[i, :n].tolist() for i, n in enumerate(lengths)]
    stats = {
        "denoiser_passes": int(den),
        "context_passes": int(ctx),
        "generated_tokens": int(lengths.sum()),
        "tokens_per_denoiser_pass": float(lengths.sum() / max(row_den.sum(), 1)),
        "row_denoiser_passes": row_den.tolist(),
        "row_context_passes": np.asarray(row_ctx).tolist(),
        "row_tokens_per_denoiser_pass": (lengths / np.maximum(row_den, 1)).tolist(),
        "seconds": run_s,
        "compile_seconds": compile_s,
        "placement": placement.kind,
    }
    return GenerationResult(toks, [[] for _ in toks], stats)
