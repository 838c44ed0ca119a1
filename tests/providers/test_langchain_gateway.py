"""End to end: a model served by the langchain provider, declared in an UPSTREAMS_FILE, streamed
through a served gateway (Granian) with the OpenAI SDK, and its call in the ledger exactly once,
billed from the model's usage metadata, or from the text counted locally when it reported none."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from billing.models import Price, UsageRecord
from streaming.tokens import count_text_tokens

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.ledger]

ANSWER = "Served by a LangChain runnable, through the gateway's own pipeline."
USAGE = {"input_tokens": 11, "output_tokens": 13, "total_tokens": 24}


def scripted_answer(*, with_usage: bool) -> dict[str, Any]:
    """The provider's options: ScriptedChatModel streaming ANSWER word by word (then its usage)."""
    pieces: list[dict[str, Any]] = [{"content": f" {word}" if index else word} for index, word in enumerate(ANSWER.split(" "))]
    if with_usage:
        pieces.append({"content": "", "usage_metadata": USAGE})
    return {"runnable": "tests.providers.runnables:ScriptedChatModel", "kwargs": {"chunks": pieces}}


def upstreams_file(tmp_path: Path, options: dict[str, Any]) -> str:
    document = {
        "providers": [{"name": "lc-fake", "kind": "langchain", "options": options}],
        "models": [{"name": "lc-chat", "deployments": [{"provider": "lc-fake", "upstream_model": "fake"}]}],
    }
    path = tmp_path / "upstreams.json"
    path.write_text(json.dumps(document))
    return str(path)


def the_row(call_id: str) -> UsageRecord:
    deadline = time.monotonic() + 5
    while not UsageRecord.objects.filter(request_id=call_id).exists():
        assert time.monotonic() < deadline, "the call's row was not written"
        time.sleep(0.02)
    (row,) = UsageRecord.objects.filter(call_id=call_id)
    return row


@pytest.mark.parametrize("with_usage", [True, False], ids=["usage-metadata", "counted-locally"])
def test_a_langchain_model_streams_through_the_gateway_and_is_billed_once(
    with_usage: bool, gateway_factory: Callable[..., Any], api_key: str, tmp_path: Path
) -> None:
    # An unpriced model is refused before any upstream call: give this one a price.
    Price.objects.create(
        model="lc-chat",
        input_usd_per_1m=Decimal("2"),
        cached_input_usd_per_1m=None,
        output_usd_per_1m=Decimal("8"),
        effective_from=datetime(2020, 1, 1, tzinfo=UTC),
    )
    gateway = gateway_factory(UPSTREAMS_FILE=upstreams_file(tmp_path, scripted_answer(with_usage=with_usage)))
    client = openai.OpenAI(base_url=gateway.api_url, api_key=api_key, max_retries=0)

    assert "lc-chat" in {model.id for model in client.models.list()}
    with client.chat.completions.with_streaming_response.create(
        model="lc-chat",
        messages=[{"role": "user", "content": "Who serves you?"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as raw:
        call_id = raw.headers["x-request-id"]
        chunks = list(raw.parse())

    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == ANSWER
    row = the_row(call_id)
    assert (row.model, row.provider, row.upstream_model, row.status, row.stream) == ("lc-chat", "lc-fake", "fake", "completed", True)
    if with_usage:
        assert (row.prompt_tokens, row.completion_tokens, row.token_source) == (11, 13, "upstream")
    else:
        assert row.token_source == "estimated" and row.prompt_tokens > 0
        assert row.completion_tokens == count_text_tokens(ANSWER, model="fake")
    # The client asked for usage: it gets what the row billed, the model's or counted locally.
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (row.prompt_tokens, row.completion_tokens)
    assert row.cost_usd == (row.prompt_tokens * Decimal(2) + row.completion_tokens * Decimal(8)) / Decimal(1_000_000)
