"""Where the converter reads tensors from: safetensors (memory-mapped, one tensor at a time) or
PyTorch `.bin` / `.pt` state dicts (needs torch; loaded with mmap so tensors are paged in on use)."""
from __future__ import annotations

import os
from pathlib import Path

import ml_dtypes
import numpy as np

from twotower_jax.checkpoint.hf import CheckpointError, SafetensorsSource

TORCH_SUFFIXES = (".bin", ".pt", ".pth")


class TorchStateDictSource:
    """Tensors of one or more torch state-dict files in a directory."""

    def __init__(self, directory: str | os.PathLike):
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{directory} holds PyTorch state dicts ({', '.join(TORCH_SUFFIXES)}); reading "
                                  "them needs torch (pip install torch==2.13.0), or convert them to safetensors") from None
        self._torch = torch
        self._tensors = {}
        for path in sorted(p for p in Path(directory).iterdir() if p.suffix in TORCH_SUFFIXES):
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read PyTorch state dict ({e})") from e
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            for name, tensor in state.items():
                if name in self._tensors:
                    raise CheckpointError(f"tensor {name} appears in more than one file of {directory}")
                self._tensors[name] = tensor

    def names(self) -> set[str]:
        return set(self._tensors)

    def get(self, name: str) -> np.ndarray:
        tensor = self._tensors[name].detach()
        if tensor.dtype == self._torch.bfloat16:
            return tensor.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()


def open_source(directory: str | os.PathLike):
    directory = Path(directory)
    if any(directory.glob("*.safetensors")):
        return SafetensorsSource(directory)
    if any(p.suffix in TORCH_SUFFIXES for p in directory.iterdir()):
        return TorchStateDictSource(directory)
    raise CheckpointError(f"{directory}: no *.safetensors and no PyTorch state dict ({', '.join(TORCH_SUFFIXES)})")
