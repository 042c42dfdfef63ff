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
