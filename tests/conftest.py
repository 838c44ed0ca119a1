"""Shared fixtures: API keys, a fake OpenAI upstream, and the gateway served by Granian.

The gateway runs as a real Granian process on a free port, against the same test database as the
tests (committed data: tests that talk to it use `transactional_db`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.conf import settings
from django.test import override_settings

from testbed.gateway import APPLICATION, Gateway
from testbed.net import free_port

if TYPE_CHECKING:
    from testbed.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent


def _a_redis_database_per_xdist_worker() -> None:
    """scripts/test runs the suite in pytest-xdist workers; tests empty and fill their Redis
    database, so worker gwN takes database (TEST_REDIS_URL's number - N) of its own. Set before the
    test modules and conftests below this one read TEST_REDIS_URL."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return
    base = urlsplit(os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    database = int(base.path.strip("/") or 0) - int(worker.removeprefix("gw"))
    if database < 0:
        raise pytest.UsageError(f"TEST_REDIS_URL's database number is too low for worker {worker}")
    os.environ["TEST_REDIS_URL"] = urlunsplit(base._replace(path=f"/{database}"))


_a_redis_database_per_xdist_worker()
__all__ = ["Gateway", "free_port", "start_gateway", "stop_gateway"]  # tests import these from here


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None, tmp_path_factory: pytest.TempPathFactory) -> None:
    """SQLite's test database is a file (not :memory:) so the gateway process can share it; on
    PostgreSQL, each xdist worker's test database is named after it (pytest-django's suffix)."""
    database = settings.DATABASES["default"]
    _configured_database_name.append(database["NAME"])
    if database["ENGINE"] == "django.db.backends.sqlite3":
        database.setdefault("TEST", {})["NAME"] = str(tmp_path_factory.mktemp("db") / "test.sqlite3")


# The database the settings name, before pytest-django points them at a test database (which it
# creates only for a session with a test that asks for one).
_configured_database_name: list[str] = []


def database_url() -> str:
    database = settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{database['NAME']}"
    user = database.get("USER") or "postgres"
    host = database.get("HOST") or "127.0.0.1"
    port = database.get("PORT") or 5432
    return f"postgres://{user}@{host}:{port}/{database['NAME']}"


@pytest.fixture(scope="session", autouse=True)
def _close_database_pools(django_db_setup: Any, django_db_blocker: Any) -> Iterator[None]:
    """Close pooled connections before the test database is dropped (they would block it), and
    end the sessions left on it: connections other threads opened (not this thread's to close),
    or the backend of a gateway stopped a moment ago."""
    yield
    from django.db import connection as this_thread
    from django.db import connections

    with django_db_blocker.unblock():
        test_database = this_thread.settings_dict["NAME"]
        # Only a test database of this session's own: without one the settings still name the
        # configured database, which the other xdist workers' sessions use as well.
        if this_thread.vendor == "postgresql" and test_database not in _configured_database_name:
            with this_thread.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
                    [test_database],
                )
        for connection in connections.all():
            connection.close()
            close_pool = getattr(connection, "close_pool", None)
            if close_pool is not None:
                close_pool()


@pytest.fixture(scope="session", autouse=True)
def _ledger_outbox_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Ledger journals of this test session (in-process and served gateways) in a directory of
    its own, never the checkout's var/: a later session's fresh test database must not be sent
    the rows of an earlier one."""
    from billing import outbox

    directory = tmp_path_factory.mktemp("outbox")
    previous = settings.LEDGER_OUTBOX_DIR
    settings.LEDGER_OUTBOX_DIR = directory
    outbox._outbox = None
    yield directory
    settings.LEDGER_OUTBOX_DIR = previous
    outbox._outbox = None


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    from testbed.fake_upstream import FakeUpstream

    # Without x-ratelimit-* headers by default: the session's gateway would learn limits from
    # one test's answers and keep them for the next. Tests of learning turn them on.
    with FakeUpstream(rate_limit_headers=False).running_in_thread() as server:
        yield server


@pytest.fixture
def fake_upstream(upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    """The session's fake upstream, with its default behaviour restored after each test."""
    defaults = {
        name: getattr(upstream, name)
        for name in (
            "tokens", "inter_token_delay", "ttft", "fault", "fault_after_tokens", "retry_after",
            "rpm_limit", "tpm_limit", "rate_limit_headers", "fault_schedule", "auto_tool_calls", "embedding_dimensions",
        )
    }
    yield upstream
    for name, value in defaults.items():
        setattr(upstream, name, value)


def start_gateway(
    env_overrides: dict[str, str],
    *,
    upstream: FakeUpstream,
    workers: int = 1,
    granian_args: tuple[str, ...] = (),
    app: str = APPLICATION,
) -> Gateway:
    """A gateway under Granian (testbed.gateway) with the tests' settings, against ``upstream``."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": "sk-test-upstream",
        "GATEWAY_HEARTBEAT_INTERVAL": "0.5",
        "GATEWAY_IDLE_TIMEOUT": "2",
        "GATEWAY_FIRST_TOKEN_TIMEOUT": "5",
        "GATEWAY_MAX_BODY_BYTES": str(256 * 1024),
        # The session's gateway and fake upstream outlive a test, and tests fail the upstream on
        # purpose: a breaker opened by one test would refuse the next one's calls. Breaker tests
        # set their own.
        "UPSTREAM_BREAKER_FAILURES": "1000000",
        "LOG_LEVEL": "WARNING",
        # A served gateway refuses the public development key (llmgateway/asgi.py).
        "DJANGO_SECRET_KEY": "test-only-secret-key-for-served-gateways",
        "LEDGER_OUTBOX_DIR": str(settings.LEDGER_OUTBOX_DIR),
        **env_overrides,
    }
    env.pop("SQLITE_TEST_NAME", None)
    return Gateway(env, workers=workers, granian_args=granian_args, timeout=30, app=app)


def stop_gateway(gateway: Gateway) -> None:
    gateway.stop()


@pytest.fixture(scope="session")
def gateway(django_db_setup: Any, django_db_blocker: Any, upstream: FakeUpstream) -> Iterator[Gateway]:
    server = start_gateway({}, upstream=upstream)
    yield server
    stop_gateway(server)


@pytest.fixture
def gateway_factory(django_db_setup: Any, upstream: FakeUpstream) -> Iterator[Callable[..., Gateway]]:
    """Start a gateway with extra settings (environment variables) for one test."""
    started: list[Gateway] = []

    def make(workers: int = 1, granian_args: tuple[str, ...] = (), app: str = APPLICATION, **env: str) -> Gateway:
        server = start_gateway(env, upstream=upstream, workers=workers, granian_args=granian_args, app=app)
        started.append(server)
        return server

    yield make
    for server in started:
        stop_gateway(server)


@pytest.fixture
def api_key_factory(transactional_db: None) -> Callable[..., str]:
    from llmgateway.services import api_key_create

    counter = iter(range(1_000_000))

    def make(username: str | None = None, **kwargs: Any) -> str:
        _, raw_key = api_key_create(username=username or f"user{next(counter)}", **kwargs)
        return raw_key

    return make


@pytest.fixture
def api_key(api_key_factory: Callable[..., str]) -> str:
    return api_key_factory("alice")


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless as root, and quiet: this machine's closed network refuses Chromium's background calls.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright."""
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop running in this thread while it lives; the ORM
    # calls the tests (and the database teardown) make here are still plain synchronous calls.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            yield chromium
            chromium.close()


@pytest.fixture
def screenshot_dir(tmp_path: Path) -> Path:
    """Where browser tests write their screenshots: SCREENSHOT_DIR if set, else the test's tmp_path."""
    directory = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(autouse=True)
def _fresh_process_caches() -> Iterator[None]:
    """Per-process caches must not carry ids across tests (rolled-back ids are reused). The
    upstreams catalog is read afresh for each test and then kept for its whole length, so a test's
    query counts do not depend on how slowly it runs (edits in the test still apply at once)."""
    from billing import pricing_cache
    from llmgateway.auth import forget_verified_keys
    from upstreams.catalog import forget

    pricing_cache.clear()
    forget_verified_keys()
    forget()
    with override_settings(UPSTREAMS_CACHE_SECONDS=3600):
        yield
    forget()
