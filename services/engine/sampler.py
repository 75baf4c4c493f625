"""Turn a batch of logits into next tokens, each row with its own sampling parameters.

Applied in this order: OpenAI's logit bias, the structured-output mask, then (the order of `transformers'` logits
warpers, our oracle) presence/frequency penalties, temperature, top-k, top-p, min-p; then one draw by the
exponential-race trick (argmax of p / Exp(1) noise), which needs no host sync. Rows with a seed draw their noise from their own generator, so a seeded request samples the
same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.sequence import Sequence


@dataclass
class SamplingBatch:
    """Per-row parameters; a tensor is only built when some row needs it (None otherwise)."""

    temperature: torch.Tensor | None  # [B] float32, 0 = greedy
    top_k: torch.Tensor | None  # [B] int64, 0 = off
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    presence_penalty: torch.Tensor | None  # [B] float32
    frequency_penalty: torch.Tensor | None  # [B] float32
    # logit bias as (rows, token ids, values) [N] each, every row's entries together; None if no row has any
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    # [B, vocab / 32] int32 on the host: each row's allowed next tokens (structured outputs); None if no row has any
    grammar: torch.Tensor | None
    output_ids: list[list[int]]  # for penalties
    generators: list[torch.Generator | None]
    num_logprobs: int | None  # the most top logprobs any row asks for; None if no row wants logprobs
    all_greedy: bool
    any_penalties: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool

    @classmethod
    def from_seqs(cls, seqs: list[Sequence], device: torch.device, vocab_size: int = 0) -> SamplingBatch:
        """vocab_size: the logits' width (for structured outputs' masks)."""
        params = [s.params for s in seqs]

        def col(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        wanted = [p.logprobs for p in params if p.logprobs is not None]
        all_greedy = all(p.greedy for p in params)
        penalties = any(p.has_penalties for p in params)
        any_top_k = any(p.top_k > 0 for p in params)
        any_top_p = any(p.top_p < 1 for p in params)
        any_min_p = any(p.min_p > 0 for p in params)
        sampled = not all_greedy
        bias = [(row, t, b) for row, p in enumerate(params) for t, b in p.logit_bias]
        logit_bias = None
        if bias:
            rows, ids, values = zip(*bias, strict=True)
            logit_bias = (
                col(list(rows), torch.int64),
                col(list(ids), torch.int64),
                col(list(values), torch.float32),
            )
        grammar = None
        if any(s.matcher is not None for s in seqs):
            from services.engine.grammar import token_bitmask

            grammar = token_bitmask([s.matcher for s in seqs], vocab_size)
        return cls(
            temperature=col([p.temperature for p in params], torch.float32) if sampled else None,
            top_k=col([max(p.top_k, 0) for p in params], torch.int64) if sampled else None,
            top_p=col([p.top_p for p in params], torch.float32) if sampled and any_top_p else None,
            min_p=col([p.min_p for p in params], torch.float32) if sampled and any_min_p else None,
            presence_penalty=col([p.presence_penalty for p in params], torch.float32) if penalties else None,
            frequency_penalty=col([p.frequency_penalty for p in params], torch.float32)
            if penalties
            else None,
            logit_bias=logit_bias,
            grammar=grammar,
            output_ids=[s.output_ids for s in seqs] if penalties else [],
            generators=[s.generator for s in seqs] if sampled else [],
            num_logprobs=max(wanted) if wanted else None,
            all_greedy=all_greedy,
            any_penalties=penalties,
            any_top_k=any_top_k,
            any_top_p=any_top_p,
            any_min_p=any_min_p,
        )


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] the sampled tokens' logprobs
    top_ids: torch.Tensor | None  # [B, n]
    top_logprobs: torch.Tensor | None  # [B, n]


def apply_penalties(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """OpenAI semantics: logit -= frequency * count + presence * (count > 0), counting generated tokens."""
    batch, vocab = logits.shape
    width = max((len(o) for o in sb.output_ids), default=0)
    if width == 0:
        return logits
    ids = torch.full((batch, width), vocab, dtype=torch.int64)
    for i, out in enumerate(sb.output_ids):
        ids[i, : len(out)] = torch.tensor(out, dtype=torch.int64)
    ids = ids.to(logits.device)
    counts = torch.zeros(batch, vocab + 1, device=logits.device).scatter_add_(
        1, ids, torch.ones_like(ids, dtype=torch.float32)
    )
    counts = counts[:, :vocab]
    return (
        logits - sb.frequency_penalty[:, None] * counts - sb.presence_penalty[:, None] * (counts > 0).float()
    )


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (always at least one)."""
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)[:, None]
    remove[:, -1] = False
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely token."""
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


NOISE_DTYPE = torch.float32  # probabilities are computed from upcast logits, so the noise is float32 too


def _seeded_row_noise(row: torch.Tensor, generator: torch.Generator) -> None:
    """NOTE: the only draw a sampled step takes from a seeded row's generator: one Exp(1) value per vocabulary
    entry, in place. `skip_sampled_step` replays exactly this call; change the two together."""
    row.exponential_(generator=generator)


def exponential_noise(
    probs: torch.Tensor, generators: list[torch.Generator | None], default: torch.Generator | None
) -> torch.Tensor:
    assert probs.dtype == NOISE_DTYPE and probs.is_contiguous(), (probs.dtype, probs.stride())
    noise = torch.empty_like(probs).exponential_(generator=default)
    for i, gen in enumerate(generators):
        if gen is not None:
            _seeded_row_noise(noise[i], gen)
    return noise.clamp_min_(1e-20)


def skip_sampled_step(generator: torch.Generator, vocab_size: int) -> None:
    """Advance a seeded row's generator past exactly what one sampled step over `vocab_size` logits draws from it,
    as if this sampler had made that step (a decode worker continuing from the prefill worker's first token).

    The draw itself is replayed (same width, dtype and device) rather than the generator's offset computed: how
    far a draw moves a generator depends on the device (CPU Mersenne Twister or CUDA Philox, whose offset steps
    depend on the launch grid), and replaying is correct on every one of them.
    """
    row = torch.empty(vocab_size, dtype=NOISE_DTYPE, device=generator.device)
    _seeded_row_noise(row, generator)


class Sampler:
    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator  # for rows without a seed of their own

    def __call__(self, logits: torch.Tensor, sb: SamplingBatch) -> SamplerOutput:
        plain = sb.logit_bias is None and not sb.any_penalties and sb.grammar is None
        if sb.all_greedy and plain and sb.num_logprobs is None:
            return SamplerOutput(logits.argmax(dim=-1), None, None, None)  # the common fast path: no upcast
        model_logits, logits = logits, logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if sb.num_logprobs is not None else None
        if sb.logit_bias is not None:
            logits = logits.index_put(sb.logit_bias[:2], sb.logit_bias[2], accumulate=True)
        if sb.grammar is not None:
            from services.engine.grammar import apply_bitmask

            if logits is model_logits:  # masked in place: never the caller's tensor
                logits = logits.clone()
            apply_bitmask(logits, sb.grammar)
        if sb.any_penalties:
            logits = apply_penalties(logits, sb)
        greedy = logits.argmax(dim=-1)
        if sb.all_greedy:
            tokens = greedy
        else:
            scaled = logits / torch.where(sb.temperature > 0, sb.temperature, 1.0)[:, None]
            if sb.any_top_k:
                scaled = apply_top_k(scaled, sb.top_k)
            if sb.any_top_p:
                scaled = apply_top_p(scaled, sb.top_p)
            if sb.any_min_p:
                scaled = apply_min_p(scaled, sb.min_p)
            probs = scaled.softmax(dim=-1)
            drawn = (probs / exponential_noise(probs, sb.generators, self.generator)).argmax(dim=-1)
            tokens = torch.where((sb.temperature == 0) | (sb.top_k == 1), greedy, drawn)
        if raw_logprobs is None:
            return SamplerOutput(tokens, None, None, None)
        chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
        top = raw_logprobs.topk(sb.num_logprobs, dim=-1) if sb.num_logprobs else None
        return SamplerOutput(tokens, chosen, top.indices if top else None, top.values if top else None)
