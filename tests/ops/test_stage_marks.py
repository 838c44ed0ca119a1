"""`bench.stage_marks` and `bench.stages`: a gateway served with a mark at each stage of a call
writes one line per API call with every stage it went through, in order, and the report reads
them back stage by stage."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from bench.stages import read_marks, report

IN_ORDER = (
    "authenticate >",
    "authenticate <",
    "read body <",
    "view >",
    "validate >",
    "catalog >",
    "rate limits >",
    "rate limits <",
    "budget hold >",
    "upstream capacity >",
    "journal >",
    "upstream request >",
    "upstream request <",
    "queue >",
    "response start",
    "first token",
    "record >",
    "record <",
    "limits give-back <",
    "ended",
)


@pytest.mark.django_db(transaction=True)
def test_a_streamed_call_through_a_marked_gateway_leaves_every_stage_in_order(gateway_factory, api_key: str, tmp_path: Path) -> None:
    gateway = gateway_factory(app="bench.stage_marks:application", STAGE_MARKS_DIR=str(tmp_path))
    client = openai.OpenAI(base_url=gateway.api_url, api_key=api_key, max_retries=0)
    with client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say something."}],
        stream=True,
        extra_headers={"x-bench-load": "0ms-1"},
    ) as stream:
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text
    client.models.list()  # not a POST /v1/...: no line of its own

    [path] = tmp_path.glob("marks.*.jsonl")
    [line] = path.read_text().splitlines()
    call = json.loads(line)
    assert call["load"] == "0ms-1"
    marks = call["marks"]
    assert set(IN_ORDER) <= set(marks)
    times = [marks[name] for name in IN_ORDER]
    assert times == sorted(times) and times[0] >= 0

    assert read_marks(tmp_path, skip=0, load="warm-up") == []
    drawn = report(read_marks(tmp_path, skip=0), slowest=50, until="first token")
    assert drawn.startswith("1 call(s) reached `first token`")
    for stage in ("authenticate", "rate limits", "budget hold", "upstream request", "first token"):
        assert f"\n{stage} " in drawn
