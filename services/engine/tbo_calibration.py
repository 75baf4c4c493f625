"""Two-batch overlap pays only where communication is a large enough share of a step to hide (slow links, big
expert dispatches) and costs where it is not (the split halves every GEMM, decode reads the weights twice).
So at start-up the engine times each decode CUDA-graph size and prefill sizes from `min_prefill_tokens` up to the
token budget, with and without TBO, and keeps TBO only where it was faster. Every rank runs the same inputs, and
the slowest rank's times decide (one all-reduce), so all ranks reach the same decision.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from services.engine.parallel.comm import run
from services.engine.tbo import interleave, split_inputs, split_point

log = logging.getLogger("pdmesh.engine")
CONTEXT = 1024  # decode context timed, where the cache holds it
PROMPT = 2048  # prefill prompt length timed
MARGIN = 0.95  # TBO is kept only where it takes at most this share of the time without it


def _time(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    """Median seconds per call (one slow call, a clock change or a late peer, does not decide)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _inputs(runner, lens: list[int], context: list[int], num_blocks: int):  # type: ignore[no-untyped-def]
    """One sequence per entry: `lens` new tokens ending at `context`, each in its own blocks (wrapping around
    the cache when it is small: the contents are scratch at start-up)."""
    from services.engine.runner import HostInputs

    bs = runner.block_size
    per = -(-max(context) // bs)
    tables = (np.arange(len(lens) * per).reshape(len(lens), per) % num_blocks).astype(np.int32)
    positions = np.concatenate([np.arange(c - n, c) for n, c in zip(lens, context, strict=True)])
    rows = np.repeat(np.arange(len(lens)), lens)
    slots = tables[rows, positions // bs].astype(np.int64) * bs + positions % bs
    # random tokens: the router spreads them over the experts as real text does (one token id would not)
    ids = np.random.default_rng(0).integers(0, runner.model.config.vocab_size, len(positions))
    return HostInputs(ids, positions, slots, lens, context, tables, [], [], 0)


@torch.inference_mode()
def calibrate(runner, num_blocks: int, max_tokens: int, max_len: int) -> dict:  # type: ignore[no-untyped-def]
    """Time TBO off/on per size, set runner.tbo to keep it where it wins; returns {case: (off s, on s)}."""
    cases: list[tuple[str, int, Callable[[], object], Callable[[], object]]] = []
    graphs = runner.graphs
    if graphs is not None:
        for bs in (b for b in graphs.sizes if graphs.has_split(b)):
            context = max(1, min(CONTEXT, max_len, num_blocks // bs * runner.block_size))
            h = _inputs(runner, [1] * bs, [context] * bs, num_blocks)
            args = (h.token_ids, h.positions, h.slots, np.asarray(h.seq_lens), h.block_tables)
            cases.append(
                (
                    "decode",
                    bs,
                    lambda a=args, b=bs: graphs.run(b, False, *a),
                    lambda a=args, b=bs: graphs.run(b, True, *a),
                )
            )
    tokens = runner.tbo.min_prefill_tokens
    while tokens <= max_tokens:
        prompt = min(PROMPT, tokens, max_len)
        lens = [prompt] * (tokens // prompt) + ([tokens % prompt] if tokens % prompt else [])
        h = _inputs(runner, lens, lens, num_blocks)
        point = split_point(lens, decode=False)
        if point is not None:
            first, second = split_inputs(h, point)
            rows = (len(first.token_ids), len(second.token_ids))
            cases.append(
                (
                    "prefill",
                    tokens,
                    lambda h=h, t=tokens: run(runner._stages(h, t)),
                    lambda f=first, s=second, r=rows: interleave(
                        runner._stages(f, r[0]), runner._stages(s, r[1])
                    ),
                )
            )
        tokens *= 2
    if not cases:
        return {}
    times = torch.tensor(
        [[_time(off, runner.device), _time(on, runner.device)] for _, _, off, on in cases],
        dtype=torch.float64,
    )
    if runner.parallel.distributed:
        dist.all_reduce(times, op=dist.ReduceOp.MAX, group=runner.parallel.host_group)
    result = {(kind, size): tuple(t) for (kind, size, _, _), t in zip(cases, times.tolist(), strict=True)}
    wins = {case: on < MARGIN * off for case, (off, on) in result.items()}
    decode_sizes = frozenset(size for (kind, size), won in wins.items() if kind == "decode" and won)
    # prefill: TBO from the smallest timed size from which it wins at every larger one
    prefill = sorted((size, won) for (kind, size), won in wins.items() if kind == "prefill")
    min_prefill = max_tokens + 1
    for size, wins in reversed(prefill):
        if not wins:
            break
        min_prefill = size
    runner.tbo = dataclasses.replace(runner.tbo, min_prefill_tokens=min_prefill, decode_sizes=decode_sizes)
    log.info(
        "two-batch overlap calibrated: prefill %s, decode graphs %s",
        f"from {min_prefill} tokens" if min_prefill <= max_tokens else "off",
        sorted(decode_sizes) or "off",
    )
    return result
