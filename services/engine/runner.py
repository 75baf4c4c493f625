"""Build a batch's model inputs, run the model over the paged cache (eagerly, or by replaying a CUDA graph for
decode batches), and sample."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from services.common.logprob import TokenLogprob
from services.engine.attention import AttentionBackend, AttentionMetadata, BoundAttention
from services.engine.cuda_graphs import DecodeGraphs
from services.engine.parallel.comm import Stage, run
from services.engine.parallel.state import ParallelState
from services.engine.prefill_graphs import PrefillGraphs
from services.engine.sampler import Sampler, SamplingBatch
from services.engine.scheduler import Batch
from services.engine.sequence import PLACEHOLDER, Sequence
from services.engine.tbo import StepPlan, TBOConfig, interleave, plan_step, split_inputs


@dataclass
class HostInputs:
    """A batch laid out on the host: flattened tokens and, per sequence, its context."""

    token_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: np.ndarray  # [S, max_blocks] int32, padded with 0
    sample_rows: list[int]  # rows whose logits are sampled (the last token of a sequence that samples)
    sampling_seqs: list[Sequence]
    num_prompt_tokens: int  # rows at prompt positions

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.query_lens)


@dataclass
class InFlight:
    """A decode step launched on the GPU whose sampled tokens the host has not read yet."""

    seqs: list[Sequence]
    positions: list[int]  # where each sequence's sampled token goes in its token_ids
    tokens: torch.Tensor  # [n] on the device: the next step's inputs come from here
    host_tokens: torch.Tensor  # [n] pinned, filled asynchronously
    done: torch.cuda.Event
    logprobs: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]  # host copies

    def row_of(self) -> dict[int, int]:
        return {id(seq): i for i, seq in enumerate(self.seqs)}


@dataclass
class StepResult:
    seqs: list[Sequence]  # the sequences that produced a token, in batch order
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        block_size: int,
        device: torch.device,
        generator: torch.Generator | None = None,
        parallel: ParallelState | None = None,
        tbo: TBOConfig | None = None,
        fixed_dispatch: bool = False,
    ) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(generator)
        self.parallel = parallel or ParallelState.single()
        self.tbo = tbo or TBOConfig()
        self.fixed_dispatch = (
            fixed_dispatch  # expert-parallel ranks exchange a fixed number of rows per batch
        )
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.num_computed_tokens = 0  # every token the model has run on, for accounting and tests
        self.num_computed_prompt_tokens = 0  # of which prompt positions (a decode worker must compute none)
        self.num_graph_steps = 0
        self.num_prefill_graph_steps = 0  # forwards replayed from prefill graphs (in pieces)
        self.num_tbo_steps = 0  # forwards run as two overlapped micro-batches

    def capture_graphs(self, sizes: list[int], max_blocks_per_seq: int, progress: bool) -> None:
        self.graphs = DecodeGraphs(
            self.model,
            self.backend,
            sizes,
            max_blocks_per_seq,
            self.device,
            progress,
            self.tbo.min_decode_seqs if self.tbo.enabled else None,
            self.fixed_dispatch,
        )

    def capture_prefill_graphs(self, max_tokens: int, progress: bool) -> None:
        self.prefill_graphs = PrefillGraphs(self.model, self.backend, max_tokens, self.device, progress)

    def host_inputs(self, batch: Batch) -> HostInputs:
        if all(item.num_new_tokens == 1 for item in batch.items):
            return self._decode_inputs(batch)
        bs = self.block_size
        ids: list[int] = []
        positions, slots = [], []
        query_lens, seq_lens, sample_rows, sampling_seqs = [], [], [], []
        row = num_prompt_tokens = 0
        for item in batch.items:
            seq, start, n = item.seq, item.start, item.num_new_tokens
            pos = np.arange(start, start + n, dtype=np.int64)
            table = np.asarray(seq.block_ids, dtype=np.int64)
            ids.extend(seq.token_ids[start : start + n])
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            query_lens.append(n)
            seq_lens.append(start + n)
            num_prompt_tokens += max(0, min(start + n, seq.prompt_len) - start)
            row += n
            if item.samples:
                sample_rows.append(row - 1)
                sampling_seqs.append(seq)
        return HostInputs(
            np.asarray(ids, dtype=np.int64),
            np.concatenate(positions),
            np.concatenate(slots),
            query_lens,
            seq_lens,
            self._block_tables(batch),
            sample_rows,
            sampling_seqs,
            num_prompt_tokens,
        )

    def _decode_inputs(self, batch: Batch) -> HostInputs:
        """One token per sequence (the hot path at large batch): plain Python ints, no per-sequence arrays."""
        bs = self.block_size
        seqs = [item.seq for item in batch.items]
        positions = [item.start for item in batch.items]
        ids = [seq.token_ids[pos] for seq, pos in zip(seqs, positions, strict=True)]
        slots = [seq.block_ids[pos // bs] * bs + pos % bs for seq, pos in zip(seqs, positions, strict=True)]
        prompt_rows = sum(pos < seq.prompt_len for seq, pos in zip(seqs, positions, strict=True))
        n = len(seqs)
        return HostInputs(
            np.asarray(ids, dtype=np.int64),
            np.asarray(positions, dtype=np.int64),
            np.asarray(slots, dtype=np.int64),
            [1] * n,
            [p + 1 for p in positions],
            self._block_tables(batch),
            list(range(n)),
            seqs,
            prompt_rows,
        )

    @staticmethod
    def _block_tables(batch: Batch) -> np.ndarray:
        tables = [item.seq.block_ids for item in batch.items]
        width = max(len(t) for t in tables)
        out = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            out[i, : len(t)] = t
        return out

    def metadata(self, h: HostInputs) -> AttentionMetadata:
        dev = self.device
        return AttentionMetadata(
            slot_mapping=torch.from_numpy(h.slots).to(dev, non_blocking=True),
            query_start_loc=torch.tensor([0, *np.cumsum(h.query_lens)], dtype=torch.int32).to(
                dev, non_blocking=True
            ),
            seq_lens=torch.tensor(h.seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=torch.from_numpy(h.block_tables).to(dev, non_blocking=True),
            query_lens_cpu=tuple(h.query_lens),
            seq_lens_cpu=tuple(h.seq_lens),
            num_decode_seqs=next((i for i, n in enumerate(h.query_lens) if n != 1), len(h.query_lens)),
        )

    def plan(self, h: HostInputs) -> StepPlan:
        return plan_step(self.parallel, h.query_lens, self.tbo)

    def forward_eager(self, h: HostInputs, plan: StepPlan | None = None) -> torch.Tensor:
        """Hidden states of every row, [T, hidden], for a step no decode graph runs: as two overlapped
        micro-batches when every rank agrees, else replayed from prefill graphs where captured, else eagerly."""
        plan = plan or self.plan(h)
        if plan.split is not None:
            first, second = split_inputs(h, plan.split)
            self.num_tbo_steps += 1
            a, b = interleave(self._stages(first, plan.rows[0]), self._stages(second, plan.rows[1]))
            return torch.cat([a, b])
        graphs = self.prefill_graphs
        if graphs is not None and graphs.bucket(len(h.token_ids)) is not None:
            self.num_prefill_graph_steps += 1
            attn = BoundAttention(self.backend, self.metadata(h))
            return graphs.run(h.token_ids, h.positions, h.slots, attn)
        return run(self._stages(h, plan.rows[0]))

    def _stages(self, h: HostInputs, rows: int) -> Stage[torch.Tensor]:
        input_ids = torch.from_numpy(h.token_ids).to(self.device, non_blocking=True)
        positions = torch.from_numpy(h.positions).to(self.device, non_blocking=True)
        batch = BoundAttention(self.backend, self.metadata(h), rows if self.fixed_dispatch else None)
        return self.model.stages(input_ids, positions, batch)

    def idle_forward(self) -> None:
        """A step with no tokens: a data-parallel rank without work still joins every collective (eagerly or by
        replaying the graph the other ranks replay)."""
        empty = np.zeros(0, dtype=np.int64)
        h = HostInputs(empty, empty, empty, [], [], np.zeros((0, 1), dtype=np.int32), [], [], 0)
        with torch.inference_mode():
            self.sample_logits(h)

    def _graph(self, plan: StepPlan) -> tuple[int, bool] | None:
        """(size, split) of the graph that runs this step, or None to run it eagerly."""
        if self.graphs is None or plan.decode_batch is None:
            return None
        bs = self.graphs.bucket(plan.decode_batch)
        if bs is None:
            return None
        tbo = self.tbo
        split = (
            tbo.enabled
            and plan.decode_batch >= tbo.min_decode_seqs
            and self.graphs.has_split(bs)
            and (tbo.decode_sizes is None or bs in tbo.decode_sizes)
        )
        return bs, split

    def sample_logits(self, h: HostInputs) -> torch.Tensor:
        """Logits of the rows that sample, [len(sample_rows), vocab]."""
        self.num_computed_tokens += len(h.token_ids)
        self.num_computed_prompt_tokens += h.num_prompt_tokens
        plan = self.plan(h)
        graph = self._graph(plan)
        if graph is not None:
            assert self.graphs is not None and len(h.sample_rows) == len(h.token_ids)
            self.num_graph_steps += 1
            self.num_tbo_steps += graph[1]
            return self.graphs.run(
                *graph, h.token_ids, h.positions, h.slots, np.asarray(h.seq_lens), h.block_tables
            )
        hidden = self.forward_eager(h, plan)
        rows = torch.tensor(h.sample_rows, dtype=torch.int64).to(self.device, non_blocking=True)
        return self.model.compute_logits(hidden[rows])

    def can_launch(self, batch: Batch) -> bool:
        """Whether a batch can run overlapped: a decode batch that a captured CUDA graph covers."""
        return (
            self.graphs is not None
            # a structured output's next mask needs this step's token: no step may start before it is read
            and all(i.num_new_tokens == 1 and i.samples and i.seq.matcher is None for i in batch.items)
            and self.graphs.bucket(len(batch.items)) is not None
        )

    @torch.inference_mode()
    def launch(self, batch: Batch, previous: InFlight | None) -> InFlight:
        """Run a decode batch without waiting for it: inputs still on the device (placeholders) are taken from
        the previous step's sampled tokens there; the sampled tokens are copied to the host in the background."""
        assert self.graphs is not None
        h = self.host_inputs(batch)
        fill = None
        pending = [row for row, token in enumerate(h.token_ids.tolist()) if token == PLACEHOLDER]
        if pending:
            assert previous is not None, "a placeholder input without a step in flight"
            rows_of = previous.row_of()
            src = [rows_of[id(h.sampling_seqs[row])] for row in pending]
            dev = self.device
            fill = (
                torch.tensor(pending).to(dev, non_blocking=True),
                previous.tokens[torch.tensor(src).to(dev, non_blocking=True)],
            )
        self.num_computed_tokens += len(h.token_ids)
        self.num_computed_prompt_tokens += h.num_prompt_tokens
        graph = self._graph(self.plan(h))
        assert graph is not None
        self.num_graph_steps += 1
        self.num_tbo_steps += graph[1]
        logits = self.graphs.run(
            *graph, h.token_ids, h.positions, h.slots, np.asarray(h.seq_lens), h.block_tables, fill
        )
        out = self.sampler(logits, SamplingBatch.from_seqs(h.sampling_seqs, self.device, logits.shape[-1]))
        host = torch.empty(out.token_ids.shape, dtype=out.token_ids.dtype, pin_memory=True)
        host.copy_(out.token_ids, non_blocking=True)
        copies = tuple(
            t.to("cpu", non_blocking=True) if t is not None else None
            for t in (out.logprobs, out.top_ids, out.top_logprobs)
        )
        done = torch.cuda.Event()
        done.record()
        positions = [item.start + 1 for item in batch.items]
        return InFlight(h.sampling_seqs, positions, out.token_ids, host, done, copies)  # type: ignore[arg-type]

    def collect(self, step: InFlight) -> StepResult:
        """Wait for a launched step and read its tokens (and logprobs)."""
        step.done.synchronize()
        token_ids = step.host_tokens.tolist()
        return StepResult(step.seqs, token_ids, self._logprobs(step.seqs, token_ids, *step.logprobs))

    @torch.inference_mode()
    def run(self, batch: Batch) -> StepResult:
        h = self.host_inputs(batch)
        if not h.sampling_seqs:  # a prefill chunk that samples nothing
            self.num_computed_tokens += len(h.token_ids)
            self.num_computed_prompt_tokens += h.num_prompt_tokens
            self.forward_eager(h)
            return StepResult([], [], [])
        logits = self.sample_logits(h)
        seqs = h.sampling_seqs
        out = self.sampler(logits, SamplingBatch.from_seqs(seqs, self.device, logits.shape[-1]))
        token_ids = out.token_ids.tolist()
        return StepResult(
            seqs, token_ids, self._logprobs(seqs, token_ids, out.logprobs, out.top_ids, out.top_logprobs)
        )

    @staticmethod
    def _logprobs(
        seqs: list[Sequence],
        token_ids: list[int],
        chosen_t: torch.Tensor | None,
        top_ids_t: torch.Tensor | None,
        top_lps_t: torch.Tensor | None,
    ) -> list[TokenLogprob | None]:
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if chosen_t is None:
            return logprobs
        chosen = chosen_t.tolist()
        top_ids = top_ids_t.tolist() if top_ids_t is not None else None
        top_lps = top_lps_t.tolist() if top_lps_t is not None else None
        for i, seq in enumerate(seqs):
            n = seq.params.logprobs
            if n is None:
                continue
            top = list(zip(top_ids[i][:n], top_lps[i][:n], strict=True)) if top_ids and top_lps and n else []
            logprobs[i] = TokenLogprob(token_ids[i], chosen[i], top)
        return logprobs

    @torch.inference_mode()
    def all_logits(self, batch: Batch) -> torch.Tensor:
        """Logits of every scheduled token (scoring / prompt logprobs), [num_tokens, vocab]."""
        h = self.host_inputs(batch)
        self.num_computed_tokens += len(h.token_ids)
        return self.model.compute_logits(self.forward_eager(h)).float()
