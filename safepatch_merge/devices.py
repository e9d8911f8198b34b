"""Turning a device name from a config or a flag into a torch device, with one-line errors."""
from __future__ import annotations

from .errors import ConfigError


def resolve_device(name: str, what: str = "device", allow_auto: bool = True):
    """torch.device for `name` ("cpu", "cuda", "cuda:1"; "auto", when `allow_auto`: CUDA if
    available, else the CPU). ConfigError naming `what` (the key or flag) for an unknown
    device or for CUDA on a machine without it. torch is imported on the first call, so
    modules that only parse options stay light."""
    import torch

    if allow_auto and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{what}: unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what} {name}: CUDA is not available on this machine")
    return dev
