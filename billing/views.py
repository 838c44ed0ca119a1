"""Cost exports over HTTP for staff: the console's download and the admin's export action.

Both stream `billing.exports.usage_export`, the exporter `manage.py export_costs` uses, so the same
filters give the same bytes. Query parameters are the command's options: `since`, `until`,
`user` and `model` (repeatable), `group_by` (repeatable), `format`, `totals`, `from_ledger`.
Permission checks are the caller's (`UsageRecordAdmin`: staff with view permission on usage
records).

Under ASGI, Django buffers a synchronous iterator whole before sending it, so there the export
is handed over as an asynchronous iterator whose every step runs in the request's own sync
thread: the one that holds the database cursor (a thread-sensitive `sync_to_async`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import closing

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.db.models import QuerySet
from django.http import HttpRequest, QueryDict, StreamingHttpResponse

from billing.exports import (
    CONTENT_TYPES,
    ExportError,
    ExportSpec,
    export_spec_parse,
    usage_export,
    usage_export_filename,
)
from billing.models import UsageRecord

QUERY_PARAMETERS = ("since", "until", "user", "model", "group_by", "format", "totals", "from_ledger")
UNKNOWN_PARAMETER = "unknown parameter (expected any of since, until, user, model, group_by, format, totals, from_ledger)."
BAD_FLAG = "expected 1 or 0, got {value!r}."
_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"", "0", "false", "off", "no"}


def _flag(query: QueryDict, name: str) -> bool:
    value = query.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ExportError(name, BAD_FLAG.format(value=query.get(name)))


def _values(query: QueryDict, name: str) -> list[str]:
    # An HTML form sends its empty text inputs: empty means "not given".
    return [value for value in query.getlist(name) if value.strip()]


def export_spec_from_query(query: QueryDict) -> ExportSpec:
    """Parse an export's query parameters; raise `ExportError` naming the first bad one."""
    for name in sorted(query):
        if name not in QUERY_PARAMETERS:
            raise ExportError(name, UNKNOWN_PARAMETER)
    return export_spec_parse(
        since=query.get("since", "").strip() or None,
        until=query.get("until", "").strip() or None,
        users=_values(query, "user"),
        models=_values(query, "model"),
        group_by=_values(query, "group_by"),
        format=query.get("format", "").strip() or "csv",
        totals=_flag(query, "totals"),
        from_ledger=_flag(query, "from_ledger"),
    )


def _encoded(chunks: Iterator[str]) -> Iterator[bytes]:
    with closing(chunks):  # type: ignore[type-var]
        for chunk in chunks:
            yield chunk.encode()


def _next_chunk(chunks: Iterator[bytes]) -> bytes | None:
    return next(chunks, None)


async def _in_request_thread(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Step a sync iterator from async code, each step in the request's sync thread."""
    step = sync_to_async(_next_chunk, thread_sensitive=True)
    try:
        while (chunk := await step(chunks)) is not None:
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            # Shielded: on a client disconnect this still ends the read transaction and its cursor.
            await asyncio.shield(sync_to_async(close, thread_sensitive=True)())


def usage_export_response(
    request: HttpRequest, spec: ExportSpec, *, records: QuerySet[UsageRecord] | None = None
) -> StreamingHttpResponse:
    """Stream `spec`'s export as an attachment."""
    chunks = _encoded(usage_export(spec, records=records))
    content = _in_request_thread(chunks) if isinstance(request, ASGIRequest) else chunks
    response = StreamingHttpResponse(content, content_type=CONTENT_TYPES[spec.format])
    response["Content-Disposition"] = f'attachment; filename="{usage_export_filename(spec)}"'
    response["Cache-Control"] = "no-store"
    return response
