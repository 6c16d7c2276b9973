"""The checksum sealed into every checkpoint mnist_lit writes: what makes damage to a file seen, not loaded."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

# The digest rides inside the checkpoint it seals, at the top level, beside Lightning's own keys.
DIGEST_KEY = "mnist_lit_sha256"


def digest(checkpoint: dict[str, Any]) -> str:
    """sha256 of everything a checkpoint holds (tensors by dtype, shape and bytes; keys, numbers and strings by
    value), whatever the digest key already holds. The same for the dict saved and the dict loaded back."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in checkpoint.items() if k != DIGEST_KEY})
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        h.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        # contiguous: one layout whatever the memory format (channels_last); bytes as they are, whatever the dtype
        tensor = value.detach().cpu().contiguous()
        h.update(tensor.view(torch.uint8).numpy() if tensor.dim() else tensor.reshape(1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(b"D%d" % len(value))
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, (list, tuple)):
        h.update(b"L%d" % len(value))
        for item in value:
            _feed(h, item)
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())
