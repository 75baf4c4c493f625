"""`pdmesh make-tiny-model`: a tiny random checkpoint in Hugging Face format, with a real tokenizer.

It loads in `transformers` as well as here, so it serves as the embedded default model for `pdmesh up` and as a
fixture for tests. Weights are random (seeded): the text it writes is gibberish, but deterministic.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = """\
A serving system turns a model into a service. Requests arrive over the network; each carries a prompt and asks
for a continuation. The prompt is processed all at once, which is called prefill, and the answer is produced one
token at a time, which is called decode. Prefill is bound by arithmetic; decode is bound by memory bandwidth.
Running both on the same accelerator makes each slow the other, so a disaggregated system runs them on separate
workers and moves the attention keys and values from one to the other. The router decides where each request
goes, keeps the workers busy, and streams the tokens back to the client as they are made.
The quick brown fox jumps over the lazy dog. Hello world! How are you today? What is the capital of France?
Paris is the capital of France. One, two, three, four, five, six, seven, eight, nine, ten. 0123456789
Once upon a time there was a little engine that could. It worked day and night, and it never lost a block.
"""


def build_tokenizer(vocab_size: int = 512) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def model_config(
    arch: str, vocab_size: int, bos: int, eos: list[int], **overrides: object
) -> dict[str, object]:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture '{arch}'; choose one of: {', '.join(ARCHS)}")
    cfg: dict[str, object] = {
        "architectures": [ARCHS[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": arch == "qwen2",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "dtype": "float32",
    }
    if arch == "llama":
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        }
    cfg.update(overrides)
    return cfg


def random_weights(cfg: dict[str, object], seed: int, std: float = 0.15) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])  # type: ignore[call-overload]
    heads, kv_heads = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"])  # type: ignore[call-overload]
    head_dim, vocab = int(cfg["head_dim"]), int(cfg["vocab_size"])  # type: ignore[call-overload]
    arch = str(cfg["model_type"])

    def randn(*shape: int, scale: float = std) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def norm(dim: int) -> torch.Tensor:
        return 1.0 + randn(dim, scale=0.05)

    w = {"model.embed_tokens.weight": randn(vocab, hidden, scale=1.0), "model.norm.weight": norm(hidden)}
    for i in range(int(cfg["num_hidden_layers"])):  # type: ignore[call-overload]
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(hidden)
        w[p + "post_attention_layernorm.weight"] = norm(hidden)
        w[p + "self_attn.q_proj.weight"] = randn(heads * head_dim, hidden)
        w[p + "self_attn.k_proj.weight"] = randn(kv_heads * head_dim, hidden)
        w[p + "self_attn.v_proj.weight"] = randn(kv_heads * head_dim, hidden)
        w[p + "self_attn.o_proj.weight"] = randn(hidden, heads * head_dim)
        if arch == "qwen2":
            w[p + "self_attn.q_proj.bias"] = randn(heads * head_dim)
            w[p + "self_attn.k_proj.bias"] = randn(kv_heads * head_dim)
            w[p + "self_attn.v_proj.bias"] = randn(kv_heads * head_dim)
        if arch == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(head_dim)
            w[p + "self_attn.k_norm.weight"] = norm(head_dim)
        w[p + "mlp.gate_proj.weight"] = randn(inter, hidden)
        w[p + "mlp.up_proj.weight"] = randn(inter, hidden)
        w[p + "mlp.down_proj.weight"] = randn(hidden, inter)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = randn(vocab, hidden)
    return w


def write_tokenizer(
    tok: Tokenizer, out: Path, chat_template: str = CHAT_TEMPLATE, eos_token: str = IM_END
) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": eos_token,
                "pad_token": EOS,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 4096,
                "chat_template": chat_template,
            },
            indent=2,
        )
    )


def make_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, **overrides: object) -> Path:
    """Write a tiny random checkpoint to out_dir (atomically: it appears complete or not at all)."""
    out = Path(out_dir)
    tok = build_tokenizer()
    bos, eos = tok.token_to_id(BOS), [tok.token_to_id(IM_END), tok.token_to_id(EOS)]
    cfg = model_config(arch, tok.get_vocab_size(), bos, eos, **overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}))
        save_file(random_weights(cfg, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_tokenizer(tok, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_model_dir() -> Path:
    """The embedded default model, made on first use under $PDMESH_HOME (default ~/.cache/pdmesh)."""
    home = Path(os.environ.get("PDMESH_HOME", Path.home() / ".cache" / "pdmesh"))
    path = home / "tiny-llama"
    if not (path / "model.safetensors").exists():
        make_tiny_model(path, "llama")
    return path
