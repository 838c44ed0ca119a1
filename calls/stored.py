"""What the Responses API keeps upstream: reading, deleting or cancelling a stored response.

A response is stored by the upstream that made it (OpenAI keeps them unless `store` is false), so
these requests go to that upstream, found from the call's ledger row (its `upstream_id` is the
response's id). The row is also the owner check: a user reaches only responses made by their
own calls, and any other id is "not found", never "forbidden" (that would confirm it exists).
"""

from __future__ import annotations

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


def _origin(user_id: int, response_id: str) -> tuple[str, str] | None:
    """The provider and upstream model that made the user's response `response_id`."""
    row = (
        UsageRecord.objects.filter(endpoint=UsageRecord.Endpoint.RESPONSES, upstream_id=response_id, user_id=user_id)
        .values_list("provider", "upstream_model")
        .first()
    )
    return None if row is None else (row[0], row[1])


_aorigin = db_task(_origin)


async def stored_response(*, principal: Principal, response_id: str, action: StoredAction) -> dict[str, Any]:
    """The upstream's answer about the caller's stored response (`StoredResponseNotFound` if
    none of theirs has that id; `UpstreamRefused` if the upstream refuses)."""
    not_found = StoredResponseNotFound(NOT_FOUND.format(response_id=response_id))
    if not response_id or len(response_id) > 100:
        raise not_found
    origin = await _aorigin(principal.user_id, response_id)
    if origin is None:
        raise not_found
    provider_name, upstream_model = origin
    provider = (await acatalog()).providers.get(provider_name)
    if provider is None:
        raise not_found
    method, suffix = _REQUESTS[action]
    try:
        return await get_provider(provider).stored(
            deployment=Deployment(provider=provider, upstream_model=upstream_model),
            method=method,
            path=f"/responses/{response_id}{suffix}",
        )
    except UpstreamError as error:
        raise UpstreamRefused(error) from error
