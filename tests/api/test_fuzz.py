"""A property-based fuzz of the API through a real Granian: whatever arrives, no 5xx, every error
an OpenAI-shaped JSON body with an `x-request-id`, every 405 with `Allow`, every 200 a completion
or a stream that ends (tests/api/fuzz.py generates the requests and judges the answers).

FUZZ_EXAMPLES requests per run (2,000 by default); `python -m bench.fuzz` runs 100,000. Each
failure Hypothesis found is kept below as a regular case (`@example`), so it is tried first on
every run whatever the seed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, event, example, given, settings

from tests.api.fuzz import CHAT_PATH, FuzzRequest, problems, requests
from tests.conftest import Gateway

pytestmark = [pytest.mark.django_db(transaction=True)]

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))


@pytest.fixture
def keyed_client(gateway: Gateway, api_key_factory) -> Iterator[httpx.Client]:
    key = api_key_factory("fuzz", rpm_limit=1_000_000, tpm_limit=1_000_000_000)
    with httpx.Client(base_url=gateway.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=15) as client:
        yield client


def send(client: httpx.Client, request: FuzzRequest) -> list[str]:
    response = client.request(request.method, request.path, content=request.body, headers=request.headers)
    event(f"answered {response.status_code}")  # the spread of answers, in --hypothesis-show-statistics
    return problems(request, response.status_code, {name.lower(): value for name, value in response.headers.items()}, response.content)


# Found by this test on main before the fixes; each was a 500 or an answer that was not OpenAI's.
@example(FuzzRequest("POST", CHAT_PATH, b'{"model":"x","messages":[{"role":[]}]}', {"Content-Type": "application/json"}))
@example(FuzzRequest("POST", CHAT_PATH, b'{"model":"x","messages":[{"role":{}}]}', {"Content-Type": "application/json"}))
@example(FuzzRequest("GET", "/v1/models/%0a", b"", {}))
@example(FuzzRequest("POST", CHAT_PATH + "%0a", b"{}", {"Content-Type": "application/json"}))
@example(FuzzRequest("DELETE", "/v1/models/sim-fast", b"", {}))
@example(FuzzRequest("PUT", CHAT_PATH, b"{}", {"Content-Type": "application/json"}))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
@given(request=requests())
def test_whatever_arrives_the_answer_is_never_a_5xx_and_every_error_is_openais(keyed_client: httpx.Client, request: FuzzRequest) -> None:
    assert send(keyed_client, request) == []


@pytest.mark.parametrize("value", [b"a\x01b", b"a\x7fb", b"a\x00b"], ids=["control-byte", "delete", "nul"])
def test_a_header_with_a_control_byte_is_refused_by_the_server_before_the_gateway(gateway: Gateway, value: bytes) -> None:
    """RFC 9110 forbids these bytes in a field value; Granian answers a bare 400 and closes, with
    no setting to say more (the README says so). The gateway never sees the request."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as connection:
        connection.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Odd: " + value + b"\r\n\r\n")
        answer = connection.recv(4096)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in head.lower() and b"x-request-id" not in head.lower()
    assert body == b""
