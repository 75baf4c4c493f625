"""Continuous batching with a per-step token budget and chunked prefill, for all three worker roles.

Every sequence is scheduled the same way: it has `num_pending_tokens` whose KV is not yet computed (a prompt,
a chunk of one, a recompute after preemption, or the one token sampled last step) and gets up to the remaining
budget of them. A sequence whose pending tokens are all scheduled samples its next token.

Roles:
- colocated: prompts are admitted, prefilled in chunks and decoded here; batches mix prefill and decode.
- prefill:   prompts are admitted and prefilled; after the first token the sequence is HELD (KV kept for transfer)
             until `release`.
- decode:    sequences arrive with their prompt KV written by another worker (`reserve`, then `admit_prefilled`)
             and are decoded here.
When blocks run out, the most recently admitted unscheduled sequence is preempted: its blocks are freed and it
is recomputed later (its full blocks usually survive in the prefix cache). Preemptions are counted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.engine.block_manager import BlockAllocator
from services.engine.sequence import SeqStatus, Sequence

ROLES = ("colocated", "prefill", "decode")


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    start: int  # position of the first new token (= tokens already in the cache)
    samples: bool  # this step completes the pending tokens, so it produces the next token

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return cls(seq, num_new_tokens, start, start + num_new_tokens == seq.num_tokens)


@dataclass
class Batch:
    items: list[ScheduledSeq] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(i.num_new_tokens for i in self.items)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(i.num_new_tokens for i in self.items if i.num_new_tokens > 1)

    def __bool__(self) -> bool:
        return bool(self.items)


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0  # tokens computed again after a preemption


class Scheduler:
    def __init__(
        self, allocator: BlockAllocator, role: str, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role '{role}'; choose one of: {', '.join(ROLES)}")
        self.allocator = allocator
        self.role = role
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.parked: dict[str, Sequence] = {}  # RESERVED (decode role) or HELD (prefill role)
        self.stats = SchedulerStats()

    # ---- admission ---------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if self.role == "decode":
            raise RuntimeError(
                "a decode worker takes prefilled sequences only: use reserve() and admit_prefilled()"
            )
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def reserve(self, seq: Sequence) -> bool:
        """Decode role: hold blocks for a prompt whose KV another worker will write. False if blocks or sequence
        slots are short."""
        if len(self.running) + len(self.parked) >= self.max_num_seqs or not self.allocator.allocate_prompt(
            seq
        ):
            return False
        seq.num_cached_tokens = seq.num_computed_tokens
        seq.status = SeqStatus.RESERVED
        self.parked[seq.request_id] = seq
        return True

    def admit_prefilled(self, request_id: str) -> Sequence:
        """Decode role: the reserved prompt's KV is in place. The caller appends the first token."""
        seq = self.parked.pop(request_id)
        assert seq.status is SeqStatus.RESERVED, f"{request_id} is {seq.status}"
        seq.num_computed_tokens = seq.prompt_len
        seq.status = SeqStatus.RUNNING
        self.allocator.register_full_blocks(seq)
        self.running.append(seq)
        return seq

    def release(self, request_id: str) -> Sequence | None:
        """Free a parked sequence's blocks (prefill role after its KV was sent; decode role on abort)."""
        seq = self.parked.pop(request_id, None)
        if seq is not None:
            self.allocator.free_seq(seq)
            seq.status = SeqStatus.FINISHED
            seq.finish_reason = seq.finish_reason or "abort"
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        for seq in [*self.waiting, *self.running]:
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return seq
        return self.release(request_id)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.role == "prefill" and reason != "abort":
            seq.status = SeqStatus.HELD
            self.parked[seq.request_id] = seq
        else:
            self.allocator.free_seq(seq)
            seq.status = SeqStatus.FINISHED

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- one step ----------------------------------------------------------------------------------------
    def schedule(self) -> Batch:
        batch = Batch()
        budget = self.max_num_batched_tokens
        scheduled: set[str] = set()
        preemptions = self.stats.num_preemptions
        # decodes first (one token each, latency-critical), then continuing prefill chunks
        order = sorted(self.running, key=lambda s: s.num_pending_tokens > 1)
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_pending_tokens, budget)
            if not self._make_room(seq, seq.num_computed_tokens + n, scheduled):
                continue
            batch.items.append(ScheduledSeq.of(seq, n))
            scheduled.add(seq.request_id)
            budget -= n
        # no admissions in a step that had to preempt: blocks are short
        admit = self.stats.num_preemptions == preemptions
        while admit and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.allocator.allocate_prompt(seq):
                break
            self.waiting.popleft()
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = seq.num_computed_tokens
            else:
                self.stats.num_recomputed_tokens += seq.num_pending_tokens
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_pending_tokens, budget)
            batch.items.append(ScheduledSeq.of(seq, n))
            budget -= n
        return batch

    def _make_room(self, seq: Sequence, num_tokens: int, scheduled: set[str]) -> bool:
        """Grow seq's blocks to num_tokens, preempting later unscheduled sequences as needed (seq itself last)."""
        if num_tokens <= len(seq.block_ids) * self.allocator.block_size:
            return True  # the common case: room in the last block
        while not self.allocator.grow(seq, num_tokens):
            victims = [s for s in self.running if s.request_id not in scheduled and s is not seq]
            victim = victims[-1] if victims else seq
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.stats.num_preemptions += 1

    def update(self, batch: Batch, now: float) -> None:
        """After the model ran (or was launched): the scheduled tokens' KV is in the cache."""
        for item in batch.items:
            if item.seq.status is not SeqStatus.RUNNING:
                continue
            if item.seq.scheduled_time is None:
                item.seq.scheduled_time = now
            item.seq.num_computed_tokens += item.num_new_tokens
            self.allocator.register_full_blocks(item.seq)
