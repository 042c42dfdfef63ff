"""Sampling rules, EOS handling and the command line."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twotower_jax import generate
from twotower_jax.checkpoint.hf import save_hf_tower, save_hf_two_tower
from twotower_jax.config import tiny
from twotower_jax.sampling.ar import generate_ar, generate_mock_ar
from twotower_jax.sampling.diffusion import generate_mask_diffusion
from twotower_jax.sampling.tokens import SamplingParams, row_keys, select_tokens
from twotower_jax.tower import NemotronH
from twotower_jax.two_tower import TwoTower

CONFIG = tiny(pattern="M*E")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    params = NemotronH(CONFIG).random_params(seed=0, scale=0.7)
    directory = tmp_path_factory.mktemp("ckpt")
    save_hf_tower(directory, CONFIG, params)
    return directory, params


def run_cli(capsys, *argv):
    assert generate.main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_select_tokens_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 64))
    keys = row_keys(jnp.arange(64))
    greedy = select_tokens(logits, keys, SamplingParams())
    assert set(np.asarray(greedy).tolist()) == {0}
    top1 = select_tokens(logits, keys, SamplingParams(temperature=5.0, top_k=1))
    assert set(np.asarray(top1).tolist()) == {0}
    top2 = select_tokens(logits, keys, SamplingParams(temperature=5.0, top_k=2))
    assert set(np.asarray(top2).tolist()) == {0, 1}
    nucleus = select_tokens(logits, keys, SamplingParams(temperature=1.0, top_p=0.75))
    assert set(np.asarray(nucleus).tolist()) == {0, 1}  # 0.5 < 0.75 ≤ 0.8: the first two tokens
    free = select_tokens(logits, keys, SamplingParams(temperature=1.0))
    assert len(set(np.asarray(free).tolist())) >= 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=-2), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(eos_token_id=500), "eos_token_id 500 is outside the vocabulary"),
])
def test_generate_ar_rejects_bad_arguments(checkpoint, kwargs, message):
    params = checkpoint[1]
    with pytest.raises(ValueError, match=message):
        generate_ar(NemotronH(CONFIG), params, [[5, 6]], 4, **kwargs)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_ar(NemotronH(CONFIG), params, [[5], []], 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate_ar(NemotronH(CONFIG), params, [[5, 96]], 4)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        generate_ar(NemotronH(CONFIG), params, [[5]], 0)


def test_eos_stops_each_row_and_cuts(checkpoint):
    params = checkpoint[1]
    model = NemotronH(CONFIG)
    prompts = [[5, 6, 7], [40, 41]]
    free = generate_ar(model, params, prompts, 10)
    eos = free.tokens[0][3]  # stop row 0 at its 4th token
    stopped = generate_ar(model, params, prompts, 10, eos_token_id=eos)
    cut = free.tokens[0].index(eos) + 1
    assert stopped.tokens[0] == free.tokens[0][:cut]
    assert stopped.logprobs[0] == pytest.approx(free.logprobs[0][:cut], abs=1e-5)
    row1_cut = free.tokens[1].index(eos) + 1 if eos in free.tokens[1] else 10
    assert stopped.tokens[1] == free.tokens[1][:row1_cut]
    assert stopped.stats["forward_passes"] == max(cut, row1_cut)


def test_seeded_sampling_is_reproducible(checkpoint):
    params = checkpoint[1]
    model = NemotronH(CONFIG)
    run = lambda seed: generate_ar(model, params, [[5, 6, 7]], 16, temperature=1.0, seed=seed).tokens
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_cli_json(checkpoint, capsys):
    directory, params = checkpoint
    out = run_cli(capsys, "--checkpoint", str(directory), "--mode", "ar", "--prompt-ids", "5,6,7",
                  "--prompt-ids", "9", "--max-new-tokens", "6", "--eos-token-id", "-1", "--json")
    # the CLI runs prompts in the engine's power-of-two prompt bucket (at least 16 wide)
    expected = generate_ar(NemotronH(CONFIG), params, [[5, 6, 7], [9]], 6, prompt_width=16)
    assert out["tokens"] == expected.tokens
    for row, expected_row in zip(out["logprobs"], expected.logprobs):
        np.testing.assert_allclose(row, expected_row, atol=1e-6)
    assert out["stats"]["forward_passes"] == 6 and out["stats"]["seconds"] > 0


def test_cli_text_prompt_with_tokenizer(checkpoint, capsys, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    directory = tmp_path / "with_tokenizer"
    directory.mkdir()
    for f in checkpoint[0].iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    vocab = {f"w{i}": i for i in range(CONFIG.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    out = run_cli(capsys, "--checkpoint", str(directory), "--prompt", "w5 w6 w7", "--max-new-tokens", "4",
                  "--eos-token-id", "-1", "--json")
    ids = run_cli(capsys, "--checkpoint", str(directory), "--prompt-ids", "5,6,7", "--max-new-tokens", "4",
                  "--eos-token-id", "-1", "--json")
    assert out["tokens"] == ids["tokens"]
    assert out["text"][0] == " ".join(f"w{t}" for t in ids["tokens"][0])


@pytest.mark.parametrize("argv, message", [
    (["--prompt-ids", "5,x"], "expected comma-separated integers"),
    (["--prompt-ids", "5", "--prompt", "hi"], "not both"),
    (["--prompt", "hi"], "tokenizer.json"),
    (["--prompt-ids", "5", "--temperature", "-1"], "temperature must be >= 0"),
])
def test_cli_errors(checkpoint, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        generate.main(["--checkpoint", str(checkpoint[0])] + argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_missing_checkpoint(capsys, tmp_path):
    with pytest.raises(SystemExit):
        generate.main(["--checkpoint", str(tmp_path / "nope"), "--prompt-ids", "5"])
    assert "no such directory" in capsys.readouterr().err


def test_demo_runs(capsys):
    from twotower_jax import demo
    assert demo.main() == 0
    out = capsys.readouterr().out
    sections = {}
    for mode in ("ar", "diffusion", "self_spec"):
        body = out[out.index(f"[{mode}]"):].split("\n\n")[0].splitlines()[1:]
        sections[mode] = body
    assert all(out.count(prompt) == 3 for prompt in demo.PROMPTS)   # each prompt answered in every mode
    assert sections["self_spec"] == sections["ar"]                  # self-speculation prints AR's answers
    # The packaged pair answers its 8 held-out examples right in every mode (issue 12's demo; it holds for
    # this checkpoint, not for any model): a sampler or loading regression shows here as a WRONG line.
    assert all(line.rstrip().endswith(" ok") for body in sections.values() for line in body), out
    table = out[out.index("tokens/pass"):].splitlines()
    assert [line.split()[1] for line in table[1:4]] == [f"{len(demo.PROMPTS)}/{len(demo.PROMPTS)}"] * 3
    assert [line.split()[0] for line in table[1:4]] == ["ar", "diffusion", "self_spec"]
    assert all(float(line.split()[3]) > 0 for line in table[1:4])   # tokens/s measured
    assert float(table[3].split()[2]) > 1                           # several tokens per context pass


def test_cli_text_prompt_with_the_demo_checkpoint(capsys):
    out = run_cli(capsys, "--checkpoint", "demo", "--mode", "ar", "--prompt", "copy abc=", "--prompt", "add 1+2=",
                  "--max-new-tokens", "4", "--eos-token-id", "-1", "--json")
    assert len(out["text"]) == 2 and all(len(row) == 4 for row in out["tokens"])
    from twotower_jax.data import ByteTokenizer
    assert out["text"][0] == ByteTokenizer().decode(out["tokens"][0])


@pytest.fixture(scope="module")
def two_tower_checkpoint(tmp_path_factory):
    model = TwoTower(CONFIG)
    params = model.random_params(seed=1, scale=0.7)
    directory = tmp_path_factory.mktemp("two_tower")
    save_hf_two_tower(directory, CONFIG, params)
    return directory, model, params


def test_cli_two_tower_modes(two_tower_checkpoint, capsys):
    directory, model, params = two_tower_checkpoint
    base = ["--checkpoint", str(directory), "--prompt-ids", "5,6,7", "--prompt-ids", "9", "--max-new-tokens", "6",
            "--eos-token-id", "-1", "--json"]
    ar = run_cli(capsys, *base, "--mode", "ar")
    assert ar["tokens"] == generate_ar(model, params, [[5, 6, 7], [9]], 6).tokens  # the context tower
    mock = run_cli(capsys, *base, "--mode", "mock_ar")
    assert mock["tokens"] == generate_mock_ar(model, params, [[5, 6, 7], [9]], 6).tokens
    assert mock["stats"]["denoiser_passes"] == 6
    diffusion = run_cli(capsys, *base, "--mode", "diffusion", "--block-size", "4", "--steps-per-block", "2",
                        "--confidence-threshold", "0.5", "--temperature", "0.5", "--seed", "3")
    expected = generate_mask_diffusion(model, params, [[5, 6, 7], [9]], 6, block_size=4, steps_per_block=2,
                                       confidence_threshold=0.5, temperature=0.5, seed=3)
    assert diffusion["tokens"] == expected.tokens
    for key in ("denoiser_passes", "context_passes", "tokens_per_denoiser_pass", "row_denoiser_passes"):
        assert diffusion["stats"][key] == expected.stats[key]
    assert diffusion["stats"]["denoiser_passes"] <= 4  # two blocks, at most two steps each


@pytest.mark.parametrize("argv, message", [
    (["--confidence-threshold", "1.2"], r"confidence_threshold must be in [0, 1]"),
    (["--block-size", "0"], "block_size must be an integer >= 1"),
    (["--steps-per-block", "20"], "steps_per_block must be an integer in [1, block_size=16]"),
    (["--mask-token-id", "500"], "mask_token_id 500 is outside the vocabulary"),
    (["--top-k", "5"], "diffusion samples with --temperature only"),
])
def test_cli_diffusion_argument_errors(two_tower_checkpoint, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        generate.main(["--checkpoint", str(two_tower_checkpoint[0]), "--mode", "diffusion", "--prompt-ids", "5"]
                      + argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["diffusion", "mock_ar"])
def test_cli_single_tower_checkpoint_refuses_two_tower_modes(checkpoint, capsys, mode):
    with pytest.raises(SystemExit):
        generate.main(["--checkpoint", str(checkpoint[0]), "--mode", mode, "--prompt-ids", "5"])
    assert f"--mode {mode} needs a TwoTower checkpoint" in capsys.readouterr().err


def test_compiled_executables_are_kept_per_argument_signature():
    """Repeat runs reuse the executable (a fresh one's first run is slow on a CPU and would be timed);
    another shape or dtype compiles its own."""
    from twotower_jax.sampling.timing import compile_and_run, compiled_for
    double = jax.jit(lambda x: x * 2)
    first, first_s = compiled_for(double, jnp.ones(3))
    again, again_s = compiled_for(double, jnp.ones(3))
    assert again is first and again_s == 0.0 and first_s > 0.0
    assert compiled_for(double, jnp.ones(4))[0] is not first
    assert compiled_for(double, jnp.ones(3, jnp.int32))[0] is not first
    out, compile_s, run_s = compile_and_run(double, jnp.arange(3.0))
    np.testing.assert_array_equal(out, [0.0, 2.0, 4.0])
    assert compile_s == 0.0 and run_s > 0.0


def test_cli_stop_strings_and_request_streams(checkpoint, capsys):
    """--stop cuts each row before the first occurrence (a text one spanning tokens); --streams request gives
    request r the stream fold_in(key(seed), r), the engine's and batch_generate's."""
    from twotower_jax.sampling.prompts import request_key_data
    out = run_cli(capsys, "--checkpoint", "demo", "--prompt", "copy abcdefgh=", "--max-new-tokens", "12",
                  "--stop", "def", "--stop", "zzz", "--json")
    free = run_cli(capsys, "--checkpoint", "demo", "--prompt", "copy abcdefgh=", "--max-new-tokens", "12", "--json")
    cut = free["text"][0].index("def")
    assert out["text"] == [free["text"][0][:cut]] and out["finish_reason"] == ["stop"]
    assert out["tokens"][0] == free["tokens"][0][:cut + 3]
    directory, params = checkpoint
    argv = ["--checkpoint", str(directory), "--prompt-ids", "5,6,7", "--prompt-ids", "9", "--max-new-tokens", "6",
            "--eos-token-id", "-1", "--temperature", "1.0", "--seed", "4", "--json"]
    sampled = run_cli(capsys, *argv, "--streams", "request")
    expected = generate_ar(NemotronH(CONFIG), params, [[5, 6, 7], [9]], 6, temperature=1.0, prompt_width=16,
                           seed=request_key_data(4, [0, 1]))
    assert sampled["tokens"] == expected.tokens
    assert run_cli(capsys, *argv)["tokens"] == generate_ar(NemotronH(CONFIG), params, [[5, 6, 7], [9]], 6,
                                                           temperature=1.0, prompt_width=16, seed=4).tokens
