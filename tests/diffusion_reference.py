"""A slow, obviously-sequential reference of mask diffusion for ONE row, written from SPEC §4.1.

It shares nothing with the jitted sampler but the model's forward functions and the documented random
stream (row key = key(seed), Gumbel noise for (block, step) = gumbel(fold_in(fold_in(key, block), step))).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def reference_mask_diffusion(model, params, prompt, max_new_tokens, block_size, steps_per_block, mask_token_id,
                             temperature, confidence_threshold, eos_token_id, seed):
    """Returns (tokens, denoiser passes, context passes) for one prompt."""
    # Any capacity that fits gives the same answer; a fixed one lets every call share its compilation.
    capacity = max(64, len(prompt) + max_new_tokens)
    _, cache = model.context.prefill(params["context"], jnp.asarray([prompt]), capacity=capacity)
    context_passes, denoiser_passes = 1, 0
    out = []
    block = 0
    while len(out) < max_new_tokens:
        width = min(block_size, max_new_tokens - len(out))
        canvas = np.full(width, mask_token_id)
        for step in range(steps_per_block):
            masked = canvas == mask_token_id
            n = int(masked.sum())
            if n == 0:
                break
            t = jnp.asarray([n / width], jnp.float32)
            logits = np.asarray(model.denoise(params, jnp.asarray([canvas]), cache, t)[0], np.float64)
            denoiser_passes += 1
            logits[:, mask_token_id] = -1e12
            if temperature == 0:
                candidate = logits.argmax(-1)
            else:
                key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), block), step)
                gumbel = np.asarray(jax.random.gumbel(key, logits.shape, jnp.float32), np.float64)
                candidate = (logits / temperature + gumbel).argmax(-1)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            confidence = probs[np.arange(width), candidate]
            if step == steps_per_block - 1:
                k = n
            else:
                k = int((masked & (confidence > confidence_threshold)).sum())
                k = max(k, 1, math.ceil(n / (steps_per_block - step)))
                k = min(k, n)
            masked_positions = np.flatnonzero(masked)
            by_confidence = masked_positions[np.argsort(-confidence[masked_positions], kind="stable")]
            canvas[by_confidence[:k]] = candidate[by_confidence[:k]]
        block_tokens = canvas.tolist()
        if eos_token_id is not None and eos_token_id in block_tokens:
            out += block_tokens[:block_tokens.index(eos_token_id) + 1]
            break
        out += block_tokens
        block += 1
        if len(out) < max_new_tokens:
            _, cache = model.context.extend(params["context"], jnp.asarray([canvas]), cache)
            context_passes += 1
    return out, denoiser_passes, context_passes
