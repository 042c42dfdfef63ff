"""One token per step: AR generation with a tower (`generate_ar`) and TwoTower's mock-AR
(`generate_mock_ar`), sharing one on-device `lax.while_loop`.

Batches of left-padded prompts; per-row EOS stop (finished rows emit pad with log-prob 0 and are cut on
the host); per-row random streams (a row samples the same alone as in any batch).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax.cache import init_cache
from twotower_jax.sampling.prompts import GenerationResult, check_eos, cut_rows, left_pad, row_seeds
from twotower_jax.sampling.timing import compile_and_run
from twotower_jax.sampling.tokens import SamplingParams, fold_rows, row_keys, select_tokens, token_logprobs
from twotower_jax.tower import NemotronH, Params
from twotower_jax.two_tower import TwoTower

_STATIC = ("model", "max_new_tokens", "sampling", "eos_token_id")


def _token_loop(first_logits, advance: Callable, carry, seeds, *, max_new_tokens: int, sampling: SamplingParams,
                eos_token_id: Optional[int], pad: int):
    """Picks a token from `first_logits`, then `advance(carry, token) -> (next logits, carry)` until
    `max_new_tokens` or every row hit EOS. Returns (tokens (b, n), log-probs (b, n), lengths (b,), advances)."""
    batch = first_logits.shape[0]
    keys = row_keys(seeds)

    def pick(step_logits, step, done):
        tok = select_tokens(step_logits, fold_rows(keys, step), sampling)
        logp = token_logprobs(step_logits, tok)
        tok = jnp.where(done, pad, tok)
        logp = jnp.where(done, 0.0, logp)
        now_done = done | (tok == eos_token_id) if eos_token_id is not None else done
        return tok, logp, now_done

    first, first_logp, done = pick(first_logits, 0, jnp.zeros((batch,), bool))
    out = jnp.full((batch, max_new_tokens), pad, jnp.int32).at[:, 0].set(first)
    out_logp = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(first_logp)
    lengths = jnp.where(done, 1, max_new_tokens).astype(jnp.int32)

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, last, out, out_logp, done, lengths, carry = state
        step_logits, carry = advance(carry, last)
        tok, logp, now_done = pick(step_logits, step, done)
        lengths = jnp.where(now_done & ~done, step + 1, lengths)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, step))
        out_logp = jax.lax.dynamic_update_slice(out_logp, logp[:, None], (0, step))
        return step + 1, tok, out, out_logp, now_done, lengths, carry

    state = (jnp.int32(1), first, out, out_logp, done, lengths, carry)
    step, _, out, out_logp, done, lengths, _ = jax.lax.while_loop(cond, body, state)
    # Rows that never hit EOS stopped where the loop stopped.
    return out, out_logp, jnp.where(done, lengths, step), step - 1


@functools.partial(jax.jit, static_argnames=_STATIC)
def ar_loop(params: Params, tokens, valid, seeds, *, model: NemotronH, max_new_tokens: int,
            sampling: SamplingParams, eos_token_id: Optional[int]):
    """Prefill, then one cached decode step per token."""
    logits, cache = model.prefill(params, tokens, valid, capacity=tokens.shape[1] + max_new_tokens - 1)

    def advance(cache, token):
        return model.decode_step(params, token, cache)

    return _token_loop(logits[:, -1], advance, cache, seeds, max_new_tokens=max_new_tokens, sampling=sampling,
                       eos_token_id=eos_token_id, pad=model.config.pad_token_id)


@functools.partial(jax.jit, static_argnames=_STATIC)
def mock_ar_loop(params: Params, tokens, valid, seeds, *, model: TwoTower, max_new_tokens: int,
                 sampling: SamplingParams, eos_token_id: Optional[int]):
    """SPEC §4.2: the denoiser (plain blocks, no timestep) reads the last token at position n−1 against
    the context caches of positions 0..n−2; then the context tower takes that token."""
    context = model.context
    batch, prompt_len = tokens.shape
    capacity = prompt_len + max_new_tokens
    if prompt_len > 1:
        _, cache = context.prefill(params["context"], tokens[:, :-1], valid[:, :-1], capacity=capacity)
    else:
        cache = init_cache(model.config, batch, capacity, model.dtype)
    fed = tokens[:, -1]

    def advance(carry, token):
        cache, fed = carry
        _, cache = context.extend(params["context"], fed[:, None], cache)
        return model.denoise(params, token[:, None], cache)[:, 0], (cache, token)

    first_logits = model.denoise(params, fed[:, None], cache)[:, 0]
    return _token_loop(first_logits, advance, (cache, fed), seeds, max_new_tokens=max_new_tokens,
                       sampling=sampling, eos_token_id=eos_token_id, pad=model.config.pad_token_id)


def _generate(loop, model, params, prompts, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed):
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    sampling = SamplingParams(temperature, top_k, top_p)
    check_eos(eos_token_id, model.config.vocab_size)
    tokens, valid = left_pad(prompts, model.config.pad_token_id, model.config.vocab_size)
    (out, out_logp, lengths, advances), compile_s, run_s = compile_and_run(
        loop, params, jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(row_seeds(seed, len(tokens))),
        model=model, max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=eos_token_id)
    lengths = np.asarray(lengths)
    toks, logps = cut_rows(np.asarray(out), np.asarray(out_logp), lengths)
    stats = {"generated_tokens": int(lengths.sum()), "seconds": run_s, "compile_seconds": compile_s}
    return GenerationResult(toks, logps, stats), int(advances), tokens.shape[1]


def generate_ar(
    model: Union[NemotronH, TwoTower],
    params: Params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: Optional[int] = None,
    seed: Union[int, Sequence[int]] = 0,
) -> GenerationResult:
    """Generates up to `max_new_tokens` after each prompt. Stats: forward passes, seconds (run only).

    `model` is a tower, or a TwoTower whose context tower and `context_lm_head` then do the work.
    `seed`: an int gives row r the seed `seed + r`; a sequence gives one seed per row.
    """
    if isinstance(model, TwoTower):
        model, params = model.context, params["context"]
    result, advances, _ = _generate(ar_loop, model, params, prompts, max_new_tokens, temperature, top_k, top_p,
                                    eos_token_id, seed)
    result.stats.update(forward_passes=1 + advances, context_passes=1 + advances)
    return result


def generate_mock_ar(
    model: TwoTower,
    params: Params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: Optional[int] = None,
    seed: Union[int, Sequence[int]] = 0,
) -> GenerationResult:
    """The release's `generate_mock_ar`: the denoiser as a one-token-per-step AR decoder (SPEC §4.2).

    Stats: denoiser passes (one per token) and context passes (the prefix prefill + one per token fed)."""
    if not isinstance(model, TwoTower):
        raise ValueError("mock-AR needs a TwoTower model (context + denoiser towers)")
    result, advances, prompt_len = _generate(mock_ar_loop, model, params, prompts, max_new_tokens, temperature,
                                             top_k, top_p, eos_token_id, seed)
    result.stats.update(forward_passes=1 + advances, denoiser_passes=1 + advances,
                        context_passes=int(prompt_len > 1) + advances)
    return result
