"""TwoTower: cross-tower plumbing, the three samplers against references and invariants, checkpoints."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusion_reference import reference_mask_diffusion

from twotower_jax.checkpoint.hf import CheckpointError, load_hf_two_tower, save_hf_tower, save_hf_two_tower
from twotower_jax.config import tiny
from twotower_jax.layers.adaln import TimestepEmbedder, timestep_sinusoid
from twotower_jax.sampling.ar import generate_ar, generate_mock_ar
from twotower_jax.sampling.diffusion import generate_mask_diffusion
from twotower_jax.two_tower import TwoTower, two_tower_params_from_tower

CONFIG = tiny(pattern="M*EM-*E", chunk_size=4)
MODEL = TwoTower(CONFIG)


@pytest.fixture(scope="module")
def params():
    return MODEL.random_params(seed=11, scale=0.6)


@pytest.fixture(scope="module")
def equal_towers_checkpoint(tmp_path_factory, params):
    """A TwoTower checkpoint whose denoiser is a copy of its context tower (plus adaLN tensors)."""
    directory = tmp_path_factory.mktemp("equal_towers")
    save_hf_two_tower(directory, CONFIG, two_tower_params_from_tower(params["context"], params["denoiser"]))
    return directory


# ---- the denoiser forward, against a direct layer-by-layer computation --------------------------------

def _rms(x, w, eps=1e-5):
    return w * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)


def _silu(x):
    return x / (1 + np.exp(-x))


def direct_denoise(params, prefix, block, t):
    """Runs the context tower over `prefix` and the denoiser over `block`, layer by layer, from the params
    alone (float64 NumPy; the MoE via the module). Attention: [context K/V ; block K/V], no mask. Mamba:
    seeded with the context layer's state after the prefix, computed by its own sequential recurrence."""
    from twotower_jax.layers.moe import MoE
    c = CONFIG
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    ctx, den = P["context"], P["denoiser"]
    hc = ctx["embeddings"]["embedding"][prefix]                    # (p, d) context stream
    hd = den["embeddings"]["embedding"][block]                     # (s, d) denoiser stream
    emb = np.asarray(timestep_sinusoid(jnp.asarray([t * 1000.0])), np.float64)[0]
    te = den["t_embedder"]
    temb = _silu(emb @ te["mlp_0"]["kernel"] + te["mlp_0"]["bias"]) @ te["mlp_2"]["kernel"] + te["mlp_2"]["bias"]
    cond = (_silu(temb) @ den["t_block_1"]["kernel"] + den["t_block_1"]["bias"]).reshape(3, c.hidden_size)

    def attention(x, w, keys_from):                                # keys_from: (context normed x or None)
        q = (x @ w["q_proj"]["kernel"]).reshape(len(x), c.num_attention_heads, c.head_dim)
        kv_src = x if keys_from is None else np.concatenate([keys_from[0], x])
        k = (kv_src @ w["k_proj"]["kernel"]).reshape(len(kv_src), c.num_key_value_heads, c.head_dim)
        v = (kv_src @ w["v_proj"]["kernel"]).reshape(len(kv_src), c.num_key_value_heads, c.head_dim)
        if keys_from is not None:                                  # context K/V come from the context weights
            k[:len(keys_from[0])] = keys_from[1]
            v[:len(keys_from[0])] = keys_from[2]
        rep = c.num_attention_heads // c.num_key_value_heads
        k, v = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(c.head_dim)
        if keys_from is None:                                      # the context tower is causal
            s = np.where(np.tril(np.ones((len(x), len(x)), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.einsum("hqk,khd->qhd", p, v).reshape(len(x), -1) @ w["o_proj"]["kernel"]

    def mamba(x, w, state=None):
        """Returns (out, (last K-1 raw xBC columns, final ssm state)); `state` seeds conv and ssm."""
        inner, gn, H, Pd, N = c.mamba_intermediate_size, c.n_groups * c.ssm_state_size, c.mamba_num_heads, \
            c.mamba_head_dim, c.ssm_state_size
        proj = x @ w["in_proj"]["kernel"]
        z, xbc, dt = proj[:, :inner], proj[:, inner:inner + c.conv_dim], proj[:, inner + c.conv_dim:]
        hist = np.zeros((c.conv_kernel - 1, c.conv_dim)) if state is None else state[0]
        full = np.concatenate([hist, xbc])
        conv = np.stack([(full[i:i + c.conv_kernel] * w["conv1d"]["kernel"]).sum(0) for i in range(len(x))])
        conv = _silu(conv + w["conv1d"]["bias"])
        xs, B, C = conv[:, :inner].reshape(-1, H, Pd), conv[:, inner:inner + gn], conv[:, inner + gn:]
        B, C = B.reshape(-1, c.n_groups, N), C.reshape(-1, c.n_groups, N)
        dt = np.log1p(np.exp(dt + w["dt_bias"]))
        A = -np.exp(w["A_log"])
        h = np.zeros((H, Pd, N)) if state is None else state[1].copy()
        y = np.zeros_like(xs)
        for ti in range(len(x)):
            for hh in range(H):
                g = hh // (H // c.n_groups)
                h[hh] = np.exp(dt[ti, hh] * A[hh]) * h[hh] + dt[ti, hh] * np.outer(xs[ti, hh], B[ti, g])
                y[ti, hh] = h[hh] @ C[ti, g] + w["D"][hh] * xs[ti, hh]
        y = y.reshape(len(x), inner) * _silu(z)
        y = y.reshape(len(x), c.n_groups, -1)
        y = (y / np.sqrt((y ** 2).mean(-1, keepdims=True) + 1e-5)).reshape(len(x), inner) * w["norm"]["weight"]
        return y @ w["out_proj"]["kernel"], (full[-(c.conv_kernel - 1):], h)

    def ffn(x, w, layer_type):
        if layer_type == "-":
            return (np.maximum(x @ w["up_proj"]["kernel"], 0) ** 2) @ w["down_proj"]["kernel"]
        moe = jax.jit(MoE(c, impl="dense").apply)   # jitted: eagerly, the module dispatches op by op
        out = moe({"params": jax.tree.map(jnp.asarray, w)}, jnp.asarray(x[None], jnp.float32))
        return np.asarray(out[0], np.float64)

    for i, layer_type in enumerate(c.pattern):
        lc, ld = ctx[f"layers_{i}"], den[f"layers_{i}"]
        shift, scale, gate = ld["scale_shift_table"] + cond
        xc = _rms(hc, lc["norm"]["weight"])
        if layer_type in "M*":
            xd = _rms(hd * (1 + scale) + shift, ld["norm"]["weight"])
        else:
            xd = _rms(hd, ld["norm"]["weight"]) * (1 + scale) + shift
        if layer_type == "*":
            kc = (xc @ lc["mixer"]["k_proj"]["kernel"]).reshape(len(xc), c.num_key_value_heads, c.head_dim)
            vc = (xc @ lc["mixer"]["v_proj"]["kernel"]).reshape(len(xc), c.num_key_value_heads, c.head_dim)
            out_c = attention(xc, lc["mixer"], None)
            out_d = attention(xd, ld["mixer"], (xc, kc, vc))
        elif layer_type == "M":
            out_c, state = mamba(xc, lc["mixer"])
            out_d, _ = mamba(xd, ld["mixer"], state)
        else:
            out_c, out_d = ffn(xc, lc["mixer"], layer_type), ffn(xd, ld["mixer"], layer_type)
        hc, hd = hc + out_c, hd + gate * out_d
    return _rms(hd, den["norm_f"]["weight"]) @ den["lm_head"]["kernel"]


def test_denoiser_block_equals_direct_layer_by_layer_computation(params):
    rng = np.random.default_rng(5)
    prefix = rng.integers(4, CONFIG.vocab_size, 11)     # 11 > chunk 4: the Mamba seed spans several chunks
    block = np.array([3, 17, 3, 3, 42, 3])
    t = 4 / 6
    _, cache = MODEL.context.prefill(params["context"], jnp.asarray([prefix]), capacity=16)
    ours = MODEL.denoise(params, jnp.asarray([block]), cache, jnp.asarray([t], jnp.float32))[0]
    expected = direct_denoise(params, prefix, block, t)
    assert np.abs(np.asarray(ours) - expected).max() / np.abs(expected).max() < 1e-4
    # and the conditioning matters: another t gives other logits
    other = MODEL.denoise(params, jnp.asarray([block]), cache, jnp.asarray([0.1], jnp.float32))[0]
    assert np.abs(np.asarray(other) - expected).max() > 1e-2


def test_timestep_embedding_layout_and_bf16_rounding():
    t = jnp.asarray([0.25, 1.0])
    emb = np.asarray(timestep_sinusoid(t * 1000))
    freqs = np.exp(-np.log(10000.0) * np.arange(128) / 128)
    # float32 arguments of up to 1000 rad carry ~6e-5 rounding; the layout (cos first) is what is checked.
    np.testing.assert_allclose(emb[:, :128], np.cos(np.asarray(t)[:, None] * 1000 * freqs), atol=2e-4)
    np.testing.assert_allclose(emb[:, 128:], np.sin(np.asarray(t)[:, None] * 1000 * freqs), atol=2e-4)
    # bf16: t = 1/3 rounds to 0.333984375 and t·1000 to 334.0 — the embedder sees exactly that.
    module = TimestepEmbedder(8, dtype=jnp.bfloat16)
    p = module.init(jax.random.key(0), jnp.ones((1,)))
    a = module.apply(p, jnp.asarray([1 / 3], jnp.float32))
    b = module.apply(p, jnp.asarray([0.334], jnp.float32))
    c = TimestepEmbedder(8, dtype=jnp.float32).apply(p, jnp.asarray([1 / 3], jnp.float32))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a, np.float32) - np.asarray(c)).max() > 0


# ---- samplers ------------------------------------------------------------------------------------------

def test_mock_ar_equals_ar_when_denoiser_equals_context(equal_towers_checkpoint):
    config, loaded = load_hf_two_tower(equal_towers_checkpoint)
    model = TwoTower(config)
    prompts = [[5, 9, 14, 22, 31, 40, 7, 8, 60], [12], [70, 71, 72]]
    ar = generate_ar(model, loaded, prompts, 20)
    mock = generate_mock_ar(model, loaded, prompts, 20)
    assert mock.tokens == ar.tokens
    for a, b in zip(ar.logprobs, mock.logprobs):
        np.testing.assert_allclose(b, a, atol=1e-4)
    assert mock.stats["denoiser_passes"] == 20 and ar.stats["forward_passes"] == 20
    alone = generate_mock_ar(model, loaded, [prompts[1]], 20)  # batched == the row alone
    assert alone.tokens[0] == mock.tokens[1]
    np.testing.assert_allclose(alone.logprobs[0], mock.logprobs[1], atol=1e-4)


def test_mock_ar_differs_when_towers_differ(params):
    prompts = [[5, 9, 14, 22]]
    assert generate_mock_ar(MODEL, params, prompts, 12).tokens != generate_ar(MODEL, params, prompts, 12).tokens


DIFFUSION_CASES = [  # (max_new_tokens, block, steps, temperature, γ)
    (12, 4, 4, 0.0, 0.2),     # greedy, threshold active
    (10, 4, 2, 0.0, 0.05),    # fewer steps than positions: the ceil(n / steps left) floor; final block of 2
    (9, 3, 3, 0.8, 0.15),     # seeded Gumbel sampling
]


@pytest.mark.parametrize("max_new, block, steps, temperature, gamma", DIFFUSION_CASES)
def test_diffusion_matches_slow_reference_and_rows_alone(params, max_new, block, steps, temperature, gamma):
    prompts = [[5, 9, 14, 22, 31, 40, 7], [12, 13], [70, 71, 72, 73]]
    kw = dict(block_size=block, steps_per_block=steps, mask_token_id=3, temperature=temperature,
              confidence_threshold=gamma)
    batch = generate_mask_diffusion(MODEL, params, prompts, max_new, seed=100, **kw)
    commits_per_pass = set()
    for row, prompt in enumerate(prompts):
        tokens, den, ctx = reference_mask_diffusion(MODEL, params, prompt, max_new, eos_token_id=None,
                                                    seed=100 + row, **kw)
        assert batch.tokens[row] == tokens
        assert batch.stats["row_denoiser_passes"][row] == den
        assert batch.stats["row_context_passes"][row] == ctx
        commits_per_pass.add(round(len(tokens) / den, 3))
    alone = generate_mask_diffusion(MODEL, params, [prompts[1]], max_new, seed=101, **kw)
    assert alone.tokens[0] == batch.tokens[1]
    assert alone.stats["row_denoiser_passes"][0] == batch.stats["row_denoiser_passes"][1]
    assert alone.stats["denoiser_passes"] == alone.stats["row_denoiser_passes"][0]
    assert 3 not in {t for row in batch.tokens for t in row}  # MASK is never an output
    assert max(commits_per_pass) > 1  # the threshold committed several tokens in some pass


def test_diffusion_eos_per_row_matches_reference(params):
    prompts = [[5, 9, 14, 22, 31, 40, 7], [12, 13]]
    # Seeded sampling: this random model's greedy output degenerates into one repeated token.
    kw = dict(block_size=4, steps_per_block=4, mask_token_id=3, temperature=1.0, confidence_threshold=0.2)
    free = generate_mask_diffusion(MODEL, params, prompts, 12, **kw)
    eos = next(tok for tok in free.tokens[0][4:] if tok not in free.tokens[0][:4])  # first seen in block 2
    first = free.tokens[0].index(eos)
    stopped = generate_mask_diffusion(MODEL, params, prompts, 12, eos_token_id=eos, **kw)
    for row, prompt in enumerate(prompts):
        tokens, den, ctx = reference_mask_diffusion(MODEL, params, prompt, 12, eos_token_id=eos, seed=row, **kw)
        assert stopped.tokens[row] == tokens
        assert stopped.stats["row_denoiser_passes"][row] == den
        assert stopped.stats["row_context_passes"][row] == ctx
    assert stopped.tokens[0] == free.tokens[0][:first + 1]
    assert stopped.stats["row_context_passes"][0] == 1 + first // 4  # prefill + the blocks before the EOS one


@pytest.mark.parametrize("steps, gamma, passes_per_block", [(4, 1.0, 4), (4, 0.0, 1), (1, 0.9, 1)])
def test_commit_extremes(params, steps, gamma, passes_per_block):
    """γ = 1 with steps = block: exactly one token per pass. γ = 0, or one step: a block per pass."""
    result = generate_mask_diffusion(MODEL, params, [[5, 6, 7], [8]], 8, block_size=4, steps_per_block=steps,
                                     confidence_threshold=gamma)
    assert result.stats["row_denoiser_passes"] == [2 * passes_per_block] * 2
    assert result.stats["tokens_per_denoiser_pass"] == pytest.approx(4 / passes_per_block)
    assert result.stats["denoiser_passes"] == 2 * passes_per_block
    assert result.stats["context_passes"] == 2  # prefill + the first block; the last block is never fed back


def test_confidence_threshold_is_a_runtime_input(params):
    """One compiled program serves every γ (a sweep compiles once per (S, T)), each γ with its own commits."""
    kw = dict(block_size=4, steps_per_block=4, mask_token_id=3, prompt_width=5)
    one_per_pass = generate_mask_diffusion(MODEL, params, [[5, 6, 7]], 8, confidence_threshold=1.0, **kw)
    all_at_once = generate_mask_diffusion(MODEL, params, [[5, 6, 7]], 8, confidence_threshold=0.0, **kw)
    assert all_at_once.stats["compile_seconds"] == 0.0
    assert (one_per_pass.stats["denoiser_passes"], all_at_once.stats["denoiser_passes"]) == (8, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(confidence_threshold=1.5), r"confidence_threshold must be in \[0, 1\]"),
    (dict(confidence_threshold=-0.1), r"confidence_threshold must be in \[0, 1\]"),
    (dict(block_size=0), "block_size must be an integer >= 1"),
    (dict(steps_per_block=0), r"steps_per_block must be an integer in \[1, block_size=16\]"),
    (dict(steps_per_block=17), r"steps_per_block must be an integer in \[1, block_size=16\]"),
    (dict(mask_token_id=96), "mask_token_id 96 is outside the vocabulary"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
])
def test_diffusion_rejects_bad_arguments(params, kwargs, message):
    kwargs = {"max_new_tokens": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_mask_diffusion(MODEL, params, [[5, 6]], **kwargs)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate_mask_diffusion(MODEL, params, [[]], 8)


# ---- checkpoints -----------------------------------------------------------------------------------------

def test_two_tower_checkpoint_round_trip_and_missing_adaln(tmp_path, params):
    save_hf_two_tower(tmp_path / "ok", CONFIG, params, max_shard_bytes=50_000)
    config, loaded = load_hf_two_tower(tmp_path / "ok")
    assert config == CONFIG
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))
    from twotower_jax.checkpoint.hf import hf_tensors_from_params, write_hf_tensors
    from twotower_jax.checkpoint.mapping import two_tower_rules
    tensors = hf_tensors_from_params(two_tower_rules(CONFIG), params)
    del tensors["scale_shift_tables.4"], tensors["t_block.1.bias"]
    write_hf_tensors(tmp_path / "bad", CONFIG.to_hf_dict(), tensors)
    with pytest.raises(CheckpointError, match=r"2 missing tensor\(s\): scale_shift_tables.4, t_block.1.bias"):
        load_hf_two_tower(tmp_path / "bad")


def test_single_tower_checkpoint_cannot_load_as_two_tower(tmp_path, params):
    save_hf_tower(tmp_path, CONFIG, params["context"])
    with pytest.raises(CheckpointError, match="single-tower checkpoint"):
        load_hf_two_tower(tmp_path)


def test_fixed_prompt_width_changes_nothing_but_the_padding(params):
    prompts = [[5, 9, 14, 22], [12, 13]]
    kw = dict(block_size=4, steps_per_block=4, mask_token_id=3, confidence_threshold=0.2)
    # mock-AR pads through the same `_generate` as AR, so AR and diffusion cover both padding paths
    for generate, extra in ((generate_ar, {}), (generate_mask_diffusion, kw)):
        plain = generate(MODEL, params, prompts, 8, **extra)
        padded = generate(MODEL, params, prompts, 8, prompt_width=9, **extra)
        assert padded.tokens == plain.tokens, generate.__name__
        if plain.logprobs[0]:
            np.testing.assert_allclose(padded.logprobs[0], plain.logprobs[0], atol=1e-5)
    with pytest.raises(ValueError, match="prompt_width 3 is shorter than the longest prompt"):
        generate_ar(MODEL, params, prompts, 8, prompt_width=3)
