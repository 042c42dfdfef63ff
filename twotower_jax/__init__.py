"""twotower-jax: NVIDIA's Nemotron-Labs-TwoTower in JAX/Flax. `twotower_jax.Engine` (with
`GenerationConfig`, `Request`) is the generation engine; the modules are imported on first use so that
`import twotower_jax` stays cheap and touches no device."""

_ENGINE_NAMES = ("Engine", "GenerationConfig", "Request", "Completion")


def __getattr__(name):
    if name in _ENGINE_NAMES:
        from twotower_jax import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'twotower_jax' has no attribute {name!r}")
