"""The one KV block allocator: reference counts and prefix caching by block hash.

Invariants (checked by `check()`, exercised by tests):
- a block is either free (ref count 0, in `free`) or owned (ref count = number of sequences using it);
- a full block whose KV is computed may be registered under the hash of its tokens chained to its prefix; it stays
  registered after it is freed, so a later prompt with the same prefix reuses it without recomputation, until the
  block is handed out again (evicted, least recently freed first);
- only full blocks are shared; a sequence writes only into blocks it owns alone.
"""

from __future__ import annotations

from collections import OrderedDict

from services.common.block_hash import block_hash
from services.engine.kv_events import KvEventLog
from services.engine.sequence import Sequence


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head is evicted first
        self.events = KvEventLog()  # every change of `cached`, in order

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Cached blocks holding the longest block-aligned prefix of token_ids, at most max_tokens long."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent: int | None = None
        for i in range(max_tokens // self.block_size):
            parent = block_hash(parent, token_ids[i * self.block_size : (i + 1) * self.block_size])
            block = self.cached.get(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_prompt(self, seq: Sequence) -> bool:
        """Give a sequence without blocks enough for all its tokens, reusing cached prefix blocks.

        At least the last token is always computed (its logits are needed), so a fully cached prompt reuses
        all but its last block. Returns False, changing nothing, when blocks are short.
        """
        assert not seq.block_ids, f"{seq.request_id} already has blocks"
        hits = self.match_prefix(seq.token_ids, seq.num_tokens - 1)
        need = self.blocks_for(seq.num_tokens) - len(hits)
        if need > self.num_free - sum(1 for b in hits if self.ref_counts[b] == 0):
            return False
        for b in hits:
            self._take(b)
        seq.block_ids = hits + [self._pop_free() for _ in range(need)]
        seq.num_computed_tokens = seq.num_hashed_blocks = 0
        seq.last_block_hash = None
        if hits:
            seq.num_computed_tokens = len(hits) * self.block_size
            seq.num_hashed_blocks = len(hits)
            seq.last_block_hash = self.hash_of[hits[-1]]
        return True

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make sure the sequence's blocks can hold num_tokens tokens. False (nothing changed) if blocks are short."""
        need = self.blocks_for(num_tokens) - len(seq.block_ids)
        if need > self.num_free:
            return False
        seq.block_ids.extend(self._pop_free() for _ in range(need))
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the sequence's newly computed full blocks (of known tokens) in the prefix cache."""
        full = min(min(seq.num_computed_tokens, seq.num_known_tokens) // self.block_size, len(seq.block_ids))
        if not self.enable_prefix_caching or full <= seq.num_hashed_blocks:
            return
        for i in range(seq.num_hashed_blocks, full):
            tokens = seq.token_ids[i * self.block_size : (i + 1) * self.block_size]
            h = block_hash(seq.last_block_hash, tokens)
            block = seq.block_ids[i]
            # a block with the same content may already be registered (two requests computed it at once):
            # keep the first, this one stays private and is recycled when freed
            if h not in self.cached and self.hash_of[block] is None:
                self.cached[h] = block
                self.hash_of[block] = h
                self.events.add(True, h)
            seq.last_block_hash = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def free_seq(self, seq: Sequence) -> None:
        # NOTE: the tail is released first so that, among one sequence's blocks, the deepest are evicted first
        for b in reversed(seq.block_ids):
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0, f"block {b} freed twice"
            if self.ref_counts[b] == 0:
                self.free[b] = None
        seq.block_ids = []
        seq.num_hashed_blocks = 0
        seq.last_block_hash = None

    def reset_prefix_cache(self) -> None:
        for h, b in self.cached.items():
            assert self.hash_of[b] == h
            self.hash_of[b] = None
            self.events.add(False, h)
        self.cached.clear()

    def check(self) -> None:
        """Assert the invariants; used by tests and debug runs."""
        for b in range(self.num_blocks):
            assert (self.ref_counts[b] == 0) == (b in self.free), f"block {b}: ref {self.ref_counts[b]}"
        for h, b in self.cached.items():
            assert self.hash_of[b] == h, f"block {b}: hash table out of sync"

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _pop_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.hash_of[block]
        if h is not None:  # evict its cached content
            del self.cached[h]
            self.hash_of[block] = None
            self.events.add(False, h)
        self.ref_counts[block] = 1
        return block
