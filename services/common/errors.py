"""Errors the engine raises for problems a user can fix."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint directory is unusable. The message names the file and the problem."""


class RequestError(ValueError):
    """A request cannot be served as given (too long, bad sampling parameters, ...)."""
