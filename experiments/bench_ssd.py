"""SSD scan benchmark: reference (sequential) vs xla (chunked) vs pallas, forward and forward+backward, at a
small size and at the real Mamba-2 layer's sizes (H=64, P=64, N=128, G=8). Prints a table and writes JSON.
Compile time is excluded (AOT-compiled first, then one warm-up run); each time is the median of --repeats
runs, and every ratio compares with the reference measured in the same run.

On a CPU the Pallas kernel runs in interpret mode, so its CPU numbers check correctness only. On a GPU the
table also gives the forward's achieved fraction of peak memory bandwidth (H100 3.35 TB/s, H200 4.8 TB/s),
counting the bytes a scan must move at least: x, dt, B, C and the initial state read once, y and the final
state written once.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python experiments/bench_ssd.py --out experiments/results/ssd_cpu.json
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench_common import compile_and_time, write_results
from twotower_jax.ops.ssd import SSD_IMPL_NAMES, ssd_chunked, ssd_sequential
from twotower_jax.ops.ssd_pallas import ssd_pallas

SIZES = {  # name -> (heads H, head_dim P, state N, groups G)
    "small": (8, 16, 16, 2),
    "real": (64, 64, 128, 8),
}
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}  # bytes/s, matched against the device name


def problem(batch, length, heads, head_dim, state, groups, dtype, seed=0):
    """Random scan inputs as the mixer makes them: dt = softplus(·) > 0, A < 0, fp32 initial state."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), dtype)
    dt = jnp.asarray(np.log1p(np.exp(rng.standard_normal((batch, length, heads)) - 2)), jnp.float32)
    A = jnp.asarray(-rng.uniform(0.5, 4.0, heads), jnp.float32)
    B = jnp.asarray(rng.standard_normal((batch, length, groups, state)), dtype)
    C = jnp.asarray(rng.standard_normal((batch, length, groups, state)), dtype)
    h0 = jnp.asarray(rng.standard_normal((batch, heads, head_dim, state)) * 0.1, jnp.float32)
    return x, dt, A, B, C, h0


def scans(chunk_size):
    """The three implementations under their CLI names (--ssd-impl)."""
    impls = {"sequential": ssd_sequential,
             "chunked": lambda *a: ssd_chunked(*a, chunk_size=chunk_size),
             "pallas": lambda *a: ssd_pallas(*a, chunk_size=chunk_size)}
    return {cli: impls[name] for cli, name in SSD_IMPL_NAMES.items() if name in impls}


def forward_backward(scan, cotangents):
    """(y, final_state) and the gradients of <y, gy> + <final_state, gh> w.r.t. all six inputs."""
    def run(*args):
        outputs, vjp = jax.vjp(scan, *args)
        return outputs, vjp(cotangents)
    return run


def max_rel_err(tree, reference):
    errs = [float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))
            for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference))]
    return max(errs)


def min_bytes(inputs):
    x, dt, A, B, C, h0 = inputs
    read = sum(a.size * a.dtype.itemsize for a in inputs)
    return read + x.size * 4 + h0.size * 4  # y and final_state are float32


def peak_bandwidth():
    kind = jax.devices()[0].device_kind
    return next((bw for name, bw in PEAK_BANDWIDTH.items() if name in kind), None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--small-lengths", type=int, nargs="+", default=[64, 1000])
    parser.add_argument("--real-lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=128, help="config chunk (the kernel caps it at 64)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="x, B, C dtype")
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    on_gpu = jax.default_backend() == "gpu"
    peak = peak_bandwidth() if on_gpu else None

    rows = []
    for size in args.sizes:
        heads, head_dim, state, groups = SIZES[size]
        for length in (args.small_lengths if size == "small" else args.real_lengths):
            inputs = problem(args.batch, length, heads, head_dim, state, groups, dtype)
            rng = np.random.default_rng(1)
            cotangents = (jnp.asarray(rng.standard_normal(inputs[0].shape), jnp.float32),
                          jnp.asarray(rng.standard_normal(inputs[5].shape), jnp.float32))
            for mode in args.modes:
                measured = {}
                for name, scan in scans(args.chunk_size).items():
                    fn = scan if mode == "fwd" else forward_backward(scan, cotangents)
                    measured[name] = compile_and_time(fn, inputs, args.repeats)
                reference_s, _, reference = measured["reference"]
                for name, (seconds, compile_s, out) in measured.items():
                    row = {"size": size, "heads": heads, "head_dim": head_dim, "state": state, "groups": groups,
                           "batch": args.batch, "length": length, "mode": mode, "impl": name,
                           "ms": seconds * 1e3, "compile_s": compile_s,
                           "speedup_vs_reference": reference_s / seconds,
                           "max_rel_err_vs_reference": max_rel_err(out, reference)}
                    if peak is not None and mode == "fwd":
                        row["bandwidth_fraction"] = min_bytes(inputs) / seconds / peak
                    rows.append(row)

    device = jax.devices()[0]
    print(f"SSD scan, {args.dtype} x/B/C, batch {args.batch}, config chunk {args.chunk_size}, "
          f"{device.platform} ({device.device_kind}), median of {args.repeats}, compile excluded")
    if not on_gpu:
        print("NOTE: not on a GPU, so Pallas runs in INTERPRET mode: its times and ratios are for "
              "correctness only, not kernel performance.")
    bw_head = f" {'% peak BW':>9}" if peak is not None else ""
    print(f"{'size':>5} {'H/P/N/G':>12} {'length':>6} {'mode':>7} {'impl':>9} {'ms':>10} {'vs ref':>8} "
          f"{'rel err':>8}{bw_head}")
    for r in rows:
        bw = ""
        if peak is not None:
            bw = f" {100 * r['bandwidth_fraction']:>8.1f}%" if "bandwidth_fraction" in r else f" {'':>9}"
        dims = f"{r['heads']}/{r['head_dim']}/{r['state']}/{r['groups']}"
        print(f"{r['size']:>5} {dims:>12} {r['length']:>6} {r['mode']:>7} {r['impl']:>9} {r['ms']:>10.3f} "
              f"{r['speedup_vs_reference']:>7.2f}x {r['max_rel_err_vs_reference']:>8.1e}{bw}")
    if args.out:
        write_results(args.out, rows, args, device_kind=device.device_kind, pallas_interpret_mode=not on_gpu,
                      peak_bandwidth_bytes_per_s=peak)


if __name__ == "__main__":
    main()
