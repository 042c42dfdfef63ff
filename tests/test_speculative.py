"""Self-speculative decoding (issue 13): AR's output at several tokens per context pass.

References come from the definitions: `generate_ar` (greedy tokens and log-probs), the AR sampling
distribution written out from its definition (softmax(logits / T) on the top-k / top-p set), and a fresh
prefill of the accepted text (rollback)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax.config import tiny
from twotower_jax.ops.ssd import ssd_sequential, ssd_state_at
from twotower_jax.sampling.ar import generate_ar
from twotower_jax.sampling.speculative import accept_drafts, generate_self_speculative, roll_back
from twotower_jax.sampling.tokens import SamplingParams
from twotower_jax.tower import truncate_extension
from twotower_jax.two_tower import TwoTower

CONFIG = tiny(pattern="M*EM-*E", chunk_size=4)
MODEL = TwoTower(CONFIG)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12]]
EOS = 29       # with these params: rows 0 and 1 hit it at their 3rd token, row 2 runs to the end
N_NEW = 11     # not a multiple of the block size


@pytest.fixture(scope="module")
def params():
    return MODEL.random_params(seed=11, scale=0.6)


@pytest.fixture(scope="module")
def ar_reference(params):
    return generate_ar(MODEL, params, PROMPTS, N_NEW, eos_token_id=EOS)


def _same_as_ar(result, ar):
    assert result.tokens == ar.tokens
    for got, want in zip(result.logprobs, ar.logprobs):
        # a chunked extension vs one-token decode steps: fp32 rounding only
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_greedy_equals_ar_on_random_two_tower(params, ar_reference):
    assert [len(t) for t in ar_reference.tokens] == [3, 3, N_NEW]            # EOS rows and a full row
    result = generate_self_speculative(MODEL, params, PROMPTS, N_NEW, block_size=4, eos_token_id=EOS)
    _same_as_ar(result, ar_reference)
    s = result.stats
    hist = s["acceptance_histogram"]
    assert sum(hist) == sum(s["row_denoiser_passes"])                      # one draft pass per row-cycle
    assert sum((k + 1) * c for k, c in enumerate(hist)) == s["generated_tokens"]
    assert s["context_passes"] == 1 + s["verify_passes"] + s["rollback_passes"]
    assert s["generated_tokens"] == sum(len(t) for t in ar_reference.tokens)


@pytest.mark.parametrize("placement", ["sharded", "towers"])
def test_greedy_equals_ar_on_two_device_placements(params, ar_reference, placement):
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices")
    result = generate_self_speculative(MODEL, params, PROMPTS, N_NEW, block_size=4, eos_token_id=EOS,
                                       placement=placement)
    _same_as_ar(result, ar_reference)
    assert result.stats["placement"] == placement


def test_greedy_equals_ar_on_demo_model():
    from twotower_jax.checkpoint.load import load_checkpoint
    from twotower_jax.data import EOS_ID, MASK_ID, TASK_KINDS, eval_set, prompt_ids
    _, config, demo_params = load_checkpoint("demo")
    demo = TwoTower(config)
    prompts = [prompt_ids(t) for t in eval_set(TASK_KINDS, 6, seed=1234)]
    ar = generate_ar(demo, demo_params, prompts, 13, eos_token_id=EOS_ID)
    result = generate_self_speculative(demo, demo_params, prompts, 13, block_size=8, eos_token_id=EOS_ID,
                                       mask_token_id=MASK_ID)
    _same_as_ar(result, ar)
    assert sum(result.stats["acceptance_histogram"][1:]) > 0              # drafts do get accepted
    assert result.stats["tokens_per_verify_pass"] > 1
    # rollback without a second pass: every context pass after the prompt is a verify pass
    assert result.stats["rollback_passes"] == 0 and result.stats["rollback"] == "states"
    assert result.stats["tokens_per_context_pass"] == result.stats["tokens_per_verify_pass"]


def test_logprob_gap_is_ars_own_chunk_vs_step_rounding():
    """Where the ~1e-5 log-prob differences come from. Self-speculation's log-probs are the context tower's
    over a chunk (the verify pass); `generate_ar`'s are one-token decode steps (and its first token a
    prefill). The same tokens' log-probs from AR's own prefill of its own output text differ from its
    decode steps by the same order (fp32 evaluation order: blocked matmuls, chunked scan and attention over
    16 positions vs 1; ~1e-6 relative to logits of size ~10). So the check is: identical tokens, and every
    log-prob within 1e-5 · (1 + |log p|) of AR's (numpy's allclose with atol = rtol = 1e-5, as for the
    other models; measured on 64 tasks of an earlier demo at S = 16: max 1.29e-5 absolute at log p = −1.06,
    6.2e-6 in that unit; here ~1.2e-6), while AR's own prefill-vs-decode gap is of the same order (< 5e-5).
    A real error (a log-prob read at the wrong position, of the wrong token, or from scaled logits) is ≥ 1e-2
    here.
    The prompts stop after the first letter or digit of each task's operand: the demo model answers whole
    prompts so surely that its greedy log-probs are 0.0 in float32 (no gap to see), while the letters it
    must guess next keep them away from 0."""
    from twotower_jax.checkpoint.load import load_checkpoint
    from twotower_jax.data import EOS_ID, MASK_ID, TASK_KINDS, ByteTokenizer, eval_set
    _, config, demo_params = load_checkpoint("demo")
    demo = TwoTower(config)
    prompts = [ByteTokenizer().encode(t.prompt[:t.prompt.index(" ") + 2], bos=True)
               for t in eval_set(TASK_KINDS, 16, seed=1234)]
    ar = generate_ar(demo, demo_params, prompts, 16, eos_token_id=EOS_ID)
    spec = generate_self_speculative(demo, demo_params, prompts, 16, block_size=16, eos_token_id=EOS_ID,
                                     mask_token_id=MASK_ID)
    assert spec.tokens == ar.tokens
    texts = [p + g for p, g in zip(prompts, ar.tokens)]
    width = max(map(len, texts)) - 1
    tokens, valid = np.zeros((len(texts), width), np.int32), np.zeros((len(texts), width), bool)
    for r, t in enumerate(texts):     # left-padded: padding is skipped exactly (tests/test_two_tower.py)
        tokens[r, width - len(t) + 1:], valid[r, width - len(t) + 1:] = t[:-1], True
    logits, _ = demo.context.prefill(demo_params["context"], jnp.asarray(tokens), jnp.asarray(valid))
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    ar_gap = spec_gap = 0.0
    for r, (p, generated, ar_logp, spec_logp) in enumerate(zip(prompts, ar.tokens, ar.logprobs, spec.logprobs)):
        at = width - len(texts[r]) + len(p) + np.arange(len(generated))
        prefill_logp = logp[r, at, generated]
        ar_gap = max(ar_gap, float(np.abs(prefill_logp - np.asarray(ar_logp)).max()))
        spec_gap = max(spec_gap, float(np.abs(np.asarray(spec_logp) - np.asarray(ar_logp)).max()))
    print(f"\nmax |AR prefill − AR decode| {ar_gap:.3g}, max |self-speculative − AR| {spec_gap:.3g}")
    assert 0 < ar_gap < 5e-5
    _same_as_ar(spec, ar)


# ---- the acceptance step: output distribution = AR sampling's ----------------------------------------

def _target(logits, temperature, top_k, top_p):
    """softmax(logits / T) restricted to the top-k tokens, then to the smallest most-likely set of mass
    ≥ top_p, renormalised (float64, from the definition)."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = np.zeros(len(p), bool)
    order = np.argsort(-z, kind="stable")
    keep[order[:top_k or len(p)]] = True
    p = np.where(keep, p, 0)
    p /= p.sum()
    mass = 0.0
    nucleus = np.zeros(len(p), bool)
    for i in order:
        if keep[i] and mass < top_p:
            nucleus[i] = True
            mass += p[i]
    p = np.where(nucleus, p, 0)
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 3, 0.9)])
def test_acceptance_step_gives_ar_sampling_distribution(temperature, top_k, top_p):
    """One cycle with block [last, d1, d2] over a 5-token vocabulary: the chance of every committed prefix
    (x; d1 y; d1 d2 z) must equal AR's p0(x), p0(d1) p1(y), p0(d1) p1(d2) p2(z) under the transformed
    distributions p_i of the cycle's logits. 200k seeded cycles; each of the ≤ 15 events checked at
    5 binomial standard deviations (+1e-4): a false alarm for a correct sampler has probability < 1e-5."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (3, 5)).astype(np.float32)
    drafts = np.array([1, 2], np.int32)
    n = 200_000
    sampling = SamplingParams(temperature, top_k, top_p)
    keys = jax.vmap(jax.random.key)(jnp.arange(n, dtype=jnp.uint32))
    a, tokens = jax.jit(lambda k: accept_drafts(jnp.broadcast_to(jnp.asarray(logits), (n, 3, 5)),
                                                jnp.broadcast_to(jnp.asarray(drafts), (n, 2)), k, sampling))(keys)
    a, tokens = np.asarray(a), np.asarray(tokens)
    assert ((tokens[:, :2] == drafts) | (np.arange(2) >= a[:, None])).all()      # accepted = the drafts
    p = [_target(logits[i], temperature, top_k, top_p) for i in range(3)]
    expected, observed = {}, {}
    for x in range(5):
        expected[(x,)] = p[0][x]
        observed[(x,)] = np.mean(tokens[:, 0] == x)
    for y in range(5):
        expected[(1, y)] = p[0][1] * p[1][y]
        observed[(1, y)] = np.mean((a >= 1) & (tokens[:, 1] == y))
        expected[(1, 2, y)] = p[0][1] * p[1][2] * p[2][y]
        observed[(1, 2, y)] = np.mean((a >= 2) & (tokens[:, 2] == y))
    for event, want in expected.items():
        tolerance = 5 * np.sqrt(want * (1 - want) / n) + 1e-4
        assert abs(observed[event] - want) <= tolerance, (event, observed[event], want)


def test_acceptance_step_greedy():
    logits = jnp.asarray(np.eye(6, 8, k=1, dtype=np.float32)[None].repeat(3, 0))     # argmax at i: token i + 1
    drafts = jnp.asarray([[1, 2, 3, 4, 5], [1, 2, 7, 4, 5], [0, 2, 3, 4, 5]], jnp.int32)
    a, tokens = accept_drafts(logits, drafts, jax.vmap(jax.random.key)(jnp.arange(3)), SamplingParams())
    assert a.tolist() == [5, 2, 0]
    assert tokens.tolist() == [[1, 2, 3, 4, 5, 6]] * 3


# ---- rollback: the cache after a cycle = a fresh prefill of the accepted text -------------------------

def test_ssd_state_at_equals_the_sequential_scan_of_each_prefix():
    """`ssd_state_at(index=k)` = the final state of the reference recurrence run over the first k positions
    (a padded position, dt = 0 and x = 0, included), for every k and per row; fp32, ≤ 1e-5 relative."""
    rng = np.random.default_rng(3)
    b, l, h, p, g, n = 2, 7, 4, 3, 2, 5
    x = rng.normal(size=(b, l, h, p)).astype(np.float32)
    dt = rng.uniform(0.05, 1.5, size=(b, l, h)).astype(np.float32)
    dt[1, 2] = 0.0
    x[1, 2] = 0.0
    A = -rng.uniform(0.2, 2.0, size=h).astype(np.float32)
    B = rng.normal(size=(b, l, g, n)).astype(np.float32)
    init = rng.normal(size=(b, h, p, n)).astype(np.float32)
    sequential = jax.jit(ssd_sequential)   # one compile per prefix length (eagerly: each op, ~110 compiles)
    for k in range(l + 1):
        got = np.asarray(ssd_state_at(x, dt, A, B, init, jnp.asarray([k, l - k])))
        for r, kk in enumerate([k, l - k]):
            _, want = sequential(x[r:r + 1, :kk], dt[r:r + 1, :kk], A, B[r:r + 1, :kk], B[r:r + 1, :kk],
                                 init[r:r + 1])
            np.testing.assert_allclose(got[r], np.asarray(want[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rollback", ["states", "replay"])
def test_rollback_equals_fresh_prefill_of_accepted_text(params, rollback):
    context, cp = MODEL.context, params["context"]
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    s = 5
    # each row's own greedy continuation, so drafts are right up to a chosen point
    ar = generate_ar(MODEL, params, prompts, s)
    tokens = np.zeros((2, 4), np.int32)
    valid = np.zeros((2, 4), bool)
    for r, p in enumerate(prompts):
        tokens[r, 4 - (len(p) - 1):] = p[:-1]
        valid[r, 4 - (len(p) - 1):] = True
    _, pre = context.prefill(cp, jnp.asarray(tokens), jnp.asarray(valid), capacity=4 + 2 * s)
    wrong = lambda t: (t + 1) % CONFIG.vocab_size                               # noqa: E731
    drafts = np.array([ar.tokens[0][:2] + [wrong(ar.tokens[0][2])] + ar.tokens[0][3:4],
                       [wrong(ar.tokens[1][0])] + ar.tokens[1][1:4]], np.int32)
    block = jnp.asarray(np.concatenate([[[p[-1]] for p in prompts], drafts], 1).astype(np.int32))
    logits, _ = context.extend(cp, block, jax.tree.map(jnp.copy, pre), logits_at="all")
    # jitted, as the sampler runs them (eagerly each would compile its ops one by one)
    a, committed = jax.jit(accept_drafts, static_argnums=3)(logits, block[:, 1:],
                                                            jax.vmap(jax.random.key)(jnp.arange(2)), SamplingParams())
    assert np.asarray(a).tolist() == [2, 0]
    if rollback == "replay":
        cache = jax.jit(roll_back, static_argnums=0)(context, cp, block, pre, a, jnp.asarray([True, True]))
    else:
        _, extended, extensions = jax.jit(context.extend_truncatable)(cp, block, pre)
        cache = jax.jit(truncate_extension)(extended, extensions, pre.length, a + 1)
    assert int(cache.length) == 4 + 3
    for r, p in enumerate(prompts):
        text = p + drafts[r, :int(a[r])].tolist()          # cache holds the text up to, not incl., the new last
        _, fresh = context.prefill(cp, jnp.asarray([text]), capacity=len(text))
        kv = np.asarray(cache.key_valid[r])
        assert kv.sum() == len(text)
        for mine, ref in zip(cache.layers, fresh.layers):
            if mine is None:
                continue
            if hasattr(mine, "k"):
                np.testing.assert_allclose(np.asarray(mine.k[r])[kv], np.asarray(ref.k[0]), atol=1e-5)
                np.testing.assert_allclose(np.asarray(mine.v[r])[kv], np.asarray(ref.v[0]), atol=1e-5)
            else:
                np.testing.assert_allclose(np.asarray(mine.conv[r]), np.asarray(ref.conv[0]), atol=1e-5)
                np.testing.assert_allclose(np.asarray(mine.ssm[r]), np.asarray(ref.ssm[0]), atol=1e-5)


def test_rejects_bad_arguments(params):
    with pytest.raises(ValueError, match="block_size"):
        generate_self_speculative(MODEL, params, PROMPTS, 4, block_size=1)
    with pytest.raises(ValueError, match="draft_steps"):
        generate_self_speculative(MODEL, params, PROMPTS, 4, block_size=4, draft_steps=4)
    with pytest.raises(ValueError, match="TwoTower"):
        generate_self_speculative(MODEL.context, params["context"], PROMPTS, 4)


# ---- a release-layout checkpoint through the real loader ---------------------------------------------

def test_greedy_equals_ar_on_release_layout_checkpoint(tmp_path):
    """The release's tensor names and layout (SPEC §6: context_tower.* / denoiser_tower.* / t_embedder /
    t_block / scale_shift_tables, torch [out, in], one tensor per expert), BF16 weights with float32 router
    biases, several safetensors shards with an index, the pattern as `hybrid_override_pattern`; the real
    config's structure (8 groups, GQA, its first 7 layers `MEMEM*E`) at shrunk sizes. Loaded by
    `load_checkpoint` (float32 compute), self-speculation = AR token for token, rows of different lengths,
    an EOS row and max_new_tokens not a multiple of S."""
    import json

    from twotower_jax.checkpoint.hf import save_hf_two_tower
    from twotower_jax.checkpoint.load import checkpoint_dtype, load_checkpoint
    from twotower_jax.checkpoint.mapping import keeps_float32
    from twotower_jax.config import nano_30b_a3b
    real = nano_30b_a3b()
    config = real.replace(
        pattern=real.pattern[:7], vocab_size=256, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
        head_dim=8, mamba_num_heads=16, mamba_head_dim=4, ssm_state_size=4, n_groups=8, chunk_size=8,
        n_routed_experts=16, num_experts_per_tok=6, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48)
    assert config.pattern == "MEMEM*E"
    params = TwoTower(config).random_params(seed=5, scale=0.5)

    def as_release(path, x):
        return x if keeps_float32(tuple(k.key for k in path)) else np.asarray(jnp.asarray(x).astype(jnp.bfloat16))
    save_hf_two_tower(tmp_path, config, jax.tree_util.tree_map_with_path(as_release, params), max_shard_bytes=200_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) >= 3 and (tmp_path / "model.safetensors.index.json").exists()
    names = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert {"context_tower.layers.5.mixer.q_proj.weight", "denoiser_tower.layers.1.mixer.experts.15.up_proj.weight",
            "context_lm_head.weight", "lm_head.weight", "t_block.1.weight", "scale_shift_tables.6"} <= set(names)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf.pop("layers_block_type", None)
    hf["hybrid_override_pattern"] = config.pattern
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert checkpoint_dtype(tmp_path) == jnp.bfloat16
    kind, loaded_config, loaded = load_checkpoint(tmp_path)
    assert kind == "two_tower" and loaded_config.pattern == config.pattern
    model = TwoTower(loaded_config)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    free = generate_ar(model, loaded, prompts, 9)
    eos = free.tokens[0][3]                              # row 0 stops at its 4th token (others maybe earlier)
    ar = generate_ar(model, loaded, prompts, 9, eos_token_id=eos)
    assert ar.tokens[0][-1] == eos and len(ar.tokens[0]) <= 4
    result = generate_self_speculative(model, loaded, prompts, 9, block_size=4, eos_token_id=eos)
    _same_as_ar(result, ar)


# ---- sampling through the whole generator: AR's distribution -------------------------------------------

@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.8, 4)])
def test_generator_samples_ars_distribution(temperature, top_k):
    """The whole generator at temperature > 0 on an 8-token vocabulary: 6000 rows of one prompt with seeds
    0..5999, three tokens each (block S = 3: a cycle's drafts, accepts, rejections and resampling, and a
    second cycle). The reference is AR sampling's exact joint distribution of the three tokens, enumerated
    from the context tower's own prefill logits (512 texts) and the definition of the temperature / top-k
    transform (`_target`, float64). Each of the 8 + 64 + 512 prefix events is checked at 5 binomial
    standard deviations + 2e-4: a false alarm for an exact sampler has probability < 584 × 5.7e-7 ≈ 3e-4
    (seeded: the run is deterministic)."""
    config = tiny(pattern="M*E", vocab_size=8, chunk_size=4)
    model = TwoTower(config)
    params = model.random_params(seed=2, scale=0.4)
    prompt, n, v = [5, 6, 1], 6000, config.vocab_size
    result = generate_self_speculative(model, params, [prompt] * n, 3, block_size=3, temperature=temperature,
                                       top_k=top_k, seed=list(range(n)))
    tokens = np.asarray(result.tokens)
    assert tokens.shape == (n, 3)
    assert sum(result.stats["acceptance_histogram"][1:]) > 0        # drafts are accepted at times
    texts = np.array([prompt + [a, b] for a in range(v) for b in range(v)], np.int32)
    logits, _ = model.context.prefill(params["context"], jnp.asarray(texts))
    logits = np.asarray(logits)
    p1 = _target(logits[0, 2], temperature, top_k, 1.0)
    p2 = np.array([_target(logits[a * v, 3], temperature, top_k, 1.0) for a in range(v)])       # [a, b]
    p3 = np.array([_target(logits[i, 4], temperature, top_k, 1.0) for i in range(v * v)]).reshape(v, v, v)
    joint = p1[:, None, None] * p2[:, :, None] * p3

    def check(observed, expected):
        tolerance = 5 * np.sqrt(expected * (1 - expected) / n) + 2e-4
        assert (np.abs(observed - expected) <= tolerance).all(), np.max(np.abs(observed - expected) - tolerance)
    check(np.bincount(tokens[:, 0], minlength=v) / n, joint.sum((1, 2)))
    check(np.bincount(tokens[:, 0] * v + tokens[:, 1], minlength=v * v) / n, joint.sum(2).reshape(-1))
    check(np.bincount((tokens[:, 0] * v + tokens[:, 1]) * v + tokens[:, 2], minlength=v ** 3) / n, joint.reshape(-1))


def test_cli_self_speculative_is_ar(capsys):
    """`python -m twotower_jax.generate --mode self_speculative` (the engine path, EOS stop) prints AR's tokens."""
    import json

    from twotower_jax import generate
    argv = ["--checkpoint", "demo", "--prompt", "copy abc=", "--prompt", "reverse abcd=", "--json",
            "--max-new-tokens", "10", "--block-size", "4"]
    outputs = {}
    for mode in ("ar", "self_speculative"):
        assert generate.main(argv + ["--mode", mode]) == 0
        outputs[mode] = json.loads(capsys.readouterr().out)
    assert outputs["self_speculative"]["tokens"] == outputs["ar"]["tokens"] and outputs["ar"]["tokens"][0]
