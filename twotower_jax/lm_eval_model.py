"""The lm-evaluation-harness (0.4.x) model `twotower`, on `twotower_jax.engine.Engine`.

    lm_eval --model twotower --model_args checkpoint=DIR,mode=diffusion,confidence_threshold=0.8,block_size=16 ...
    python -m twotower_jax.evaluate --checkpoint DIR --tasks T --model-args mode=diffusion,...   # offline

(`lm_eval` finds the model once this module is imported; `python -m twotower_jax.evaluate` does that.)

- `loglikelihood` and `loglikelihood_rolling` are exact AR log-probabilities of the context tower (whatever
  the mode): one causal pass per (context, continuation), batched in power-of-two length buckets;
  rolling windows as lm-eval's HF model (disjoint, maximal context, `max_length` tokens).
- `generate_until` runs the engine in the model's `mode` (ar, mock_ar, diffusion, self_speculative) with
  its knobs as model args; `until` strings stop a row at their first occurrence in the decoded text, also
  across block boundaries; `max_gen_toks` per request; `do_sample: false` (lm-eval's default) is greedy,
  otherwise `temperature` / `top_k` / `top_p` of the request. Each request's random stream is
  `fold_in(key(seed), id)` with the id a hash of its context and settings, so a request samples the same
  on any rank, batch or order.
- Data parallel: under `jax.distributed` (several processes) `rank` / `world_size` are the process index
  and count, and lm-eval's gathers and barriers go through the jax.distributed key-value store.

Model args: checkpoint (required; `demo` for the packaged model), mode, batch_size, max_length (default
2048), max_gen_toks (default 256), dtype, placement, devices, seed, temperature / top_k / top_p (defaults
for sampled requests), block_size, steps_per_block, confidence_threshold, mask_token_id, draft_steps,
eos_token_id.
"""
from __future__ import annotations

import base64
import hashlib
import json
import pickle
from typing import Optional

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from twotower_jax.engine import Engine, GenerationConfig, Request

_INT_ARGS = ("batch_size", "max_length", "max_gen_toks", "seed", "top_k", "block_size", "steps_per_block",
             "mask_token_id", "draft_steps", "eos_token_id", "devices")
_FLOAT_ARGS = ("temperature", "top_p", "confidence_threshold")


@register_model("twotower")
class TwoTowerLM(LM):
    """lm-eval's LM interface over an `Engine` (see the module docstring)."""

    def __init__(self, checkpoint: str = "demo", mode: str = "ar", batch_size=8, max_length: int = 2048,
                 max_gen_toks: int = 256, dtype: str = "auto", placement: str = "single", devices=None,
                 seed: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 block_size: int = 16, steps_per_block: int = 16, confidence_threshold: float = 0.9,
                 mask_token_id: int = 3, draft_steps: int = 1, eos_token_id: Optional[int] = None,
                 engine: Optional[Engine] = None, max_batch_size=None, device=None, **unused):
        super().__init__()
        if unused:
            raise ValueError(f"unknown twotower model args: {sorted(unused)}")
        import jax
        batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.max_length, self.max_gen_toks = int(max_length), int(max_gen_toks)
        if engine is None:
            local = jax.local_devices()
            devices = local if devices is None else local[:int(devices)]
            engine = Engine.load(checkpoint, dtype=dtype, placement=placement, devices=devices,
                                 batch_size=batch_size, max_prompt_len=self.max_length)
        self.engine = engine
        if engine.tokenizer is None:
            raise ValueError(f"checkpoint {checkpoint!r} has no tokenizer (tokenizer.json): lm-eval works on text")
        self.base = GenerationConfig(
            mode=mode, max_new_tokens=self.max_gen_toks, temperature=0.0, top_k=0, top_p=1.0, seed=int(seed),
            eos_token_id=eos_token_id, block_size=int(block_size), steps_per_block=int(steps_per_block),
            confidence_threshold=float(confidence_threshold), mask_token_id=int(mask_token_id),
            draft_steps=int(draft_steps))
        self.sampled = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
        self._rank, self._world_size = jax.process_index(), jax.process_count()
        self._device = "cpu"
        self._collectives = 0

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        from lm_eval.utils import simple_parse_args_string
        args = simple_parse_args_string(arg_string)
        args.update({k: v for k, v in (additional_config or {}).items() if v is not None and k not in args})
        return cls(**_typed(args))

    # --- scoring ------------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = [tuple(r.args) for r in requests]
        out = self.engine.loglikelihood(pairs)
        for pair, value in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", pair, value)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        texts = [r.args[0] for r in requests]
        out = self.engine.loglikelihood_rolling(texts, max_length=self.max_length)
        for text, value in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), value)
        return out

    # --- generation ---------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Grouped by sampling settings (one engine call each); results in request order."""
        groups: dict = {}
        seen: dict = {}
        for index, r in enumerate(requests):
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sampling = self._sampling(kwargs)
            ids = self.engine.encode(context)
            keep = max(self.max_length - max_new, 1)
            if len(ids) > keep:
                ids = ids[-keep:]
            base = hashlib.sha256(json.dumps([context, until, max_new, sorted(sampling.items())]).encode()
                                  ).hexdigest()[:24]
            seen[base] = seen.get(base, -1) + 1
            request = Request(id=f"{base}-{seen[base]}", prompt_ids=ids, max_new_tokens=max_new, stop=tuple(until))
            groups.setdefault(tuple(sorted(sampling.items())), []).append((index, request))
        out: list = [None] * len(requests)
        for sampling, members in groups.items():
            config = GenerationConfig(**{**self.base.__dict__, **dict(sampling)})
            done = self.engine.generate([req for _, req in members], config)
            for (index, _), completion in zip(members, done):
                out[index] = completion.text
                self.cache_hook.add_partial("generate_until", requests[index].args, completion.text)
        return out

    def _sampling(self, kwargs: dict) -> dict:
        if not kwargs.pop("do_sample", False):   # lm-eval's default: greedy (temperature ignored, as HF does)
            return dict(temperature=0.0, top_k=0, top_p=1.0)
        s = dict(self.sampled)
        for name in ("temperature", "top_k", "top_p"):
            if kwargs.get(name) is not None:
                s[name] = type(s[name])(kwargs[name])
        if self.base.mode == "diffusion":
            s.update(top_k=0, top_p=1.0)
        return s

    # --- data parallel (jax.distributed) -----------------------------------------------------------

    def _client(self):
        from jax._src import distributed
        return distributed.global_state.client

    def _key(self, name: str) -> str:
        self._collectives += 1
        return f"twotower_lm_eval/{self._collectives}/{name}"

    def barrier(self) -> None:
        if self.world_size > 1:
            self._client().wait_at_barrier(self._key("barrier"), 3_600_000)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        key = self._key("gather")
        client = self._client()
        client.key_value_set(f"{key}/{self.rank}", base64.b64encode(pickle.dumps(obj)).decode())
        objects = [pickle.loads(base64.b64decode(client.blocking_key_value_get(f"{key}/{r}", 3_600_000)))
                   for r in range(self.world_size)] if self.rank == dst else None
        client.wait_at_barrier(key + "/done", 3_600_000)
        return objects

    def all_gather(self, tensor):
        if self.world_size == 1:
            return tensor
        import torch
        key = self._key("all_gather")
        client = self._client()
        client.key_value_set(f"{key}/{self.rank}", json.dumps(tensor.reshape(-1).tolist()))
        values = [v for r in range(self.world_size)
                  for v in json.loads(client.blocking_key_value_get(f"{key}/{r}", 3_600_000))]
        return torch.tensor(values)


def _typed(args: dict) -> dict:
    out = dict(args)
    for k in _INT_ARGS:
        if k in out and out[k] is not None and not isinstance(out[k], int) and str(out[k]) != "auto":
            out[k] = int(out[k])
    for k in _FLOAT_ARGS:
        if k in out and out[k] is not None:
            out[k] = float(out[k])
    return out
