"""Runs the training step under a given mesh layout and prints the losses and final params (as JSON
with a digest), for tests/test_train_parallel.py. Run in a subprocess with as many CPU devices as the
layout needs (XLA_FLAGS=--xla_force_host_platform_device_count=N), or as one of several processes.

    python tests/train_parallel_worker.py --out F --runs NAME=LOSS,BATCH,GRAD_ACCUM,DATA,EXPERT [...]
        [--steps 20] [--coordinator_address A --num_processes P --process_id I]

DATA = 0: no mesh (the single-device step). Several runs share one process (and its compile caches).
"""
import argparse
import dataclasses
import functools
import json
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", nargs="*", default=[], help="NAME=LOSS,BATCH,GRAD_ACCUM,DATA,EXPERT")
    parser.add_argument("--loop_workdir", help="also train through loop.train here (diffusion, data=2 mesh)")
    parser.add_argument("--stop_after", type=int, help="loop.train stops after this step (an interruption)")
    parser.add_argument("--kill_at_step", type=int, help="SIGKILL this process once loop.train has logged this step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args = parser.parse_args()

    from twotower_jax import distributed
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils

    from twotower_jax.config import tiny
    from twotower_jax.tower import Impl
    from twotower_jax.training import parallel
    from twotower_jax.training.loop import TrainConfig, make_optimizer, make_train_step
    from twotower_jax.training.objective import ar_loss, diffusion_loss
    from twotower_jax.two_tower import TwoTower

    # Expert dims divisible by 2 (experts split over `expert`), hidden 32 divisible by `data` (FSDP).
    config = tiny(pattern="M*E", n_routed_experts=4, num_experts_per_tok=2)
    model = TwoTower(config, impl=Impl(moe="dense"))
    cfg = TrainConfig(steps=args.steps, peak_lr=3e-3, warmup_steps=2, decay_fraction=0.2)

    def run(loss: str, batch_rows: int, grad_accum: int, data: int, expert: int) -> dict:
        params = model.random_params(seed=0, scale=0.3)
        if loss == "diffusion":
            loss_fn = functools.partial(diffusion_loss, model=model, block_size=4, mask_token_id=3)
            trainable, frozen = params["denoiser"], params["context"]
        else:
            loss_fn = functools.partial(ar_loss, model=model.context)
            trainable, frozen = params["context"], None
        opt_state = make_optimizer(cfg).init(trainable)
        mesh = None
        if data:
            mesh = parallel.train_mesh(n_devices=data * expert, data=data)
            trainable, opt_state, frozen = parallel.place_train_state(trainable, opt_state, frozen, mesh)
        parallel.check_grad_accum(grad_accum, batch_rows, mesh)
        step_fn = make_train_step(loss_fn, cfg, mesh, grad_accum)
        rng = np.random.default_rng(1)
        losses = []
        key = jax.random.key(0)
        for step in range(1, args.steps + 1):
            batch = rng.integers(4, config.vocab_size, (batch_rows, 16)).astype(np.int32)
            batch = (jnp.asarray(batch) if mesh is None
                     else distributed.global_array(batch, parallel.batch_shardings(batch, mesh)))
            trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch,
                                                    jax.random.fold_in(key, step), step - 1)
            losses.append(float(metrics["loss"]))
        gathered = jax.tree.map(lambda x: np.asarray(jax.device_get(
            multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x), np.float64),
            trainable)
        layout = None
        if mesh is not None:
            leaf = trainable["layers_2"]["mixer"]["experts_up"]
            layout = {"experts_up_spec": [str(axis) for axis in leaf.sharding.spec],
                      "devices": mesh.devices.size, "processes": jax.process_count()}
        flat = {jax.tree_util.keystr(p): v.tolist() for p, v in jax.tree_util.tree_leaves_with_path(gathered)}
        return {"losses": losses, "params": flat, "layout": layout}

    def kill_at(record):
        if record["step"] == args.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def loop_run(workdir: str, stop_after) -> dict:
        """loop.train on a data=2 mesh: checkpoints every 5 steps, metrics every step."""
        from twotower_jax.training.loop import read_metrics, train
        params = model.random_params(seed=0, scale=0.3)
        loss_fn = functools.partial(diffusion_loss, model=model, block_size=4, mask_token_id=3)
        batches = np.random.default_rng(1).integers(4, config.vocab_size, (args.steps, 8, 16)).astype(np.int32)
        loop_cfg = dataclasses.replace(cfg, save_every=5, log_every=1)
        final = train(loss_fn, params["denoiser"], params["context"], lambda step: batches[step], loop_cfg,
                      workdir, stop_after=stop_after, progress=False, on_log=kill_at,
                      mesh=parallel.train_mesh(n_devices=2, data=2))
        gathered = jax.tree.map(lambda x: np.asarray(jax.device_get(
            multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x), np.float64), final)
        losses = [r["loss"] for r in read_metrics(workdir)] if jax.process_index() == 0 else []
        return {"losses": losses, "layout": None,
                "params": {jax.tree_util.keystr(p): v.tolist() for p, v in jax.tree_util.tree_leaves_with_path(gathered)}}

    results = {}
    if args.loop_workdir:
        results["loop"] = loop_run(args.loop_workdir, args.stop_after)
    for spec in args.runs:
        name, values = spec.split("=")
        loss, *numbers = values.split(",")
        results[name] = run(loss, *map(int, numbers))
    if jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    distributed.shutdown()   # jax 0.12.1 hung at exit after orbax checkpoints otherwise

if __name__ == "__main__":
    main()
