"""Devices and precision: which torch device a `--device` value names, autocast for
`train.precision`, TF32 matmuls, and host-to-device copies that do not wait."""

from __future__ import annotations

import torch

from vtadl.exceptions import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    """The torch device of a `--device` value; a ConfigError if it is unknown or absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is built without CUDA" if not torch.version.cuda else "no GPU found"
            raise ConfigError(f"device {name!r} is not available: {why}; use --device cpu")
        if (device.index or 0) >= count:
            raise ConfigError(f"device {name!r} does not exist: {count} GPU(s) found")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} is not available on this machine")
    return device


def autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 matmuls on CUDA (`train.tf32`); elsewhere nothing. cuDNN convolutions use TF32
    by PyTorch's own default either way."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if enabled else "highest")


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait for the device: pinned and
    copied asynchronously on CUDA (a plain copy of pageable memory synchronises)."""
    if device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)
