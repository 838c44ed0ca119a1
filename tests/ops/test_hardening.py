"""What a hostile or broken client can make the server hold, and how a deployment is secured.

Bodies: an API call is authenticated before its body is read; bodies are capped
(GATEWAY_MAX_BODY_BYTES) and timed (GATEWAY_BODY_TIMEOUT), on the API and on Django's pages.
Connections: `scripts/serve` has Granian close idle connections and slow headers. Secrets:
`scripts/serve` keeps a generated key in var/, and a served non-debug gateway refuses the public
one. The served tests drive a real Granian with raw sockets, counting the bytes it accepted.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, free_port

MiB = 1024 * 1024
HOSTILE_BODY = 300 * MiB
# What the kernel's socket buffers and Granian's read buffer can take in before the application
# decides: a few MB on loopback (measured 4-8 MiB). A server that read the body would take 300.
ACCEPTED_WITHOUT_READING = 16 * MiB
CHAT = "/v1/chat/completions"
LOGIN = "/accounts/login/"


# --- A raw HTTP/1.1 client that counts what the server accepted --------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float  # from the end of the request's headers to the answer's first bytes
    sent_when_answered: int  # body bytes the socket had taken when the answer arrived
    sent_total: int  # body bytes the socket took before the server closed it (or the body ended)
    body_ended: bool  # the whole body was sent: the server kept reading
    server_closed: bool  # the server closed the connection after its answer


def chunked(total: int, piece: int = 64 * 1024) -> Iterator[bytes]:
    """A chunked request body of `total` bytes, with its terminating chunk."""
    frame = b"%x\r\n" % piece + b"x" * piece + b"\r\n"
    for _ in range(total // piece):
        yield frame
    yield b"0\r\n\r\n"


def raw(total: int, piece: int = 64 * 1024) -> Iterator[bytes]:
    for _ in range(total // piece):
        yield b"x" * piece


def one_byte_per_second(answered: threading.Event, total: int) -> Iterator[bytes]:
    for _ in range(total):
        yield b"x"
        if answered.wait(1.0):
            return


def post_raw(
    port: int, path: str, headers: dict[str, str], body: Iterator[bytes], *,
    answered: threading.Event | None = None, expect_close: bool = True, timeout: float = 15,
) -> Answer:  # fmt: skip
    """Send `body` from a thread while waiting for the answer; return it with the bytes counted.

    `answered` is set once the answer is in (and, with `expect_close`, the connection closed or
    found open): a paced body stops there; any other body goes on until the server stops it.
    """
    answered = answered or threading.Event()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(timeout)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    sock.sendall(head.encode() + b"\r\n")
    sent = 0
    ended = threading.Event()
    outcome: dict[str, Any] = {}

    def pump() -> None:
        nonlocal sent
        try:
            for piece in body:
                sock.sendall(piece)
                sent += len(piece)
            outcome["body_ended"] = True
        except OSError as error:  # the server closed the connection
            outcome["error"] = error
        finally:
            ended.set()

    thread = threading.Thread(target=pump, daemon=True)
    started = time.monotonic()
    thread.start()
    data, server_closed, sent_when_answered, answered_at = b"", False, None, None
    try:
        while True:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                server_closed = True
                break
            if sent_when_answered is None:
                sent_when_answered, answered_at = sent, time.monotonic()
            if not piece:
                server_closed = True
                break
            data += piece
            if _complete(data):
                if expect_close:  # rather than read on (the body is still being sent)
                    try:
                        server_closed = sock.recv(1) == b""
                    except ConnectionResetError:
                        server_closed = True
                    except TimeoutError:
                        server_closed = False
                break
    finally:
        answered.set()
        ended.wait(timeout)
        sock.close()
        thread.join(timeout)
    assert answered_at is not None and data, "no answer"
    head_text, _, answer_body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_text.decode("latin1").split("\r\n")
    return Answer(
        status=int(status_line.split()[1]),
        headers={name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)},
        body=answer_body,
        seconds=answered_at - started,
        sent_when_answered=sent_when_answered or 0,
        sent_total=sent,
        body_ended=outcome.get("body_ended", False),
        server_closed=server_closed,
    )


def _complete(data: bytes) -> bool:
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        return False
    for line in head.decode("latin1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return len(body) >= int(value)
    return False


def assert_openai_error(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status, answer
    error = json.loads(answer.body)["error"]
    assert error["code"] == code and error["message"], error
    assert answer.headers["content-type"] == "application/json"
    assert len(answer.headers["x-request-id"]) == 36
    assert answer.headers["connection"] == "close"


# --- Bodies, on a served gateway ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)  # the gateway looks the wrong key up
@pytest.mark.parametrize("authorization", [None, "Bearer sk-gw-not-a-real-key"], ids=["no-key", "wrong-key"])
def test_an_unauthenticated_300_mib_body_is_refused_before_it_is_read(gateway_factory, authorization) -> None:
    gateway = gateway_factory()
    headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    if authorization:
        headers["Authorization"] = authorization

    answer = post_raw(gateway.port, CHAT, headers, chunked(HOSTILE_BODY))

    assert_openai_error(answer, 401, "invalid_api_key")
    assert answer.seconds < 5
    assert answer.sent_when_answered < ACCEPTED_WITHOUT_READING
    # The server closed the connection instead of reading (draining) the rest.
    assert answer.server_closed and not answer.body_ended
    assert answer.sent_total < ACCEPTED_WITHOUT_READING


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("path", "framing"),
    [(CHAT, "chunked"), (CHAT, "content-length"), (LOGIN, "chunked"), (LOGIN, "content-length")],
    ids=["api-chunked", "api-content-length", "page-chunked", "page-content-length"],
)
def test_a_body_over_the_cap_gets_413_and_is_not_read_further(gateway_factory, api_key, path, framing) -> None:
    gateway = gateway_factory(GATEWAY_MAX_BODY_BYTES=str(256 * 1024))
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    if framing == "chunked":
        headers["Transfer-Encoding"] = "chunked"
        body = chunked(HOSTILE_BODY)
    else:
        headers["Content-Length"] = str(HOSTILE_BODY)
        body = raw(HOSTILE_BODY)

    answer = post_raw(gateway.port, path, headers, body)

    assert_openai_error(answer, 413, "request_too_large")
    assert "262144 bytes" in json.loads(answer.body)["error"]["message"]
    assert answer.seconds < 5
    assert answer.server_closed and not answer.body_ended
    assert answer.sent_total < ACCEPTED_WITHOUT_READING


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", [CHAT, LOGIN], ids=["api", "page"])
def test_a_one_byte_per_second_body_gets_408_at_the_body_deadline(gateway_factory, api_key, path) -> None:
    gateway = gateway_factory(GATEWAY_BODY_TIMEOUT="1")
    answered = threading.Event()
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json", "Content-Length": "120"}
    answer = post_raw(gateway.port, path, headers, one_byte_per_second(answered, 120), answered=answered, timeout=10)

    assert_openai_error(answer, 408, "request_timeout")
    assert answer.seconds < 1 + 3  # the deadline, and a margin for a loaded machine
    assert answer.sent_when_answered < 10
    assert answer.server_closed


@pytest.mark.django_db(transaction=True)
@pytest.mark.ledger
def test_a_chunked_body_under_the_cap_is_served(gateway_factory, api_key, fake_upstream) -> None:
    """The bounds refuse only what crosses them: an authenticated chunked call completes."""
    gateway = gateway_factory()
    fake_upstream.tokens = 3
    payload = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi " * 2000}]}).encode()
    frames = [b"%x\r\n" % len(payload[i : i + 1000]) + payload[i : i + 1000] + b"\r\n" for i in range(0, len(payload), 1000)]

    answer = post_raw(
        gateway.port,
        CHAT,
        {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        iter([*frames, b"0\r\n\r\n"]),
        expect_close=False,
    )

    assert answer.status == 200, answer.body
    assert json.loads(answer.body)["choices"][0]["message"]["content"] == "tok tok tok "
    assert answer.body_ended


# --- Bodies, in process: what the handler receives and leaves for the view ------------------------


class Client:
    """Drives `llmgateway.asgi.application` with one HTTP request; records every receive and send."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.messages = messages
        self.received = 0
        self.sent: list[dict[str, Any]] = []
        self.never = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if self.received < len(self.messages):
            self.received += 1
            return self.messages[self.received - 1]
        await self.never.wait()  # a client that sends nothing more
        raise AssertionError("unreachable")

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def request(self, path: str, headers: dict[str, str], method: str = "POST") -> dict[str, Any]:
        from llmgateway.asgi import application

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
        }  # fmt: skip
        await asyncio.wait_for(application(scope, self.receive, self.send), timeout=10)
        return scope

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    @property
    def error(self) -> dict[str, Any]:
        return json.loads(b"".join(message.get("body", b"") for message in self.sent[1:]))["error"]


@pytest.mark.django_db(transaction=True)
async def test_a_wrong_key_is_answered_without_a_single_receive() -> None:
    client = Client([{"type": "http.request", "body": b"{}", "more_body": False}])
    await client.request(CHAT, {"Authorization": "Bearer sk-gw-wrong", "Content-Length": "2"})
    assert client.status == 401 and client.error["code"] == "invalid_api_key"
    assert client.received == 0


@pytest.mark.django_db(transaction=True)
async def test_the_principal_authenticated_before_the_body_is_left_in_the_scope(api_key) -> None:
    from llmgateway.asgi import PRINCIPAL_SCOPE_KEY

    client = Client([{"type": "http.request", "body": b"{}", "more_body": False}])
    scope = await client.request("/v1/embeddingz", {"Authorization": f"Bearer {api_key}", "Content-Length": "2"})
    assert client.status == 404  # the view ran, with the body read
    assert client.received >= 1
    principal = scope[PRINCIPAL_SCOPE_KEY]
    assert principal.username == "alice" and principal.key_prefix == api_key[: len(principal.key_prefix)]


@pytest.mark.django_db(transaction=True)
async def test_a_declared_length_over_the_cap_is_refused_without_a_receive(api_key, settings) -> None:
    settings.GATEWAY_MAX_BODY_BYTES = 1000
    client = Client([{"type": "http.request", "body": b"x" * 1001, "more_body": False}])
    await client.request(CHAT, {"Authorization": f"Bearer {api_key}", "Content-Length": "1001"})
    assert client.status == 413 and client.error["code"] == "request_too_large"
    assert client.received == 0


@pytest.mark.django_db(transaction=True)
async def test_a_body_growing_past_the_cap_stops_being_read_at_once(api_key, settings) -> None:
    settings.GATEWAY_MAX_BODY_BYTES = 1000
    client = Client([{"type": "http.request", "body": b"x" * 600, "more_body": True}] * 10)
    await client.request(CHAT, {"Authorization": f"Bearer {api_key}", "Transfer-Encoding": "chunked"})
    assert client.status == 413
    assert client.received == 2  # 600, then 1,200 bytes: not one message more


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", [CHAT, LOGIN, "/healthz"], ids=["api", "page", "probe"])
async def test_a_body_that_stops_arriving_gets_408(api_key, settings, path) -> None:
    settings.GATEWAY_BODY_TIMEOUT = 0.2
    client = Client([{"type": "http.request", "body": b"{", "more_body": True}])
    await client.request(path, {"Authorization": f"Bearer {api_key}", "Content-Length": "50"})
    assert client.status == 408 and client.error["code"] == "request_timeout"
    assert client.error["message"] == "The request body did not arrive within 0.2 seconds."


# --- Idle connections and slow headers: scripts/serve as shipped ----------------------------------


def wait_closed(sock: socket.socket, timeout: float) -> float:
    """Seconds until the server closes `sock` (reading and discarding what it sends)."""
    sock.settimeout(timeout)
    started = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


class Served:
    """`scripts/serve` run as shipped, but for its environment set-up (`_setup.sh`, which may install
    packages): a copy beside a `_setup.sh` that only enters the project and its virtualenv."""

    def __init__(self, tmp_path: Path, var_dir: Path) -> None:
        scripts = tmp_path / "scripts"
        scripts.mkdir(exist_ok=True)
        shutil.copy(ROOT / "scripts" / "serve", scripts / "serve")
        (scripts / "_setup.sh").write_text(
            f'set -euo pipefail\ncd "{ROOT}"\nexport PATH="{Path(sys.executable).parent}:$PATH"\n'
        )
        self.script = scripts / "serve"
        self.var_dir = var_dir
        self.log = tmp_path / "serve.log"

    def start(self) -> None:
        self.port = free_port()
        env = {name: value for name, value in os.environ.items() if not name.startswith(("DJANGO_", "REDIS_", "GRANIAN_", "PROMETHEUS_"))}
        env.update(
            LLMGATEWAY_VAR_DIR=str(self.var_dir), DATABASE_URL="", PORT=str(self.port), WORKERS="1",
            GRANIAN_HTTP1_HEADER_READ_TIMEOUT="1000", GRANIAN_LOG_LEVEL="warning",
            SIMULATOR_TOKENS_PER_SECOND="20", SIMULATOR_COMPLETION_TOKENS="40", SIMULATOR_TTFT_SECONDS="0",
        )  # fmt: skip
        env.pop("SQLITE_TEST_NAME", None)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(["bash", str(self.script)], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError("scripts/serve did not answer within 90 s:\n" + self.log.read_text())

    def stop(self) -> None:
        self.process.terminate()  # bash exec'd Granian: this is Granian's main process
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    server = Served(tmp_path, tmp_path / "var")
    yield server
    if getattr(server, "process", None) is not None and server.process.poll() is None:
        server.stop()


def test_scripts_serve_keeps_a_generated_key_and_closes_idle_connections(served: Served) -> None:
    served.start()

    key_file = served.var_dir / "secret_key"
    key = key_file.read_text().strip()
    assert len(key) >= 50 and key != "insecure-dev-only-key-set-DJANGO_SECRET_KEY"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    # A connection that never sends a byte, one that stops mid-headers, and a keep-alive one idle
    # after a request: each closed at the header read timeout (1 s here, 10 s by default).
    with socket.create_connection(("127.0.0.1", served.port)) as silent:
        assert wait_closed(silent, 10) < 1 + 2
    with socket.create_connection(("127.0.0.1", served.port)) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert wait_closed(slow, 10) < 1 + 2
    with socket.create_connection(("127.0.0.1", served.port)) as kept:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        kept.settimeout(10)
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        assert wait_closed(kept, 10) < 1 + 2

    # ... while a stream that outlasts it is not cut (40 tokens at 20/s: 2 s).
    demo_key = next(line.split()[-1] for line in served.log.read_text().splitlines() if "API key:" in line)
    with httpx.Client(timeout=20) as client:
        response = client.post(
            f"http://127.0.0.1:{served.port}{CHAT}",
            headers={"Authorization": f"Bearer {demo_key}"},
            json={"model": "sim-chat", "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
        )
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")

    # Served again, it keeps the key it generated.
    served.stop()
    served.start()
    assert key_file.read_text().strip() == key


# --- The secret key ---------------------------------------------------------------------------


def granian(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "llmgateway.asgi:application"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def gateway_env(var_dir: Path, **extra: str) -> dict[str, str]:
    """No DJANGO_SECRET_KEY, DJANGO_DEBUG off, an empty var dir (its own SQLite database)."""
    env = {name: value for name, value in os.environ.items() if name not in {"DJANGO_SECRET_KEY", "DJANGO_DEBUG", "SQLITE_TEST_NAME"}}
    return {**env, "LLMGATEWAY_VAR_DIR": str(var_dir), "DATABASE_URL": "", "LOG_LEVEL": "WARNING", **extra}


def test_a_served_gateway_refuses_to_start_on_the_public_key(tmp_path: Path) -> None:
    from llmgateway.asgi import PUBLIC_SECRET_KEY

    process = granian(gateway_env(tmp_path), free_port())
    try:
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0
    assert PUBLIC_SECRET_KEY in output.decode()


@pytest.mark.parametrize("how", ["key-file-in-var", "debug"])
def test_a_served_gateway_starts_with_a_kept_key_or_in_debug(tmp_path: Path, how: str) -> None:
    extra = {}
    if how == "key-file-in-var":
        (tmp_path / "secret_key").write_text("a-key-kept-by-scripts-serve-" + "k" * 40 + "\n")
    else:
        extra["DJANGO_DEBUG"] = "1"
    port = free_port()
    process = granian(gateway_env(tmp_path, **extra), port)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.communicate()[0].decode()
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                assert response.status_code == 200, response.text
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.05)
    finally:
        process.terminate()
        try:
            process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def settings_in_a_new_process(var_dir: Path, **env: str) -> dict[str, Any]:
    """The settings a fresh process reads from this environment (settings are read at import)."""
    base = {name: value for name, value in os.environ.items() if not name.startswith("DJANGO_") and name not in {"CSRF_TRUSTED_ORIGINS", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE"}}
    code = (
        "import json; from django.conf import settings as s; print(json.dumps({name: getattr(s, name, None) for name in "
        "('SECRET_KEY', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', 'SECURE_PROXY_SSL_HEADER', 'CSRF_TRUSTED_ORIGINS')}))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT, env={**base, "DJANGO_SETTINGS_MODULE": "llmgateway.settings", "LLMGATEWAY_VAR_DIR": str(var_dir), **env},
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return json.loads(output)


@pytest.mark.parametrize(
    ("env_key", "file_key", "expected"),
    [
        ("from-env", "from-file", "from-env"),
        (None, "from-file", "from-file"),
        (None, None, "insecure-dev-only-key-set-DJANGO_SECRET_KEY"),
    ],
    ids=["env-wins", "file", "public-default"],
)
def test_the_secret_key_comes_from_the_environment_else_var_else_the_public_default(tmp_path, env_key, file_key, expected) -> None:
    if file_key:
        (tmp_path / "secret_key").write_text(file_key + "\n")
    env = {"DJANGO_SECRET_KEY": env_key} if env_key else {}
    assert settings_in_a_new_process(tmp_path, **env)["SECRET_KEY"] == expected


def test_secure_cookie_and_proxy_settings_come_from_the_environment(tmp_path) -> None:
    assert settings_in_a_new_process(tmp_path) == {
        "SECRET_KEY": "insecure-dev-only-key-set-DJANGO_SECRET_KEY",
        "SESSION_COOKIE_SECURE": False,
        "CSRF_COOKIE_SECURE": False,
        "SECURE_PROXY_SSL_HEADER": None,
        "CSRF_TRUSTED_ORIGINS": [],
    }
    configured = settings_in_a_new_process(
        tmp_path,
        SESSION_COOKIE_SECURE="1",
        CSRF_COOKIE_SECURE="true",
        DJANGO_SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto",
        CSRF_TRUSTED_ORIGINS="https://gateway.example.com, https://chat.example.com",
    )
    assert configured["SESSION_COOKIE_SECURE"] is True and configured["CSRF_COOKIE_SECURE"] is True
    assert configured["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert configured["CSRF_TRUSTED_ORIGINS"] == ["https://gateway.example.com", "https://chat.example.com"]


def test_a_served_gateway_marks_its_cookies_secure_when_told(gateway_factory) -> None:
    gateway = gateway_factory(CSRF_COOKIE_SECURE="1", SESSION_COOKIE_SECURE="1")
    response = httpx.get(f"{gateway.base_url}{LOGIN}", timeout=10)
    assert response.status_code == 200
    csrf_cookie = next(value for name, value in response.headers.multi_items() if name == "set-cookie" and value.startswith("csrftoken="))
    assert "Secure" in csrf_cookie.split("; ")
