"""The `openai` provider names upstream failures by what happened, whatever its transport says."""

from __future__ import annotations

import aiohttp
import httpx2
import openai
import pytest

from streaming.providers.openai import translate_error


def sdk_timeout_caused_by(transport_error: BaseException) -> openai.APITimeoutError:
    """What the SDK raises when its aiohttp transport fails: APITimeoutError from
    httpx2.ConnectTimeout from the aiohttp error."""
    request = httpx2.Request("POST", "http://upstream.invalid/v1/chat/completions")
    try:
        try:
            try:
                raise transport_error
            except BaseException as error:
                raise httpx2.ConnectTimeout(str(error)) from error
        except httpx2.ConnectTimeout as error:
            raise openai.APITimeoutError(request=request) from error
    except openai.APITimeoutError as error:
        return error


@pytest.mark.parametrize(
    ("transport_error", "kind"),
    [
        (aiohttp.ServerDisconnectedError(), "connection"),
        (aiohttp.ClientOSError(111, "Connect call failed"), "connection"),
        (aiohttp.ConnectionTimeoutError("connect timed out"), "timeout"),
        (aiohttp.SocketTimeoutError("read timed out"), "timeout"),
    ],
    ids=["dropped", "refused", "connect-timeout", "read-timeout"],
)
def test_a_transport_failure_is_a_timeout_only_when_it_timed_out(transport_error, kind) -> None:
    assert translate_error(sdk_timeout_caused_by(transport_error)).kind == kind
