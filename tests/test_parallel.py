"""Parallel engines with 2 gloo ranks in real processes: tensor parallel, expert parallel (all-reduce and
all-to-all), data-parallel attention with uneven and empty batches, and two-batch overlap on and off; each
compared token for token with one process."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from services.engine import LLM, SamplingParams
from services.engine.parallel.state import ParallelConfig
from tests.cluster import free_port
from tests.test_moe_models import build as build_moe

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [[0, *range(5, 5 + n)] for n in (3, 17, 40, 9)]
CPU = {"device": "cpu", "dtype": "float32", "block_size": 4, "max_num_batched_tokens": 24}


def _rank(rank: int, port: int, model: str, options: dict, prompts: list[list[int]], out: str) -> None:
    options = {**CPU, **options, "parallel": ParallelConfig(**options["parallel"])}
    llm = LLM(model, rank=rank, dist_init_method=f"tcp://127.0.0.1:{port}", progress=False, **options)
    outs = llm.generate(prompts, GREEDY, progress=False)
    runner = llm.engine.runner
    result = {
        "tokens": [o.token_ids for o in outs],
        "tbo_steps": runner.num_tbo_steps,
        "graph_steps": runner.num_graph_steps,
    }
    Path(out).write_text(json.dumps(result))


def run_ranks(model: Path, options: dict, prompts_by_rank: list[list[list[int]]], tmp: Path) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = []
    for rank, prompts in enumerate(prompts_by_rank):
        out = tmp / f"rank{rank}.json"
        p = ctx.Process(target=_rank, args=(rank, port, str(model), options, prompts, str(out)))
        p.start()
        procs.append((p, out))
    for p, _ in procs:
        p.join(timeout=180)
        assert p.exitcode == 0, f"a rank failed or hung (exit code {p.exitcode})"
    return [json.loads(out.read_text()) for _, out in procs]


def single(model: Path, prompts: list[list[int]], **options: object) -> list[list[int]]:
    llm = LLM(str(model), progress=False, **{**CPU, **options})
    return [o.token_ids for o in llm.generate(prompts, GREEDY, progress=False)]


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("deepseek")
    build_moe("deepseek_v3", path)
    return path


def test_tensor_parallel_equals_one_rank(dense: Path, tmp_path: Path) -> None:
    results = run_ranks(dense, {"parallel": {"tp": 2}}, [PROMPTS, PROMPTS], tmp_path)
    expected = single(dense, PROMPTS)
    assert results[0]["tokens"] == results[1]["tokens"] == expected


def test_tensor_and_expert_parallel_moe_equals_one_rank(moe: Path, tmp_path: Path) -> None:
    results = run_ranks(moe, {"parallel": {"tp": 2, "ep": 2}}, [PROMPTS, PROMPTS], tmp_path)
    assert results[0]["tokens"] == results[1]["tokens"] == single(moe, PROMPTS)


@pytest.mark.parametrize(
    ("model", "dispatch"), [("moe", "all_to_all"), ("moe", "all_gather"), ("deepseek", "all_to_all")]
)
def test_expert_parallel_with_data_parallel_attention(
    model: str, dispatch: str, request: pytest.FixtureRequest, tmp_path: Path
):
    """Each rank serves its own requests; tokens cross ranks to reach their experts and come back."""
    path = request.getfixturevalue(model)
    mine, theirs = PROMPTS[:3], PROMPTS[3:]  # uneven: three requests on rank 0, one on rank 1
    options = {"parallel": {"dp": 2, "ep": 2}, "ep_dispatch": dispatch}
    results = run_ranks(path, options, [mine, theirs], tmp_path)
    assert results[0]["tokens"] == single(path, mine)
    assert results[1]["tokens"] == single(path, theirs)


def test_an_empty_rank_never_hangs(moe: Path, tmp_path: Path) -> None:
    results = run_ranks(moe, {"parallel": {"dp": 2, "ep": 2}}, [PROMPTS, []], tmp_path)
    assert results[0]["tokens"] == single(moe, PROMPTS) and results[1]["tokens"] == []


def test_two_batch_overlap_gives_the_same_tokens(dense: Path, moe: Path, tmp_path: Path) -> None:
    tbo = {"tbo": True, "tbo_min_prefill_tokens": 8, "tbo_min_decode_seqs": 2}
    runs = [
        (dense, {"parallel": {"tp": 2}}),
        (moe, {"parallel": {"dp": 2, "ep": 2}, "ep_dispatch": "all_to_all"}),
        (moe, {"parallel": {"dp": 2, "ep": 2}, "ep_dispatch": "all_gather"}),
    ]
    for path, options in runs:
        prompts = [PROMPTS, PROMPTS] if "tp" in options["parallel"] else [PROMPTS, PROMPTS[::-1][:3]]
        on = run_ranks(path, {**options, **tbo}, prompts, tmp_path)
        assert all(r["tbo_steps"] > 0 for r in on), "TBO never ran"
        for rank, result in enumerate(on):
            assert result["tokens"] == single(path, prompts[rank]), f"TBO changed rank {rank}'s tokens"


def test_a_rank_that_cannot_split_turns_tbo_off_everywhere(moe: Path, tmp_path: Path) -> None:
    """Rank 1 only ever holds one token per step: no rank may overlap, or their collectives would pair wrongly."""
    tbo = {"tbo": True, "tbo_min_prefill_tokens": 1, "tbo_min_decode_seqs": 1}
    mine = PROMPTS[:2]  # one prefill step then nine decode steps, in step with rank 1 throughout
    results = run_ranks(moe, {"parallel": {"dp": 2, "ep": 2}, **tbo}, [mine, [[7]]], tmp_path)
    assert [r["tbo_steps"] for r in results] == [0, 0]
    assert results[0]["tokens"] == single(moe, mine) and results[1]["tokens"] == single(moe, [[7]])


def test_calibration_keeps_tbo_only_where_it_was_faster(dense: Path) -> None:
    """Start-up calibration times each prefill size with and without TBO; its scratch writes (before any
    request) leave the requests that follow intact."""
    from services.engine.tbo_calibration import MARGIN, calibrate

    llm = LLM(str(dense), progress=False, tbo=True, tbo_min_prefill_tokens=8, **CPU)
    engine = llm.engine
    result = calibrate(engine.runner, engine.runtime.num_blocks, 32, engine.runtime.max_model_len)
    assert set(result) == {("prefill", 8), ("prefill", 16), ("prefill", 32)}
    wins = {size: on < MARGIN * off for (_, size), (off, on) in result.items()}
    expected = min((s for s in wins if all(wins[t] for t in wins if t >= s)), default=33)
    assert engine.runner.tbo.min_prefill_tokens == expected
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, progress=False)] == single(dense, PROMPTS)


def test_each_rank_of_a_parallel_worker_takes_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda:N with several ranks: rank r on GPU N + r (wrapping at the GPU count), so two tensor-parallel
    workers share a 4-GPU host as GPUs 0-1 and 2-3; one rank keeps exactly the device it was given."""
    import torch

    from services.engine.config import EngineConfig

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    two = ParallelConfig(tp=2)
    assert [EngineConfig("m", device="cuda:2", parallel=two).resolve_device(r) for r in (0, 1)] == [
        torch.device("cuda", 2),
        torch.device("cuda", 3),
    ]
    assert [EngineConfig("m", device="cuda", parallel=two).resolve_device(r) for r in (0, 1)] == [
        torch.device("cuda", 0),
        torch.device("cuda", 1),
    ]
    assert EngineConfig("m", device="cuda:3", parallel=two).resolve_device(1) == torch.device("cuda", 0)
    assert EngineConfig("m", device="cuda:3").resolve_device(0) == torch.device("cuda", 3)
    assert EngineConfig("m", device="cpu", parallel=two).resolve_device(1) == torch.device("cpu")
