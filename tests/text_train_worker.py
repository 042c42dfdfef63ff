"""Trains a tiny AR tower with `loop.train` on the grain text pipeline, on a data=2 mesh, for
tests/test_text_pipeline.py. Two layouts of the same global batches:

    --layout processes: one of 2 processes (1 CPU device each, jax.distributed); each reads its own shard
        (TextBatches, shard = process index of 2) and feeds only its rows; the global batch of step s is
        shard 0's batch s then shard 1's batch s (process order).
    --layout reference: 1 process with 2 CPU devices building exactly that global batch itself: shard 0's
        and shard 1's batches (two pipelines, shard_count=2) concatenated, as one global batch_fn.

    python tests/text_train_worker.py --layout processes --data corpus.jsonl --tokenizer tok.json \
        --workdir W --out result.json [--stop_after K] --coordinator_address A --num_processes 2 --process_id I

Writes (process 0) {"losses": every logged loss of the run in `workdir`, "params": {path: values},
"batches_read": [per process: batches its feed drew from grain in this launch], "global_rows_from": the
process whose rows each row of a global batch built by `loop` is (processes: [0, 0, 1, 1])}.
"""
import argparse
import dataclasses
import functools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

STEPS, SEQ_LEN, ROWS_PER_SHARD, SHARDS = 8, 16, 2, 2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", choices=["processes", "reference"], required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stop_after", type=int)
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args = parser.parse_args()

    from twotower_jax import distributed
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from twotower_jax.config import tiny
    from twotower_jax.data.text_pipeline import TextBatches, TextPipeline, TextPipelineConfig
    from twotower_jax.tower import Impl, NemotronH
    from twotower_jax.training import loop, parallel
    from twotower_jax.training.loop import TrainConfig, read_metrics, train
    from twotower_jax.training.objective import ar_loss

    def shard(index=None, count=None) -> TextPipeline:   # None: this process's shard of jax.process_count()
        return TextPipeline(TextPipelineConfig(data=(args.data,), tokenizer=args.tokenizer, seq_len=SEQ_LEN,
                                               batch_size=ROWS_PER_SHARD, seed=3, shard_index=index,
                                               shard_count=count))

    if args.layout == "processes":
        if jax.process_count() != SHARDS:
            raise SystemExit(f"--layout processes runs as {SHARDS} processes, got {jax.process_count()}")
        feeds = [TextBatches(shard())]
        batch_fn = feeds[0]
    else:
        feeds = [TextBatches(shard(i, SHARDS)) for i in range(SHARDS)]

        def batch_fn(index):   # the global batch: every shard's rows, in shard (= process) order
            return np.concatenate([feed(index) for feed in feeds])

    mesh = parallel.train_mesh(n_devices=2, data=2)
    # which process's rows the global batch holds, row by row (the loss is blind to row order)
    marked = np.full((ROWS_PER_SHARD, 3), jax.process_index(), np.int32)
    placed = loop._on_devices(marked, mesh, 1, args.layout == "processes")
    global_rows_from = np.asarray(multihost_utils.process_allgather(placed, tiled=True)
                                  if jax.process_count() > 1 else placed)[:, 0].tolist()

    model = NemotronH(dataclasses.replace(tiny(pattern="M*"), vocab_size=feeds[0].pipeline.vocab_size),
                      impl=Impl(moe="dense"))
    cfg = TrainConfig(steps=STEPS, peak_lr=3e-3, warmup_steps=2, save_every=2, log_every=1)
    final = train(functools.partial(ar_loss, model=model), model.random_params(seed=0, scale=0.3), None, batch_fn,
                  cfg, args.workdir, stop_after=args.stop_after, progress=False,
                  mesh=mesh)
    gathered = jax.tree.map(lambda x: np.asarray(jax.device_get(
        multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x), np.float64), final)
    read = distributed.allgather_json(sum(feed.batches_read for feed in feeds))
    if jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump({"losses": [r["loss"] for r in read_metrics(args.workdir)], "batches_read": read,
                       "global_rows_from": global_rows_from,
                       "params": {jax.tree_util.keystr(p): v.tolist()
                                  for p, v in jax.tree_util.tree_leaves_with_path(gathered)}}, f)
    distributed.shutdown()   # jax 0.12.1 hung at exit after orbax checkpoints otherwise


if __name__ == "__main__":
    main()
