"""The external oracle: `transformers`' NemotronHForCausalLM on CPU in float32 with random O(1) weights.

Weights are drawn at O(1) scale (norm weights around 1, projections ~ 1/sqrt(fan_in), non-zero router
correction bias, varied A_log/dt_bias/D) so that a dropped or mis-laid tensor changes the logits visibly.
HF's prefill dt clamp is removed (SPEC §8) so its prefill and decode paths compute our math.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("torch", reason="HF oracle (torch, transformers) not installed")
pytest.importorskip("transformers", reason="HF oracle (torch, transformers) not installed")
import torch  # noqa: E402
import transformers  # noqa: E402

from twotower_jax.config import NemotronHConfig


def make_hf_model(config: NemotronHConfig, seed: int = 0) -> "transformers.NemotronHForCausalLM":
    hf_config = transformers.NemotronHConfig.from_dict(config.to_hf_dict())
    torch.manual_seed(seed)
    model = transformers.NemotronHForCausalLM(hf_config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                value = 1.0 + 0.3 * torch.randn(p.shape, generator=gen)
            elif leaf == "A_log":
                value = torch.log(torch.empty(p.shape).uniform_(0.5, 8.0, generator=gen))
            elif leaf == "dt_bias":
                value = torch.randn(p.shape, generator=gen) - 1.0
            elif leaf == "D":
                value = torch.randn(p.shape, generator=gen)
            elif "conv1d" in name:
                value = 0.5 * torch.randn(p.shape, generator=gen)
            elif leaf == "embeddings" or name.endswith("embeddings.weight"):
                value = torch.randn(p.shape, generator=gen)
            else:  # projections, experts, router: ~ unit-variance outputs
                value = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1])
            p.copy_(value)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.2 * torch.randn(buf.shape, generator=gen))
        for layer in model.model.layers:
            if hasattr(layer.mixer, "time_step_limit"):
                layer.mixer.time_step_limit = (0.0, float("inf"))
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Full causal forward (no cache) → float32 logits (b, l, v)."""
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), use_cache=False).logits.float().numpy()


def hf_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy generation by repeated full forwards (no HF cache path involved), with per-token log-probs."""
    tokens = list(prompt)
    out, logprobs = [], []
    for _ in range(steps):
        logits = torch.as_tensor(hf_logits(model, np.array([tokens]))[0, -1])
        logp = torch.log_softmax(logits.double(), -1)
        tok = int(torch.argmax(logits))
        out.append(tok)
        logprobs.append(float(logp[tok]))
        tokens.append(tok)
    return out, logprobs
