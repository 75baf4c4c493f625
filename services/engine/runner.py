"""Build a batch's model inputs, run the model over the paged cache, and sample."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from services.engine.attention import AttentionBackend, AttentionMetadata, BoundAttention
from services.engine.sampler import Sampler, SamplingBatch
from services.engine.scheduler import Batch
from services.engine.sequence import Sequence, TokenLogprob


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # rows of the hidden states whose logits are sampled (last token of a sequence)
    sampling_seqs: list[Sequence]
    num_prompt_tokens: int  # rows at prompt positions


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
    ) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(generator)
        self.num_computed_tokens = 0  # every token the model has run on, for accounting and tests
        self.num_computed_prompt_tokens = 0  # of which prompt positions (a decode worker must compute none)

    def prepare(self, batch: Batch) -> ModelInputs:
        bs = self.block_size
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
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
        width = max(len(i.seq.block_ids) for i in batch.items)
        tables = np.zeros((len(batch.items), width), dtype=np.int32)
        for i, item in enumerate(batch.items):
            tables[i, : len(item.seq.block_ids)] = item.seq.block_ids
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev, non_blocking=True),
            query_start_loc=torch.tensor([0, *np.cumsum(query_lens)], dtype=torch.int32).to(
                dev, non_blocking=True
            ),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=torch.from_numpy(tables).to(dev, non_blocking=True),
            query_lens_cpu=tuple(query_lens),
            seq_lens_cpu=tuple(seq_lens),
        )
        return ModelInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64).to(dev, non_blocking=True),
            positions=torch.from_numpy(np.concatenate(positions)).to(dev, non_blocking=True),
            meta=meta,
            sample_rows=torch.tensor(sample_rows, dtype=torch.int64).to(dev, non_blocking=True),
            sampling_seqs=sampling_seqs,
            num_prompt_tokens=num_prompt_tokens,
        )

    def forward(self, inputs: ModelInputs) -> torch.Tensor:
        self.num_computed_tokens += inputs.input_ids.numel()
        self.num_computed_prompt_tokens += inputs.num_prompt_tokens
        return self.model(inputs.input_ids, inputs.positions, BoundAttention(self.backend, inputs.meta))

    @torch.inference_mode()
    def run(self, batch: Batch) -> StepResult:
        inputs = self.prepare(batch)
        hidden = self.forward(inputs)
        seqs = inputs.sampling_seqs
        if not seqs:
            return StepResult([], [], [])
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        out = self.sampler(logits, SamplingBatch.from_seqs(seqs, self.device))
        token_ids = out.token_ids.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if out.logprobs is not None:
            chosen = out.logprobs.tolist()
            top_ids = out.top_ids.tolist() if out.top_ids is not None else None
            top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
            for i, seq in enumerate(seqs):
                n = seq.params.logprobs
                if n is None:
                    continue
                top = (
                    list(zip(top_ids[i][:n], top_lps[i][:n], strict=True))
                    if top_ids and top_lps and n
                    else []
                )
                logprobs[i] = TokenLogprob(token_ids[i], chosen[i], top)
        return StepResult(seqs, token_ids, logprobs)

    @torch.inference_mode()
    def all_logits(self, batch: Batch) -> torch.Tensor:
        """Logits of every scheduled token (scoring / prompt logprobs), [num_tokens, vocab]."""
        return self.model.compute_logits(self.forward(self.prepare(batch))).float()
