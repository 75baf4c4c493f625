"""Child processes that cannot outlive their parent: a parent killed outright (SIGKILL, out of memory, its Ray
actor killed) runs no clean-up, and an orphaned worker or rank would keep its GPU memory and ports forever."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> None:
    """Have the kernel kill this process when its parent exits (Linux; elsewhere nothing happens).

    `parent_pid`: the parent's pid as the parent saw it, to catch a parent that died before this call."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent is already gone
