"""The sharded training step (twotower_jax/training/parallel.py) against the single-device step: a
(data=2, expert=2) mesh on 4 CPU devices, gradient accumulation, and two processes joined by
jax.distributed against one process with two devices. Each layout runs in its own subprocess
(tests/train_parallel_worker.py) because the device count is fixed when a process starts."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from twotower_jax.training import parallel
from xla_test_flags import training_subprocess_env

WORKER = os.path.join(os.path.dirname(__file__), "train_parallel_worker.py")
STEPS = 20
KILL_AT_STEP = 12     # between the checkpoints after steps 10 and 15


def run_worker(out, runs, devices=1, **flags):
    argv = [sys.executable, WORKER, "--out", str(out), "--steps", str(STEPS), "--runs", *runs]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return subprocess.Popen(argv, env=training_subprocess_env(devices))


def assert_same_run(a, b, tol=1e-5):
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=tol, atol=tol)
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        np.testing.assert_allclose(a["params"][name], b["params"][name], rtol=tol, atol=tol, err_msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every layout, trained for STEPS steps from the same params on the same batches, in one 4-device
    process (runs named by layout; "loop": `loop.train` on a data=2 mesh, uninterrupted), and
    "two_processes": `loop.train` in two 1-device processes joined by jax.distributed, SIGKILLed after
    step 12 (checkpoints every 5 steps) and resumed by two new processes."""
    tmp = tmp_path_factory.mktemp("train_parallel")
    four = run_worker(tmp / "four_devices.json", [
        # NAME=LOSS,BATCH,GRAD_ACCUM,DATA,EXPERT (DATA 0: the single-device step, no mesh)
        "single=diffusion,8,1,0,1", "sharded=diffusion,8,1,2,2", "data2=diffusion,8,1,2,1",
        "ar_whole=ar,8,1,0,1", "ar_accum=ar,8,2,0,1", "ar_sharded_accum=ar,8,2,2,2"], devices=4,
        loop_workdir=tmp / "loop_one_process")
    for launch, kill in enumerate((KILL_AT_STEP, None)):
        address = f"127.0.0.1:{_free_port()}"
        flags = dict(coordinator_address=address, num_processes=2, loop_workdir=tmp / "loop_two")
        if kill:
            flags["kill_at_step"] = kill
        procs = [run_worker(tmp / f"two_processes_{launch}.json", [], devices=1, process_id=pid, **flags)
                 for pid in range(2)]
        codes = [p.wait(timeout=900) for p in procs]
        if kill:   # both died (SIGKILL, or process 1 taken down by its lost peer) between checkpoints
            assert all(code != 0 for code in codes), codes
            assert not (tmp / "two_processes_0.json").exists()
        else:
            assert codes == [0, 0]
    assert four.wait(timeout=900) == 0
    results = json.loads((tmp / "four_devices.json").read_text())
    results["two_processes"] = json.loads((tmp / "two_processes_1.json").read_text())["loop"]
    return results


def test_sharded_step_on_4_devices_equals_one_device(runs):
    single, sharded = runs["single"], runs["sharded"]
    assert sharded["layout"]["devices"] == 4
    assert sharded["layout"]["experts_up_spec"][:2] == ["expert", "data"]   # experts + FSDP over data
    assert single["losses"][-1] < single["losses"][0]    # it trains
    assert_same_run(sharded, single)


def test_grad_accumulation_equals_the_whole_batch(runs):
    assert_same_run(runs["ar_accum"], runs["ar_whole"])
    assert_same_run(runs["ar_sharded_accum"], runs["ar_whole"])


def test_two_processes_killed_and_resumed_equal_one_uninterrupted_process(runs):
    """2 processes (1 device each) == 1 process with 2 devices, through `loop.train`: SIGKILLed at step 12
    (checkpoints every 5 steps), restarted from the step-10 checkpoint; the metrics log keeps steps 1–10
    of the first launch and 11–20 of the second: all 20 losses and the final params as uninterrupted."""
    one, two = runs["loop"], runs["two_processes"]
    assert len(two["losses"]) == len(one["losses"]) == STEPS
    assert_same_run(two, one)
    assert_same_run(one, runs["data2"])      # the loop on a mesh == the bare sharded step
    assert_same_run(runs["data2"], runs["single"])


def test_bad_grad_accum_is_refused():
    with pytest.raises(ValueError, match="grad_accum must be an integer"):
        parallel.check_grad_accum(0, 8)
    with pytest.raises(ValueError, match="does not split into grad_accum=3"):
        parallel.check_grad_accum(3, 8)


def test_remat_policies_keep_loss_and_gradients():
    import functools

    import jax

    from twotower_jax.config import tiny
    from twotower_jax.tower import Impl
    from twotower_jax.training.objective import diffusion_loss
    from twotower_jax.two_tower import TwoTower

    config = tiny(pattern="M*EM*E")
    params = TwoTower(config, impl=Impl(moe="dense")).random_params(seed=0, scale=0.3)
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 4, config.vocab_size)

    def loss_and_grad(remat):
        model = TwoTower(config, impl=Impl(moe="dense", remat=remat))
        loss = functools.partial(diffusion_loss, model=model, block_size=8, mask_token_id=3)
        (value, _), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
            params["denoiser"], params["context"], tokens, jax.random.key(2))
        return value, grads

    reference, reference_grads = loss_and_grad("none")
    for remat in ("full", "dots"):
        value, grads = loss_and_grad(remat)
        np.testing.assert_allclose(value, reference, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="unknown remat policy"):
        TwoTower(config, impl=Impl(remat="some")).random_params(seed=0)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_one_call_context_pass_equals_block_by_block(block_size):
    """The objective's context pass in one call (block-boundary states from the scan inputs) against the
    sampler's way of building it: L/S serial extensions, each Mamba cache kept before every block."""
    import functools

    import jax

    from twotower_jax.config import tiny
    from twotower_jax.ops.ssd import ssd_block_states, ssd_sequential
    from twotower_jax.tower import Impl, NemotronH
    from twotower_jax.training.objective import blockwise_context, blockwise_context_by_blocks

    config = tiny(pattern="M*EM", chunk_size=8)   # scan chunk 8 != block size
    model = NemotronH(config, impl=Impl(moe="dense"))
    params = model.random_params(seed=3, scale=0.4)
    tokens = jax.random.randint(jax.random.key(4), (2, 32), 4, config.vocab_size)
    # jitted (as in training): run eagerly, each would dispatch op by op, hundreds of small compiles
    by_blocks = jax.jit(blockwise_context_by_blocks, static_argnums=(0, 3))(model, params, tokens, block_size)
    # attention tiles: the default (128 > 32: one tile), 8 (4 × 4 tiles, those above the diagonal skipped),
    # None (the model's Impl: 512 × 1,024)
    for tile in ({}, {"attention_tile": 8}, {"attention_tile": None}):
        one_call = jax.jit(functools.partial(blockwise_context, model, block_size=block_size, **tile))(
            params=params, tokens=tokens)
        assert len(jax.tree.leaves(one_call)) == len(jax.tree.leaves(by_blocks)) > 0
        for a, b in zip(jax.tree.leaves(one_call), jax.tree.leaves(by_blocks)):
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-5,
                                       err_msg=str(tile))
    with pytest.raises(ValueError, match="attention_tile"):
        blockwise_context(model, params, tokens, block_size, attention_tile=0)

    # ssd_block_states against the sequential reference's state after each block prefix
    rng = np.random.default_rng(0)
    b, length, h, p, g, n = 1, 12, 2, 3, 1, 4
    x, B = rng.standard_normal((b, length, h, p)), rng.standard_normal((b, length, g, n))
    dt, A = rng.uniform(0.1, 2.0, (b, length, h)), -rng.uniform(0.5, 3.0, h)
    h0 = rng.standard_normal((b, h, p, n))
    states = ssd_block_states(*(jax.numpy.asarray(a, "float32") for a in (x, dt, A, B, h0)), block_size=4)
    for block in range(3):
        k = 4 * block
        expected = h0 if k == 0 else ssd_sequential(*(jax.numpy.asarray(a, "float32") for a in (
            x[:, :k], dt[:, :k], A, B[:, :k], B[:, :k], h0)))[1]
        np.testing.assert_allclose(states[:, block], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of block_size"):
        ssd_block_states(*(jax.numpy.asarray(a, "float32") for a in (x, dt, A, B, h0)), block_size=5)


def test_distributed_initialize_checks_its_flags():
    from twotower_jax import distributed
    with pytest.raises(ValueError, match="go together"):
        distributed.initialize("127.0.0.1:1", None, 0)
    with pytest.raises(ValueError, match=r"process id 2 is outside \[0, 2\)"):
        distributed.initialize("127.0.0.1:1", 2, 2)
    assert distributed.initialize("127.0.0.1:1", 1, 0) is False        # one process: nothing to join
    assert distributed.initialize(from_environment=False) is False
    assert distributed.process_rows(8, 1, 4) == slice(2, 4)
    with pytest.raises(ValueError, match="does not split evenly"):
        distributed.process_rows(6, 0, 4)


def test_router_bias_update_balances_expert_load():
    """Aux-loss-free balancing (training/load_balance.py, Megatron's rule): in a train step the routers'
    correction biases move by rate · sign(mean load − load) and nothing else changes; repeated on a
    router skewed towards one expert, the load evens out."""
    import functools

    import jax
    import jax.numpy as jnp

    from twotower_jax.config import tiny
    from twotower_jax.tower import Impl
    from twotower_jax.training import load_balance
    from twotower_jax.training.loop import TrainConfig, make_optimizer, make_train_step
    from twotower_jax.training.objective import diffusion_loss
    from twotower_jax.two_tower import TwoTower

    config = tiny(pattern="M*E", n_routed_experts=4, num_experts_per_tok=2)
    model = TwoTower(config, impl=Impl(moe="dense"))
    params = model.random_params(seed=0, scale=0.3)
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 4, config.vocab_size)
    loss = functools.partial(diffusion_loss, model=model, block_size=4, mask_token_id=3, expert_load=True)
    rate = 1e-3
    results = {}
    for r in (0.0, rate):
        cfg = TrainConfig(steps=5, warmup_steps=1, expert_bias_update_rate=r)
        trainable = jax.tree.map(jnp.array, params["denoiser"])
        step = make_train_step(loss, cfg)
        results[r] = step(trainable, make_optimizer(cfg).init(trainable), params["context"], tokens,
                          jax.random.key(2), 0)
    (plain, _, plain_metrics), (balanced, _, metrics) = results[0.0], results[rate]
    assert 1.0 <= float(metrics["expert_load_max_over_mean"]) and float(metrics["expert_load_min_over_mean"]) <= 1.0
    _, direct = jax.jit(loss)(params["denoiser"], params["context"], tokens, jax.random.key(2))
    (layer, load), = direct["expert_load"].items()
    assert layer == ("layers_2", "mixer") and float(load.sum()) == tokens.size * 2   # every token, top-2
    delta = np.asarray(balanced["layers_2"]["mixer"]["e_score_correction_bias"]
                       - plain["layers_2"]["mixer"]["e_score_correction_bias"])
    np.testing.assert_allclose(delta, rate * np.sign(np.asarray(load).mean() - np.asarray(load)), atol=1e-7)
    for path, a in jax.tree_util.tree_leaves_with_path(plain):
        if "e_score_correction_bias" not in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(a, functools.reduce(lambda node, key: node[key.key], path, balanced))

    # a router skewed to expert 0 (bias +0.5) evens out under repeated updates (rate 0.01)
    skewed = jax.tree.map(jnp.array, params["denoiser"])
    skewed["layers_2"]["mixer"]["e_score_correction_bias"] = jnp.asarray([0.5, 0.0, 0.0, 0.0], jnp.float32)

    @jax.jit
    def rebalance(p):
        _, m = loss(p, params["context"], tokens, jax.random.key(2))
        return load_balance.update_expert_bias(p, m["expert_load"], 0.01), load_balance.load_metrics(m["expert_load"])

    _, before = rebalance(skewed)
    for _ in range(80):
        skewed, after = rebalance(skewed)
    assert float(before["expert_load_max_over_mean"]) > 1.5
    assert float(after["expert_load_max_over_mean"]) < float(before["expert_load_max_over_mean"]) - 0.3
