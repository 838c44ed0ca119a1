"""Counting a long stream's tokens in batches gives the count of the whole text."""

from __future__ import annotations

import pytest

from streaming.pipeline import CompletionTally
from streaming.providers.simulator import simulated_text
from streaming.tokens import count_text_tokens

PROSE = (
    "Streaming gateways relay tokens as they arrive.\n\nEach piece, "
    "whether a word, a number like 3.14159 or punctuation (!?), is counted once. "
)


@pytest.mark.parametrize(
    ("pieces", "model"),
    [
        ([simulated_text(i) for i in range(20_000)], "gpt-4o"),
        ([PROSE[i : i + 7] for i in range(0, len(PROSE), 7)] * 400, "gpt-4o"),
        ([PROSE[i : i + 3] for i in range(0, len(PROSE), 3)] * 400, "gpt-4"),
    ],
    ids=["simulator-words-o200k", "prose-7-char-chunks-o200k", "prose-3-char-chunks-cl100k"],
)
def test_batched_count_equals_the_whole_texts_count(pieces: list[str], model: str) -> None:
    tally = CompletionTally(lambda text: count_text_tokens(text, model=model))
    for piece in pieces:
        tally.add(piece)
    assert tally.tokens() == count_text_tokens("".join(pieces), model=model)


def test_the_tally_keeps_at_most_one_batch_of_text() -> None:
    tally = CompletionTally(len)
    for _ in range(100_000):
        tally.add("word ")
    assert tally._pending_chars < CompletionTally.BATCH_CHARS + 10
    assert tally.tokens() == 500_000


async def test_inside_an_event_loop_batches_are_counted_off_the_loop_and_none_is_lost() -> None:
    import asyncio
    import threading

    loop_thread = threading.get_ident()
    counted_in: set[int] = set()

    def count(text: str) -> int:
        counted_in.add(threading.get_ident())
        return len(text.split())

    tally = CompletionTally(count)
    for _ in range(10_000):
        tally.add("word ")
    # Batches handed to threads and not back yet are still part of the total.
    assert tally.tokens() == 10_000
    for _ in range(100):
        if not tally._in_flight:
            break
        await asyncio.sleep(0.01)
    assert tally.counted > 0 and not tally._in_flight
    assert any(thread != loop_thread for thread in counted_in)  # batches were counted in threads
    assert tally.tokens() == 10_000


def test_the_pending_text_is_held_as_a_few_strings_not_one_object_per_piece() -> None:
    tally = CompletionTally(len)
    for _ in range(1_000):  # 2,000 characters: less than a batch, so nothing is counted yet
        tally.add("ab")
    assert tally.counted == 0
    assert len(tally._pending) <= CompletionTally.JOIN_PIECES
    assert tally.tokens() == 2_000
