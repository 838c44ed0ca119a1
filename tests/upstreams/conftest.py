"""Upstreams fixtures: a document of two providers and two models, written to a file on demand,
and a live catalog read afresh in each test."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from upstreams import catalog

# Groq, whose key is in GROQ_API_KEY, and a local vLLM that takes none. `team-chat` tries the
# local server first (priority 0), then Groq; when both failed, the simulator's `sim-chat`.
DOCUMENT: dict[str, Any] = {
    "providers": [
        {
            "name": "groq",
            "kind": "openai",
            "base_url": "https://api.groq.com/openai/v1",
            "api_key_env": "GROQ_API_KEY",
            "read_timeout": 30.0,
        },
        {
            "name": "local-vllm",
            "kind": "openai",
            "base_url": "http://127.0.0.1:8000/v1",
            "headers": {"x-team": "ml"},
            "max_connections": 64,
        },
    ],
    "models": [
        {
            "name": "team-chat",
            "routing": "priority",
            "fallbacks": ["sim-chat"],
            "context_window": 131072,
            "deployments": [
                {"provider": "groq", "upstream_model": "llama-3.1-8b-instant", "priority": 1, "rpm": 30, "tpm": 6000},
                {"provider": "local-vllm", "upstream_model": "meta-llama/Llama-3.1-8B-Instruct", "priority": 0},
            ],
        },
        {
            "name": "team-fast",
            "owned_by": "ml-team",
            "routing": "weighted",
            "deployments": [
                {"provider": "local-vllm", "upstream_model": "qwen2.5-0.5b", "weight": 3},
                {"provider": "groq", "upstream_model": "llama-3.2-1b-preview", "weight": 1},
            ],
        },
    ],
}


@pytest.fixture
def document() -> dict[str, Any]:
    """A fresh copy of DOCUMENT, for a test to spoil."""
    return copy.deepcopy(DOCUMENT)


@pytest.fixture
def write_document(tmp_path: Path) -> Callable[..., Path]:
    """`write(document, name="upstreams.yaml")`: the document as YAML (or JSON for a .json name)."""

    def write(document: Any, name: str = "upstreams.yaml") -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(document) if name.endswith(".json") else yaml.safe_dump(document, sort_keys=False))
        return path

    return write


@pytest.fixture(autouse=True)
def _fresh_catalog() -> Iterator[None]:
    """Each test reads the live catalog from its own rows (not one cached by an earlier test)."""
    catalog.forget()
    yield
    catalog.forget()
