"""The langchain provider's tests run offline: LangSmith tracing would send every run out."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _langsmith_tracing_off() -> None:
    from langsmith.utils import tracing_is_enabled

    if tracing_is_enabled():
        pytest.fail("LangSmith tracing is on (LANGSMITH_TRACING or LANGCHAIN_TRACING_V2): these tests must not reach the network")
