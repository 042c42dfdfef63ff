"""One token per step: AR generation with a tower (`generate_ar`) and TwoTower's mock-AR
(`generate_mock_ar`), sharing one token loop.

Batches of left-padded prompts; per-row EOS stop (finished rows emit pad with log-prob 0 and are cut on
the host); per-row random streams (a row samples the same alone as in any batch).

Placements (`twotower_jax.sharding`): `single` and `sharded` compile the whole generation, loop
included, as one program. AR needs only the context tower, so `towers` runs it whole on the context
tower's device. Mock-AR on `towers` alternates the towers every token: a compiled context-extend piece on
device 0 and a compiled denoise-and-pick piece on device 1, with the context cache sent to device 1 and
the token back to device 0 in between (see `_mock_ar_towers` for why this design).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax.cache import init_cache
from twotower_jax.sampling.placed import (compile_pieces, on, placed_model, placement_mesh, run_placed,
                                          tower_groups)
from twotower_jax.sampling.prompts import GenerationResult, check_eos, cut_rows, left_pad, row_seeds
from twotower_jax.sampling.tokens import SamplingParams, fold_rows, row_keys, select_tokens, token_logprobs
from twotower_jax.sharding import PlacementLike, constrain_batch, group_placement, resolve, tower_mesh
from twotower_jax.tower import NemotronH, Params
from twotower_jax.two_tower import TwoTower


class TokenState(NamedTuple):
    """The token loop's state: next step index, last token (b,), outputs (b, n), log-probs (b, n),
    finished rows (b,), their lengths (b,)."""
    step: jax.Array
    last: jax.Array
    out: jax.Array
    out_logp: jax.Array
    done: jax.Array
    lengths: jax.Array


@dataclasses.dataclass(frozen=True)
class _Rules:
    max_new_tokens: int
    sampling: SamplingParams
    eos_token_id: Optional[int]
    pad: int

    def pick(self, step_logits, keys, step, done):
        tok = select_tokens(step_logits, fold_rows(keys, step), self.sampling)
        logp = token_logprobs(step_logits, tok)
        tok = jnp.where(done, self.pad, tok)
        logp = jnp.where(done, 0.0, logp)
        now_done = done | (tok == self.eos_token_id) if self.eos_token_id is not None else done
        return tok, logp, now_done

    def start(self, first_logits, keys) -> TokenState:
        batch = first_logits.shape[0]
        first, first_logp, done = self.pick(first_logits, keys, 0, jnp.zeros((batch,), bool))
        out = jnp.full((batch, self.max_new_tokens), self.pad, jnp.int32).at[:, 0].set(first)
        out_logp = jnp.zeros((batch, self.max_new_tokens), jnp.float32).at[:, 0].set(first_logp)
        lengths = jnp.where(done, 1, self.max_new_tokens).astype(jnp.int32)
        return TokenState(jnp.int32(1), first, out, out_logp, done, lengths)

    def running(self, s: TokenState):
        return (s.step < self.max_new_tokens) & ~jnp.all(s.done)

    def step(self, s: TokenState, step_logits, keys) -> TokenState:
        tok, logp, now_done = self.pick(step_logits, keys, s.step, s.done)
        return TokenState(s.step + 1, tok,
                          jax.lax.dynamic_update_slice(s.out, tok[:, None], (0, s.step)),
                          jax.lax.dynamic_update_slice(s.out_logp, logp[:, None], (0, s.step)),
                          now_done, jnp.where(now_done & ~s.done, s.step + 1, s.lengths))

    @staticmethod
    def finish(s: TokenState):
        # Rows that never hit EOS stopped where the loop stopped.
        return s.out, s.out_logp, jnp.where(s.done, s.lengths, s.step), s.step - 1


def _token_loop(first_logits, advance: Callable, carry, seeds, rules: _Rules):
    """Picks a token from `first_logits`, then `advance(carry, token) -> (next logits, carry)` until
    `max_new_tokens` or every row hit EOS. Returns (tokens (b, n), log-probs (b, n), lengths (b,), advances)."""
    keys = row_keys(seeds)

    def body(state):
        s, carry = state
        step_logits, carry = advance(carry, s.last)
        return rules.step(s, step_logits, keys), carry

    s, _ = jax.lax.while_loop(lambda state: rules.running(state[0]), body, (rules.start(first_logits, keys), carry))
    return rules.finish(s)


def _rules(model, max_new_tokens, sampling, eos_token_id):
    return _Rules(max_new_tokens, sampling, eos_token_id, model.config.pad_token_id)


def ar_loop(params: Params, tokens, valid, seeds, *, model: NemotronH, max_new_tokens: int,
            sampling: SamplingParams, eos_token_id: Optional[int]):
    """Prefill, then one cached decode step per token (traced inside `run_placed`'s jit)."""
    logits, cache = model.prefill(params, tokens, valid, capacity=tokens.shape[1] + max_new_tokens - 1,
                                  logits_at="last")

    def advance(cache, token):
        return model.decode_step(params, token, cache)

    return _token_loop(logits[:, -1], advance, cache, seeds, _rules(model, max_new_tokens, sampling, eos_token_id))


def _context_prefix(params: Params, tokens, valid, *, model: TwoTower, max_new_tokens: int,
                    capacity: Optional[int] = None):
    """Mock-AR's (and self-speculation's) context cache: the prompt minus its last token (which the denoiser
    reads first), in `capacity` slots (default: prompt + max_new_tokens)."""
    batch, prompt_len = tokens.shape
    capacity = prompt_len + max_new_tokens if capacity is None else capacity
    if prompt_len > 1:
        return model.context.prefill(params["context"], tokens[:, :-1], valid[:, :-1], capacity=capacity,
                                     logits_at="none")[1]
    return init_cache(model.config, batch, capacity, model.dtype)


def mock_ar_loop(params: Params, tokens, valid, seeds, *, model: TwoTower, max_new_tokens: int,
                 sampling: SamplingParams, eos_token_id: Optional[int]):
    """SPEC §4.2: the denoiser (plain blocks, no timestep) reads the last token at position n−1 against
    the context caches of positions 0..n−2; then the context tower takes that token."""
    context = model.context
    cache = _context_prefix(params, tokens, valid, model=model, max_new_tokens=max_new_tokens)
    fed = tokens[:, -1]

    def advance(carry, token):
        cache, fed = carry
        _, cache = context.extend(params["context"], fed[:, None], cache, logits_at="none")
        return model.denoise(params, token[:, None], cache)[:, 0], (cache, token)

    first_logits = model.denoise(params, fed[:, None], cache)[:, 0]
    return _token_loop(first_logits, advance, (cache, fed), seeds,
                       _rules(model, max_new_tokens, sampling, eos_token_id))


# --- mock-AR on the `towers` placement: per-tower compiled pieces -------------------------------------

@functools.lru_cache(maxsize=None)
def _mock_ar_pieces(model: TwoTower, rules: _Rules, context_mesh, denoiser_mesh):
    """The compiled pieces of mock-AR on `towers` (one set per model, rules and groups, so repeats compile
    nothing): context prefix and one-token extend (context group), first pick and one step of denoise + pick
    (denoiser group). Each runs where its committed inputs are; its outputs are pinned to the group's batch
    layout (rows over `data`), the layout the next piece was compiled for."""
    def pinned(fn, mesh, **jit_kw):
        return jax.jit(lambda *args: constrain_batch(fn(*args), mesh, args[1].shape[0]), **jit_kw)

    prefix = pinned(lambda p, t, v: _context_prefix({"context": p}, t, v, model=model,
                                                   max_new_tokens=rules.max_new_tokens), context_mesh)
    extend = pinned(lambda p, token, cache: model.context.extend(p, token[:, None], cache, logits_at="none")[1],
                    context_mesh, donate_argnums=2)   # the old cache's buffers hold the new one

    def denoise_last(p, token, cache):
        return model.denoise(p, token[:, None], cache)[:, 0]

    def with_running(s):  # computed on the denoiser group with the step, so the host reads one flag
        return s, rules.running(s)

    start = pinned(lambda p, fed, cache, seeds: with_running(
        rules.start(denoise_last(p, fed, cache), row_keys(seeds))), denoiser_mesh)
    step = jax.jit(lambda p, s, cache, seeds: constrain_batch(with_running(
        rules.step(s, denoise_last(p, s.last, cache), row_keys(seeds))), denoiser_mesh, seeds.shape[0]))
    return prefix, extend, start, step


def _mock_ar_towers(model: TwoTower, params: Params, tokens, valid, seeds, mesh, *, max_new_tokens: int,
                    sampling: SamplingParams, eos_token_id: Optional[int]):
    """Mock-AR with the context tower on the towers mesh's group 0 and the denoiser on group 1 (one device
    each on 2 devices; each split by the `sharded` rules inside a bigger group).

    Why per-tower pieces and not one program: one jitted program runs on one device set with every
    input on it, so a single program over both groups would need both towers' params stacked on a
    `tower` mesh axis (the denoiser's adaLN params padded into the context's half) and every step run
    under per-group `lax.cond`s with collectives to keep the loop predicates equal — a different
    param layout from the checkpoint and from the other placements, restored through a copy. Per-tower
    pieces keep the checkpoint's tree (each tower restored straight onto its group) and are each
    compiled; the price is a host round trip per token (the EOS stop check) and a copy of the context
    cache to the denoiser group per token, both small next to a 30B tower's forward pass. On one shared
    CPU they are pure overhead (measured in experiments/results/sampler_cpu.md).

    Returns the same (tokens, log-probs, lengths, advances) as `mock_ar_loop`, and compile/run seconds.
    """
    context_mesh, denoiser_mesh, context_params, denoiser_params, context_at, denoiser_at = tower_groups(
        params, mesh, tokens.shape[0])
    rules = _rules(model, max_new_tokens, sampling, eos_token_id)
    first_fed = tokens[:, -1]
    first_fed = jax.device_put(first_fed, context_at(first_fed))
    tokens, valid = jax.device_put((tokens, valid), context_at((tokens, valid)))
    seeds = jax.device_put(seeds, denoiser_at(seeds))
    prefix, extend, start, step = _mock_ar_pieces(model, rules, context_mesh, denoiser_mesh)

    with jax.set_mesh(context_mesh):
        cache_struct = jax.eval_shape(prefix, context_params, tokens, valid)
    with jax.set_mesh(denoiser_mesh):
        state_struct = jax.eval_shape(start, denoiser_params, first_fed, cache_struct, seeds)[0]
    cache_on_context, cache_on_denoiser = context_at(cache_struct), denoiser_at(cache_struct)
    fed_on_denoiser = denoiser_at(first_fed)
    (prefix_c, extend_c, start_c, step_c), compile_s = compile_pieces(
        (prefix, (context_params, tokens, valid), context_mesh),
        (extend, (context_params, first_fed, on(cache_struct, cache_on_context)), context_mesh),
        (start, (denoiser_params, on(first_fed, fed_on_denoiser), on(cache_struct, cache_on_denoiser), seeds),
         denoiser_mesh),
        (step, (denoiser_params, on(state_struct, denoiser_at(state_struct)), on(cache_struct, cache_on_denoiser),
                seeds), denoiser_mesh))

    fed_on_context = context_at(first_fed)
    begin = time.perf_counter()
    cache = prefix_c(context_params, tokens, valid)
    s, running = start_c(denoiser_params, jax.device_put(first_fed, fed_on_denoiser),
                         jax.device_put(cache, cache_on_denoiser), seeds)
    fed = first_fed
    while bool(running):  # the one host sync per token: has every row stopped?
        cache = extend_c(context_params, fed, cache)
        fed = jax.device_put(s.last, fed_on_context)   # the token the denoiser reads now; the context takes it next
        s, running = step_c(denoiser_params, s, jax.device_put(cache, cache_on_denoiser), seeds)
    outputs = jax.block_until_ready(rules.finish(s))
    return outputs, compile_s, time.perf_counter() - begin


def _generate(loop, model, params, prompts, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed,
              placement: PlacementLike, prompt_width: Optional[int], mesh, towers_loop=None):
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    sampling = SamplingParams(temperature, top_k, top_p)
    check_eos(eos_token_id, model.config.vocab_size)
    placement = resolve(placement)
    requested = placement.kind
    mesh = placement_mesh(placement, mesh)
    model = placed_model(model, placement, mesh)
    tokens, valid = left_pad(prompts, model.config.pad_token_id, model.config.vocab_size, prompt_width)
    seeds = row_seeds(seed, len(tokens))
    statics = dict(model=model, max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=eos_token_id)
    if placement.kind == "towers" and towers_loop is not None:
        outputs, compile_s, run_s = towers_loop(model, params, tokens, valid, seeds, mesh, **{
            k: v for k, v in statics.items() if k != "model"})
    else:
        if placement.kind == "towers":  # one tower's work: all of it on that tower's group
            mesh, placement = tower_mesh(mesh, "context"), group_placement(placement)
        outputs, compile_s, run_s = run_placed(loop, placement, mesh, params, tokens, valid, seeds, **statics)
    out, out_logp, lengths, advances = outputs
    lengths = np.asarray(lengths)
    toks, logps = cut_rows(np.asarray(out), np.asarray(out_logp), lengths)
    stats = {"generated_tokens": int(lengths.sum()), "seconds": run_s, "compile_seconds": compile_s,
             "placement": requested}
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
    placement: PlacementLike = "single",
    prompt_width: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> GenerationResult:
    """Generates up to `max_new_tokens` after each prompt. Stats: forward passes, seconds (run only).

    `model` is a tower, or a TwoTower whose context tower and `context_lm_head` then do the work.
    `seed`: an int gives row r the seed `seed + r`; a sequence gives one seed per row.
    `placement`: "single" | "towers" (AR uses one tower: all on the context tower's group) |
    "sharded" (experts and dense weights split over every device), see `twotower_jax.sharding`.
    `mesh`: the devices, from `sharding.make_mesh(placement, ...)` (default: every visible device); rows are
    split over its `data` axis.
    `prompt_width`: left-pad every batch to this many tokens, so prompts of any length up to it share one
    compiled program (default: the longest prompt of the batch).
    """
    if isinstance(model, TwoTower):
        model, params = model.context, params["context"]
    result, advances, _ = _generate(ar_loop, model, params, prompts, max_new_tokens, temperature, top_k, top_p,
                                    eos_token_id, seed, placement, prompt_width, mesh)
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
    placement: PlacementLike = "single",
    prompt_width: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> GenerationResult:
    """The release's `generate_mock_ar`: the denoiser as a one-token-per-step AR decoder (SPEC §4.2).

    Stats: denoiser passes (one per token) and context passes (the prefix prefill + one per token fed).
    `placement`: "single" | "towers" (context tower on one half of the devices, denoiser on the other) |
    "sharded"; `mesh` as in `generate_ar`."""
    if not isinstance(model, TwoTower):
        raise ValueError("mock-AR needs a TwoTower model (context + denoiser towers)")
    result, advances, prompt_len = _generate(mock_ar_loop, model, params, prompts, max_new_tokens, temperature,
                                             top_k, top_p, eos_token_id, seed, placement, prompt_width,
                                             mesh, _mock_ar_towers)
    result.stats.update(forward_passes=1 + advances, denoiser_passes=1 + advances,
                        context_passes=int(prompt_len > 1) + advances)
    return result
