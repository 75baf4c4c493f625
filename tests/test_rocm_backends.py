"""The ROCm adapters (aiter, mori) are chosen by name and imported only then: without their libraries, picking
one fails at start-up with a message that names the library and where it comes from; nothing else imports them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from services.engine import LLM
from tests.conftest import build_hf_checkpoint
from tests.test_moe_models import build


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_checkpoint(tmp_path_factory.mktemp("dense"), "llama")


def test_aiter_attention_names_the_missing_library(dense: Path) -> None:
    with pytest.raises(
        RuntimeError, match=r"the aiter attention backend needs the 'aiter' package.*ROCm/aiter"
    ):
        LLM(str(dense), device="cpu", attention_backend="aiter", progress=False)


def test_aiter_experts_name_the_missing_library(tmp_path: Path) -> None:
    build("qwen3_moe", tmp_path)
    with pytest.raises(RuntimeError, match=r"the aiter MoE kernels needs the 'aiter' package"):
        LLM(str(tmp_path), device="cpu", moe_backend="aiter", progress=False)


def test_mori_dispatch_names_the_missing_library() -> None:
    from services.engine.rocm.mori_dispatch import MoriDispatch

    with pytest.raises(RuntimeError, match=r"the mori expert dispatch needs the 'mori' package.*ROCm/mori"):
        MoriDispatch(dist.group.WORLD, 64, 4, 2, 16, None)  # type: ignore[arg-type]


def test_mori_and_aiter_options_are_checked(dense: Path) -> None:
    with pytest.raises(ValueError, match="ep_dispatch=mori needs data-parallel attention"):
        LLM(str(dense), device="cpu", ep_dispatch="mori", progress=False)
    with pytest.raises(ValueError, match="moe_backend=aiter cannot serve the all_to_all dispatch"):
        LLM(str(dense), device="cpu", moe_backend="aiter", ep_dispatch="all_to_all", progress=False)


def test_the_engine_never_imports_the_rocm_libraries(dense: Path) -> None:
    LLM(str(dense), device="cpu", progress=False)
    assert "aiter" not in sys.modules and "mori" not in sys.modules
