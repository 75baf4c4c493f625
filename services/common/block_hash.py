"""The chained hash that names a KV block by its tokens and everything before them.

Workers register computed blocks under it (prefix caching) and report them (`WatchKvEvents`); routers compute the
same hashes from a prompt's token ids to find how much of it each worker already holds.
"""

from __future__ import annotations

import hashlib
import struct


def block_hash(parent: int | None, tokens: list[int]) -> int:
    """Stable across processes (workers and routers must agree), chained so a hash names the whole prefix."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<q", parent if parent is not None else -1))
    h.update(struct.pack(f"<{len(tokens)}i", *tokens))
    return int.from_bytes(h.digest(), "little", signed=True)


def prefix_hashes(token_ids: list[int], block_size: int, max_tokens: int | None = None) -> list[int]:
    """The hashes of the full blocks of token_ids (of at most max_tokens tokens), in order."""
    n = len(token_ids) if max_tokens is None else min(max_tokens, len(token_ids))
    hashes: list[int] = []
    parent: int | None = None
    for i in range(n // block_size):
        parent = block_hash(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes
