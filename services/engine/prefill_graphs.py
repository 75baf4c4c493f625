"""Prefill forwards replayed from CUDA graphs, in pieces.

An eager forward costs the host a Python call per kernel (tens of microseconds each): for MoE models some 25 per
layer, which at a few thousand tokens takes longer than the GPU's work. A graph cannot capture attention over a
batch's sequences (how many, how long, how much of each is cached change every step), but everything else in a
layer (norms, projections, rotary and KV store, routing, experts) depends on the number of tokens alone. So a
forward is captured as pieces cut at each layer's attention (`BoundAttention.eager`): piece 0 runs from the
embedding to the first layer's attention inputs, piece i from layer i-1's attention output to layer i's
attention inputs, the last piece to the final norm. A replay runs the pieces in turn and, between two of them,
that layer's attention eagerly with the batch's metadata.

Contract:
- one set of pieces per bucketed token count, captured largest first into one memory pool; a batch is padded up
  to its bucket: padded rows have token 0, position 0 and slot -1 (store nothing), belong to no sequence (no
  attention reads them) and everything else is row-wise, so they cannot touch real rows; their outputs are
  ignored;
- a piece ends by copying the attention inputs into static buffers and the next begins by reading the attention
  output from one; the buffers are shared by every layer and bucket (layers run one after another);
- static input buffers (token ids, positions, slots) are filled before the first piece; the final hidden states
  are a static buffer, valid until the next replay;
- after capture, each token count is timed replayed and eagerly (from an idle GPU to the GPU's end, so the host's
  time and the copies through the buffers both count); its graphs are kept only where replaying is faster;
- one rank only (no collectives) and no two-batch overlap: those forwards run eagerly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Hashable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from services.engine.attention import AttentionBackend, AttentionMetadata, BoundAttention
from services.engine.attention.base import Eager
from services.engine.parallel.comm import run

log = logging.getLogger(__name__)

# token counts captured: fine steps where the host dominates, coarser ones where padding costs GPU time
BUCKETS = (64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 5120, 6144, 7168, 8192)


def prefill_sizes(max_tokens: int) -> list[int]:
    """Buckets up to the step's token budget, the budget itself the largest (beyond 8192: steps of 2048)."""
    big = range(BUCKETS[-1] + 2048, max_tokens, 2048)
    return sorted({b for b in (*BUCKETS, *big) if b < max_tokens} | {max_tokens})


class PrefillGraphs:
    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        max_tokens: int,
        device: torch.device,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.backend = backend
        self.device = device
        self.sizes = prefill_sizes(max_tokens)
        n = self.sizes[-1]
        self.inputs = torch.zeros((3, n), dtype=torch.int64, device=device)  # token ids, positions, slots
        self._buffers: dict[Hashable, torch.Tensor] = {}
        self.pieces: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.cuts: dict[int, list[tuple[Eager, tuple[torch.Tensor, ...], torch.Tensor]]] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.timings: dict[int, tuple[float, float]] = {}  # token count -> (eager, replayed) seconds
        self._capture_meta: dict[int, AttentionMetadata] = {}
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        with torch.inference_mode():
            for size in tqdm(
                sorted(self.sizes, reverse=True),
                desc="Capturing prefill graphs",
                unit="size",
                disable=not progress,
            ):
                self._capture(size, pool, stream)
        torch.cuda.synchronize(device)
        for size, (eager, replay) in self.timings.items():
            # dropped only now: a pool whose graphs are all gone is released, and later captures would need it
            if (
                replay > eager
            ):  # the GPU's extra copies cost more than the host's launches: run this size eagerly
                del self.pieces[size], self.cuts[size], self.hidden[size]
        log.info(
            "prefill graphs replay %d of %d token counts (faster than eager there): %s",
            len(self.pieces),
            len(self.sizes),
            ", ".join(
                f"{size} {eager * 1e3:.1f}/{replay * 1e3:.1f} ms"
                for size, (eager, replay) in sorted(self.timings.items())
            ),
        )

    def bucket(self, tokens: int) -> int | None:
        """The token count whose graphs run `tokens` tokens; None: run them eagerly."""
        size = next((b for b in self.sizes if b >= tokens), None) if tokens else None
        return size if size in self.pieces else None

    def _buffer(self, key: Hashable, like: torch.Tensor) -> torch.Tensor:
        """The static buffer `key` for tensors shaped like `like` ([tokens, ...]), as a view of like's rows;
        made (zeroed) by the first warm-up, before any capture."""
        full = (self.sizes[-1], *like.shape[1:])
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.zeros(full, dtype=like.dtype, device=like.device)
        assert buf.shape == full and buf.dtype == like.dtype, f"static buffer {key} reused with another shape"
        return buf[: like.shape[0]]

    def _through_buffers(
        self, attn: BoundAttention
    ) -> Callable[[Eager, tuple[torch.Tensor, ...]], torch.Tensor]:
        """A warm-up's cut: the eager part run on the static buffers, uncaptured (makes the buffers)."""

        def cut(fn: Eager, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
            statics = tuple(self._buffer(("in", i), t) for i, t in enumerate(inputs))
            for static, t in zip(statics, inputs, strict=True):
                static.copy_(t)
            out = fn(attn, *statics)
            static_out = self._buffer("out", out)
            static_out.copy_(out)
            return static_out

        return cut

    def _capture(self, size: int, pool: tuple[int, int], stream: torch.cuda.Stream) -> None:
        dev = self.device
        ids, positions, slots = self.inputs[:, :size]
        slots.fill_(-1)
        meta = AttentionMetadata(  # one fresh prompt of `size` tokens that stores nothing
            slot_mapping=slots,
            query_start_loc=torch.tensor([0, size], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([size], dtype=torch.int32, device=dev),
            block_tables=torch.zeros((1, 1), dtype=torch.int32, device=dev),
            query_lens_cpu=(size,),
            seq_lens_cpu=(size,),
        )
        warm = BoundAttention(self.backend, meta)
        # warm up through the same cuts: compile kernels, settle allocations, make the static buffers
        run(
            self.model.stages(
                ids, positions, BoundAttention(self.backend, meta, cut=self._through_buffers(warm))
            )
        )
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()  # the warm-up's blocks back to the device, for the graphs' pool to take
        pieces: list[torch.cuda.CUDAGraph] = []
        cuts: list[tuple[Eager, tuple[torch.Tensor, ...], torch.Tensor]] = []

        def begin() -> None:
            pieces.append(torch.cuda.CUDAGraph())
            pieces[-1].capture_begin(pool=pool)

        def cut(fn: Eager, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
            statics = tuple(self._buffer(("in", i), t) for i, t in enumerate(inputs))
            for static, t in zip(statics, inputs, strict=True):
                static.copy_(t)
            pieces[-1].capture_end()
            out = fn(warm, *statics)  # run once, uncaptured, for the output's shape (values unused)
            static_out = self._buffer("out", out)
            cuts.append((fn, statics, static_out))
            begin()
            return static_out

        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            begin()
            hidden = run(self.model.stages(ids, positions, BoundAttention(self.backend, meta, cut=cut)))
            pieces[-1].capture_end()
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.pieces[size], self.cuts[size], self.hidden[size] = pieces, cuts, hidden
        # NOTE: the pieces read only slot_mapping of this metadata (a view of the static inputs) today; the rest
        # is kept alive too, so a backend that ever reads more from a piece reads stale values, not freed memory
        self._capture_meta[size] = meta
        eager = self._seconds(lambda: run(self.model.stages(ids, positions, warm)))
        replay = self._seconds(lambda: self._replay(size, size, warm))
        self.timings[size] = (eager, replay)

    def _seconds(self, forward: Callable[[], object]) -> float:
        """The best of three forwards, each from an idle GPU to the end of its work."""
        best = math.inf
        for _ in range(3):
            torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            forward()
            torch.cuda.synchronize(self.device)
            best = min(best, time.perf_counter() - start)
        return best

    def run(
        self, token_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, attn: BoundAttention
    ) -> torch.Tensor:
        """The hidden states [n, hidden] of a batch of n = len(token_ids) tokens (a view of a static buffer,
        valid until the next replay); `attn`: the batch's own metadata, for the attention between pieces."""
        n = len(token_ids)
        size = self.bucket(n)
        assert size is not None, f"no prefill graph holds {n} tokens"
        host = np.zeros((3, size), dtype=np.int64)
        host[0, :n], host[1, :n], host[2, :n] = token_ids, positions, slots
        host[2, n:] = -1  # padded rows store nothing
        self.inputs[:, :size].copy_(torch.from_numpy(host), non_blocking=True)
        return self._replay(size, n, attn)

    def _replay(self, size: int, n: int, attn: BoundAttention) -> torch.Tensor:
        cuts = self.cuts[size]
        for i, piece in enumerate(self.pieces[size]):
            piece.replay()
            if i < len(cuts):
                fn, statics, out = cuts[i]
                out[:n].copy_(fn(attn, *statics)[:n])
        return self.hidden[size][:n]
