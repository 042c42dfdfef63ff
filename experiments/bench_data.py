"""Speed of the offline training-data stream (`twotower_jax.data.TrainingStream.batch`): median
milliseconds per batch after a warm-up batch, per (seq_len, batch_size, task_fraction). Printed as a
table and written as JSON. (This was a wall-clock unit test; speed belongs in a benchmark.)

    python experiments/bench_data.py [--repeats 20] [--out experiments/results/data_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from twotower_jax.data.stream import TrainingStream

SHAPES = ((128, 16, 0.8), (256, 32, 0.5), (1024, 8, 0.5))   # (seq_len, batch_size, task_fraction)


def measure(seq_len: int, batch_size: int, task_fraction: float, repeats: int) -> dict:
    stream = TrainingStream(seq_len=seq_len, batch_size=batch_size, seed=0, task_fraction=task_fraction)
    stream.batch(0)
    times = []
    for step in range(1, repeats + 1):
        start = time.perf_counter()
        stream.batch(step)
        times.append(time.perf_counter() - start)
    ms = float(np.median(times)) * 1e3
    return {"seq_len": seq_len, "batch_size": batch_size, "task_fraction": task_fraction,
            "ms_per_batch": ms, "tokens_per_s": seq_len * batch_size / (ms / 1e3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = parser.parse_args(argv)
    rows = [measure(*shape, args.repeats) for shape in SHAPES]
    print("| seq_len | batch | task_fraction | ms / batch | tokens/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seq_len']} | {r['batch_size']} | {r['task_fraction']} | {r['ms_per_batch']:.2f} | "
              f"{r['tokens_per_s']:.3g} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": {"args": vars(args), "host": platform.processor() or platform.machine()},
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
