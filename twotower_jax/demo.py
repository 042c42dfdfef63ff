"""`make demo`: a tiny TwoTower with RANDOM weights, generated from in all three modes (no downloads).

Writes a random checkpoint in the release's tensor layout to a temporary folder, then runs the same CLI
a user would run on a real checkpoint: AR (context tower), mock-AR (denoiser, one token per pass) and
block-wise mask diffusion (several tokens per denoiser pass). The tokens are meaningless: the weights
are random. A later milestone ships a small trained demo model.
"""
from __future__ import annotations

import sys
import tempfile

from twotower_jax import generate
from twotower_jax.checkpoint.hf import save_hf_two_tower
from twotower_jax.config import tiny
from twotower_jax.two_tower import TwoTower

PATTERN = "MEM*EM-E"


def main() -> int:
    config = tiny(pattern=PATTERN, vocab_size=256, hidden_size=64)
    params = TwoTower(config).random_params(seed=0)
    print("=" * 78)
    print(f"twotower-jax demo: a tiny TwoTower (each tower {PATTERN}: Mamba-2, MoE, attention, MLP)")
    print("with RANDOM weights: the ids show the machinery working, not language.")
    print("=" * 78)
    with tempfile.TemporaryDirectory() as directory:
        save_hf_two_tower(directory, config, params)
        common = ["--prompt-ids", "5,6,7,8", "--prompt-ids", "9,10", "--max-new-tokens", "16",
                  "--eos-token-id", "-1"]
        runs = [["--mode", "ar"], ["--mode", "mock_ar"],
                ["--mode", "diffusion", "--block-size", "8", "--steps-per-block", "8",
                 "--confidence-threshold", "0.05"]]
        for mode_args in runs:
            argv = mode_args + common
            print("\n$ python -m twotower_jax.generate --checkpoint <tmp> " + " ".join(argv))
            code = generate.main(["--checkpoint", directory] + argv)
            if code:
                return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
