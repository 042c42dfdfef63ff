"""The real-config TwoTower (Nemotron-3-Nano-30B-A3B × 2, BF16) placed on N devices: per-device parameter
bytes against the ideal split (total ÷ N), and the diffusion programs (context prefill, context extension
over a block, denoiser pass over a block) compiled ahead of time from shapes alone under `towers` and
`sharded`, with their compile seconds and XLA memory analysis. Nothing is allocated: params are
`jax.eval_shape` structs. Writes a Markdown table and JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/plan_placements.py \\
        --out experiments/results/placements_8dev

`--no-compile` writes the byte table only (seconds, and it needs no devices: abstract meshes).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp

from twotower_jax import sharding
from twotower_jax.config import nano_30b_a3b
from twotower_jax.plan import compile_programs
from twotower_jax.tower import Impl
from twotower_jax.two_tower import TwoTower

GB = 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--placements", nargs="+", default=["towers", "sharded"], choices=["towers", "sharded"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--no-compile", action="store_true", help="the byte table only (abstract meshes)")
    parser.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)

    model = TwoTower(nano_30b_a3b(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, impl=Impl(moe="ragged"))
    begin = time.perf_counter()
    shapes = model.param_shapes()
    shapes_s = time.perf_counter() - begin
    rows = []
    for name in args.placements:
        mesh = (sharding.abstract_mesh(name, args.devices) if args.no_compile
                else sharding.make_mesh(name, n_devices=args.devices))
        table = sharding.balance_table(shapes, name, mesh)
        row = {"placement": name, "mesh": table["mesh"], "total_bytes": table["total_bytes"],
               "ideal_bytes": table["ideal_bytes"], "per_device": {str(k): v for k, v in table["per_device"].items()},
               "max_over_ideal": table["max_over_ideal"], "rules": sharding.describe(name, mesh)["rules"]}
        if not args.no_compile:
            row["programs"] = compile_programs(model, "diffusion", name, mesh, batch=args.batch,
                                               context=args.prompt_length, new_tokens=args.new_tokens,
                                               block_size=args.block_size)
        rows.append(row)
        print(f"{row['placement']}: largest device {table['max_bytes'] / GB:.2f} GB = {table['max_over_ideal']:.4f} x ideal "
              f"{table['ideal_bytes'] / GB:.2f} GB", flush=True)
        for program, info in row.get("programs", {}).items():
            print(f"  {program}: compiled in {info['compile_seconds']:.1f} s, arguments {info['argument'] / GB:.2f} GB, "
                  f"temp {info['temp'] / GB:.2f} GB", flush=True)

    # For comparison: the rules before dense weights were split (experts and vocabulary only), bytes only.
    before = sharding.Placement("sharded", (("expert", sharding.EXPERT_AXIS), ("vocab", sharding.MODEL_AXES)))
    before_mesh = sharding.abstract_mesh("sharded", args.devices)
    table = sharding.balance_table(shapes, before, before_mesh)
    rows.append({"placement": "sharded, experts + vocabulary only (earlier rules)", "mesh": table["mesh"],
                 "total_bytes": table["total_bytes"], "ideal_bytes": table["ideal_bytes"],
                 "per_device": {str(k): v for k, v in table["per_device"].items()},
                 "max_over_ideal": table["max_over_ideal"], "rules": sharding.describe(before, before_mesh)["rules"]})
    print(f"{rows[-1]['placement']}: {table['max_over_ideal']:.4f} x ideal", flush=True)

    command = "XLA_FLAGS=--xla_force_host_platform_device_count=%d python experiments/plan_placements.py %s" % (
        args.devices, " ".join(argv if argv is not None else sys.argv[1:]))
    meta = {"command": command, "devices": [str(d) for d in jax.devices()][:args.devices], "jax": jax.__version__,
            "host": platform.processor() or platform.machine(), "param_shapes_seconds": shapes_s, "args": vars(args)}
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(rows, meta))
    return 0


def markdown(rows, meta) -> str:
    lines = [f"# Real-config TwoTower (BF16) on {meta['args']['devices']} devices: parameter bytes and AOT compiles",
             "", f"Command: `{meta['command']}`", "",
             f"jax {meta['jax']}, host {meta['host']}; params are `eval_shape` structs (nothing allocated).", "",
             "## Parameter bytes per device (GB = 1e9 bytes)", ""]
    devices = list(rows[0]["per_device"])
    lines.append("| placement | mesh | " + " | ".join(f"dev {d}" for d in devices) + " | ideal (total ÷ N) | largest ÷ ideal |")
    lines.append("|---|---|" + "---|" * len(devices) + "---|---|")
    for r in rows:
        mesh = " × ".join(f"{a} {s}" for a, s in r["mesh"].items())
        lines.append(f"| {r['placement']} | {mesh} | " + " | ".join(f"{r['per_device'][d] / GB:.2f}" for d in devices)
                     + f" | {r['ideal_bytes'] / GB:.2f} | {r['max_over_ideal']:.4f} |")
    lines += ["", f"Total {rows[0]['total_bytes'] / GB:.2f} GB (both towers). Rules: `{rows[0]['rules']}`."]
    if any("programs" in r for r in rows):
        a = meta["args"]
        lines += ["", f"## Programs compiled ahead of time (batch {a['batch']}, prompt {a['prompt_length']}, "
                      f"capacity {a['prompt_length'] + a['new_tokens']}, block {a['block_size']})", "",
                  "Per device: each device of a program's group runs the same SPMD program. A program takes one "
                  "tower's params (under `sharded` each device holds both towers' shards: two programs' arguments). "
                  "`memory_analysis()` of the XLA:CPU compile: a GPU compile's temporaries will differ.", "",
                  "| placement | program | devices | compile s | arguments GB | outputs GB | temporaries GB |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            for name, p in r.get("programs", {}).items():
                lines.append(f"| {r['placement']} | {name} | {','.join(map(str, p['devices']))} | "
                             f"{p['compile_seconds']:.1f} | {p['argument'] / GB:.2f} | {p['output'] / GB:.2f} | "
                             f"{p['temp'] / GB:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
