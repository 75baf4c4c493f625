"""Model definitions and the checkpoint loader."""

from __future__ import annotations

from services.engine.models.loader import MODEL_CLASSES, load_model

__all__ = ["MODEL_CLASSES", "load_model"]
