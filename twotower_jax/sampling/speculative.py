"""Lossless self-speculative decoding (issue 13): the denoiser drafts a block, the context tower verifies it
in the extension pass diffusion mode runs anyway. Output distribution = AR's (greedy: token for token).

Invariant between cycles, per row: the context cache holds the text up to, not including, the last
committed token `last` (the prompt's last token at the start, so the prompt minus one token is prefilled).
One cycle, for the rows still running (finished rows are frozen: they take no denoiser commits and no
valid context positions):

1. Draft. Block = [last, MASK × (S−1)]; the denoiser fills the masks with `draft_steps` passes of the
   diffusion commit rule (`diffusion._denoise_block`; 1 pass = argmax everywhere, MASK logit forbidden).
   The drafter is always greedy: with a one-hot proposal d the acceptance probability is p(d), which
   the most likely token maximises; any draft keeps the output exact.
2. Verify. The context tower extends its cache over [last, d_1 … d_{S−1}] (logits_at="all"): its
   logits at block position i are the AR distribution of the token after position i.
3. Accept (`accept_drafts`). Greedy: the longest prefix with d_{i+1} = argmax p_i, then the AR argmax
   at the first mismatch (or after d_{S−1}). Sampling: d_{i+1} accepted with probability p_i(d_{i+1})
   under the temperature/top-k/top-p-transformed distribution (`tokens.sampling_logits`, the one
   `select_tokens` samples from); at the first rejection a token from p_i with d_{i+1} removed and
   renormalised (speculative sampling with a one-hot proposal: exactly AR's distribution). a + 1 tokens
   per row and cycle, cut at the row's first EOS and at max_new_tokens; log-probs are those of the
   unscaled context softmax, as in `generate_ar`.
4. Roll back. The cache must hold [last, d_1 … d_a] (not the new last token). Chosen (`rollback="states"`,
   the default): no second pass. The verify pass runs `extend_truncatable`, which also keeps each Mamba
   layer's scan inputs for the block (`MambaExtension`: the pre-verify conv/SSM state, the raw xBC columns,
   x, dt, B); `truncate_extension` then rebuilds each layer's state at the accepted length a + 1 per row
   (`ssd_state_at`: row a + 1 of the SSD decay matrix applied to the block's inputs, and the conv state
   = the last K−1 raw columns), marks the row's K/V slots past a + 1 invalid and sets the length to the
   longest kept prefix. Why not keep the SSM state after every block position: that is S states per
   Mamba layer and row (real config: S · 23 · (2 MiB SSM + 72 KiB conv) ≈ 762 MiB per row at S = 16),
   while the inputs are ≈ 44 KiB per position and layer (≈ 16 MiB per row at S = 16) plus the pre-verify
   state kept alive (≈ 48 MiB per row, one Mamba state); rebuilding one state costs S·H·P·N MACs per
   layer (real config ≈ 0.4 GFLOP per row and cycle, ≈ 0.3 % of the 16-token verify pass). The option
   `rollback="replay"` (the first version) re-runs the context tower over the accepted prefix from the
   pre-verify cache (`roll_back`): exact through the ordinary extension path, but a second context pass
   in most cycles; kept as an independent cross-check in the tests.
   Slots: KV slots are shared by all rows, so a cycle advances the cache by m = the longest committed
   prefix among running rows (S when all accepted everything); a row that accepted fewer leaves invalid
   slots (holes), which attention masks. Capacity: prompt − 1 + min(N·S, B·(N − 1) + S) slots (N =
   max_new_tokens, B = rows): a running row has < N tokens, so before the last cycle at most
   min((N − 1)·S, B·(N − 1)) slots are used, and the last cycle writes S more. No compaction.

The whole generation is one program (`jax.lax.while_loop` over cycles) placed by `run_placed` (`single`,
`sharded`). On `towers` each tower runs on its own device group as per-tower compiled pieces
(`_speculative_towers`: drafts on the denoiser's group, prefix / verify / rollback on the context's).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from twotower_jax.sampling.ar import _context_prefix
from twotower_jax.sampling.diffusion import DiffusionParams, _denoise_block
from twotower_jax.sampling.placed import compile_pieces, on, placed_model, placement_mesh, run_placed, tower_groups
from twotower_jax.sampling.prompts import GenerationResult, check_eos, cut_rows, left_pad, row_seeds
from twotower_jax.sampling.tokens import SamplingParams, fold_rows, row_keys, sampling_logits
from twotower_jax.sharding import PlacementLike, constrain_batch, resolve
from twotower_jax.tower import Params, truncate_extension
from twotower_jax.two_tower import TwoTower


ROLLBACKS = ("states", "replay")


def leading_true(flags):
    """(b, n) bool -> (b,) the number of leading True values per row."""
    return jnp.sum(jnp.cumprod(flags.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def accept_drafts(logits, drafts, keys, sampling: SamplingParams):
    """The acceptance step. `logits` (b, S, v): the context tower's logits at the block positions [last,
    d_1 … d_{S−1}]; `drafts` (b, S−1) = d_1 … d_{S−1}; `keys` one PRNG key per row (this cycle's).
    Returns (a (b,) accepted drafts, tokens (b, S)): the row's committed tokens are tokens[:, :a + 1]
    (d_1 … d_a, then the AR tower's own token)."""
    batch, width, vocab = logits.shape
    logits = logits.astype(jnp.float32)
    if sampling.greedy:
        choice = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return leading_true(drafts == choice[:, :-1]), choice
    z = sampling_logits(logits, sampling)
    p_draft = jnp.take_along_axis(jax.nn.softmax(z, axis=-1)[:, :-1], drafts[..., None], axis=-1)[..., 0]
    uniform = jax.vmap(lambda k: jax.random.uniform(k, (width - 1,)))(fold_rows(keys, 0))
    a = leading_true(uniform < p_draft)
    # At a rejection: p_i with the rejected draft removed (renormalised by the categorical); after the last
    # draft: p_{S-1} itself.
    removed = jax.nn.one_hot(jnp.concatenate([drafts, jnp.full((batch, 1), -1, drafts.dtype)], 1), vocab,
                             dtype=bool)
    residual = jnp.where(removed, jnp.finfo(jnp.float32).min, z)
    resampled = jax.vmap(lambda k, r: jax.random.categorical(k, r, axis=-1))(fold_rows(keys, 1), residual)
    position = jnp.arange(width)
    padded = jnp.concatenate([drafts, jnp.zeros((batch, 1), drafts.dtype)], 1)
    return a, jnp.where(position[None] < a[:, None], padded, resampled).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Spec:
    max_new_tokens: int
    block_size: int
    draft: DiffusionParams       # the drafter: greedy, `draft_steps` passes per block
    sampling: SamplingParams
    eos_token_id: Optional[int]
    pad: int
    rollback: str = "states"     # "states" (default) or "replay"

    def capacity(self, prompt_len: int, batch: int) -> int:
        n, s = self.max_new_tokens, self.block_size
        return max(prompt_len - 1 + min(n * s, batch * (n - 1) + s), 1)


class SpecState(NamedTuple):
    """Between cycles (the context cache travels separately): cycle index, last committed token (b,),
    outputs / log-probs (b, N), tokens so far (b,), finished rows (b,), per-row verify / rollback /
    denoiser passes (b,), batched verify / rollback / denoiser passes (), acceptance histogram (S,):
    hist[k] = row-cycles that committed k + 1 tokens (k accepted drafts + the AR token, after the EOS and
    max_new_tokens cuts: drafts accepted past a row's end are not counted)."""
    cycle: jax.Array
    last: jax.Array
    out: jax.Array
    out_logp: jax.Array
    gen: jax.Array
    done: jax.Array
    row_verify: jax.Array
    row_rollback: jax.Array
    row_den: jax.Array
    verify: jax.Array
    rollback: jax.Array
    den: jax.Array
    hist: jax.Array


def _start(tokens, spec: _Spec) -> SpecState:
    batch = tokens.shape[0]
    zeros = jnp.zeros((batch,), jnp.int32)
    n = spec.max_new_tokens
    return SpecState(jnp.int32(0), tokens[:, -1], jnp.full((batch, n), spec.pad, jnp.int32),
                     jnp.zeros((batch, n), jnp.float32), zeros, jnp.zeros((batch,), bool), zeros, zeros, zeros,
                     jnp.int32(0), jnp.int32(0), jnp.int32(0), jnp.zeros((spec.block_size,), jnp.int32))


def _cycle(model: TwoTower, params, keys, threshold, spec: _Spec, s: SpecState, cache):
    """One draft / verify / accept / roll-back cycle. Returns (state, cache)."""
    block, row_passes, passes = _draft(model, params, keys, threshold, spec, s, cache)
    return _verify(model, params["context"], keys, spec, s, cache, block, row_passes, passes)


def _draft(model: TwoTower, params, keys, threshold, spec: _Spec, s: SpecState, cache):
    """Step 1 (denoiser; `params` needs only "denoiser"): the drafted block [last, d_1 … d_{S−1}] (b, S),
    denoiser passes per row (b,) and batched ()."""
    width = spec.block_size
    batch = s.last.shape[0]
    position = jnp.arange(width)
    canvas = jnp.concatenate([s.last[:, None], jnp.full((batch, width - 1), spec.draft.mask_token_id, jnp.int32)], 1)
    masked = jnp.broadcast_to(position[None] > 0, canvas.shape)
    return _denoise_block(model, params, cache, keys, s.cycle, ~s.done, width, spec.draft, threshold, canvas, masked)


def _verify(model: TwoTower, context_params, keys, spec: _Spec, s: SpecState, cache, block, row_passes, passes):
    """Steps 2–4 (context tower): verify `block`, accept, commit, roll back. Returns (state, cache)."""
    width, n_max = spec.block_size, spec.max_new_tokens
    batch = s.last.shape[0]
    active = ~s.done
    position = jnp.arange(width)
    context = model.context
    params = {"context": context_params}
    verify_valid = jnp.broadcast_to(active[:, None], block.shape)
    start = cache.length
    if spec.rollback == "states":
        logits, verified, extensions = context.extend_truncatable(params["context"], block, cache, verify_valid)
    else:
        logits, verified = context.extend(params["context"], block, cache, verify_valid, logits_at="all")
    a, tokens = accept_drafts(logits, block[:, 1:], fold_rows(keys, s.cycle), spec.sampling)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1), tokens[..., None], -1)[..., 0]
    n = jnp.minimum(a + 1, n_max - s.gen)
    hit_eos = jnp.zeros_like(active)
    if spec.eos_token_id is not None:
        first_eos = jnp.min(jnp.where(tokens == spec.eos_token_id, position, width), axis=-1)
        hit_eos = active & (first_eos < n)
        n = jnp.minimum(n, first_eos + 1)
    n = jnp.where(active, n, 0)
    write = position[None] < n[:, None]
    rows = jnp.arange(batch)[:, None]
    columns = jnp.where(write, s.gen[:, None] + position[None], n_max)       # n_max: dropped
    out = s.out.at[rows, columns].set(tokens, mode="drop")
    out_logp = s.out_logp.at[rows, columns].set(logp, mode="drop")
    gen = s.gen + n
    done = s.done | hit_eos | (gen >= n_max)
    last = jnp.where(active, jnp.take_along_axis(tokens, jnp.maximum(n - 1, 0)[:, None], 1)[:, 0], s.last)
    still = ~done
    if spec.rollback == "states":   # no second pass: states rebuilt at the accepted length, KV tails invalid
        need = jnp.zeros((), bool)
        cache = truncate_extension(verified, extensions, start, jnp.where(still, a + 1, 0))
    else:
        need = jnp.any(still & (a < width - 1))
        cache = jax.lax.cond(need, lambda _: roll_back(context, params["context"], block, cache, a, still),
                             lambda _: verified, None)
    hist = s.hist + jnp.zeros((width,), jnp.int32).at[jnp.maximum(n - 1, 0)].add(active.astype(jnp.int32))
    return SpecState(s.cycle + 1, last, out, out_logp, gen, done, s.row_verify + active, s.row_rollback + (still & need),
                     s.row_den + row_passes, s.verify + 1, s.rollback + need, s.den + passes,
                     hist), cache


def roll_back(context, context_params, block, cache, a, keep):
    """The pre-verify `cache` extended over `block` (b, S) keeping positions 0..a of the rows in `keep` (b,)
    (the rest skipped: invalid KV slots, Mamba state unchanged), then advanced by the longest kept prefix
    (later slots are overwritten by the next extension). Equals a cache of the accepted text."""
    position = jnp.arange(block.shape[1])
    replay = keep[:, None] & (position[None] <= a[:, None])
    length = cache.length + jnp.max(jnp.where(keep, a + 1, 0))   # read before `extend` donates `cache`
    _, replayed = context.extend(context_params, block, cache, replay, logits_at="none")
    return replayed.replace(length=length)


def speculative_loop(params: Params, tokens, valid, seeds, threshold, *, model: TwoTower, spec: _Spec):
    """The whole generation as one program (traced inside `run_placed`'s jit). Returns the final SpecState
    (and whether the prompt prefix took a context pass)."""
    batch, prompt_len = tokens.shape
    keys = row_keys(seeds)
    cache = _context_prefix(params, tokens, valid, model=model, max_new_tokens=spec.max_new_tokens,
                            capacity=spec.capacity(prompt_len, batch))
    s = _start(tokens, spec)
    s, _ = jax.lax.while_loop(lambda c: ~jnp.all(c[0].done),
                              lambda c: _cycle(model, params, keys, threshold, spec, *c), (s, cache))
    return s


@functools.lru_cache(maxsize=None)
def _towers_pieces(model: TwoTower, spec: _Spec, context_mesh, denoiser_mesh):
    """Compiled pieces on `towers` (one set per model, settings and groups): the prompt prefix, the start
    state and a cycle's verify / accept / roll back (context group; the cache it extends is donated) and
    a cycle's draft (denoiser group). Outputs pinned to their group's batch layout."""
    def pinned(fn, mesh, **jit_kw):
        return jax.jit(lambda *args: constrain_batch(fn(*args), mesh, args[-1].shape[0]), **jit_kw)

    prefix = pinned(lambda p, tokens, valid, seeds: _context_prefix(
        {"context": p}, tokens, valid, model=model, max_new_tokens=spec.max_new_tokens,
        capacity=spec.capacity(tokens.shape[1], tokens.shape[0])), context_mesh)
    start = pinned(lambda tokens, seeds: _start(tokens, spec), context_mesh)
    draft = pinned(lambda p, cache, s, threshold, seeds: _draft(model, p, row_keys(seeds), threshold, spec, s, cache),
                   denoiser_mesh)

    def verify(p, cache, s, drafted, seeds):
        s, cache = _verify(model, p, row_keys(seeds), spec, s, cache, *drafted)
        return s, cache, jnp.all(s.done)
    return prefix, start, draft, pinned(verify, context_mesh, donate_argnums=1)


def _speculative_towers(model: TwoTower, params: Params, tokens, valid, seeds, threshold, mesh, spec: _Spec):
    """Self-speculation with the context tower (prefix, verify, rollback; the state) on the towers mesh's
    group 0 and the denoiser (drafts) on group 1, cycle by cycle, as diffusion's `_diffusion_towers` (see
    there why per-tower pieces): per cycle the context cache and the state go to the denoiser group, the
    drafted block comes back, and the host reads one flag (every row done?). Returns (SpecState, compile
    seconds, run seconds)."""
    # the cached placement (placed.placed_params): a repeat call does not place the params again
    context_mesh, denoiser_mesh, context_params, denoiser_params, context_at, denoiser_at = tower_groups(
        params, mesh, tokens.shape[0])
    tokens, valid, seeds_c = jax.device_put((tokens, valid, seeds), context_at((tokens, valid, seeds)))
    seeds_d, threshold = jax.device_put((seeds, threshold), denoiser_at((seeds, threshold)))
    prefix, start, draft, verify = _towers_pieces(model, spec, context_mesh, denoiser_mesh)
    with jax.set_mesh(context_mesh):
        cache_struct = jax.eval_shape(prefix, context_params, tokens, valid, seeds_c)
        state_struct = jax.eval_shape(start, tokens, seeds_c)
    with jax.set_mesh(denoiser_mesh):
        drafted_struct = jax.eval_shape(draft, denoiser_params, cache_struct, state_struct, threshold, seeds_d)
    cache_on_context, cache_on_denoiser = context_at(cache_struct), denoiser_at(cache_struct)
    state_on_context, state_on_denoiser = context_at(state_struct), denoiser_at(state_struct)
    drafted_on_context = context_at(drafted_struct)
    (prefix_c, start_c, draft_c, verify_c), compile_s = compile_pieces(
        (prefix, (context_params, tokens, valid, seeds_c), context_mesh),
        (start, (tokens, seeds_c), context_mesh),
        (draft, (denoiser_params, on(cache_struct, cache_on_denoiser), on(state_struct, state_on_denoiser), threshold,
                 seeds_d), denoiser_mesh),
        (verify, (context_params, on(cache_struct, cache_on_context), on(state_struct, state_on_context),
                  on(drafted_struct, drafted_on_context), seeds_c), context_mesh))

    begin = time.perf_counter()
    cache = prefix_c(context_params, tokens, valid, seeds_c)
    s = start_c(tokens, seeds_c)
    while True:
        drafted = draft_c(denoiser_params, jax.device_put(cache, cache_on_denoiser),
                          jax.device_put(s, state_on_denoiser), threshold, seeds_d)
        s, cache, all_done = verify_c(context_params, cache, s, jax.device_put(drafted, drafted_on_context), seeds_c)
        if bool(all_done):   # the one host sync per cycle
            break
    s = jax.block_until_ready(s)
    return s, compile_s, time.perf_counter() - begin


def generate_self_speculative(
    model: TwoTower,
    params: Params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    block_size: int = 16,
    draft_steps: int = 1,
    confidence_threshold: float = 0.9,
    mask_token_id: int = 3,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: Optional[int] = None,
    seed: Union[int, Sequence[int]] = 0,
    placement: PlacementLike = "single",
    mesh: Optional[jax.sharding.Mesh] = None,
    prompt_width: Optional[int] = None,
    rollback: str = "states",
) -> GenerationResult:
    """AR's output (greedy: token for token; sampling: in distribution) at up to `block_size` tokens per
    context-tower verify pass: the denoiser drafts S − 1 tokens after the last committed one with
    `draft_steps` passes of the diffusion commit rule (γ = `confidence_threshold` when more than one), the
    context tower verifies them in its extension pass. See the module docstring for the cycle.

    Arguments and per-row semantics as `generate_ar` (seed, placement, mesh, prompt_width) and
    `generate_mask_diffusion` (block_size, mask_token_id); `rollback`: "states" (default, no second pass)
    or "replay" (module docstring, step 4). Stats: `context_passes` (prompt prefix + verify + rollback
    passes; rollback passes are 0 with "states"), `verify_passes`, `rollback_passes`, `denoiser_passes`,
    `tokens_per_context_pass` (generated tokens / the verify + rollback passes each row took part in, over
    all rows: AR's equivalent is 1) and per row, `tokens_per_verify_pass` (rollbacks not counted), `acceptance_histogram` (index k: row-cycles that committed k + 1 tokens).
    """
    if not isinstance(model, TwoTower):
        raise ValueError("self-speculative decoding needs a TwoTower model (context + denoiser towers)")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    if not (isinstance(block_size, int) and block_size >= 2):
        raise ValueError(f"block_size must be an integer >= 2 (the last token and at least one draft), got "
                         f"{block_size}")
    if not (isinstance(draft_steps, int) and 1 <= draft_steps <= block_size - 1):
        raise ValueError(f"draft_steps must be an integer in [1, block_size - 1 = {block_size - 1}], got "
                         f"{draft_steps}")
    confidence_threshold = float(confidence_threshold)
    if not 0.0 <= confidence_threshold <= 1.0:
        raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}")
    if rollback not in ROLLBACKS:
        raise ValueError(f"rollback must be one of {ROLLBACKS}, got {rollback!r}")
    draft = DiffusionParams(block_size, draft_steps, mask_token_id, 0.0)
    draft.validate(model.config.vocab_size)
    check_eos(eos_token_id, model.config.vocab_size)
    spec = _Spec(max_new_tokens, block_size, draft, SamplingParams(float(temperature), top_k, top_p), eos_token_id,
                 model.config.pad_token_id, rollback)
    placement = resolve(placement)
    requested = placement.kind
    mesh = placement_mesh(placement, mesh)
    model = placed_model(model, placement, mesh)
    tokens, valid = left_pad(prompts, model.config.pad_token_id, model.config.vocab_size, prompt_width)
    seeds = row_seeds(seed, len(tokens))
    if placement.kind == "towers":   # each tower on its own device group
        s, compile_s, run_s = _speculative_towers(model, params, tokens, valid, seeds,
                                                  np.float32(confidence_threshold), mesh, spec)
    else:
        s, compile_s, run_s = run_placed(speculative_loop, placement, mesh, params, tokens, valid, seeds,
                                         np.float32(confidence_threshold), model=model, spec=spec)
    gen = np.asarray(s.gen)
    toks, logps = cut_rows(np.asarray(s.out), np.asarray(s.out_logp), gen)
    verify, rollback = int(s.verify), int(s.rollback)
    row_ctx = np.asarray(s.row_verify) + np.asarray(s.row_rollback)
    stats = {
        "generated_tokens": int(gen.sum()),
        "context_passes": int(tokens.shape[1] > 1) + verify + rollback,
        "verify_passes": verify,
        "rollback_passes": rollback,
        "denoiser_passes": int(s.den),
        "forward_passes": int(tokens.shape[1] > 1) + verify + rollback + int(s.den),
        "tokens_per_context_pass": float(gen.sum() / max(row_ctx.sum(), 1)),
        "tokens_per_verify_pass": float(gen.sum() / max(np.asarray(s.row_verify).sum(), 1)),
        "row_context_passes": row_ctx.tolist(),
        "row_denoiser_passes": np.asarray(s.row_den).tolist(),
        "row_tokens_per_context_pass": (gen / np.maximum(row_ctx, 1)).tolist(),
        "row_tokens_per_verify_pass": (gen / np.maximum(np.asarray(s.row_verify), 1)).tolist(),
        "acceptance_histogram": np.asarray(s.hist).tolist(),
        "seconds": run_s,
        "compile_seconds": compile_s,
        "placement": requested,
        "rollback": spec.rollback,
    }
    return GenerationResult(toks, logps, stats)
