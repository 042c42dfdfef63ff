"""`make demo`: generate from a tiny Nemotron-H tower with RANDOM weights (no downloads).

Builds a random checkpoint in the HF layout in a temporary folder, then runs the same CLI a user would
run on a real checkpoint. The tokens are meaningless: the weights are random. A later milestone ships a
small trained demo model.
"""
from __future__ import annotations

import sys
import tempfile

from twotower_jax import generate
from twotower_jax.checkpoint.hf import save_hf_tower
from twotower_jax.config import tiny
from twotower_jax.tower import NemotronH


def main() -> int:
    config = tiny(pattern="MEM*EM-E", vocab_size=256, hidden_size=64)
    params = NemotronH(config).random_params(seed=0)
    print("=" * 72)
    print("twotower-jax demo: a tiny Nemotron-H tower (pattern MEM*EM-E: Mamba-2, MoE, attention, MLP)")
    print("with RANDOM weights: the generated ids show the machinery working, not language.")
    print("=" * 72)
    with tempfile.TemporaryDirectory() as directory:
        save_hf_tower(directory, config, params)
        argv = ["--checkpoint", directory, "--mode", "ar", "--prompt-ids", "5,6,7,8",
                "--prompt-ids", "9,10", "--max-new-tokens", "24", "--eos-token-id", "-1"]
        print("$ python -m twotower_jax.generate --checkpoint <tmp> " + " ".join(argv[2:]))
        return generate.main(argv)


if __name__ == "__main__":
    sys.exit(main())
