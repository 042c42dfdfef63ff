import os
import sys

# Two CPU devices for mesh tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
# Compile-time XLA flags for the suite (tests/xla_test_flags.py says which and why; TWOTOWER_TEST_FULL_OPT=1
# keeps XLA's defaults). Subprocesses inherit them; those that set their own device count use `xla_flags`.
sys.path.insert(0, os.path.dirname(__file__))
from xla_test_flags import fast_compile_flags  # noqa: E402

for _flag in fast_compile_flags():
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


# TWOTOWER_TEST_COST_LOG=path appends one JSON line per test: wall seconds, CPU seconds of this process
# and of the subprocesses it waited for, and the XLA compiles (count, seconds) it made. CPU seconds say what
# a test costs on a shared 2-core machine, where wall time mostly says what else was running beside it.
if os.environ.get("TWOTOWER_TEST_COST_LOG"):
    import json
    import resource
    import time

    _compile_seconds = []

    def _record_compile(event, duration, **_):
        if event == BACKEND_COMPILE_EVENT:
            _compile_seconds.append(duration)

    import jax.monitoring  # noqa: E402

    jax.monitoring.register_event_duration_secs_listener(_record_compile)

    def _cpu():
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        wall, (me, kids), compiles = time.perf_counter(), _cpu(), len(_compile_seconds)
        yield
        me2, kids2 = _cpu()
        with open(os.environ["TWOTOWER_TEST_COST_LOG"], "a") as log:
            log.write(json.dumps({"test": item.nodeid, "wall": time.perf_counter() - wall, "cpu": me2 - me,
                                  "cpu_children": kids2 - kids, "compiles": len(_compile_seconds) - compiles,
                                  "compile_s": sum(_compile_seconds[compiles:])}) + "\n")


# Every program a test compiles stays loaded (jax's jit caches keep its executable) until the process ends,
# and each loaded XLA:CPU executable holds ~60 memory mappings (24,418 in one process after the 383 compiles
# of test_two_tower, test_speculative and test_attention). Linux allows a process 65,530
# (vm.max_map_count), so a process that ran the whole suite (~2,200 compiles) failed an mmap inside a later
# compile: the segfaults/aborts in XLA:CPU compiles that once forced the suite into several processes.
# Dropping jax's caches and the samplers' kept executables after each file releases them; a later file that
# needs the same program loads it from the run's persistent compilation cache.
@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs_after_each_file():
    yield
    import gc

    import jax

    from twotower_jax.sampling.timing import clear_compiled

    clear_compiled()
    jax.clear_caches()
    gc.collect()


# `make test` hands whole files to its 2 xdist workers in collection order: the slowest first (CPU seconds,
# subprocesses included, from a cost-log run), so the run does not end with one worker alone on a long file.
# Files not listed follow in name order.
SLOWEST_FILES_FIRST = (
    "test_train_parallel.py",   # ~120 s: a 4-device and a 2-process training subprocess
    "test_placement_many.py",   # ~100 s: the 8-device subprocess
    "test_speculative.py", "test_two_tower.py", "test_attention.py", "test_evaluate.py", "test_text_pipeline.py",
    "test_engine.py", "test_batch_generate.py", "test_generate.py", "test_training.py", "test_plan.py",
    "test_cache.py", "test_hf_parity.py", "test_placement.py", "test_experiments.py", "test_moe_dispatch.py",
    "test_notebook.py", "test_gpu_check.py", "test_layers.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: files stay whole, in order
