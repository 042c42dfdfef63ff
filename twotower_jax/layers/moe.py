"""Mixture of experts (SPEC §2) and the dense relu² MLP.

Router (float32): s = sigmoid(x·Wᵀ); pick top-k of s + e_score_correction_bias (group-limited when
n_group > 1); weights = the unbiased s at the picks, renormalised, × routed_scaling_factor.
Experts are non-gated: down(relu(up(x))²). One shared expert is always added.

Dispatches with the same result:
- "dense": every expert on every token, then weighted (the test reference);
- "ragged": sort token copies by expert, `lax.ragged_dot` over the expert stack;
- "grouped": tokens grouped by expert, for decode-sized calls: the distinct chosen experts (all of them once
  tokens x k reaches the expert count) each run once over all the call's tokens, combined by a (expert, token)
  weight matrix that is zero where a token did not choose the expert. Each chosen expert's weights are read
  once per call however many tokens chose it, through batch-major matmuls (no per-call weight transpose);
- "gather": the legacy decode dispatch: gathers each token's k experts' weights, a private copy per token
  (kept for comparison: at batch 8 it copies 32 experts' weights per layer, 7x batch 1 on CPU);
- "expert_parallel": experts split over the mesh axis `expert` of the current mesh (`jax.set_mesh`);
  each device runs the ragged dispatch on its local experts for all tokens, one `psum` combines.
"""
from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from twotower_jax.config import NemotronHConfig

MoEImpl = Literal["auto", "ragged", "dense", "grouped", "gather", "expert_parallel"]
# Calls with at most this many tokens (decode steps) run the grouped dispatch (experiments/results/overhead_cpu.md).
GROUPED_MAX_TOKENS = 8
GATHER_MAX_TOKENS = GROUPED_MAX_TOKENS   # the old name


def resolve_moe_impl(impl: str, n_tokens: int, backend: str) -> str:
    """`auto` → `grouped` for decode-sized calls; otherwise the dense all-experts dispatch on CPU (5x
    ragged_dot at 512 tokens, experiments/results/moe_cpu.md) and the sorted ragged dispatch elsewhere.
    Resolved at trace time: the token count is a static shape."""
    if impl != "auto":
        return impl
    if n_tokens <= GROUPED_MAX_TOKENS:
        return "grouped"
    return "dense" if backend == "cpu" else "ragged"
EXPERT_AXIS = "expert"


def relu_squared(x):
    return jnp.square(jax.nn.relu(x))


class ReluSquaredMLP(nn.Module):
    """down_proj(relu(up_proj(x))²): the `-` layers and the MoE shared expert."""
    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        h = relu_squared(nn.Dense(self.intermediate_size, name="up_proj", **dense)(x))
        return nn.Dense(self.hidden_size, name="down_proj", **dense)(h)


def route(
    x: Float[Array, "t d"],
    weight: Float[Array, "e d"],
    correction_bias: Float[Array, "e"],
    config: NemotronHConfig,
) -> tuple[Float[Array, "t k"], Int[Array, "t k"]]:
    """Returns (combine weights (float32), expert indices) for each token."""
    logits = jnp.einsum("td,ed->te", x.astype(jnp.float32), weight.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    scores = jax.nn.sigmoid(logits)
    choice = scores + correction_bias.astype(jnp.float32)
    if config.n_group > 1:
        grouped = choice.reshape(choice.shape[0], config.n_group, -1)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)                      # (t, n_group)
        _, top_groups = jax.lax.top_k(group_score, config.topk_group)
        keep = jnp.zeros_like(group_score, dtype=bool).at[
            jnp.arange(choice.shape[0])[:, None], top_groups].set(True)
        choice = jnp.where(jnp.repeat(keep, grouped.shape[-1], axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, config.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * config.routed_scaling_factor, idx


def _einsum_f32(spec: str, a, b):
    """einsum accumulating in float32. XLA:CPU has no BF16 x BF16 = F32 kernel for some batched dots, so
    there the operands are widened first (exact for bf16, so the result is the same)."""
    if jax.default_backend() == "cpu":
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def experts_dense(x, up, down, weights, idx):
    """Reference dispatch: all experts on all tokens. x (t,d), up (e,d,f), down (e,f,d)."""
    h = relu_squared(_einsum_f32("td,edf->tef", x, up))
    out = _einsum_f32("tef,efd->ted", h.astype(x.dtype), down)
    combine = jnp.zeros((x.shape[0], up.shape[0]), jnp.float32).at[
        jnp.arange(x.shape[0])[:, None], idx].add(weights)
    return jnp.einsum("te,ted->td", combine, out)


def chosen_experts(idx, n_experts: int):
    """The distinct experts chosen by any token, in `min(n_experts, t·k)` slots (static): (slot experts (m,),
    slot used (m,)). With m = n_experts every expert has its own slot; otherwise the distinct chosen experts
    in increasing order, then unused slots (expert 0, never read: their combine rows are zero)."""
    t, k = idx.shape
    m = min(n_experts, t * k)
    if m == n_experts:
        return jnp.arange(n_experts), jnp.ones((n_experts,), bool)
    present = jnp.zeros((n_experts,), bool).at[idx.reshape(-1)].set(True)
    slots = jnp.nonzero(present, size=m, fill_value=0)[0]
    return slots, jnp.arange(m) < present.sum()


def experts_grouped(x, up, down, weights, idx):
    """Grouped dispatch: each distinct chosen expert runs once over all the call's tokens (dense over the
    chosen experts), weighted per (expert, token) by the router weight, zero where not chosen. Weights are
    read (or, with fewer slots than experts, gathered) once per expert per call, never per token; the
    matmuls are batch-major over experts, the layout the expert stacks are stored in. Work is
    min(E, t·k)·t expert-token products: for decode-sized calls."""
    slots, used = chosen_experts(idx, up.shape[0])
    if slots.shape[0] < up.shape[0]:
        up, down = up[slots], down[slots]
    chose = (idx[:, :, None] == slots) & used                                   # (t, k, m)
    combine = jnp.einsum("tk,tkm->mt", weights, chose.astype(jnp.float32))
    xs = jnp.broadcast_to(x, (slots.shape[0],) + x.shape)                       # (m, t, d)
    h = relu_squared(_einsum_f32("mtd,mdf->mtf", xs, up))
    out = _einsum_f32("mtf,mfd->mtd", h.astype(x.dtype), down)
    return jnp.einsum("mt,mtd->td", combine, out)


def experts_gather(x, up, down, weights, idx):
    """Legacy gather dispatch: each token's k experts' weights are gathered and applied to it alone (a
    private copy of k experts' weights per token)."""
    h = relu_squared(_einsum_f32("td,tkdf->tkf", x, up[idx]))
    out = _einsum_f32("tkf,tkfd->tkd", h.astype(x.dtype), down[idx])
    return jnp.einsum("tk,tkd->td", weights, out)


def experts_ragged(x, up, down, weights, idx):
    """Sorted dispatch: each token copy goes to its expert's contiguous group; one ragged matmul per proj.

    An index equal to the number of experts is an overflow bucket: sorted last, outside every group, so
    its rows come out zero (used by the expert-parallel dispatch for other devices' experts). `ragged_dot`
    leaves rows outside every group undefined (possibly NaN, and 0·NaN = NaN), so they are masked with
    `where`, never zeroed by their 0 weight."""
    t, k = idx.shape
    flat_expert = idx.reshape(-1)
    order = jnp.argsort(flat_expert, stable=True)
    token_of = order // k
    in_group = flat_expert[order] < up.shape[0]
    group_sizes = jnp.bincount(flat_expert, length=up.shape[0]).astype(jnp.int32)
    h = jax.lax.ragged_dot(x[token_of], up, group_sizes, preferred_element_type=jnp.float32)
    out = jax.lax.ragged_dot(relu_squared(h).astype(x.dtype), down, group_sizes,
                             preferred_element_type=jnp.float32)
    out = jnp.where(in_group[:, None], out * weights.reshape(-1)[order][:, None], 0.0)
    return jnp.zeros((t, x.shape[1]), jnp.float32).at[token_of].add(out)


def experts_expert_parallel(x, up, down, weights, idx):
    """Experts split over the current mesh's `expert` axis; tokens replicated; one psum."""
    mesh = jax.sharding.get_abstract_mesh()
    if EXPERT_AXIS not in mesh.axis_names:
        raise ValueError(f"the expert_parallel MoE needs a mesh with an {EXPERT_AXIS!r} axis set by jax.set_mesh; "
                         f"current mesh axes: {mesh.axis_names}")
    n_experts, devices = up.shape[0], mesh.shape[EXPERT_AXIS]
    if n_experts % devices:
        raise ValueError(f"{n_experts} experts cannot be split evenly over {devices} devices")
    P = jax.sharding.PartitionSpec

    def local(x, up_local, down_local, weights, idx):
        n_local = up_local.shape[0]
        local_idx = idx - jax.lax.axis_index(EXPERT_AXIS) * n_local
        mine = (local_idx >= 0) & (local_idx < n_local)
        out = experts_ragged(x, up_local, down_local, jnp.where(mine, weights, 0.0),
                             jnp.where(mine, local_idx, n_local))
        return jax.lax.psum(out, EXPERT_AXIS)

    return jax.shard_map(local, in_specs=(P(), P(EXPERT_AXIS), P(EXPERT_AXIS), P(), P()), out_specs=P())(
        x, up, down, weights, idx)


_DISPATCH = {"ragged": experts_ragged, "dense": experts_dense, "grouped": experts_grouped, "gather": experts_gather,
             "expert_parallel": experts_expert_parallel}


class MoE(nn.Module):
    config: NemotronHConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    impl: MoEImpl = "auto"

    @nn.compact
    def __call__(self, x: Float[Array, "b l d"]) -> Float[Array, "b l d"]:
        cfg = self.config
        d, e, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        init = nn.initializers.lecun_normal()
        gate_weight = self.param("gate_weight", init, (e, d), self.param_dtype)
        correction_bias = self.param("e_score_correction_bias", nn.initializers.zeros, (e,), jnp.float32)
        up = self.param("experts_up", init, (e, d, f), self.param_dtype).astype(self.dtype)
        down = self.param("experts_down", init, (e, f, d), self.param_dtype).astype(self.dtype)

        tokens = x.reshape(-1, d)
        weights, idx = route(tokens, gate_weight, correction_bias, cfg)
        # Expert load (assignments per expert) for training's load balancing; recorded only when the
        # caller asks for the "intermediates" collection (training.load_balance).
        self.sow("intermediates", "tokens_per_expert", jnp.zeros((e,), jnp.float32).at[idx.reshape(-1)].add(1.0))
        impl = resolve_moe_impl(self.impl, tokens.shape[0], jax.default_backend())
        dispatch = _DISPATCH.get(impl)
        if dispatch is None:
            raise ValueError(f"unknown MoE impl {self.impl!r}; expected auto or one of {sorted(_DISPATCH)}")
        routed = dispatch(tokens.astype(self.dtype), up, down, weights, idx).astype(x.dtype).reshape(x.shape)
        shared = ReluSquaredMLP(d, cfg.moe_shared_expert_intermediate_size, self.dtype, self.param_dtype,
                                name="shared_experts")(x)
        return routed + shared
