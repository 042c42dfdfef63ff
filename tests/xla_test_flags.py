"""The XLA flags the test suite compiles with, for its own processes (tests/conftest.py) and for the
subprocesses tests start with a device count of their own (one place, so that they all compile alike).

The suite compiles hundreds of small programs and runs each a few times, so XLA:CPU's compile time is most
of its cost. These flags cut it and change no result the tests compare: numerics are checked against
references at stated tolerances either way. Benchmarks and the library never use them.
- `--xla_backend_optimization_level=0`, `--xla_llvm_disable_expensive_passes=true`: ~3.6x faster compiles
  (measured on the 8-device placement subprocess).
- `--xla_cpu_parallel_codegen_split_count=1`: one LLVM module per program instead of several compiled on
  parallel threads. On 2 cores already busy with 2 pytest workers the threads add no speed, only the
  splitting's overhead: 16–20% less compile CPU time for a tiny TwoTower's train step (interleaved runs),
  and test_two_tower + test_speculative + test_cache on 2 workers took 87–106 s against 113–115 s.
- `--xla_cpu_use_fusion_emitters=false` (jaxlib 0.10 only; newer jaxlibs have no other code path and reject
  the flag): the older elemental emitters. Compiling the tiny TwoTower's diffusion train step took
  4.6–6.6 CPU s with the fusion emitters and 1.2–1.7 s without (tests/conftest.py's cost log).
TWOTOWER_TEST_FULL_OPT=1 keeps XLA's defaults.
"""
import importlib.metadata
import os


def _jaxlib_version() -> tuple[int, int]:
    try:
        major, minor = importlib.metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (99, 0)   # unknown: assume new, add no flag it might reject


def fast_compile_flags() -> tuple[str, ...]:
    if os.environ.get("TWOTOWER_TEST_FULL_OPT"):
        return ()
    flags = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
             "--xla_cpu_parallel_codegen_split_count=1"]
    if _jaxlib_version() < (0, 11):
        flags.append("--xla_cpu_use_fusion_emitters=false")
    return tuple(flags)


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test subprocess with `devices` CPU devices."""
    return " ".join((f"--xla_force_host_platform_device_count={devices}", *fast_compile_flags()))


def training_subprocess_env(devices: int) -> dict:
    """The environment for a training subprocess with `devices` CPU devices: the suite's XLA flags, CPU only,
    and without the suite's shared persistent compilation cache (on jax 0.12.1 two processes relaunched with
    a cache their first launch had filled hung before their first step)."""
    env = {key: value for key, value in os.environ.items() if key != "JAX_COMPILATION_CACHE_DIR"}
    return {**env, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu"}
