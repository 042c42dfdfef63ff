"""The memory plan: per-device params and caches against numbers worked out from SPEC §2/§7 by hand,
compiled temps for a tiny model, and `generate` refusing a run that cannot fit before loading anything."""
import jax.numpy as jnp
import pytest

from twotower_jax import generate
from twotower_jax.config import nano_30b_a3b, tiny
from twotower_jax.plan import main as plan_main
from twotower_jax.plan import memory_plan, memory_plan_train, parse_bytes, train_placement

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


# --- plan --train ---------------------------------------------------------------------------------------

def tower_param_count(c, denoiser: bool) -> int:
    """Params of one tower, written out from SPEC §6's tensor list (conv1d + bias, router + correction bias,
    per-expert up/down, shared experts, dense MLP), plus the denoiser's adaLN (t_embedder, t_block, one
    (3, D) scale-shift table per layer)."""
    D, V = c.hidden_size, c.vocab_size
    H, I = c.mamba_num_heads, c.mamba_num_heads * c.mamba_head_dim
    GN = c.n_groups * c.ssm_state_size
    per_letter = {
        "M": D * (2 * I + 2 * GN + H) + (I + 2 * GN) * (c.conv_kernel + 1) + 3 * H + I + I * D,
        "*": D * c.num_attention_heads * c.head_dim * 2 + D * c.num_key_value_heads * c.head_dim * 2,
        "E": c.n_routed_experts * (D + 1) + c.n_routed_experts * 2 * D * c.moe_intermediate_size
             + 2 * D * c.moe_shared_expert_intermediate_size,
        "-": 2 * D * c.intermediate_size,
    }
    n = V * D + D + D * V + sum(per_letter[k] + D for k in c.pattern)   # embeddings, norm_f, lm_head, layers
    if denoiser:
        n += (256 * D + D + D * D + D) + (D * 3 * D + 3 * D) + 3 * D * len(c.pattern)
    return n


def test_train_plan_resident_bytes_match_parameter_counts():
    config = tiny()
    trainable, frozen = tower_param_count(config, True), tower_param_count(config, False)
    one = memory_plan_train(config, batch=2, seq_len=16, block_size=4, compile=False)
    assert one.counts["trainable"] == trainable and one.counts["frozen"] == frozen
    assert one.params == {0: 4 * trainable}                      # fp32 master weights
    # AdamW: mu and nu in fp32, one int32 step count for Adam and one for the schedule
    assert one.optimizer == {0: 2 * 4 * trainable + 2 * 4}
    assert one.frozen == {0: 2 * frozen}                         # the context tower in bf16
    assert one.batch == {0: 2 * 16 * 4}
    assert one.total(0) == 4 * trainable + 8 * trainable + 8 + 2 * frozen + 128 and one.program is None
    # FSDP over 2 data devices: every split-able weight halves; the rest (norms, A_log, D, biases, the 1-D
    # tables) stays whole on both, and rows of the batch split
    two = memory_plan_train(config, n_devices=2, data=2, batch=2, seq_len=16, block_size=4, compile=False)
    assert two.description["mesh"] == {"data": 2, "expert": 1, "tensor": 1}
    for d in (0, 1):
        assert 4 * trainable / 2 < two.params[d] < 4 * trainable * 0.62   # tiny: many small leaves
        assert two.optimizer[d] == 2 * two.params[d] + 8
        assert two.batch[d] == 16 * 4
    assert two.params[0] == two.params[1]


def test_real_denoiser_train_plan_on_8_and_32_devices():
    plan = memory_plan_train(nano_30b_a3b(), n_devices=8, data=8, batch=8, seq_len=4096, compile=False,
                             device_memory=80 * GiB)
    assert 31.5e9 < plan.counts["trainable"] < 31.7e9 and 31.5e9 < plan.counts["frozen"] < 31.7e9
    trainable, frozen = plan.counts["trainable"], plan.counts["frozen"]
    for d in range(8):   # within 1% of the even split (a few small params stay whole)
        assert 4 * trainable / 8 <= plan.params[d] < 1.01 * 4 * trainable / 8
        assert plan.optimizer[d] == 2 * plan.params[d] + 8
        assert 2 * frozen / 8 <= plan.frozen[d] < 1.01 * 2 * frozen / 8
    assert plan.fits() and 50 * GiB < plan.peak < 53 * GiB      # ≈ 12 B/param · 31.6B / 8 + 7.4 GiB frozen
    wide = memory_plan_train(nano_30b_a3b(), n_devices=32, data=4, batch=32, seq_len=4096, compile=False)
    assert wide.description["mesh"] == {"data": 4, "expert": 8, "tensor": 1}
    # 32 ways: the unsplit leaves weigh more (1.7% over the even split)
    assert max(wide.state(d) for d in range(32)) < 1.03 * (12 * trainable + 8 + 2 * frozen) / 32
    assert not memory_plan_train(nano_30b_a3b(), seq_len=4096, compile=False, device_memory=80 * GiB).fits()


def test_compiled_train_plan_of_a_tiny_model_on_two_devices():
    plan = memory_plan_train(tiny(pattern="M*E"), n_devices=2, data=2, batch=4, seq_len=16, block_size=4,
                             grad_accum=2)
    program = plan.program
    assert plan.compiled_on.startswith("cpu") and program["devices"] == [0, 1]
    assert program["temp"] > 0 and plan.total(0) == plan.state(0) + plan.batch[0] + program["temp"]
    # the donated params and optimizer state are the outputs' buffers; the arguments are what the plan
    # counts (less frozen params the step never reads, e.g. the context tower's LM head) plus the RNG key
    assert program["alias"] == plan.params[0] + plan.optimizer[0]
    assert plan.params[0] + plan.optimizer[0] + plan.batch[0] < program["argument"] <= plan.state(0) + plan.batch[0] + 8
    assert "activations: XLA memory analysis" in plan.table() and "| 0–1 |" in plan.table()
    assert "remat none" in plan.table()


def test_train_plan_cli(capsys):
    assert plan_main(["--train", "--config", "nano-30b-a3b", "--devices", "8", "--data", "8", "--no-compile",
                      "--device-memory", "80GiB", "--batch", "8", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "training memory plan" in out and "31,607,962,560 trainable" in out and "fits" in out
    assert plan_main(["--train", "--config", "tiny", "--seq-len", "30", "--block-size", "16", "--no-compile"]) == 2
    assert "multiple of block_size" in capsys.readouterr().err
    assert plan_main(["--train", "--config", "tiny", "--batch", "3", "--grad-accum", "2", "--no-compile"]) == 2


def test_train_layout_is_the_training_steps():
    parallel = pytest.importorskip("twotower_jax.training.parallel")
    assert train_placement() == parallel.TRAIN_PLACEMENT


def test_compiled_train_plan_with_remat():
    """--remat puts the denoiser's layers under nn.remat (the frozen context pass runs as it is)."""
    plan = memory_plan_train(tiny(pattern="M*E"), batch=2, seq_len=16, block_size=4, remat="full")
    assert plan.program["temp"] > 0 and plan.program["alias"] == plan.params[0] + plan.optimizer[0]
    assert "remat full" in plan.table()
