"""A tiny checkpoint that answers every chat with a fixed script: what a tool-calling model writes, which a random
model never would. Each family's chat template ends its generation prompt with its own token; from that token the
model writes the family's script, one added token per piece, then its end token.

How: every layer's output projections are zero, so the last hidden state is the current token's embedding; the
script's tokens have orthogonal embeddings, and lm_head maps each to the next one's row with a large logit (greedy
or sampled alike). `transformers` loads it as a plain Llama, and the tests check it writes the script there too.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken

from services.engine.tiny_model import (
    BOS,
    EOS,
    IM_END,
    build_tokenizer,
    model_config,
    random_weights,
    write_tokenizer,
)

START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"

HERMES_TEMPLATE = """{{- bos_token }}
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- 'Functions you may call:\\n<tools>\\n' }}
{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}
{{- '</tools>\\nCall one as <tool_call>\\n{"name": NAME, "arguments": OBJECT}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' + (message.content or '') }}
{%- for call in message.tool_calls or [] %}
{{- '\\n<tool_call>\\n{"name": "' + call.function.name + '", "arguments": ' }}
{{- call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- elif message.role != 'system' %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

LLAMA_TEMPLATE = """{{- bos_token }}
{%- if tools %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\nTo call a function, answer with JSON: ' }}
{{- '{"name": function name, "parameters": arguments}.\\n\\n' }}
{%- for tool in tools %}{{- tool | tojson }}{{- '\\n\\n' }}{%- endfor %}
{{- '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- for call in message.tool_calls %}
{{- '{"name": "' + call.function.name + '", "parameters": ' }}{{- call.function.arguments | tojson }}{{- '}' }}
{%- endfor %}
{{- '<|eot_id|>' }}
{%- elif message.role == 'tool' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""

# family: (chat template, the generation prompt's last token, the script's pieces, the end token)
SCRIPTS = {
    "hermes": (
        HERMES_TEMPLATE,
        "\n",
        [
            "Let me check.",
            '\n<tool_call>\n{"name": "get_weather", ',
            '"arguments": {"city": "Paris"}}\n</tool_call>',
            '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
        ],
        IM_END,
    ),
    "llama3_json": (
        LLAMA_TEMPLATE,
        "\n\n",
        ['{"name": "get_weather", ', '"parameters": {"city": "Paris"}}'],
        EOT,
    ),
}


def make_scripted_model(out: Path, seed: int = 0) -> dict[str, Path]:
    """The checkpoint (hermes template) and, per family, a tokenizer-only folder with that family's template (a
    router's --model): {family: folder}."""
    tok = build_tokenizer()
    tok.add_special_tokens([START_HEADER, END_HEADER, EOT])
    pieces = [p for _, _, script, _ in SCRIPTS.values() for p in script]
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in [*pieces, "\n\n"]])
    ids = {t: tok.token_to_id(t) for t in [*pieces, "\n\n", EOT, IM_END]}
    ids["\n"] = tok.encode("\n", add_special_tokens=False).ids[-1]
    bos, eos = tok.token_to_id(BOS), [tok.token_to_id(IM_END), tok.token_to_id(EOS), ids[EOT]]
    cfg = model_config("llama", tok.get_vocab_size(), bos, eos)
    w = random_weights(cfg, seed)
    hidden = int(cfg["hidden_size"])  # type: ignore[call-overload]
    for name in w:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w[name].zero_()
    lm_head = torch.zeros_like(w["lm_head.weight"])
    chained: list[int] = []
    for _, start, script, end in SCRIPTS.values():
        chain = [ids[start], *(ids[p] for p in script), ids[end]]
        for a, b in itertools.pairwise(chain):
            if a not in chained:
                chained.append(a)
                w["model.embed_tokens.weight"][a] = torch.nn.functional.one_hot(
                    torch.tensor(len(chained) - 1), hidden
                ).float()
            lm_head[b] += 10.0 * w["model.embed_tokens.weight"][a]
    w["lm_head.weight"] = lm_head

    out.mkdir(parents=True, exist_ok=True)
    model = out / "scripted"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(cfg, indent=2))
    (model / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}))
    save_file(w, str(model / "model.safetensors"), metadata={"format": "pt"})
    folders = {}
    for family, (template, _, _, end) in SCRIPTS.items():
        folder = model if family == "hermes" else out / f"scripted-{family}"
        folder.mkdir(exist_ok=True)
        write_tokenizer(tok, folder, template, end)
        folders[family] = folder
    return folders
