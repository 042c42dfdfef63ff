import os
import sys

# Two CPU devices for mesh tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
# The suite compiles hundreds of small programs and runs each a few times: XLA:CPU's backend
# optimisation and its expensive LLVM passes cost more than they save here (~3.6x faster compiles,
# measured on the 8-device placement subprocess). They change no result the tests compare: numerics are
# checked against references at stated tolerances either way. Benchmarks never run with these flags.
# TWOTOWER_TEST_FULL_OPT=1 keeps XLA's defaults.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
if not os.environ.get("TWOTOWER_TEST_FULL_OPT"):
    for _flag in FAST_COMPILE_FLAGS:
        if _flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
            os.environ["XLA_FLAGS"] += " " + _flag
# A persistent compilation cache shared by this pytest process, its xdist workers and every subprocess it
# starts (they inherit the environment): a process that compiles a program another has already compiled
# (same HLO, flags and device assignment: e.g. the demo model's samplers in two workers) loads it instead.
# Measured on the a-g group: 96 of 1365 programs were loaded again. `make test` points all its pytest
# processes at one directory, new for each run and removed at its end (the suite's time is a cold run's);
# a pytest run on its own gets a temporary one. Every program is cached, however small or quick to compile.
# A cache hit still fires jax's backend-compile event (tests/conftest.py `backend_compiles` counts it).
# A size limit turns on jax's file lock around each cache read and write (without one, a process can read an
# entry another is still writing: jax then warns and compiles). TWOTOWER_TEST_NO_COMPILATION_CACHE=1 turns
# the cache off.
if not os.environ.get("TWOTOWER_TEST_NO_COMPILATION_CACHE"):
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        import atexit
        import shutil
        import tempfile

        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="twotower-test-jax-cache-")
        atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

from twotower_jax.config import tiny  # noqa: E402

# Tiny configs that together cover every layer type, n_groups > 1, GQA and MQA, several chunk sizes.
PARITY_CONFIGS = {
    "all_types": tiny(pattern="ME*-M*E"),
    "mqa_groups4": tiny(pattern="M*MEM", n_groups=4, num_key_value_heads=1, chunk_size=4,
                        num_experts_per_tok=2, routed_scaling_factor=1.0),
}


@pytest.fixture(scope="session")
def hf_tower(tmp_path_factory):
    """Factory: config name -> (transformers model, checkpoint dir, our config, our params), cached."""
    from hf_oracle import make_hf_model
    from twotower_jax.checkpoint.hf import load_hf_tower

    built = {}

    def get(name):
        if name not in built:
            model = make_hf_model(PARITY_CONFIGS[name], seed=len(built) + 1)
            directory = tmp_path_factory.mktemp(f"hf_{name}")
            model.save_pretrained(directory)
            config, params = load_hf_tower(directory)
            built[name] = (model, directory, config, params)
        return built[name]

    return get


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"   # jax._src.dispatch, 0.10.2 .. 0.12


@pytest.fixture
def backend_compiles():
    """A list that records every XLA backend compilation made while the test runs (its durations)."""
    import jax.monitoring

    compiles = []

    def listener(event, duration, **_):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
