"""The engine: a model, its paged KV cache, the scheduler and the runner, stepped by the caller.

One engine serves one role (colocated, prefill or decode); the worker services drive `step()` from their loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import astuple, dataclass, field, replace

import torch
import torch.distributed as dist

from services.common.errors import RequestError
from services.common.logprob import TokenLogprob
from services.common.sampling_params import SamplingParams
from services.common.tokenizer import Tokenizer
from services.engine.attention import make_backend, resolve_backend
from services.engine.block_manager import BlockAllocator
from services.engine.config import EngineConfig, EngineRuntime
from services.engine.cuda_graphs import default_sizes
from services.engine.detokenizer import IncrementalDetokenizer
from services.engine.grammar import Grammars
from services.engine.kv_cache import KVCache, KVLayout
from services.engine.model_config import ModelConfig
from services.engine.models import load_model
from services.engine.models.moe import Experts
from services.engine.parallel.state import init_parallel
from services.engine.runner import InFlight, ModelRunner
from services.engine.sampler import skip_sampled_step
from services.engine.scheduler import Batch, ScheduledSeq, Scheduler
from services.engine.sequence import PLACEHOLDER, SeqStatus, Sequence
from services.engine.tbo import TBOConfig
from services.engine.tbo_calibration import calibrate

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


@dataclass(frozen=True)
class LoadCounts:
    """How loaded an engine is (what GetLoad reports); adds up over the replicas of a worker."""

    running: int = 0
    waiting: int = 0
    parked: int = 0
    used_blocks: int = 0
    total_blocks: int = 0
    computed_tokens: int = 0
    computed_prompt_tokens: int = 0
    preemptions: int = 0
    pending_tokens: int = 0  # tokens of waiting and running requests whose KV is not computed yet
    tbo_steps: int = 0  # forwards run as two overlapped micro-batches

    def __add__(self, other: LoadCounts) -> LoadCounts:
        return LoadCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        started = time.monotonic()
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.tokenizer = Tokenizer(config.model)
        self.grammars = Grammars(config.model, self.model_config.vocab_size)
        device = self._bind_device()
        self.parallel = init_parallel(config.parallel, config.rank, config.dist_init_method or "env://")
        dtype = config.resolve_dtype(device, self.model_config.checkpoint_dtype)
        self.model = self._load_model(device, dtype)
        num_blocks, max_model_len = self._plan_memory(device, dtype)
        layout = KVLayout.for_model(self.model_config, num_blocks, config.block_size, dtype, self.parallel.tp)
        self.kv_cache = KVCache(layout, device)
        self.runtime = EngineRuntime(
            device, dtype, num_blocks, max_model_len, self.model_config.eos_token_ids
        )
        self.runner = self._build_runner(device, dtype, max_model_len)
        self.tbo_calibration: dict = {}
        if config.tbo and config.tbo_calibrate and device.type == "cuda":
            self.tbo_calibration = calibrate(
                self.runner, num_blocks, config.max_num_batched_tokens, max_model_len
            )
        # decode steps overlap host work where graphs run them (not in the prefill role: it never decodes; not
        # with data-parallel ranks: each step's plan is agreed with the others before it launches)
        self.overlap = (
            self.runner.graphs is not None
            and config.role != "prefill"
            and config.overlap_scheduling
            and config.parallel.dp == 1
        )
        self._inflight: InFlight | None = None
        self.allocator = BlockAllocator(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.allocator, config.role, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.seqs: dict[str, Sequence] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        log.info(
            "engine ready in %.1fs: %s (%s) on %s, %s, %d KV blocks of %d tokens, max_model_len %d, role %s, "
            "attention %s, CUDA graphs %s, prefill graphs %s",
            time.monotonic() - started,
            self.model_config.architecture,
            config.model,
            device,
            dtype,
            num_blocks,
            config.block_size,
            max_model_len,
            config.role,
            self.attention_backend,
            "on" if self.runner.graphs is not None else "off",
            "on" if self.runner.prefill_graphs is not None else "off",
        )

    # ---- start-up steps ----------------------------------------------------------------------------------
    def _bind_device(self) -> torch.device:
        """This rank's device, made current."""
        device = self.config.resolve_device(self.config.rank)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # this rank's GPU: NCCL and the kernels' default device
        if device.type == "cuda":
            # NOTE: the host's tensor work is small; torch's CPU thread pool only adds wake-up stalls, worst with
            # several ranks' pools on one host
            torch.set_num_threads(1)
        return device

    def _load_model(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        """The model's weights on this rank, with the expert dispatch and kernels the config asks for."""
        config, moe = self.config, self.model_config.moe
        if config.ep_dispatch == "mori" and moe is not None:
            from services.engine.rocm.mori_dispatch import MoriDispatch

            dispatcher = MoriDispatch(
                self.parallel.world_group,
                self.model_config.hidden_size,
                moe.num_experts // self.parallel.ep,
                moe.top_k,
                max(config.max_num_batched_tokens, config.max_num_seqs),
                dtype,
            )
            self.parallel = replace(self.parallel, dispatcher=dispatcher)
        model = load_model(
            self.model_config,
            device,
            dtype,
            config.progress and self.parallel.rank == 0,
            config.load_format,
            self.parallel,
        )
        if config.moe_backend == "aiter" and moe is not None:
            from services.engine.rocm.aiter_moe import AiterExperts

            for module in model.modules():
                if isinstance(module, Experts):
                    module.kernel = AiterExperts(module)
        return model

    def _plan_memory(self, device: torch.device, dtype: torch.dtype) -> tuple[int, int]:
        """KV blocks for what memory is left after the weights, and the longest sequence they allow."""
        num_blocks = self._size_kv_cache(device, dtype)
        return num_blocks, self._max_model_len(num_blocks)

    def _build_runner(self, device: torch.device, dtype: torch.dtype, max_model_len: int) -> ModelRunner:
        """The model runner over the KV cache, with decode CUDA graphs captured where they can run."""
        config = self.config
        self.attention_backend = resolve_backend(config.attention_backend, device)
        backend = make_backend(
            self.attention_backend, self.kv_cache, self.model_config.head_dim**-0.5, max_model_len
        )
        generator = torch.Generator(device).manual_seed(config.seed)
        dispatch = config.resolve_ep_dispatch(device)
        runner = ModelRunner(
            self.model,
            backend,
            config.block_size,
            device,
            generator,
            self.parallel,
            TBOConfig(config.tbo, config.tbo_min_prefill_tokens, config.tbo_min_decode_seqs),
            fixed_dispatch=self.parallel.ep > 1 and config.parallel.dp > 1 and dispatch == "all_gather",
        )
        # exact all-to-all expert dispatch reads pair counts on the host: not capturable
        graphable = runner.fixed_dispatch or config.parallel.dp == 1 or self.parallel.ep == 1
        if device.type == "cuda" and self.attention_backend == "triton" and config.cuda_graphs and graphable:
            max_batch = min(config.max_num_seqs, config.cuda_graph_max_batch)
            sizes = [
                b for b in config.cuda_graph_sizes or default_sizes(max_batch) if b <= config.max_num_seqs
            ]
            if sizes:
                runner.capture_graphs(sizes, -(-max_model_len // config.block_size), config.progress)
            # pieces hold no collectives, and the experts must be this package's kernels
            if config.prefill_graphs and config.parallel.world == 1 and config.moe_backend == "torch":
                runner.capture_prefill_graphs(config.max_num_batched_tokens, config.progress)
        return runner

    @property
    def layout_fingerprint(self) -> str:
        """What a peer must match to exchange KV with this engine (model, dtype, block and head shapes, and the
        tensor-parallel ranks: rank r writes to rank r, even where every rank holds the same latent cache)."""
        return f"{self.kv_cache.layout.fingerprint(self.model_config.fingerprint)}|TP{self.parallel.tp}"

    # ---- requests ----------------------------------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError for a request that can never be served as given."""
        if not prompt_ids:
            raise RequestError("the prompt is empty; give at least one token.")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab}).")
        if params.response_format is not None:
            self.grammars.compiled(params.response_format)  # an unusable schema is the request's error
        outside = [t for t, _ in params.logit_bias if t >= vocab]
        if outside:
            raise RequestError(
                f"logit_bias token id {outside[0]} is outside the vocabulary: ids are in [0, {vocab})."
            )
        limit = self.runtime.max_model_len
        if len(prompt_ids) >= limit:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; this model serves at most {limit} tokens in total "
                "(prompt plus output). Shorten the prompt."
            )

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival: float | None = None
    ) -> None:
        """`arrival` (monotonic): when the request reached the worker, if earlier than now (its queue time
        then includes the wait for the engine thread to finish the step it was running)."""
        self.check_request(prompt_ids, params)
        seq = self._new_seq(request_id, prompt_ids, params)
        if arrival is not None:
            seq.arrival_time = min(arrival, seq.arrival_time)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        self.detokenizers.pop(request_id, None)
        return seq is not None and self.scheduler.abort(request_id) is not None

    # ---- decode role: KV written by a prefill worker -----------------------------------------------------
    def reserve(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Reservation | None:
        """Hold blocks for the prompt's KV; None when the cache is full now (retry later or elsewhere)."""
        self.check_request(prompt_ids, params)
        if self._inflight is not None:
            # NOTE: blocks freed while a step was in flight may still take that step's (stale) KV writes; they must
            # land before another worker's transfer may write into reserved blocks, which is not stream-ordered
            self._inflight.done.synchronize()
        seq = self._new_seq(request_id, prompt_ids, params)
        if not self.scheduler.reserve(seq):
            self._forget(request_id)
            return None
        return Reservation(request_id, list(seq.block_ids), seq.num_cached_tokens)

    def admit_prefilled(self, request_id: str, first_token: int) -> list[RequestOutput]:
        """The reserved prompt's KV has landed: decode from the first token (sampled by the prefill worker)."""
        seq = self.scheduler.admit_prefilled(request_id)
        if seq.generator is not None:
            # the prefill worker drew the first token's noise from its own generator of the same seed; without
            # this, our first draw would replay that noise and the text would differ from a colocated run's
            skip_sampled_step(seq.generator, self.model_config.vocab_size)  # the width of the runner's logits
        return [self._emit(seq, first_token, None)]

    def release(self, request_id: str) -> None:
        """Free a held (prefill role) or reserved (decode role) request's blocks."""
        self.scheduler.release(request_id)
        self._forget(request_id)

    def prefix_cache(self) -> Engine:
        return self

    def replica_loads(self) -> list[LoadCounts]:
        """One engine is one data-parallel replica (a rank group reports each of its replicas)."""
        return [self.load_counts()]

    def load_counts(self) -> LoadCounts:
        scheduler, allocator, runner = self.scheduler, self.allocator, self.runner
        return LoadCounts(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            parked=len(scheduler.parked),
            used_blocks=allocator.num_used,
            total_blocks=allocator.num_blocks,
            computed_tokens=runner.num_computed_tokens,
            computed_prompt_tokens=runner.num_computed_prompt_tokens,
            preemptions=scheduler.stats.num_preemptions,
            pending_tokens=sum(s.num_pending_tokens for s in (*scheduler.waiting, *scheduler.running)),
            tbo_steps=runner.num_tbo_steps,
        )

    def kv_snapshot(self) -> tuple[int, list[int]]:
        """Every block hash in the prefix cache now, and the number of the last cache event it includes."""
        return self.allocator.events.seq, list(self.allocator.cached)

    # ---- stepping ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.overlap:
            return self._step_overlapped()
        batch = self.scheduler.schedule()
        if batch:
            return self._run(batch)
        if self.config.parallel.dp > 1:
            self.runner.idle_forward()  # NOTE: data-parallel ranks run every forward together, even with no tokens
        return []

    @property
    def busy(self) -> bool:
        """Whether this engine (this rank alone) has work for step()."""
        return self.scheduler.num_unfinished > 0 or self._inflight is not None

    def has_unfinished(self) -> bool:
        """Whether step() has work; with data-parallel ranks, whether any rank has (they step together)."""
        if self.config.parallel.dp == 1:
            return self.busy
        flag = torch.tensor([int(self.busy)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.parallel.host_group)
        return bool(flag.item())

    def _run(self, batch: Batch) -> list[RequestOutput]:
        started = time.monotonic()
        result = self.runner.run(batch)
        self.scheduler.update(batch, started)
        return [
            self._emit(seq, token, logprob)
            for seq, token, logprob in zip(result.seqs, result.token_ids, result.logprobs, strict=True)
        ]

    def _step_overlapped(self) -> list[RequestOutput]:
        """Decode steps overlap the host's work: step N+1 is launched (its inputs are step N's tokens, still on
        the GPU, standing as placeholders in the sequences) before step N's tokens are read and processed.

        NOTE: a sequence that step N finishes has already been scheduled into N+1; that extra token is dropped
        and its KV write lands in the sequence's own blocks, ahead (in stream order) of any later reuse. Anything
        that could preempt, admit or prefill first waits for the step in flight, so placeholders never reach a
        recompute or the prefix cache.
        """
        outputs: list[RequestOutput] = []
        if self._inflight is not None and (
            self.scheduler.waiting or self.allocator.num_free < len(self.scheduler.running)
        ):
            outputs += self._collect()
        batch = self.scheduler.schedule()
        if batch and self.runner.can_launch(batch):
            started = time.monotonic()
            step = self.runner.launch(batch, self._inflight)
            self.scheduler.update(batch, started)
            for seq in step.seqs:
                seq.token_ids.append(PLACEHOLDER)
            previous, self._inflight = self._inflight, step
            return outputs + (self._process(previous) if previous is not None else [])
        if self._inflight is not None:
            outputs += self._collect()
            batch = Batch([i for i in batch.items if i.seq.status is SeqStatus.RUNNING])
        return outputs + (self._run(batch) if batch else [])

    def _collect(self) -> list[RequestOutput]:
        step, self._inflight = self._inflight, None
        return self._process(step) if step is not None else []

    def _process(self, step: InFlight) -> list[RequestOutput]:
        result = self.runner.collect(step)
        outputs = []
        for seq, position, token, logprob in zip(
            result.seqs, step.positions, result.token_ids, result.logprobs, strict=True
        ):
            if seq.status is not SeqStatus.RUNNING or self.seqs.get(seq.request_id) is not seq:
                continue  # finished or aborted after this step was launched: its token is dropped
            outputs.append(self._emit(seq, token, logprob, position))
            self.allocator.register_full_blocks(seq)
        return outputs

    def _emit(
        self, seq: Sequence, token: int, logprob: TokenLogprob | None, position: int | None = None
    ) -> RequestOutput:
        """Take in a sampled token (appended, or written over its placeholder at `position`), detokenize it,
        check the stop conditions, and describe what the request got."""
        params = seq.params
        queue_s = prefill_s = None
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
            scheduled = seq.scheduled_time or seq.first_token_time
            queue_s, prefill_s = scheduled - seq.arrival_time, seq.first_token_time - scheduled
        if position is None:
            seq.token_ids.append(token)
            position = seq.num_tokens - 1
        else:
            seq.token_ids[position] = token
        produced = position + 1 - seq.prompt_len  # output tokens up to this one
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.matcher is not None:
            seq.matcher.accept(token)
        detok = self.detokenizers[seq.request_id]
        before = len(detok.text)
        detok.add(token)
        reason: str | None = None
        stop_reason: str | int | None = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.runtime.eos_token_ids):
            reason, stop_reason = "stop", token
        elif detok.check_stop(len(detok.text) - before, params.include_stop_str_in_output):
            reason, stop_reason = "stop", detok.stopped_by
        elif produced >= params.max_tokens or position + 1 >= self.runtime.max_model_len:
            reason = "length"
        elif seq.matcher is not None and seq.matcher.done:  # the format is complete
            reason, stop_reason = "stop", token
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
            num_output_tokens=produced,
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
        if params.response_format is not None:
            seq.matcher = self.grammars.matcher(params.response_format)
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
        block_bytes = KVLayout.for_model(
            self.model_config, 1, cfg.block_size, dtype, self.parallel.tp
        ).block_nbytes
        if cfg.kv_cache_memory_gb is not None:
            budget = cfg.kv_cache_memory_gb * 2**30
        elif device.type == "cuda":
            # this process's share of the GPU, and never more than is free (other processes may share the GPU);
            # what the forward pass needs at its peak is kept back
            free, total = torch.cuda.mem_get_info(device)
            # prefill graphs keep one forward's transient memory in their pool for good
            graphs = cfg.cuda_graphs and cfg.prefill_graphs and cfg.parallel.world == 1
            reserve = GPU_ACTIVATION_RESERVE_GB * 2**30 + (3 if graphs else 2) * self._activation_bytes(dtype)
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

    def _activation_bytes(self, dtype: torch.dtype) -> int:
        """A bound on one forward pass's transient memory at the token budget (MLP and projections dominate)."""
        m, tokens = self.model_config, self.config.max_num_batched_tokens
        elem = torch.empty((), dtype=dtype).element_size()
        per_token = 3 * m.intermediate_size + 4 * m.hidden_size + m.q_size + 2 * m.kv_size
        logits = self.config.max_num_seqs * m.vocab_size * 4
        return tokens * per_token * elem + logits

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
