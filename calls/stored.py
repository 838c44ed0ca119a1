"""What the Responses API keeps upstream: reading, deleting or cancelling a stored response.

A response is stored by the upstream that made it (OpenAI keeps them unless `store` is false), so
these requests go to that upstream, found from the call's ledger row (its `upstream_id` is the
response's id). The row is also the owner check: a user reaches only responses made by their
own calls, and any other id is "not found", never "forbidden" (that would confirm it exists).
The same check guards `previous_response_id`: a new response may continue only the caller's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from billing.models import UsageRecord
from calls.exceptions import StoredResponseNotFound, UpstreamRefused
from calls.principal import Principal
from infra.db import db_task
from streaming.catalog import Deployment
from streaming.providers import UpstreamError, get_provider
from upstreams.catalog import acatalog

NOT_FOUND = "No response found with id '{response_id}'."

StoredAction = Literal["retrieve", "delete", "cancel"]
_REQUESTS: dict[StoredAction, tuple[Literal["GET", "DELETE", "POST"], str]] = {
    "retrieve": ("GET", ""),
    "delete": ("DELETE", ""),
    "cancel": ("POST", "/cancel"),
}


# The shape of the ids OpenAI gives (resp_...); anything else is no response of anyone's.
RESPONSE_ID = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


@dataclass(frozen=True, slots=True)
class Origin:
    """The call that made a stored response."""

    provider: str
    upstream_model: str
    context_tokens: int  # its prompt and its answer: what a response chained to it reads again


def _origin(user_id: int, response_id: str) -> Origin | None:
    row = (
        UsageRecord.objects.filter(endpoint=UsageRecord.Endpoint.RESPONSES, upstream_id=response_id, user_id=user_id)
        .values_list("provider", "upstream_model", "prompt_tokens", "completion_tokens")
        .first()
    )
    return None if row is None else Origin(provider=row[0], upstream_model=row[1], context_tokens=row[2] + row[3])


_aorigin = db_task(_origin)


async def origin_of(*, principal: Principal, response_id: str) -> Origin:
    """The call of the caller's that made `response_id`; `StoredResponseNotFound` if none did."""
    origin = await _aorigin(principal.user_id, response_id) if RESPONSE_ID.match(response_id) else None
    if origin is None:
        raise StoredResponseNotFound(NOT_FOUND.format(response_id=response_id))
    return origin


async def stored_response(*, principal: Principal, response_id: str, action: StoredAction) -> dict[str, Any]:
    """The upstream's answer about the caller's stored response (`StoredResponseNotFound` if
    none of theirs has that id; `UpstreamRefused` if the upstream refuses)."""
    origin = await origin_of(principal=principal, response_id=response_id)
    provider = (await acatalog()).providers.get(origin.provider)
    if provider is None:
        raise StoredResponseNotFound(NOT_FOUND.format(response_id=response_id))
    method, suffix = _REQUESTS[action]
    try:
        return await get_provider(provider).stored(
            deployment=Deployment(provider=provider, upstream_model=origin.upstream_model),
            method=method,
            path=f"/responses/{response_id}{suffix}",
        )
    except UpstreamError as error:
        raise UpstreamRefused(error) from error
