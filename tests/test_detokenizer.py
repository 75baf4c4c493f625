"""Incremental detokenization equals decoding everything at once; stop strings never leak into streamed text."""

from __future__ import annotations

import random
from pathlib import Path

from services.common.tokenizer import Tokenizer
from services.engine.detokenizer import IncrementalDetokenizer


def test_incremental_equals_full_decode(tiny_model: Path) -> None:
    tok = Tokenizer(tiny_model)
    rng = random.Random(0)
    texts = ["Hello world! How are you today?", "Paris is the capital of France. ", "naïve café – 東京 🚀 ok"]
    for text in texts:
        prompt, output = tok.encode("Say:"), tok.encode(text, add_special_tokens=False)
        d = IncrementalDetokenizer(tok, prompt)
        streamed = ""
        for t in output:
            d.add(t)
            streamed += d.delta()
        streamed += d.delta(final=True)
        assert streamed == d.text == tok.decode(output)
    for _ in range(50):  # random ids, including ones that split multi-byte characters
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
        d = IncrementalDetokenizer(tok, [0])
        for t in ids:
            d.add(t)
        full = tok.decode(ids)
        assert d.text == full or (full.endswith("\ufffd") and full.startswith(d.text))
        d.flush()
        assert d.text == full


def test_stop_string_is_held_back_and_truncated(tiny_model: Path) -> None:
    tok = Tokenizer(tiny_model)
    ids = tok.encode("one two three four five", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [0], stop=("three",))
    streamed = ""
    for t in ids:
        before = len(d.text)
        d.add(t)
        stopped = d.check_stop(len(d.text) - before, include_stop=False)
        streamed += d.delta(final=stopped)
        if stopped:
            break
    assert stopped and d.stopped_by == "three"
    assert streamed == "one two "
