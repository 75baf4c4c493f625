"""Triton kernels for the GPU fast path. Each file holds one kernel and a wrapper that asserts its contract.

`available(device)` says whether they can run: on CUDA with Triton installed, or anywhere under
TRITON_INTERPRET=1 (Triton's interpreter, which the CPU tests use to check the kernels against PyTorch).
"""

from __future__ import annotations

import importlib.util
import os

import torch


def available(device: torch.device) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
