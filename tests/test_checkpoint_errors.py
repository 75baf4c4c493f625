"""Bad checkpoints fail at load with an error that names the file and the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from services.engine import LLM, CheckpointError


@pytest.fixture
def checkpoint(tiny_model: Path, tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_model, path)
    return path


def load(path: Path) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32", progress=False)


def edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_weights(path: Path, fn) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file)


def test_unknown_architecture(checkpoint: Path) -> None:
    edit_config(checkpoint, architectures=["GPTBigCodeForCausalLM"])
    with pytest.raises(
        CheckpointError, match=r"config\.json.*unsupported architecture.*GPTBigCodeForCausalLM"
    ):
        load(checkpoint)


def test_missing_weight(checkpoint: Path) -> None:
    edit_weights(checkpoint, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(
        CheckpointError,
        match=r"missing weight.*model\.safetensors.*model\.layers\.1\.self_attn\.k_proj\.weight",
    ):
        load(checkpoint)


def test_shape_mismatch(checkpoint: Path) -> None:
    def shrink(t: dict) -> None:
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][
            :, :100
        ].contiguous()

    edit_weights(checkpoint, shrink)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors.*down_proj\.weight.*shape \(64, 100\), expected \(64, 128\)",
    ):
        load(checkpoint)


def test_config_disagreeing_with_weights(checkpoint: Path) -> None:
    edit_config(checkpoint, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .*_proj\.weight. has shape"):
        load(checkpoint)


def test_missing_tokenizer(checkpoint: Path) -> None:
    (checkpoint / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not found"):
        load(checkpoint)


def test_missing_config_and_bad_json(checkpoint: Path) -> None:
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load(checkpoint)
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: not found"):
        load(checkpoint)


def test_no_weights_and_unexpected_tensor(checkpoint: Path) -> None:
    edit_weights(checkpoint, lambda t: t.update(extra=t["model.norm.weight"].clone()))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'extra'"):
        load(checkpoint)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load(checkpoint)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a directory"):
        load(tmp_path / "nope")


def test_unsupported_rope_type(checkpoint: Path) -> None:
    edit_config(checkpoint, rope_scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(CheckpointError, match=r"config\.json: rope type 'longrope' is not supported"):
        load(checkpoint)
