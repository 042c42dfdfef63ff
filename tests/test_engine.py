"""The generation engine (twotower_jax/engine.py): references are the samplers and the tower called directly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax.engine import (Engine, GenerationConfig, Request, RequestError, StopScanner, next_pow2,
                                 rolling_windows)
from twotower_jax.sampling.ar import generate_ar
from twotower_jax.sampling.diffusion import generate_mask_diffusion
from twotower_jax.sampling.prompts import request_key_data

PROMPTS = ["copy abc=", "reverse tower=", "add 12+7=", "sort hqe=", "copy zz=", "reverse ab="]


@pytest.fixture(scope="module")
def engine():
    return Engine.load("demo", batch_size=4)


def test_request_keys_are_fold_in_of_seed_and_id():
    data = request_key_data(7, [0, 5, "row-a"])
    want = jax.random.key_data(jax.random.fold_in(jax.random.key(7), 5))
    np.testing.assert_array_equal(data[1], np.asarray(want))
    assert data.dtype == np.uint32 and data.shape == (3, 2)
    # seed s, id r + 1 is not seed s + 1, id r (the old seed + r streams were)
    assert not np.array_equal(request_key_data(7, [1])[0], request_key_data(8, [0])[0])
    assert not np.array_equal(request_key_data(7, ["1"])[0], request_key_data(7, [1])[0])
    np.testing.assert_array_equal(request_key_data([3, 4], [9, 9]), np.stack([request_key_data(3, [9])[0],
                                                                                request_key_data(4, [9])[0]]))


@pytest.mark.parametrize("mode, extra", [("ar", dict(temperature=1.0, top_k=20)),
                                         ("diffusion", dict(temperature=0.7, block_size=4, steps_per_block=2,
                                                            confidence_threshold=0.5))])
def test_a_request_generates_the_same_in_any_batch_order_or_position(engine, mode, extra):
    config = GenerationConfig(mode=mode, max_new_tokens=8, eos_token_id=-1, seed=3, **extra)
    requests = [Request(id=f"r{i}", prompt=p) for i, p in enumerate(PROMPTS)]
    together = engine.generate(requests, config)            # batches of 4 + 2
    reverse = engine.generate(requests[::-1], config)[::-1]  # other batches, other positions
    alone = [engine.generate([r], config)[0] for r in requests[:3]]   # batch of 1
    assert [c.tokens for c in together] == [c.tokens for c in reverse]
    assert [c.tokens for c in together[:3]] == [c.tokens for c in alone]
    assert len({tuple(c.tokens) for c in together}) > 1 and all(len(c.tokens) == 8 for c in together)
    if mode != "ar":   # the demo's denoiser is nearly deterministic at this temperature
        return
    # the same prompt under another id samples another stream
    twin = engine.generate([Request(id="other", prompt=PROMPTS[0])], config)[0]
    assert twin.tokens != together[0].tokens


def test_engine_equals_the_sampler_with_the_request_keys(engine):
    """The engine adds batching, buckets and cuts, not numerics: the sampler called directly with the
    per-request keys, the same prompt width and the bucketed length gives the same tokens."""
    config = GenerationConfig(mode="diffusion", max_new_tokens=6, eos_token_id=-1, temperature=0.5, block_size=4,
                              steps_per_block=2, confidence_threshold=0.5, seed=11)
    requests = [Request(id=i, prompt=p) for i, p in enumerate(PROMPTS[:2])]
    done = engine.generate(requests, config)
    ids = [engine.encode(p) for p in PROMPTS[:2]]
    direct = generate_mask_diffusion(engine.model, engine.params, ids, 8, block_size=4, steps_per_block=2,
                                     confidence_threshold=0.5, temperature=0.5,
                                     seed=request_key_data(11, [0, 1]), prompt_width=16)
    assert [c.tokens for c in done] == [t[:6] for t in direct.tokens]
    assert [c.finish_reason for c in done] == ["length", "length"]
    assert done[0].text == engine.decode(done[0].tokens)
    assert done[0].stats["denoiser_passes"] == direct.stats["row_denoiser_passes"][0]


def test_per_request_max_new_tokens_and_eos(engine):
    config = GenerationConfig(mode="ar", max_new_tokens=16)
    done = engine.generate([Request(id=0, prompt="copy abc=", max_new_tokens=3),
                            Request(id=1, prompt="copy abc=")], config)
    assert len(done[0].tokens) == 3 and done[0].finish_reason == "length"
    reference = generate_ar(engine.model, engine.params, [engine.encode("copy abc=")], 16, eos_token_id=2,
                            prompt_width=16)
    assert done[1].tokens == reference.tokens[0]
    assert done[0].tokens == reference.tokens[0][:3]
    assert done[1].finish_reason == "eos" and done[1].tokens[-1] == 2 and done[1].text == engine.decode(done[1].tokens[:-1])


def test_stop_scanner_finds_a_stop_string_straddling_chunks():
    decode = lambda ids: "".join(chr(i) for i in ids)
    text = "hello world. next"
    scanner = StopScanner(decode, ["o w", "xt"])
    ids = [ord(c) for c in text]
    assert not scanner.feed(ids[:4])            # "hell": the stop string starts in chunk 2 ("o") ...
    assert scanner.feed(ids[4:8])               # ... and ends in it after crossing "hell|o wo"
    assert scanner.text == "hell" and scanner.n_tokens == 7
    scanner = StopScanner(decode, ["xt", "ld. n"])
    for start in range(0, len(ids), 3):
        if scanner.feed(ids[start:start + 3]):
            break
    assert scanner.text == "hello wor" and scanner.n_tokens == len("hello world. n")
    assert not StopScanner(decode, ["zz"]).feed(ids) and not StopScanner(decode, []).feed(ids)


@pytest.mark.parametrize("mode, extra", [("ar", dict(stop_check_every=4)),
                                         ("diffusion", dict(block_size=4, steps_per_block=4)),
                                         ("self_speculative", dict(block_size=4))])
def test_stop_strings_across_block_boundaries_in_every_mode(engine, mode, extra):
    config = GenerationConfig(mode=mode, max_new_tokens=16, eos_token_id=-1, **extra)
    prompt = "copy abcdefghijkl="
    free = engine.generate([Request(id=0, prompt=prompt)], config)[0]
    text = free.text
    assert len(text) >= 8, text     # the byte tokenizer: one token per character
    stop = text[3:6]                # characters 3..5 straddle the boundary after token 4
    first = text.index(stop)
    cut = engine.generate([Request(id=0, prompt=prompt, stop=[stop, "\x00never"])], config)[0]
    assert cut.finish_reason == "stop" and cut.text == text[:first]
    assert cut.tokens == free.tokens[:first + len(stop)]


def test_loglikelihood_equals_the_context_tower_directly(engine):
    pairs = [("copy abc=", "abc"), ("add 12+7=", "19"), ("reverse tower=", "rewot"), ("c", "opy a much longer one")]
    got = engine.loglikelihood(pairs)
    model, params = engine.model.context, engine.params["context"]
    for (context, continuation), (logp, greedy) in zip(pairs, got):
        ctx, cont = engine.encode(context), engine.encode(context + continuation)[len(engine.encode(context)):]
        seq = jnp.asarray([ctx + cont])
        logits = np.asarray(model.prefill(params, seq[:, :-1])[0][0], np.float64)
        logits -= logits.max(-1, keepdims=True)
        logsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        targets = np.asarray(seq[0, 1:])
        rows = np.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
        # fp32 sums of up to ~20 log-probs: 1e-5 absolute, or 1e-6 relative for large sums (fp32's spacing
        # at 134 is 1.5e-5, so an absolute 1e-5 alone cannot hold for an unlikely continuation)
        assert logp == pytest.approx(logsm[rows, targets[rows]].sum(), rel=1e-6, abs=1e-5)
        assert greedy == bool(np.all(logsm[rows].argmax(-1) == targets[rows]))
    assert got[0][1]          # the demo copies: the continuation "abc" is its greedy answer
    assert got[1][0] < 0


def test_loglikelihood_moves_trailing_spaces_and_accepts_ids(engine):
    a = engine.loglikelihood([("copy ab ", "x")])[0]
    b = engine.loglikelihood([("copy ab", " x")])[0]
    assert a == b
    ids = engine.encode_pair("copy ab", " x")
    assert engine.loglikelihood([ids])[0] == b


def test_rolling_windows_match_lm_eval():
    lm_utils = pytest.importorskip("lm_eval.utils")
    for n, max_length in [(1, 4), (4, 4), (10, 4), (9, 3), (5, 16)]:
        ids = list(range(10, 10 + n))
        want = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
            token_list=ids, prefix_token=1, max_seq_len=max_length, context_len=1)]
        assert rolling_windows(ids, 1, max_length) == [(list(a), list(b)) for a, b in want], (n, max_length)


def test_rolling_loglikelihood_covers_every_token_once(engine):
    text = "copy abcdefghij=abcdefghij"
    whole = engine.loglikelihood_rolling([text], max_length=64)[0]
    ids = engine.encode(text, special=False)
    assert whole == pytest.approx(engine.score_tokens([([engine.prefix_token], ids)])[0][0], abs=1e-5)
    windowed = engine.loglikelihood_rolling([text], max_length=8)[0]
    assert windowed < 0 and windowed != pytest.approx(whole, abs=1e-6)   # less context, other numbers
    pieces = rolling_windows(ids, engine.prefix_token, 8)
    assert sum(len(b) for _, b in pieces) == len(ids)
    assert windowed == pytest.approx(sum(lp for lp, _ in engine.score_tokens(pieces)), abs=1e-5)


@pytest.mark.parametrize("request_, message", [
    (Request(id=1), "exactly one of prompt / prompt_ids"),
    (Request(id=2, prompt=""), "empty prompt"),
    (Request(id=3, prompt_ids=[]), "empty prompt"),
    (Request(id=4, prompt_ids=[5, 999]), "outside the vocabulary"),
    (Request(id=5, prompt_ids=["a"]), "list of integers"),
    (Request(id=6, prompt="x" * 40), "over the limit max_prompt_len=32"),
    (Request(id=7, prompt="x", max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (Request(id=8, prompt="x", temperature=-1.0), "temperature must be >= 0"),
    (Request(id=9, prompt="x", stop="\n"), "stop must be a list of strings"),
])
def test_bad_requests_are_refused_by_name(request_, message):
    engine = Engine.load("demo", max_prompt_len=32)
    with pytest.raises(RequestError, match=message) as info:
        engine.generate([request_])
    assert f"request {request_.id!r}" in str(info.value)


def test_duplicate_ids_and_single_tower_modes_are_refused(engine):
    with pytest.raises(RequestError, match="unique"):
        engine.generate([Request(id=1, prompt="a"), Request(id=1, prompt="b")])
    with pytest.raises(ValueError, match="mode must be one of"):
        GenerationConfig(mode="beam")


def test_buckets():
    assert [next_pow2(n) for n in (1, 2, 3, 16, 17)] == [1, 2, 4, 16, 32]
    engine = Engine.load("demo", batch_size=6)
    assert [engine.batch_bucket(n) for n in (1, 3, 5, 6)] == [1, 4, 6, 6]
    assert engine.prompt_bucket(3) == 16 and engine.prompt_bucket(17) == 32
    assert engine.new_token_bucket(20, GenerationConfig(mode="diffusion", block_size=16)) == 32
    assert engine.new_token_bucket(3, GenerationConfig(mode="diffusion", block_size=16)) == 16
    assert engine.new_token_bucket(20, GenerationConfig(mode="diffusion", block_size=12)) == 36
    assert engine.new_token_bucket(5, GenerationConfig(mode="ar")) == 8
