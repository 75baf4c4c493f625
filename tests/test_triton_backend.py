"""The GPU fast path against the reference: Triton kernels, the triton attention backend on random paged layouts,
and greedy generation with the triton backend (and CUDA graphs, on a GPU) against the torch backend and
`transformers`. Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
import torch
import torch.nn.functional as F

from services.engine import kernels
from services.engine.attention.base import AttentionMetadata, BoundAttention
from services.engine.kv_cache import KVCache, KVLayout
from services.engine.model_config import RopeConfig
from services.engine.models.layers import RotaryEmbedding

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
pytestmark = pytest.mark.skipif(not kernels.available(DEVICE), reason="needs Triton (GPU or interpreter)")


def tol(dtype: torch.dtype) -> float:
    return 2e-5 if dtype == torch.float32 else 2e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_and_fused_add(dtype: torch.dtype) -> None:
    from services.engine.kernels.norm import rmsnorm

    x, r = torch.randn(9, 256, dtype=dtype, device=DEVICE), torch.randn(9, 256, dtype=dtype, device=DEVICE)
    w = torch.randn(256, dtype=dtype, device=DEVICE)

    def ref(v: torch.Tensor) -> torch.Tensor:
        v32 = v.float()
        return w * (v32 * torch.rsqrt(v32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)

    assert torch.allclose(rmsnorm(x, w, 1e-6).float(), ref(x).float(), atol=tol(dtype), rtol=tol(dtype))
    out, summed = rmsnorm(x, w, 1e-6, r)
    assert torch.equal(summed, x + r)
    assert torch.allclose(out.float(), ref(x + r).float(), atol=tol(dtype), rtol=tol(dtype))
    # per-head norm of a strided view, as q/k norms see the fused q/k/v projection: [rows, heads, head_dim]
    qkv = torch.randn(9, 4 * 64 + 32, dtype=dtype, device=DEVICE)
    q = qkv[:, 16 : 16 + 4 * 64].unflatten(-1, (4, 64))
    wh = torch.randn(64, dtype=dtype, device=DEVICE)
    q32 = q.float()
    expect = wh * (q32 * torch.rsqrt(q32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    got = rmsnorm(q, wh, 1e-6)
    assert got.shape == q.shape and got.is_contiguous()
    assert torch.allclose(got.float(), expect.float(), atol=tol(dtype), rtol=tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_matches_linear(dtype: torch.dtype, rows: int) -> None:
    from services.engine.kernels.gemv import gemv

    x = torch.randn(rows, 1000, dtype=dtype, device=DEVICE)
    w, b = torch.randn(300, 1000, dtype=dtype, device=DEVICE), torch.randn(300, dtype=dtype, device=DEVICE)
    for config in (None, (16, 256, 4, 4)):
        got, want = gemv(x, w, b, config).float(), F.linear(x.float(), w.float(), b.float())
        assert torch.allclose(got, want, atol=tol(dtype) * 30, rtol=tol(dtype))


@pytest.mark.parametrize("rows", [0, 1, 3, 40])  # 0: an idle data-parallel rank
def test_latent_router_logits_are_the_fp32_matmul_of_the_model_dtype_values(rows: int) -> None:
    """DeepSeek's router scores fp32 logits of bf16 activations and weights; on GPUs they come from a GEMV (up to
    4 rows) or a bf16 matmul with fp32 output, with no fp32 copies of either operand. Products of bf16 values are
    exact in fp32, so only the order of the fp32 sums may differ from casting first."""
    from services.engine.kernels.gemv import gemv
    from services.engine.model_config import ModelConfig
    from services.engine.models.deepseek import Router

    dtype = torch.bfloat16 if CUDA else torch.float32
    x = torch.randn(rows, 2048, device=DEVICE).to(dtype)
    w = torch.randn(64, 2048, device=DEVICE).to(dtype)
    want = F.linear(x.float(), w.float())
    if 1 <= rows <= 4:  # the GEMV's fp32 output (Triton's interpreter without a GPU)
        got = gemv(x, w, out_dtype=torch.float32)
        assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-3, rtol=1e-5)
    moe = SimpleNamespace(num_experts=64, topk_method="greedy")
    cfg = cast(ModelConfig, SimpleNamespace(hidden_size=2048, moe=moe))
    router = Router(cfg).to(DEVICE)
    router.weight.data = w
    got = router(x)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype: torch.dtype) -> None:
    from services.engine.kernels.activation import silu_and_mul

    x = torch.randn(5, 2 * 300, dtype=dtype, device=DEVICE)
    gate, up = x.chunk(2, -1)
    assert torch.allclose(
        silu_and_mul(x).float(), (F.silu(gate) * up).float(), atol=tol(dtype), rtol=tol(dtype)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "qk_norm", [False, True]
)  # Qwen3: q and k RMS-normed per head first, in the same kernel
def test_rope_and_store_matches_rotary_then_store(dtype: torch.dtype, qk_norm: bool) -> None:
    from services.engine.attention.torch_backend import store_kv
    from services.engine.kernels.rope_store import rope_and_store
    from services.engine.models.layers import RMSNorm

    tokens, hq, hkv, d = 7, 8, 2, 64
    rotary = RotaryEmbedding(
        d,
        512,
        RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=128),
    ).to(DEVICE)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=dtype, device=DEVICE)
    q, k, v = (t.unflatten(-1, (-1, d)) for t in qkv.split([hq * d, hkv * d, hkv * d], -1))
    positions = torch.tensor([0, 1, 9, 100, 511, 3, 64], device=DEVICE)
    slots = torch.tensor([5, -1, 0, 31, 17, 8, 12], device=DEVICE)  # -1: not stored
    kv = torch.zeros(8, 2, 2, 4, hkv, d, dtype=dtype, device=DEVICE)
    q_norm, k_norm = RMSNorm(d, 1e-6), RMSNorm(d, 1e-6)
    q_norm.weight.data = torch.rand(d, device=DEVICE).to(dtype) + 0.5
    k_norm.weight.data = torch.rand(d, device=DEVICE).to(dtype) + 0.5
    q_in, k_in = (q_norm._norm(q.clone()), k_norm._norm(k.clone())) if qk_norm else (q.clone(), k.clone())
    expected_q, expected_k = rotary(positions, q_in), rotary(positions, k_in)
    expected_kv = kv.clone()
    store_kv(expected_kv[:, 1, 0], expected_kv[:, 1, 1], expected_k, v, slots)
    norms = (q_norm.weight, k_norm.weight, 1e-6) if qk_norm else None
    rope_and_store(q, k, v, positions, rotary.cos, rotary.sin, slots, kv[:, 1, 0], kv[:, 1, 1], norms)
    # interpreted: bit-identical (the norm's sum of squares adds in another order); compiled, the GPU may contract
    # multiply-adds and round once less
    exact = not CUDA and not qk_norm
    for got, want in ((q, expected_q), (k, expected_k), (kv, expected_kv)):
        assert (
            torch.equal(got, want)
            if exact
            else torch.allclose(got.float(), want.float(), atol=tol(dtype), rtol=tol(dtype))
        )


def paged(dtype: torch.dtype, seq_lens: list[int], hkv: int = 2, d: int = 64, block_size: int = 16):
    layout = KVLayout(256, 2, block_size, hkv, d, dtype)
    cache = KVCache(layout, DEVICE)
    cache.kv.normal_()
    width = max(math.ceil(n / block_size) for n in seq_lens)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32, device=DEVICE)
    free = torch.randperm(256).tolist()  # blocks scattered over the pool
    for i, n in enumerate(seq_lens):
        for j in range(math.ceil(n / block_size)):
            tables[i, j] = free.pop()
    return cache, tables


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq", [2, 8])
def test_decode_attention_matches_sdpa(dtype: torch.dtype, hq: int) -> None:
    from services.engine.kernels.decode_attention import decode_attention

    seq_lens = [1, 15, 16, 17, 200, 513]
    cache, tables = paged(dtype, seq_lens)
    k_cache, v_cache = cache.layer(1)
    q = torch.randn(len(seq_lens), hq, 64, dtype=dtype, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    for splits in (1, 3, 8):
        check_decode(
            decode_attention(q, k_cache, v_cache, tables, lens, 0.125, splits),
            q,
            k_cache,
            v_cache,
            tables,
            seq_lens,
            dtype,
        )


def check_decode(out, q, k_cache, v_cache, tables, seq_lens, dtype) -> None:  # type: ignore[no-untyped-def]
    for i, n in enumerate(seq_lens):
        blocks = tables[i, : math.ceil(n / 16)].long()
        keys = k_cache[blocks].flatten(0, 1)[:n].transpose(0, 1).float()
        values = v_cache[blocks].flatten(0, 1)[:n].transpose(0, 1).float()
        ref = F.scaled_dot_product_attention(
            q[i, :, None].float(), keys, values, scale=0.125, enable_gqa=True
        )
        assert torch.allclose(out[i].float(), ref[:, 0], atol=tol(dtype), rtol=tol(dtype)), (
            f"sequence {i} ({n})"
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_backend_matches_torch_backend_on_mixed_batches(dtype: torch.dtype) -> None:
    """Decodes, a prefill chunk after a cached prefix and a fresh prefill, in one batch, on scattered blocks."""
    from services.engine.attention.torch_backend import TorchAttention
    from services.engine.attention.triton_backend import TritonAttention

    hq, hkv, d, bs = 8, 2, 64, 16
    query_lens, seq_lens = [1, 1, 1, 37, 20], [5, 130, 64, 90, 20]
    cache, tables = paged(dtype, seq_lens, hkv, d, bs)
    tokens = sum(query_lens)
    slots = []
    for i, (n, ctx) in enumerate(zip(query_lens, seq_lens, strict=True)):
        for pos in range(ctx - n, ctx):
            slots.append(int(tables[i, pos // bs]) * bs + pos % bs)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=DEVICE),
        query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=tables,
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(seq_lens),
        num_decode_seqs=3,
    )
    rotary = RotaryEmbedding(d, 256, RopeConfig(theta=10000.0)).to(DEVICE)
    positions = torch.tensor(
        [p for n, c in zip(query_lens, seq_lens, strict=True) for p in range(c - n, c)], device=DEVICE
    )
    q = torch.randn(tokens, hq, d, dtype=dtype, device=DEVICE)
    k, v = (
        torch.randn(tokens, hkv, d, dtype=dtype, device=DEVICE),
        torch.randn(tokens, hkv, d, dtype=dtype, device=DEVICE),
    )
    outs = []
    for cls in (TorchAttention, TritonAttention):
        c = KVCache(cache.layout, DEVICE)
        c.kv.copy_(cache.kv)
        attn = BoundAttention(cls(c, d**-0.5, 1024), meta)
        qr, kr = attn.rope_and_store(0, q.clone(), k.clone(), v, positions, rotary)
        outs.append((attn(0, qr, kr, v), c.kv))
    (ref, ref_kv), (got, got_kv) = outs
    # interpreted: bit-identical; compiled, the GPU may contract the rotary's multiply-adds
    assert (
        torch.equal(got_kv, ref_kv)
        if not CUDA
        else torch.allclose(got_kv.float(), ref_kv.float(), atol=tol(dtype))
    )
    assert torch.allclose(got.float(), ref.float(), atol=tol(dtype), rtol=tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("dim", "value_dim"), [(72, 64), (576, 512)])  # the second: DeepSeek's latent
def test_latent_store_and_decode_match_attention_over_the_latents(
    dtype: torch.dtype, dim: int, value_dim: int
) -> None:
    """Latent attention (MLA, absorbed): both backends store a batch's latents (a padding row with slot -1 stores
    nothing) and attend over each sequence's cached latents as keys, their first `value_dim` as values; checked
    against SDPA over each sequence's latents gathered by hand."""
    from services.engine.attention.torch_backend import TorchAttention
    from services.engine.attention.triton_backend import TritonAttention

    heads, bs = 8, 16
    seq_lens = [5, 130, 64]
    layout = KVLayout(256, 2, bs, 1, dim, dtype, parts=1)
    width = max(math.ceil(n / bs) for n in seq_lens)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32, device=DEVICE)
    free = torch.randperm(256).tolist()
    for i, n in enumerate(seq_lens):
        for j in range(math.ceil(n / bs)):
            tables[i, j] = free.pop()
    last = [int(tables[i, (n - 1) // bs]) * bs + (n - 1) % bs for i, n in enumerate(seq_lens)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([*last, -1], device=DEVICE),
        query_start_loc=torch.arange(len(seq_lens) + 2, dtype=torch.int32),
        seq_lens=torch.tensor([*seq_lens, 1], dtype=torch.int32, device=DEVICE),
        block_tables=torch.cat([tables, tables[:1]]),
        query_lens_cpu=(1,) * (len(seq_lens) + 1),
        seq_lens_cpu=(*seq_lens, 1),
        num_decode_seqs=len(seq_lens) + 1,
    )
    initial = torch.randn(layout.shape, dtype=dtype, device=DEVICE)
    new = torch.randn(len(seq_lens) + 1, dim, dtype=dtype, device=DEVICE)  # the last row: padding
    q = torch.randn(len(seq_lens), heads, dim, dtype=dtype, device=DEVICE)
    outs = []
    for cls in (TorchAttention, TritonAttention):
        cache = KVCache(layout, DEVICE)
        cache.kv.copy_(initial)
        attn = BoundAttention(cls(cache, 1.0, 1024), meta)
        attn.store_latent(1, new)
        got = attn.latent_decode(1, q[..., :value_dim], q[..., value_dim:], dim**-0.5)
        outs.append((got, cache.kv.clone()))
    (ref, ref_kv), (got, got_kv) = outs
    assert torch.equal(ref_kv, got_kv)
    expected_kv = initial.clone()
    flat = KVCache(layout, DEVICE)
    flat.kv.copy_(initial)
    for row, slot in enumerate(last):
        flat.latent(1)[slot // bs, slot % bs, 0] = new[row]
    assert torch.equal(ref_kv, flat.kv) and not torch.equal(ref_kv, expected_kv)
    for i, n in enumerate(seq_lens):
        latents = flat.latent(1)[tables[i, : math.ceil(n / bs)].long()].flatten(0, 1)[:n, 0].float()
        # the heads as rows of queries: each attends alone (no mask), over the same keys and values
        want = F.scaled_dot_product_attention(
            q[i].float()[None], latents[None], latents[None, :, :value_dim], scale=dim**-0.5
        )[0]
        for out in (ref, got):
            assert torch.allclose(out[i].float(), want, atol=tol(dtype), rtol=tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_latent_matches_rotary_then_store(dtype: torch.dtype, interleaved: bool) -> None:
    """The fused kernel against the torch backend (rotary, concatenation, store): the query's rotary part
    rotated in place, the latents returned and stored at their slots, a -1 slot not stored."""
    from services.engine.attention.torch_backend import TorchAttention
    from services.engine.attention.triton_backend import TritonAttention

    tokens, heads, compressed_dim, rope = 5, 3, 32, 16
    dim = compressed_dim + rope
    layout = KVLayout(
        num_blocks=6, num_layers=2, block_size=4, num_kv_heads=1, head_dim=dim, dtype=dtype, parts=1
    )
    rotary = RotaryEmbedding(rope, 64, RopeConfig(theta=10000.0, interleaved=interleaved))
    rotary.cos, rotary.sin = rotary.cos.to(DEVICE), rotary.sin.to(DEVICE)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([3, 9, 17, -1, 22], device=DEVICE),
        query_start_loc=torch.tensor([0, tokens], dtype=torch.int32),
        seq_lens=torch.tensor([tokens], dtype=torch.int32, device=DEVICE),
        block_tables=torch.zeros(1, 6, dtype=torch.int32, device=DEVICE),
        query_lens_cpu=(tokens,),
        seq_lens_cpu=(tokens,),
    )
    positions = torch.tensor([0, 7, 30, 2, 63], device=DEVICE)
    q = torch.randn(tokens, heads, 8 + rope, dtype=dtype, device=DEVICE)  # [nope | rope] per head, as MLA's
    kv = torch.randn(tokens, compressed_dim + rope, dtype=dtype, device=DEVICE)
    outs = []
    for cls in (TorchAttention, TritonAttention):
        cache = KVCache(layout, DEVICE)
        cache.kv.zero_()
        q_in = q.clone()
        q_rot, latent = cls(cache, 1.0, 64).rope_latent(
            1, q_in[..., 8:], kv[:, compressed_dim:], kv[:, :compressed_dim], positions, rotary, meta
        )
        outs.append((q_rot, latent, cache.latent(1).reshape(-1, dim)))  # layer 1's latents by slot
    (ref_q, ref_latent, ref_kv), (got_q, got_latent, got_kv) = outs
    assert not torch.equal(ref_q, q[..., 8:]) and torch.equal(
        ref_latent[:, :compressed_dim], kv[:, :compressed_dim]
    )
    # interpreted: bit-identical; compiled, the GPU may contract the rotary's multiply-adds
    exact = not CUDA
    for ref, got in ((ref_q, got_q), (ref_latent, got_latent), (ref_kv, got_kv)):
        assert torch.equal(ref, got) if exact else torch.allclose(ref, got, atol=tol(dtype), rtol=tol(dtype))
    assert torch.equal(got_kv[[3, 9, 17, 22]], got_latent[[0, 1, 2, 4]])
    assert int((got_kv != 0).any(1).sum()) == 4  # the token of slot -1 went nowhere


@pytest.mark.parametrize("dtype", DTYPES)
def test_staging_block_copies(dtype: torch.dtype) -> None:
    from services.engine.kernels.block_copy import gather_blocks, scatter_blocks

    pool = torch.randn(12, 2, 2, 4, 2, 8, dtype=dtype, device=DEVICE)
    ids = torch.tensor([7, 2, 11, 3], device=DEVICE)
    staging = torch.empty(4, *pool.shape[1:], dtype=dtype, device=DEVICE)
    gather_blocks(pool, ids, staging)
    assert torch.equal(staging, pool[ids])
    back = torch.zeros_like(pool)
    scatter_blocks(staging, back, ids)
    assert torch.equal(back[ids], pool[ids]) and not back[[0, 1, 4]].any()


def test_greedy_generation_with_the_triton_backend(llama_checkpoint: Path) -> None:
    """Token-identical to the torch backend (CPU: kernels interpreted); on a GPU also with CUDA graphs, against
    eager and transformers."""
    from services.engine import LLM, SamplingParams

    prompts = [[0, *range(5, 5 + n)] for n in (3, 30, 70)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    common = dict(device=str(DEVICE), dtype="float32", block_size=16, max_model_len=512, progress=False)
    reference = LLM(str(llama_checkpoint), attention_backend="torch", **common).generate(prompts, params)
    eager = LLM(str(llama_checkpoint), attention_backend="triton", cuda_graphs=False, **common)
    assert [o.token_ids for o in eager.generate(prompts, params)] == [o.token_ids for o in reference]
    if CUDA:
        from transformers import AutoModelForCausalLM

        from tests.test_models_vs_transformers import hf_generate

        graphs = LLM(str(llama_checkpoint), attention_backend="triton", cuda_graphs=True, **common)
        outs = graphs.generate(prompts, params)
        assert graphs.engine.runner.num_graph_steps > 0
        assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
        hf = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
        for prompt, out in zip(prompts, outs, strict=True):
            assert out.token_ids == hf_generate(hf, prompt, 12)[0]


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v2"])
def test_moe_models_generate_the_same_with_the_triton_backend(name: str, tmp_path: Path) -> None:
    """Qwen3-MoE (q/k norms fused into the rotary kernel) and DeepSeek-V2 (latent rotary and store in one kernel,
    absorbed latent decode): token-identical to the torch backend (CPU: kernels interpreted); on a GPU, where the
    experts and routing also run as kernels, equal to `transformers` eagerly and with CUDA graphs."""
    from services.engine import LLM, SamplingParams
    from tests.test_models_vs_transformers import hf_generate
    from tests.test_moe_models import build

    hf = build(name, tmp_path)
    prompts = [[0, *range(5, 5 + n)] for n in (3, 20, 41)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    common = dict(device=str(DEVICE), dtype="float32", block_size=4, max_model_len=128, progress=False)
    want = [hf_generate(hf, prompt, 10)[0] for prompt in prompts]
    for graphs in (False, True) if CUDA else (False,):
        llm = LLM(str(tmp_path), attention_backend="triton", cuda_graphs=graphs, **common)
        assert [o.token_ids for o in llm.generate(prompts, params)] == want
        assert not graphs or llm.engine.runner.num_graph_steps > 0


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_latent_attention_model_decodes_in_cuda_graphs(tmp_path: Path) -> None:
    """DeepSeek-V2 (MLA + MoE, bf16): decodes replayed from CUDA graphs give the tokens eager decodes give (the
    absorbed latent decode against `transformers` is checked in fp32 on CPU, tests/test_moe_models.py)."""
    from services.engine import LLM, SamplingParams
    from tests.test_moe_models import build

    build("deepseek_v2", tmp_path)
    prompts = [[0, *range(5, 5 + n)] for n in (3, 20, 41)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    common = dict(device="cuda", dtype="bfloat16", block_size=16, max_model_len=256, progress=False)
    eager = LLM(str(tmp_path), attention_backend="triton", cuda_graphs=False, **common).generate(
        prompts, params
    )
    graphs = LLM(str(tmp_path), attention_backend="triton", cuda_graphs=True, **common)
    outs = graphs.generate(prompts, params)
    assert graphs.engine.runner.num_graph_steps > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in eager]


@pytest.mark.skipif(not CUDA, reason="overlapped decode runs with CUDA graphs")
def test_overlapped_decode_matches_step_by_step(llama_checkpoint: Path) -> None:
    """Stops of every kind, aborts and new arrivals while steps overlap: the same tokens as without overlap."""
    from services.engine import Engine, EngineConfig, SamplingParams

    def engine(overlap: bool) -> Engine:
        return Engine(
            EngineConfig(
                str(llama_checkpoint),
                device="cuda",
                dtype="float32",
                max_model_len=512,
                overlap_scheduling=overlap,
                progress=False,
            )
        )

    free = engine(False)
    free.add_request(
        "probe", [0, *range(40, 60)], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    )
    probe = [t for _ in range(40) for o in free.step() for t in o.new_token_ids]
    cases = {
        "long": ([0, *range(5, 45)], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)),
        "stop-token": (
            [0, *range(40, 60)],
            SamplingParams(max_tokens=30, temperature=0, stop_token_ids=(probe[7],)),
        ),
        "short": ([0, 9, 8, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)),
        "seeded": (
            [0, *range(100, 130)],
            SamplingParams(max_tokens=25, temperature=1.0, seed=3, ignore_eos=True),
        ),
        "aborted": ([0, *range(60, 70)], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)),
    }
    results = []
    for overlap in (False, True):
        e = engine(overlap)
        assert e.overlap == overlap
        tokens: dict[str, list[int]] = {rid: [] for rid in [*cases, "late"]}
        for rid, (prompt, params) in cases.items():
            e.add_request(rid, prompt, params)
        steps = 0
        while e.has_unfinished():
            for out in e.step():
                tokens[out.request_id] += out.new_token_ids
            steps += 1
            if steps == 6:
                e.abort("aborted")
                tokens["aborted"] = tokens["aborted"][
                    :3
                ]  # what was streamed before the abort may differ by a step
                e.add_request(
                    "late",
                    [0, *range(200, 240)],
                    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                )
        assert e.allocator.num_used == 0 and not e.seqs
        results.append(tokens)
    assert results[0] == results[1]
    assert results[1]["stop-token"][-1] == probe[7] and len(results[1]["short"]) == 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens", [1, 37, 300]
)  # tiles of 16 pairs, mostly empty or several per expert; larger
@pytest.mark.parametrize(("first", "count"), [(2, 3), (0, 8)])  # a rank holding 3 of 8 experts; all of them
def test_fused_experts_match_a_loop_over_experts(
    dtype: torch.dtype, tokens: int, first: int, count: int
) -> None:
    """Pairs of other ranks' experts add nothing; an empty batch gives an empty result."""
    from services.engine.kernels.moe import gemm_config
    from services.engine.models.moe import Experts

    assert (gemm_config(tokens * 4, count)[0] == 16) == (tokens == 1)
    with torch.device(DEVICE):
        experts = Experts(8, 64, 32, first=first, count=count)
        experts.w13.data = (torch.randn(count, 64, 64) * 0.1).to(dtype)
        experts.w2.data = (torch.randn(count, 64, 32) * 0.1).to(dtype)
        x = torch.randn(tokens, 64).to(dtype)
        ids, weights = torch.randint(0, 8, (tokens, 4)), torch.rand(tokens, 4)
        ids[0] = torch.tensor([0, 1, 5, 7])  # a token none of whose experts is here (with 3 of 8)
        if tokens > 1:
            ids[1] = torch.tensor([2, 2, 2, 2])  # one expert in every slot
    got = experts._forward_fused(x, weights, ids).float()
    want = torch.zeros(tokens, 64, device=DEVICE)
    for t, j in ((t, j) for t in range(tokens) for j in range(4)):
        e = int(ids[t, j]) - first
        if 0 <= e < count:
            gate, up = (x[t].float() @ experts.w13[e].float().T).chunk(2)
            want[t] += weights[t, j] * ((F.silu(gate) * up) @ experts.w2[e].float().T)
    assert torch.allclose(got, want, atol=tol(dtype) * 5, rtol=tol(dtype) * 5)
    if count < 8:  # token 0's experts are all another rank's
        none_here = ((ids >= first) & (ids < first + count)).sum(1) == 0
        assert none_here.any() and (got[none_here] == 0).all()
    assert experts._forward_fused(x[:0], weights[:0], ids[:0]).shape == (0, 64)


@pytest.mark.parametrize(
    ("experts", "top_k", "scoring", "renormalize", "round_to"),
    [
        (128, 8, "softmax", True, torch.bfloat16),
        (64, 6, "softmax", False, None),
        (12, 3, "sigmoid", True, None),
    ],
)
def test_routing_kernel_matches_torch_routing(
    experts: int, top_k: int, scoring: str, renormalize: bool, round_to: torch.dtype | None
) -> None:
    """Qwen3-MoE's, DeepSeek-V2-Lite's and a sigmoid router's top-k (ids, weights) as the reference computes
    them: scores in fp32, the k best, renormalised, scaled, rounded where the reference rounds."""
    from services.engine.kernels.moe_route import route_topk
    from services.engine.model_config import MoEConfig
    from services.engine.models.moe import _route

    moe = MoEConfig(experts, top_k, 16, renormalize, scoring=scoring, routed_scaling_factor=1.5)
    # distinct logits (exact in bf16: multiples of 1/16) so that the order is the reference's; row 0 all tied
    logits = torch.stack([torch.randperm(experts) for _ in range(33)]).float().sub(experts / 2).div(16)
    logits = logits.to(DEVICE, torch.bfloat16)
    logits[0, :] = 0  # all tied: the lowest ids win
    weights, ids = route_topk(logits, top_k, scoring == "sigmoid", renormalize, 1.5, round_to)
    want_w, want_ids = _route(logits, moe, None)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids[1:], want_ids[1:]) and ids[0].tolist() == list(range(top_k))
    if (
        round_to is not None
    ):  # to the nearest bf16 on a GPU; Triton's interpreter truncates (one unit further)
        assert torch.equal(weights, weights.to(round_to).float())
        assert torch.allclose(weights, want_w, atol=0, rtol=2**-7)
    else:
        assert torch.allclose(weights, want_w, atol=1e-6, rtol=1e-5)
    assert route_topk(logits[:0], top_k, False, True, 1.0)[1].shape == (0, top_k)


@pytest.mark.parametrize(("pairs", "first", "count"), [(148, 2, 3), (5000, 1, 5), (36, 0, 8)])
def test_expert_order_is_a_stable_sort_by_local_expert(pairs: int, first: int, count: int) -> None:
    """The pairs of each local expert in pair order, expert after expert (over several chunks of pairs for the
    second case), and where each expert's pairs end."""
    from services.engine.kernels.moe import expert_order

    ids = torch.randint(0, 8, (pairs // 4, 4), device=DEVICE)
    order, ends = expert_order(ids, first, count)
    local = ids.flatten().cpu() - first
    mine = [p for p in range(pairs) if 0 <= local[p] < count]
    assert order[: len(mine)].tolist() == sorted(mine, key=lambda p: (int(local[p]), p))
    assert ends.tolist() == [int(((local >= 0) & (local <= e)).sum()) for e in range(count)]
