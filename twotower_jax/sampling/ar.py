"""Autoregressive generation with one tower: prefill, then cached single-token decode, the whole loop
on device in one `lax.while_loop`. Batches of left-padded prompts; per-row EOS stop (finished rows
emit pad with log-prob 0 and are cut on the host)."""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax.sampling.prompts import GenerationResult, check_eos, cut_rows, left_pad
from twotower_jax.sampling.timing import compile_and_run
from twotower_jax.sampling.tokens import SamplingParams, select_tokens, token_logprobs
from twotower_jax.tower import NemotronH, Params


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "eos_token_id"))
def ar_loop(params: Params, tokens, valid, key, *, model: NemotronH, max_new_tokens: int,
            sampling: SamplingParams, eos_token_id: Optional[int]):
    """Returns (generated (b, n) int32, log-probs (b, n) f32, lengths (b,) int32, decode steps run)."""
    batch, prompt_len = tokens.shape
    pad = model.config.pad_token_id
    logits, cache = model.prefill(params, tokens, valid, capacity=prompt_len + max_new_tokens - 1)

    def pick(step_logits, step, done):
        tok = select_tokens(step_logits, jax.random.fold_in(key, step), sampling)
        logp = token_logprobs(step_logits, tok)
        tok = jnp.where(done, pad, tok)
        logp = jnp.where(done, 0.0, logp)
        now_done = done | (tok == eos_token_id) if eos_token_id is not None else done
        return tok, logp, now_done

    not_done = jnp.zeros((batch,), bool)
    first, first_logp, done = pick(logits[:, -1], 0, not_done)
    out = jnp.full((batch, max_new_tokens), pad, jnp.int32).at[:, 0].set(first)
    out_logp = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(first_logp)
    lengths = jnp.where(done, 1, max_new_tokens).astype(jnp.int32)

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, last, out, out_logp, done, lengths, cache = state
        step_logits, cache = model.decode_step(params, last, cache)
        tok, logp, now_done = pick(step_logits, step, done)
        lengths = jnp.where(now_done & ~done, step + 1, lengths)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, step))
        out_logp = jax.lax.dynamic_update_slice(out_logp, logp[:, None], (0, step))
        return step + 1, tok, out, out_logp, now_done, lengths, cache

    state = (jnp.int32(1), first, out, out_logp, done, lengths, cache)
    step, _, out, out_logp, done, lengths, _ = jax.lax.while_loop(cond, body, state)
    # Rows that never hit EOS stopped where the loop stopped.
    lengths = jnp.where(done, lengths, step)
    return out, out_logp, lengths, step - 1


def generate_ar(
    model: NemotronH,
    params: Params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: Optional[int] = None,
    seed: int = 0,
) -> GenerationResult:
    """Generates up to `max_new_tokens` after each prompt. Stats: forward passes, seconds (run only)."""
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    sampling = SamplingParams(temperature, top_k, top_p)
    check_eos(eos_token_id, model.config.vocab_size)
    tokens, valid = left_pad(prompts, model.config.pad_token_id, model.config.vocab_size)
    (out, out_logp, lengths, decode_steps), compile_s, run_s = compile_and_run(
        ar_loop, params, jnp.asarray(tokens), jnp.asarray(valid), jax.random.key(seed),
        model=model, max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=eos_token_id)
    lengths = np.asarray(lengths)
    toks, logps = cut_rows(np.asarray(out), np.asarray(out_logp), lengths)
    stats = {
        "forward_passes": 1 + int(decode_steps),
        "generated_tokens": int(lengths.sum()),
        "seconds": run_s,
        "compile_seconds": compile_s,
    }
    return GenerationResult(toks, logps, stats)
