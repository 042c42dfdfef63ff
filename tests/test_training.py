"""Training: the parallel diffusion objective equals the inference-time denoiser block by block, the
context tower stays frozen bit for bit, resume is exact, and the pieces (noise, AR loss, schedule) hold."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax.config import tiny
from twotower_jax.tower import Impl
from twotower_jax.training.loop import TrainConfig, read_metrics, train, wsd_schedule
from twotower_jax.training.objective import (ar_loss, blockwise_context, denoiser_logits, diffusion_loss,
                                             noise_tokens)
from twotower_jax.two_tower import TwoTower, identity_adaln_params, two_tower_params_from_tower

MASK = 3


def jitted(fn, **static):
    """`fn` with `static` bound, compiled: the objectives run inside a jitted train step, and run eagerly
    they dispatch op by op (436 small compiles for one diffusion loss of the tiny model, ~30 s here)."""
    return jax.jit(functools.partial(fn, **static))


@pytest.fixture(scope="module")
def two_tower():
    # chunk 4 < block 8 < length 40: scans cross chunk boundaries inside blocks and start from seeded states.
    model = TwoTower(tiny(chunk_size=4), impl=Impl(moe="dense"))
    return model, model.random_params(seed=1, scale=0.3)


def test_parallel_objective_equals_inference_denoiser_block_by_block(two_tower):
    model, params = two_tower
    batch, length, block = 2, 40, 8
    tokens = jax.random.randint(jax.random.key(0), (batch, length), 4, model.config.vocab_size)
    noisy, masked, t = noise_tokens(jax.random.key(1), tokens, MASK)
    context = jitted(blockwise_context, model=model.context, block_size=block)(params=params["context"],
                                                                                tokens=tokens)
    parallel = jitted(denoiser_logits, model=model)(denoiser_params=params["denoiser"], noisy=noisy,
                                                     context=context, t=t)
    # What the sampler has when it starts block n: the context tower's cache extended by blocks 0..n-1.
    cache = model.context.init_cache(batch, length)
    for n in range(length // block):
        piece = slice(n * block, (n + 1) * block)
        expected = model.denoise(params, noisy[:, piece], cache, t)
        scale = float(jnp.max(jnp.abs(expected)))
        np.testing.assert_allclose(parallel[:, piece], expected, atol=1e-5 * scale, rtol=0, err_msg=f"block {n}")
        _, cache = model.context.extend(params["context"], tokens[:, piece], cache)


def test_diffusion_loss_is_mean_ce_over_masked_positions_only(two_tower):
    model, params = two_tower
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 4, model.config.vocab_size)
    # a key whose draw masks some positions and keeps others, so both sides of the mean are exercised
    rng = next(k for k in map(jax.random.key, range(100))
               if 0 < int(noise_tokens(k, tokens, MASK)[1].sum()) < tokens.size)
    loss, metrics = jitted(diffusion_loss, model=model, block_size=8, mask_token_id=MASK)(
        params["denoiser"], params["context"], tokens, rng)
    noisy, masked, t = noise_tokens(rng, tokens, MASK)
    context = jitted(blockwise_context, model=model.context, block_size=8)(params=params["context"], tokens=tokens)
    logits = jitted(denoiser_logits, model=model)(denoiser_params=params["denoiser"], noisy=noisy,
                                                     context=context, t=t)
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
    ce = -np.take_along_axis(np.asarray(logp), np.asarray(tokens)[..., None], -1)[..., 0]
    m = np.asarray(masked)
    np.testing.assert_allclose(float(loss), ce[m].mean(), rtol=1e-5)   # no 1/t weight, unmasked ignored
    assert float(metrics["masked_fraction"]) == pytest.approx(m.mean())


def test_noise_schedule_masks_each_token_with_probability_t():
    tokens = jnp.full((4096, 64), 7, jnp.int32)
    noisy, masked, t = noise_tokens(jax.random.key(0), tokens, MASK)
    t, masked = np.asarray(t), np.asarray(masked)
    assert t.min() >= 1e-3 and t.max() <= 1.0 and abs(t.mean() - 0.5) < 0.02
    assert np.array_equal(np.asarray(noisy) == MASK, masked)
    # per-example masked fraction tracks t (binomial noise of 64 draws)
    assert np.abs(masked.mean(1) - t).mean() < 0.06
    assert np.corrcoef(masked.mean(1), t)[0, 1] > 0.97


def test_objective_rejects_lengths_that_are_not_whole_blocks(two_tower):
    model, params = two_tower
    tokens = jnp.zeros((1, 12), jnp.int32) + 5
    with pytest.raises(ValueError, match="multiple of block_size 8"):
        diffusion_loss(params["denoiser"], params["context"], tokens, jax.random.key(0), model=model,
                       block_size=8, mask_token_id=MASK)


def test_ar_loss_is_next_token_cross_entropy_of_prefill(two_tower):
    model, params = two_tower
    tokens = jax.random.randint(jax.random.key(4), (2, 13), 4, model.config.vocab_size)
    loss, _ = jitted(ar_loss, model=model.context)(params["context"], None, tokens, None)
    logits, _ = model.context.prefill(params["context"], tokens)
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], -1)
    ce = -np.take_along_axis(np.asarray(logp), np.asarray(tokens)[:, 1:, None], -1)
    np.testing.assert_allclose(float(loss), ce.mean(), rtol=1e-5)


def test_identity_adaln_denoiser_starts_as_the_ar_tower(two_tower):
    model, params = two_tower
    start = two_tower_params_from_tower(params["context"], identity_adaln_params(model, jax.random.key(0)))
    prompt = jax.random.randint(jax.random.key(5), (2, 9), 4, model.config.vocab_size)
    token = jax.random.randint(jax.random.key(6), (2,), 4, model.config.vocab_size)
    _, cache = model.context.prefill(params["context"], prompt, capacity=10)
    # Equal towers + identity adaLN: on a one-token block the denoiser is the AR step, whatever t is.
    den = model.denoise(start, token[:, None], cache, jnp.array([0.3, 0.9]))
    ar_logits, _ = model.context.decode_step(params["context"], token, cache)   # donates the cache: last
    np.testing.assert_allclose(den[:, 0], ar_logits, rtol=1e-5, atol=1e-5)


def test_wsd_schedule_warms_up_holds_and_decays():
    cfg = TrainConfig(steps=100, peak_lr=1e-3, final_lr=1e-5, warmup_steps=10, decay_fraction=0.2)
    lr = wsd_schedule(cfg)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(5e-4)
    assert all(float(lr(s)) == pytest.approx(1e-3) for s in (10, 50, 80))
    assert float(lr(90)) == pytest.approx((1e-3 + 1e-5) / 2) and float(lr(100)) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="warmup_steps=200"):
        TrainConfig(steps=100, warmup_steps=200)


def _stream(vocab):
    def batch(step):
        return np.random.default_rng(step).integers(4, vocab, (2, 16)).astype(np.int32)
    return batch


def test_denoiser_training_keeps_context_frozen_and_resumes_exactly(two_tower, tmp_path):
    model, params = two_tower
    context_before = jax.tree.map(np.array, params["context"])
    denoiser_before = jax.tree.map(np.array, params["denoiser"])
    loss = functools.partial(diffusion_loss, model=model, block_size=8, mask_token_id=MASK)
    cfg = TrainConfig(steps=6, warmup_steps=2, save_every=3, log_every=1, peak_lr=1e-2)
    batch = _stream(model.config.vocab_size)

    straight = train(loss, params["denoiser"], params["context"], batch, cfg, tmp_path / "a")
    # interrupted after step 3 (its checkpoint saved), then a fresh call resumes from it
    train(loss, params["denoiser"], params["context"], batch, cfg, tmp_path / "b", stop_after=3)
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3]
    resumed = train(loss, params["denoiser"], params["context"], batch, cfg, tmp_path / "b")

    curve_a = [r["loss"] for r in read_metrics(tmp_path / "a")]
    curve_b = [r["loss"] for r in read_metrics(tmp_path / "b")]
    assert len(curve_a) == 6 and curve_a == curve_b
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)
    # the context tower never changes; the denoiser does, everywhere that gets a gradient
    jax.tree.map(np.testing.assert_array_equal, params["context"], context_before)
    unchanged = [jax.tree_util.keystr(path) for path, same in jax.tree_util.tree_leaves_with_path(
        jax.tree.map(np.array_equal, straight, denoiser_before)) if same]
    # the router's selection bias gets no gradient (top-k is not differentiable) and no weight decay
    assert unchanged and all("e_score_correction_bias" in name for name in unchanged), unchanged
    assert set(straight) == set(params["denoiser"])


def test_ar_training_reduces_loss(tmp_path):
    model = TwoTower(tiny(pattern="M*E"), impl=Impl(moe="dense")).context
    params = model.init_params(jax.random.key(0))
    loss = functools.partial(ar_loss, model=model)

    def batch(step):   # a fixed periodic sequence: learnable in a few steps
        return np.tile(np.arange(4, 12, dtype=np.int32), (2, 2))

    cfg = TrainConfig(steps=30, warmup_steps=3, peak_lr=1e-2, log_every=1, save_every=30)
    train(loss, params, None, batch, cfg, tmp_path)
    curve = [r["loss"] for r in read_metrics(tmp_path)]
    assert curve[-1] < 0.5 * curve[0]


def test_variant_loss_at_spec_settings_equals_the_library_objective(two_tower):
    from twotower_jax.training.recipes import variant_diffusion_loss
    model, params = two_tower
    tokens = jax.random.randint(jax.random.key(4), (2, 16), 4, model.config.vocab_size)
    kw = dict(model=model, block_size=8, mask_token_id=MASK)
    spec, _ = jitted(diffusion_loss, **kw)(params["denoiser"], params["context"], tokens, jax.random.key(5))
    variant = jitted(variant_diffusion_loss, t_low=1e-3, t_high=1.0, answers_only=False, **kw)
    same, _ = variant(params["denoiser"], params["context"], tokens, jax.random.key(5))
    assert float(same) == pytest.approx(float(spec), rel=1e-6)
    # answers_only with every position an answer is the same loss again; with none, no masked position counts
    everywhere = jnp.ones(tokens.shape, bool)
    answers_only = jitted(variant_diffusion_loss, t_low=1e-3, t_high=1.0, answers_only=True, **kw)
    loss, _ = answers_only(params["denoiser"], params["context"], (tokens, everywhere), jax.random.key(5))
    assert float(loss) == pytest.approx(float(spec), rel=1e-6)
    loss, _ = answers_only(params["denoiser"], params["context"], (tokens, ~everywhere), jax.random.key(5))
    assert float(loss) == 0.0


def test_curriculum_stages_switch_block_size_and_loss_by_step(tmp_path):
    from twotower_jax.training.loop import Stage, stage_at
    from twotower_jax.training.recipes import DataSettings, DenoiserRecipe, denoiser_stages
    model = TwoTower(tiny(chunk_size=4), impl=Impl(moe="dense"))
    data = DataSettings(seq_len=64, batch_size=2, block_size=16, task_fraction=1.0)
    stages = denoiser_stages(model, data, 10, DenoiserRecipe(curriculum=((32, 0.4),)))
    assert [s.until_step for s in stages] == [4, 10]
    assert [s.loss_fn.keywords["block_size"] for s in stages] == [32, 16]
    assert stages[0].loss_fn.func is diffusion_loss   # SPEC settings: the library objective itself
    assert [stage_at(stages, k).until_step for k in (1, 4, 5, 10)] == [4, 4, 10, 10]
    np.testing.assert_array_equal(stages[0].batch_fn(7), data.stream(32).batch(7))
    np.testing.assert_array_equal(stages[1].batch_fn(7), data.stream(16).batch(7))
    # train runs the stages in order (each step logged once) and rejects a curriculum plus a batch_fn
    calls = []

    def loss(name):
        def fn(params, frozen, tokens, rng):
            calls.append(name)
            value = jnp.sum(params["w"] ** 2)
            return value, {"loss": value}
        return fn

    cfg = TrainConfig(steps=4, warmup_steps=1, log_every=1, save_every=4)
    batch = lambda step: np.zeros((1, 2), np.int32)   # noqa: E731
    train([Stage(2, loss("a"), batch), Stage(4, loss("b"), batch)], {"w": jnp.ones(3)}, None, None, cfg, tmp_path)
    assert calls == ["a", "b"]   # each traced once: one compiled step per stage
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="Stage"):
        train([Stage(4, loss("a"), batch)], {"w": jnp.ones(3)}, None, batch, cfg, tmp_path / "x")
