"""torch/HF → orbax checkpoint converter (and back). Run as `python -m convert`; see `convert.cli`."""
