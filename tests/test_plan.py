"""The memory plan: per-device params and caches against numbers worked out from SPEC §2/§7 by hand,
compiled temps for a tiny model, and `generate` refusing a run that cannot fit before loading anything."""
import jax.numpy as jnp
import pytest

from twotower_jax import generate
from twotower_jax.config import nano_30b_a3b, tiny
from twotower_jax.plan import main as plan_main
from twotower_jax.plan import memory_plan, parse_bytes

GiB = 2 ** 30


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * GiB
    assert parse_bytes("40 GB") == 40 * 10 ** 9
    assert parse_bytes("1.5e3") == 1500
    with pytest.raises(ValueError, match="cannot read 'lots'"):
        parse_bytes("lots")


def real_cache_bytes(tokens: int, batch: int = 1) -> int:
    """SPEC §7, written out: KV 6 attention layers × (K, V) × 2 KV heads × 128 × 2 B (bf16) per token; per
    sequence, 23 Mamba layers × (conv: 3 columns × (4096 + 2·8·128) channels + SSM: 64 × 64 × 128) in fp32;
    plus one validity byte per slot and the fill counter."""
    kv = 6 * 2 * 2 * 128 * 2 * tokens
    mamba = 23 * (3 * (4096 + 2 * 8 * 128) + 64 * 64 * 128) * 4
    return batch * (kv + mamba + tokens) + 4


@pytest.mark.parametrize("placement, devices", [("single", 1), ("sharded", 8), ("towers", 2), ("towers", 8)])
def test_real_two_tower_plan_params_and_caches(placement, devices):
    plan = memory_plan(nano_30b_a3b(), mode="diffusion", placement=placement, n_devices=devices, batch=2,
                       context=32768 - 128, new_tokens=128, dtype=jnp.bfloat16, compile=False,
                       device_memory=80 * GiB)
    assert len(plan.params) == devices
    total = sum(plan.params.values())
    assert 62e9 * 2 < total < 64e9 * 2          # ≈63.2B params in bf16 (SPEC §6)
    assert max(plan.params.values()) <= 1.10 * total / devices
    cache = real_cache_bytes(32768, batch=2)
    # single/sharded: one context cache, replicated; towers: the context group's and the denoiser's copy
    assert set(plan.caches.values()) == {cache}
    assert plan.fits() == (devices >= 2)        # 118 GiB of params fit two 80 GiB devices, not one
    assert "DOES NOT FIT" in plan.table() if devices == 1 else "fits" in plan.table()


def test_ar_plan_holds_one_tower():
    plan = memory_plan(nano_30b_a3b(), mode="ar", placement="single", context=1024, compile=False)
    assert 31e9 * 2 < plan.params[0] < 32.5e9 * 2   # ≈31.6B params per tower
    assert plan.caches[0] == real_cache_bytes(1024 + 128)
    # `generate --mode ar` on a TwoTower checkpoint loads both towers; on `towers` each stays on its group
    both = memory_plan(nano_30b_a3b(), mode="ar", placement="towers", n_devices=2, context=1024, compile=False,
                       two_tower_params=True)
    assert both.params[0] == plan.params[0] and both.params[1] > plan.params[0]
    assert both.caches == {0: plan.caches[0], 1: 0}


def test_compiled_plan_of_a_tiny_model_on_two_devices():
    plan = memory_plan(tiny(pattern="M*E"), mode="diffusion", placement="towers", n_devices=2, context=40,
                       new_tokens=8, block_size=4, dtype=jnp.float32)
    assert set(plan.programs) == {"context_prefill", "context_extend_4", "denoiser_pass_4"}
    assert plan.programs["context_prefill"]["devices"] == [0]
    assert plan.programs["denoiser_pass_4"]["devices"] == [1]
    assert all(p["temp"] > 0 for p in plan.programs.values())
    assert plan.compiled_on.startswith("cpu")
    assert plan.total(0) == plan.params[0] + plan.caches[0] + plan.temp(0)


def test_plan_cli(capsys):
    assert plan_main(["--config", "nano-30b-a3b", "--placement", "sharded", "--devices", "8", "--no-compile",
                      "--device-memory", "80GiB", "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "placement sharded on 8 device(s)" in out and "fits" in out
    assert plan_main(["--config", "nano-30b-a3b", "--no-compile", "--device-memory", "80GiB"]) == 1
    assert plan_main(["--config", "tiny", "--batch", "0", "--no-compile"]) == 2


def test_generate_refuses_up_front_with_the_plan(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--checkpoint", "demo", "--mode", "diffusion", "--prompt", "copy ab=",
                       "--device-memory", "64KiB"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "this run does not fit" in err and "memory plan:" in err and "DOES NOT FIT" in err
