"""Device choice: one rule for the whole project, so runs, pages and tests agree."""

from __future__ import annotations

import torch

VALID_DEVICES = ("auto", "cuda", "mps", "cpu")


def pick_device(prefer: str | None = "auto") -> torch.device:
    """Return cuda if available, else mps, else cpu; a named device is honoured or refused clearly."""
    choice = (prefer or "auto").lower()
    if choice.startswith("cuda:"):
        base = "cuda"
    else:
        base = choice
    if base not in VALID_DEVICES:
        raise ValueError(f"Unknown device {prefer!r}; choose one of {', '.join(VALID_DEVICES)}.")
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("Device 'cuda' was requested but no CUDA GPU is visible to PyTorch.")
    if base == "mps" and not _mps_available():
        raise RuntimeError("Device 'mps' was requested but Apple MPS is not available here.")
    return torch.device(choice)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
