"""Two-batch overlap (TBO): one batch split in two micro-batches whose forward passes interleave, so that one
micro-batch's collectives (tensor-parallel all-reduce, expert-parallel dispatch/combine) run while the other
computes.

- Split: decode batches by requests (half the sequences each); prefill and mixed batches by tokens (the split
  point nearest half of the tokens, cutting a sequence's chunk in two if it falls inside one: the second part
  then attends to the first part's KV, stored by micro-batch A earlier in the same layer).
- Agreement: every data-parallel rank must run the same number of micro-batches or collectives would pair up
  wrongly and hang, so before each forward one all-gather shares each rank's token counts and whether it can
  split; TBO runs only if every rank can and the largest rank's batch is above the threshold (decode: sequences,
  prefill: tokens). The same collective sizes the fixed-shape expert dispatch of each micro-batch and picks the
  CUDA graph all ranks replay.
- Interleaving: the model's forward is a generator that yields right after launching each collective; the
  executor alternates between the two generators, so A's collective is in flight while B computes. The
  collectives run on the communication library's own stream; the compute stream only waits on their events.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from services.engine.parallel.comm import gather_into
from services.engine.parallel.state import ParallelState


@dataclass(frozen=True)
class TBOConfig:
    enabled: bool = False
    min_prefill_tokens: int = 4096  # per rank: below this the split costs more than it hides
    min_decode_seqs: int = 128  # per rank
    decode_sizes: frozenset[int] | None = (
        None  # CUDA graph sizes that replay split (None: all from the minimum)
    )


def split_point(query_lens: list[int], decode: bool) -> tuple[int, int] | None:
    """(sequence index, tokens of it that go to micro-batch A) for a split, or None if the batch cannot split."""
    if decode:
        n = len(query_lens)
        return (n // 2, 0) if n >= 2 else None
    total = sum(query_lens)
    if total < 2:
        return None
    half, seen = total // 2, 0
    for i, n in enumerate(query_lens):
        if seen + n >= half:
            a = half - seen
            return (i, a) if a < n else (i + 1, 0)
        seen += n
    return None


@dataclass(frozen=True)
class StepPlan:
    """What every rank runs this step, agreed from all ranks' batches."""

    split: tuple[int, int] | None  # this rank's split point when the step runs as two micro-batches
    rows: tuple[int, ...]  # per micro-batch, the most tokens any rank has in it (fixed-shape expert dispatch)
    decode_batch: int | None  # every rank decodes or idles: the largest rank's batch (picks the CUDA graph)


def plan_step(parallel: ParallelState, query_lens: list[int], cfg: TBOConfig) -> StepPlan:
    """One collective per step (data-parallel ranks only: tensor-parallel ranks hold the same batch and reach the
    same plan alone): every rank's (tokens, decode sequences, can split, micro-batch sizes) -> the same plan."""
    tokens = sum(query_lens)
    decode = bool(query_lens) and all(n == 1 for n in query_lens)
    point = (split_point(query_lens, decode) if query_lens else (0, 0)) if cfg.enabled else None
    first = sum(query_lens[: point[0]]) + point[1] if point is not None else 0
    # decode sequences: -1 when the batch is not a decode batch (an idle rank counts as decoding 0)
    decodes = len(query_lens) if decode else (0 if tokens == 0 else -1)
    mine = [tokens, decodes, int(point is not None), first, tokens - first]
    if parallel.config.dp == 1:
        table = [mine]
    else:
        # over the host: a device collective would make the host wait for all the GPU work queued before it
        local = torch.tensor(mine, dtype=torch.int64)
        everyone = torch.empty(parallel.world * len(mine), dtype=torch.int64)
        gather_into(everyone, local, group=parallel.host_group)
        table = everyone.view(parallel.world, len(mine)).tolist()
    decode_batch = max(r[1] for r in table) if all(r[1] >= 0 for r in table) else None
    split = cfg.enabled and all(r[2] for r in table) and any(r[0] for r in table)
    if split:
        if decode_batch is not None:
            split = decode_batch >= cfg.min_decode_seqs
        else:
            split = max(r[0] for r in table) >= cfg.min_prefill_tokens
    if split:
        return StepPlan(point, (max(r[3] for r in table), max(r[4] for r in table)), decode_batch)
    return StepPlan(None, (max(r[0] for r in table),), decode_batch)


def split_inputs(h: Any, point: tuple[int, int]) -> tuple[Any, Any]:
    """Cut HostInputs in two at `point`; A's rows come first, so concatenating their outputs restores the order."""
    seq, a = point
    rows_a = sum(h.query_lens[:seq]) + a
    lens_a, lens_b = list(h.query_lens[:seq]), list(h.query_lens[seq:])
    ctx_a, ctx_b = list(h.seq_lens[:seq]), list(h.seq_lens[seq:])
    tables_a, tables_b = h.block_tables[:seq], h.block_tables[seq:]
    if a:  # the sequence at `seq` is cut: its first `a` tokens go to A
        lens_a.append(a)
        ctx_a.append(h.seq_lens[seq] - h.query_lens[seq] + a)
        lens_b[0] -= a
        tables_a = np.concatenate([tables_a, h.block_tables[seq : seq + 1]])
    samples_a = [r for r in h.sample_rows if r < rows_a]
    samples_b = [r - rows_a for r in h.sample_rows if r >= rows_a]
    seqs = h.sampling_seqs
    part_a = dataclasses.replace(
        h,
        token_ids=h.token_ids[:rows_a],
        positions=h.positions[:rows_a],
        slots=h.slots[:rows_a],
        query_lens=lens_a,
        seq_lens=ctx_a,
        block_tables=tables_a,
        sample_rows=samples_a,
        sampling_seqs=seqs[: len(samples_a)],
    )
    part_b = dataclasses.replace(
        h,
        token_ids=h.token_ids[rows_a:],
        positions=h.positions[rows_a:],
        slots=h.slots[rows_a:],
        query_lens=lens_b,
        seq_lens=ctx_b,
        block_tables=tables_b,
        sample_rows=samples_b,
        sampling_seqs=seqs[len(samples_a) :],
    )
    return part_a, part_b


def interleave(a: Generator[Any, None, Any], b: Generator[Any, None, Any]) -> tuple[Any, Any]:
    """Run two stage generators alternately, switching at every yield (a collective in flight); their results."""
    gens, results = [a, b], [None, None]
    active = [0, 1]
    while active:
        for i in list(active):
            try:
                next(gens[i])
            except StopIteration as done:
                results[i] = done.value
                active.remove(i)
    return results[0], results[1]
