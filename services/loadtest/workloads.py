"""Workloads: what the load test sends. Every workload is a list of conversations; a single-turn request is a
conversation of one turn. Later turns of a conversation are sent after the previous answer arrives and carry it.

- random:        prompts of exactly --input-len tokens (by the model's tokenizer), answers of --output-len tokens
- sharegpt:      a ShareGPT-format JSON file: first human turn as the prompt, the reply's length as max_tokens
- shared-prefix: --num-groups system prompts of --prefix-len tokens, each shared by its group's questions
- multi-turn:    conversations of --turns user turns; each turn resends the whole conversation so far
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from services.common.tokenizer import Tokenizer

WORKLOADS = ("random", "sharegpt", "shared-prefix", "multi-turn")


class WorkloadError(ValueError):
    pass


@dataclass(frozen=True)
class LengthRange:
    low: int
    high: int

    @classmethod
    def parse(cls, text: str, name: str) -> LengthRange:
        """'128' or '64:256' (inclusive)."""
        try:
            parts = [int(p) for p in str(text).split(":")]
        except ValueError:
            raise WorkloadError(f"{name} must be a number or a range LOW:HIGH, got '{text}'") from None
        if len(parts) == 1:
            parts *= 2
        if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
            raise WorkloadError(
                f"{name} must be a positive number or a range LOW:HIGH with LOW <= HIGH, got '{text}'"
            )
        return cls(parts[0], parts[1])

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


@dataclass
class Turn:
    content: str | list[int]  # text, or token ids (completions endpoint, exact lengths)
    output_len: int
    content_tokens: int  # tokens of content by the model's tokenizer


@dataclass
class Conversation:
    turns: list[Turn]
    system: str | None = None
    group: int | None = None  # shared-prefix group
    index: int = 0
    history: list[dict[str, str]] = field(default_factory=list)  # filled while it runs


@dataclass(frozen=True)
class WorkloadSpec:
    name: str = "random"
    path: str | None = None
    input_len: LengthRange = LengthRange(256, 256)
    output_len: LengthRange = LengthRange(128, 128)
    prefix_len: int = 512
    num_groups: int = 4
    turns: int = 3
    token_ids: bool = True  # random prompts as token ids (completions endpoint): exact lengths

    def build(self, n: int, tokenizer: Tokenizer | None, seed: int) -> list[Conversation]:
        rng = random.Random(seed)
        if self.name not in WORKLOADS:
            raise WorkloadError(f"unknown dataset '{self.name}'; choose one of: {', '.join(WORKLOADS)}")
        if self.name == "sharegpt":
            return sharegpt(self.path, n, tokenizer, self.output_len, rng)
        if tokenizer is None:
            raise WorkloadError(f"the {self.name} dataset needs the model's tokenizer: pass --tokenizer DIR")
        if self.name == "random":
            return [
                Conversation(
                    [
                        random_turn(
                            tokenizer,
                            self.input_len.draw(rng),
                            self.output_len.draw(rng),
                            rng,
                            self.token_ids,
                        )
                    ],
                    index=i,
                )
                for i in range(n)
            ]
        if self.name == "shared-prefix":
            systems = [exact_text(tokenizer, self.prefix_len, rng)[0] for _ in range(self.num_groups)]
            return [
                Conversation(
                    [random_turn(tokenizer, self.input_len.draw(rng), self.output_len.draw(rng), rng, False)],
                    system=systems[i % self.num_groups],
                    group=i % self.num_groups,
                    index=i,
                )
                for i in range(n)
            ]
        return [
            Conversation(
                [
                    random_turn(tokenizer, self.input_len.draw(rng), self.output_len.draw(rng), rng, False)
                    for _ in range(self.turns)
                ],
                index=i,
            )
            for i in range(n)
        ]


def random_turn(tok: Tokenizer, input_len: int, output_len: int, rng: random.Random, token_ids: bool) -> Turn:
    if token_ids:
        ids = random_ids(tok, input_len, rng)
        return Turn(ids, output_len, len(ids))
    text, n = exact_text(tok, input_len, rng)
    return Turn(text, output_len, n)


def random_ids(tok: Tokenizer, n: int, rng: random.Random) -> list[int]:
    usable = [i for i in range(tok.vocab_size) if i not in tok.special_ids]
    return [rng.choice(usable) for _ in range(n)]


def exact_text(tok: Tokenizer, n: int, rng: random.Random, attempts: int = 10) -> tuple[str, int]:
    """Text that encodes to exactly n tokens (usually); returns it with its actual token count."""
    ids = random_ids(tok, n, rng)
    text, count = "", 0
    for _ in range(attempts):
        text = tok.decode(ids)
        again = tok.encode(text, add_special_tokens=False)
        count = len(again)
        if count == n:
            break
        ids = again[:n] if count > n else again + random_ids(tok, n - count, rng)
    return text, count


def sharegpt(
    path: str | None, n: int, tok: Tokenizer | None, output_len: LengthRange, rng: random.Random
) -> list[Conversation]:
    if not path:
        raise WorkloadError("the sharegpt dataset needs --dataset-path FILE (a ShareGPT-format JSON file)")
    file = Path(path)
    if not file.exists():
        raise WorkloadError(f"{file}: dataset file not found")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise WorkloadError(f"{file}: expected a JSON list of conversations")
    pairs = []
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        prompt, reply = turns[0].get("value", ""), turns[1].get("value", "")
        if prompt and reply:
            pairs.append((prompt, reply))
    if not pairs:
        raise WorkloadError(f"{file}: no usable conversations (need a human turn followed by a reply)")
    rng.shuffle(pairs)
    out = []
    for i in range(n):
        prompt, reply = pairs[i % len(pairs)]
        prompt_tokens = len(tok.encode(prompt, add_special_tokens=False)) if tok else 0
        reply_tokens = len(tok.encode(reply, add_special_tokens=False)) if tok else output_len.draw(rng)
        out.append(Conversation([Turn(prompt, max(1, reply_tokens), prompt_tokens)], index=i))
    return out
