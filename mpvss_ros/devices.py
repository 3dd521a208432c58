"""Device strings: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked before torch sees them.

torch keeps a device index in 8 bits (``c10::DeviceIndex``) and wraps larger ones without a
word: ``torch.device("cuda:256")`` is ``cuda:0``, ``"cuda:255"`` is ``cuda`` (the current
device) and ``"cuda:128"`` is ``cuda:-128``. A typo on a multi-GPU robot would then run on
another GPU than the one asked for. Every place that turns a user's device string into a
``torch.device`` goes through :func:`as_torch_device`; the node's parameter check, which imports no
torch, uses :func:`check_device`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .values import shown

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICE_CHOICES", "MAX_CUDA_INDEX", "check_device", "as_torch_device"]

#: The accepted device strings, as error messages name them.
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
#: The largest CUDA device index torch represents (an int8).
MAX_CUDA_INDEX = 127
# fullmatch: "$" would allow a final "\n"; ASCII digits only; no leading zeros (torch refuses them)
_DEVICE_RE = re.compile(r"auto|cpu|cuda(?::(0|[1-9][0-9]*))?")


def check_device(device: Any) -> str:
    """Return ``device`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` with N in 0..127.

    Raises:
        ValueError: anything else (not a string, another device type, leading zeros, spaces, a
            final newline, non-ASCII digits, an index past :data:`MAX_CUDA_INDEX`), naming it.
    """
    match = _DEVICE_RE.fullmatch(device) if isinstance(device, str) else None
    if match is None:
        raise ValueError(f"device must be {DEVICE_CHOICES}, got {shown(device)}")
    if match.group(1) is not None and int(match.group(1)) > MAX_CUDA_INDEX:
        raise ValueError(f"device index must be at most {MAX_CUDA_INDEX} (torch keeps it in 8 bits and would wrap "
                         f"it to another GPU), got {shown(device)}")
    return device


def as_torch_device(device: str | torch.device) -> torch.device:
    """A ``torch.device`` for ``device``: a string is checked with :func:`check_device` first
    (``auto`` must have been resolved: :func:`mpvss_ros.model_loader.resolve_device`); a
    ``torch.device`` passes as it is.

    Raises:
        ValueError: a string that :func:`check_device` refuses, or ``auto``.
    """
    import torch

    if isinstance(device, torch.device):
        return device
    if check_device(device) == "auto":
        raise ValueError("device 'auto' must be resolved to cpu or cuda first (model_loader.resolve_device)")
    return torch.device(device)
