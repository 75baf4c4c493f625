"""The engine: a model, its paged KV cache, the scheduler and the runner, stepped by the caller.

One engine serves one role (colocated, prefill or decode); the worker services drive `step()` from their loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from services.engine.attention import make_backend
from services.engine.block_manager import BlockAllocator
from services.engine.config import EngineConfig, EngineRuntime
from services.engine.detokenizer import IncrementalDetokenizer
from services.engine.errors import RequestError
from services.engine.kv_cache import KVCache, KVLayout
from services.engine.model_config import ModelConfig
from services.engine.models import load_model
from services.engine.runner import ModelRunner
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Batch, ScheduledSeq, Scheduler
from services.engine.sequence import Sequence, TokenLogprob
from services.engine.tokenizer import Tokenizer

log = logging.getLogger("pdmesh.engine")
CPU_KV_CACHE_GB = 1.0
GPU_ACTIVATION_RESERVE_GB = 2.0


@dataclass
class RequestOutput:
    """What one step produced for one request: the new tokens and text, and whether it is done."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # stop | length | abort | prefilled (prefill role: continue on a decode worker)
    stop_reason: str | int | None  # the stop string or stop token id that ended it
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    # on the first token only: seconds from arrival to the first scheduled step, and from then to this token
    queue_s: float | None = None
    prefill_s: float | None = None
    emitted: float = field(default_factory=time.monotonic)  # when the engine produced it (monotonic clock)


@dataclass(frozen=True)
class Reservation:
    """Decode role: where the prompt's KV must be written. Blocks before `num_cached_tokens` are already here."""

    request_id: str
    block_ids: list[int]
    num_cached_tokens: int


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        started = time.monotonic()
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.tokenizer = Tokenizer(config.model)
        device = config.resolve_device()
        dtype = config.resolve_dtype(device, self.model_config.checkpoint_dtype)
        self.model = load_model(self.model_config, device, dtype, progress=config.progress)
        num_blocks = self._size_kv_cache(device, dtype)
        max_model_len = self._max_model_len(num_blocks)
        layout = KVLayout.for_model(self.model_config, num_blocks, config.block_size, dtype)
        self.kv_cache = KVCache(layout, device)
        self.runtime = EngineRuntime(
            device, dtype, num_blocks, max_model_len, self.model_config.eos_token_ids
        )
        backend = make_backend(config.attention_backend, self.kv_cache, self.model_config.head_dim**-0.5)
        generator = torch.Generator(device).manual_seed(config.seed)
        self.runner = ModelRunner(self.model, backend, config.block_size, device, generator)
        self.allocator = BlockAllocator(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.allocator, config.role, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.seqs: dict[str, Sequence] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        log.info(
            "engine ready in %.1fs: %s (%s) on %s, %s, %d KV blocks of %d tokens, max_model_len %d, role %s",
            time.monotonic() - started,
            self.model_config.architecture,
            config.model,
            device,
            dtype,
            num_blocks,
            config.block_size,
            max_model_len,
            config.role,
        )

    @property
    def layout_fingerprint(self) -> str:
        """What a peer must match to exchange KV with this engine (model, dtype, block and head shapes)."""
        return self.kv_cache.layout.fingerprint(self.model_config.fingerprint)

    # ---- requests ----------------------------------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError for a request that can never be served as given."""
        if not prompt_ids:
            raise RequestError("the prompt is empty; give at least one token.")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab}).")
        limit = self.runtime.max_model_len
        if len(prompt_ids) >= limit:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; this model serves at most {limit} tokens in total "
                "(prompt plus output). Shorten the prompt."
            )

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.check_request(prompt_ids, params)
        self.scheduler.add(self._new_seq(request_id, prompt_ids, params))

    def abort(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        self.detokenizers.pop(request_id, None)
        return seq is not None and self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- decode role: KV written by a prefill worker -----------------------------------------------------
    def reserve(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Reservation | None:
        """Hold blocks for the prompt's KV; None when the cache is full now (retry later or elsewhere)."""
        self.check_request(prompt_ids, params)
        seq = self._new_seq(request_id, prompt_ids, params)
        if not self.scheduler.reserve(seq):
            self._forget(request_id)
            return None
        return Reservation(request_id, list(seq.block_ids), seq.num_cached_tokens)

    def admit_prefilled(self, request_id: str, first_token: int) -> list[RequestOutput]:
        """The reserved prompt's KV has landed: decode from the first token (sampled by the prefill worker)."""
        seq = self.scheduler.admit_prefilled(request_id)
        return [self._emit(seq, first_token, None)]

    def release(self, request_id: str) -> None:
        """Free a held (prefill role) or reserved (decode role) request's blocks."""
        self.scheduler.release(request_id)
        self._forget(request_id)

    # ---- stepping ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        started = time.monotonic()
        result = self.runner.run(batch)
        self.scheduler.update(batch, started)
        return [
            self._emit(seq, token, logprob)
            for seq, token, logprob in zip(result.seqs, result.token_ids, result.logprobs, strict=True)
        ]

    def _emit(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        params = seq.params
        queue_s = prefill_s = None
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
            scheduled = seq.scheduled_time or seq.first_token_time
            queue_s, prefill_s = scheduled - seq.arrival_time, seq.first_token_time - scheduled
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        detok = self.detokenizers[seq.request_id]
        before = len(detok.text)
        detok.add(token)
        reason: str | None = None
        stop_reason: str | int | None = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.runtime.eos_token_ids):
            reason, stop_reason = "stop", token
        elif detok.check_stop(len(detok.text) - before, params.include_stop_str_in_output):
            reason, stop_reason = "stop", detok.stopped_by
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.runtime.max_model_len:
            reason = "length"
        if self.config.role == "prefill" and reason is None:
            reason = "prefilled"
        if reason is not None:
            if reason != "prefilled":
                detok.flush()
            self.scheduler.finish(seq, reason)
            if self.config.role != "prefill":
                self._forget(seq.request_id)
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[token],
            new_text=detok.delta(final=reason is not None),
            finished=reason is not None,
            finish_reason=reason,
            stop_reason=stop_reason,
            num_prompt_tokens=seq.prompt_len,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            new_logprobs=[logprob] if logprob is not None else [],
            queue_s=queue_s,
            prefill_s=prefill_s,
        )

    # ---- scoring -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def compute_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits at every position of token_ids ([len, vocab], float32), computed in budget-sized chunks."""
        seq = Sequence.new("score", token_ids, SamplingParams())
        if not self.allocator.grow(seq, len(token_ids)):
            raise RequestError("not enough free KV blocks to score this sequence now.")
        try:
            chunks = []
            step = self.config.max_num_batched_tokens
            for start in range(0, len(token_ids), step):
                n = min(step, len(token_ids) - start)
                seq.num_computed_tokens = start
                chunks.append(self.runner.all_logits(Batch([ScheduledSeq.of(seq, n)])))
            return torch.cat(chunks)
        finally:
            self.allocator.free_seq(seq)

    # ---- internals ---------------------------------------------------------------------------------------
    def _new_seq(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        if request_id in self.seqs:
            raise RequestError(f"request id '{request_id}' is already in use.")
        seq = Sequence.new(request_id, prompt_ids, params)
        if params.seed is not None:
            seq.generator = torch.Generator(self.runtime.device).manual_seed(params.seed)
        self.seqs[request_id] = seq
        self.detokenizers[request_id] = IncrementalDetokenizer(
            self.tokenizer, prompt_ids, params.skip_special_tokens, params.stop
        )
        return seq

    def _forget(self, request_id: str) -> None:
        self.seqs.pop(request_id, None)
        self.detokenizers.pop(request_id, None)

    def _size_kv_cache(self, device: torch.device, dtype: torch.dtype) -> int:
        cfg = self.config
        if cfg.num_blocks is not None:
            return cfg.num_blocks
        block_bytes = KVLayout.for_model(self.model_config, 1, cfg.block_size, dtype).block_nbytes
        if cfg.kv_cache_memory_gb is not None:
            budget = cfg.kv_cache_memory_gb * 2**30
        elif device.type == "cuda":
            # this process's share of the GPU, and never more than is free (other processes may share the GPU)
            free, total = torch.cuda.mem_get_info(device)
            reserve = GPU_ACTIVATION_RESERVE_GB * 2**30
            own = torch.cuda.memory_reserved(device)
            budget = min(total * cfg.gpu_memory_utilization - own, free) - reserve
        else:
            budget = CPU_KV_CACHE_GB * 2**30
        model_len = cfg.max_model_len or self.model_config.max_position_embeddings
        # no point in more blocks than every sequence slot at full length could use
        useful = cfg.max_num_seqs * -(-model_len // cfg.block_size)
        num_blocks = min(int(budget // block_bytes), useful)
        if num_blocks < 1:
            raise RuntimeError(
                f"no memory left for the KV cache on {device} after loading the model; lower max_num_batched_tokens, "
                "raise gpu_memory_utilization or use a device with more memory."
            )
        return num_blocks

    def _max_model_len(self, num_blocks: int) -> int:
        capacity = num_blocks * self.config.block_size
        wanted = self.config.max_model_len or self.model_config.max_position_embeddings
        if wanted > capacity:
            if self.config.max_model_len is not None:
                raise ValueError(
                    f"max_model_len {wanted} does not fit in the KV cache ({capacity} tokens); lower max_model_len "
                    "or give the cache more memory (num_blocks / kv_cache_memory_gb)."
                )
            log.warning(
                "max_model_len capped to the KV cache's %d tokens (the model allows %d)", capacity, wanted
            )
            wanted = capacity
        return wanted
