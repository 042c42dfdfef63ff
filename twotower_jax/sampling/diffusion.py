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
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax.sampling.prompts import GenerationResult, check_eos, left_pad, row_seeds
from twotower_jax.sampling.timing import compile_and_run
from twotower_jax.sampling.tokens import fold_rows, row_keys
from twotower_jax.tower import Params
from twotower_jax.two_tower import TwoTower

MASK_LOGIT = -1e12  # what the release writes into the MASK column before picking


@dataclasses.dataclass(frozen=True)
class DiffusionParams:
    block_size: int = 16
    steps_per_block: int = 16
    mask_token_id: int = 3
    temperature: float = 0.0
    confidence_threshold: float = 0.9

    def validate(self, vocab_size: int) -> None:
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size}")
        if not (isinstance(self.steps_per_block, int) and 1 <= self.steps_per_block <= self.block_size):
            raise ValueError(f"steps_per_block must be an integer in [1, block_size={self.block_size}], "
                             f"got {self.steps_per_block}")
        if not 0 <= self.mask_token_id < vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary [0, {vocab_size})")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}")
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
                   dp: DiffusionParams):
    """Fills one block. Returns (canvas (b, width), denoiser passes per row, batched passes)."""
    batch = active.shape[0]
    mask_id = dp.mask_token_id

    def cond(state):
        step, canvas, _ = state
        return (step < dp.steps_per_block) & jnp.any(active & jnp.any(canvas == mask_id, axis=-1))

    def body(state):
        step, canvas, row_passes = state
        masked = canvas == mask_id
        n_masked = masked.sum(-1)
        running = active & (n_masked > 0)
        t = n_masked.astype(jnp.float32) / width
        logits = model.denoise(params, canvas, context_cache, t)
        logits = logits.at[..., mask_id].set(MASK_LOGIT)
        if dp.temperature == 0:
            candidate = jnp.argmax(logits, axis=-1)
        else:
            step_keys = fold_rows(keys, block_index, step)
            gumbel = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[1:], jnp.float32))(step_keys)
            candidate = jnp.argmax(logits / dp.temperature + gumbel, axis=-1)
        probs = jax.nn.softmax(logits, axis=-1)
        confidence = jnp.take_along_axis(probs, candidate[..., None], axis=-1)[..., 0]
        n_confident = (masked & (confidence > dp.confidence_threshold)).sum(-1)
        k = jnp.where(running, commit_count(n_masked, n_confident, step, dp.steps_per_block), 0)
        # Rank masked positions by confidence (ties: lower position first); commit the top k.
        order = jnp.argsort(jnp.where(masked, -confidence, jnp.inf), axis=-1, stable=True)
        rank = jnp.argsort(order, axis=-1)
        commit = masked & (rank < k[:, None])
        canvas = jnp.where(commit, candidate.astype(canvas.dtype), canvas)
        return step + 1, canvas, row_passes + running.astype(jnp.int32)

    canvas = jnp.full((batch, width), mask_id, jnp.int32)
    steps, canvas, row_passes = jax.lax.while_loop(
        cond, body, (jnp.int32(0), canvas, jnp.zeros((batch,), jnp.int32)))
    return canvas, row_passes, steps


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "dp", "eos_token_id"))
def diffusion_loop(params: Params, tokens, valid, seeds, *, model: TwoTower, max_new_tokens: int,
                   dp: DiffusionParams, eos_token_id: Optional[int]):
    """Returns (tokens (b, n), lengths (b,), per-row denoiser passes, per-row context passes,
    batched denoiser passes, batched context passes)."""
    batch, prompt_len = tokens.shape
    pad = model.config.pad_token_id
    size = dp.block_size
    n_full, last_width = divmod(max_new_tokens, size)
    n_blocks = n_full + (last_width > 0)
    keys = row_keys(seeds)
    _, cache = model.context.prefill(params["context"], tokens, valid, capacity=prompt_len + max_new_tokens)

    def run_block(state, block_index, width):
        out, lengths, done, cache, row_den, row_ctx, den, ctx = state
        active = ~done
        canvas, row_passes, passes = _denoise_block(model, params, cache, keys, block_index, active, width, dp)
        position = jnp.arange(width)
        if eos_token_id is None:
            first_eos = jnp.full((batch,), width)
        else:
            first_eos = jnp.min(jnp.where(canvas == eos_token_id, position, width), axis=-1)
        # Frozen rows emit pad; tokens after a row's first EOS are cut.
        keep = active[:, None] & (position[None] <= first_eos[:, None])
        out = jax.lax.dynamic_update_slice(out, jnp.where(keep, canvas, pad), (0, block_index * size))
        hit_eos = active & (first_eos < width)
        lengths = jnp.where(hit_eos, block_index * size + first_eos + 1, lengths)
        done = done | hit_eos
        return (out, lengths, done, cache, row_den + row_passes, row_ctx, den + passes, ctx), canvas

    def extend_context(state, canvas):
        out, lengths, done, cache, row_den, row_ctx, den, ctx = state
        extending = ~done
        _, cache = model.context.extend(params["context"], canvas, cache,
                                        jnp.broadcast_to(extending[:, None], canvas.shape))
        return out, lengths, done, cache, row_den, row_ctx + extending, den, ctx + 1

    def full_block(carry):
        block_index, state = carry
        state, canvas = run_block(state, block_index, size)
        another = (block_index + 1 < n_blocks) & ~jnp.all(state[2])
        state = jax.lax.cond(another, extend_context, lambda s, c: s, state, canvas)
        return block_index + 1, state

    zeros = jnp.zeros((batch,), jnp.int32)
    state = (jnp.full((batch, max_new_tokens), pad, jnp.int32), jnp.full((batch,), max_new_tokens, jnp.int32),
             jnp.zeros((batch,), bool), cache, zeros, zeros + 1, jnp.int32(0), jnp.int32(1))
    _, state = jax.lax.while_loop(lambda c: (c[0] < n_full) & ~jnp.all(c[1][2]), full_block, (jnp.int32(0), state))
    if last_width:
        state = jax.lax.cond(jnp.all(state[2]), lambda s: s,
                             lambda s: run_block(s, jnp.int32(n_full), last_width)[0], state)
    out, lengths, _, _, row_den, row_ctx, den, ctx = state
    return out, lengths, row_den, row_ctx, den, ctx


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
) -> GenerationResult:
    """The release's `generate_mask_diffusion`, batched. Returns tokens per row (cut after EOS) and stats.

    `logprobs` is empty per row: diffusion commits tokens from a changing canvas, and the probability
    of a token at its commit step is not a log-likelihood of the sequence.
    `seed`: an int gives row r the seed `seed + r`; a sequence gives one seed per row.
    """
    if not isinstance(model, TwoTower):
        raise ValueError("mask diffusion needs a TwoTower model (context + denoiser towers)")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    dp = DiffusionParams(block_size, steps_per_block, mask_token_id, float(temperature), float(confidence_threshold))
    dp.validate(model.config.vocab_size)
    check_eos(eos_token_id, model.config.vocab_size)
    tokens, valid = left_pad(prompts, model.config.pad_token_id, model.config.vocab_size)
    (out, lengths, row_den, row_ctx, den, ctx), compile_s, run_s = compile_and_run(
        diffusion_loop, params, jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(row_seeds(seed, len(tokens))),
        model=model, max_new_tokens=max_new_tokens, dp=dp, eos_token_id=eos_token_id)
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
    }
    return GenerationResult(toks, [[] for _ in toks], stats)
