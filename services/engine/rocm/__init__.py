"""Thin adapters for AMD ROCm libraries that are not on the public package registries: `aiter` (attention and
fused-MoE kernels) and `mori` (MoE dispatch/combine). Each is imported lazily, when a user picks it, behind the
engine's own interfaces (an attention backend, an experts kernel, an expert dispatcher). None of them has run on
AMD hardware yet (docs/engine.md says which backend ran where)."""

from __future__ import annotations

import importlib
from types import ModuleType

SOURCES = {"aiter": "https://github.com/ROCm/aiter", "mori": "https://github.com/ROCm/mori"}


def require(module: str, what: str) -> ModuleType:
    """Import `module` or say plainly what is missing and where it comes from."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(
            f"{what} needs the '{module}' package, an AMD ROCm library that is not on PyPI: build it from "
            f"{SOURCES[module]} on a ROCm machine, or choose another backend ({e})"
        ) from e
