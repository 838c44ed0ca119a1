"""Who is calling: what the edge authenticated, as the call's life needs it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    """The API key and its owner, with the key's own limits (no key: the chat page's session)."""

    api_key_id: int | None  # None for the web chat page's session
    user_id: int
    username: str
    key_prefix: str
    rpm_limit: int | None
    tpm_limit: int | None
    max_concurrent: int | None
