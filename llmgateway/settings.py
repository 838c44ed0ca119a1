"""Settings for llmgateway, read from the environment with embedded defaults.

With no environment at all the gateway runs on SQLite, an in-process limiter and channel layer,
and the built-in simulator provider. Set DATABASE_URL and REDIS_URL for production.
"""

import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from infra.postgres_pool import check_idle_connection
from infra.redis import channel_layer

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("LLMGATEWAY_VAR_DIR", BASE_DIR / "var"))


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


# Public, so never used to serve: with DJANGO_DEBUG off a server refuses to start on it
# (llmgateway/asgi.py); tests and management commands may use it.
INSECURE_DEV_SECRET_KEY = "insecure-dev-only-key-set-DJANGO_SECRET_KEY"


def _secret_key() -> str:
    """DJANGO_SECRET_KEY, else the key scripts/serve generated in VAR_DIR, else the public one."""
    if key := os.environ.get("DJANGO_SECRET_KEY"):
        return key
    try:
        key = (VAR_DIR / "secret_key").read_text().strip()
    except FileNotFoundError:
        key = ""
    return key or INSECURE_DEV_SECRET_KEY


DEBUG = _env_bool("DJANGO_DEBUG", False)
SECRET_KEY = _secret_key()
ALLOWED_HOSTS = _env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")
# Behind TLS: cookies only over HTTPS, and the header a trusted proxy sets to "https" (e.g.
# DJANGO_SECURE_PROXY_SSL_HEADER=X-Forwarded-Proto; never set it without such a proxy).
SESSION_COOKIE_SECURE = _env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = _env_bool("CSRF_COOKIE_SECURE", False)
if _proxy_ssl_header := os.environ.get("DJANGO_SECURE_PROXY_SSL_HEADER", "").strip():
    SECURE_PROXY_SSL_HEADER = ("HTTP_" + _proxy_ssl_header.upper().replace("-", "_"), "https")
# Origins (scheme and host) trusted for unsafe requests, e.g. https://gateway.example.com.
CSRF_TRUSTED_ORIGINS = _env_list("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "daphne",  # only for `manage.py runserver`; production serves with Granian
    "llmgateway.admin_config.GatewayAdminConfig",  # django.contrib.admin with the project's site
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_ratelimit",
    "llmgateway",
    "streaming",
    "billing",
    "chat",
    "upstreams",
]

MIDDLEWARE = [
    "llmgateway.middleware.RequestTimingMiddleware",
    # Turns django-ratelimit's blocks on the login and chat pages into RATELIMIT_VIEW's 429.
    "django_ratelimit.middleware.RatelimitMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "llmgateway.urls"
ASGI_APPLICATION = "llmgateway.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'llmgateway.sqlite3'}",
        conn_max_age=_env_int("DATABASE_CONN_MAX_AGE", 0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Persistent connections in the few shared DB worker threads (infra/db.py).
    DATABASES["default"]["CONN_MAX_AGE"] = None
    # WAL lets the gateway's readers run while the ledger writes.
    DATABASES["default"].setdefault("OPTIONS", {})["init_command"] = (
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;"
    )
    DATABASES["default"]["OPTIONS"]["transaction_mode"] = "IMMEDIATE"
    if os.environ.get("SQLITE_TEST_NAME"):
        # A file, not :memory:, so a gateway process started by the tests shares it.
        DATABASES["default"]["TEST"] = {"NAME": os.environ["SQLITE_TEST_NAME"]}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Requests hand their connection back after each database step (infra/db.py); the pool
    # makes that cheap and bounds the connections one gateway process opens.
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": _env_int("DATABASE_POOL_MAX_SIZE", 16),
        # Seconds a database step waits for a pooled connection. The API's database threads
        # (DATABASE_THREADS) are fewer than the connections, so only a failing database makes a
        # step wait: it stays short (503s come fast; a ledger row goes to the outbox meanwhile).
        "timeout": _env_float("DATABASE_POOL_TIMEOUT", 2.0),
        # After a failed connection attempt the pool retries with a doubling delay until this
        # many seconds have passed, then gives up until the next request asks: kept short, so a
        # gateway is back within seconds of its database instead of after a backoff grown long.
        "reconnect_timeout": _env_float("DATABASE_POOL_RECONNECT_TIMEOUT", 2.0),
        # The pool checks a connection as it hands it out: after a database restart or terminated
        # backends it replaces the dead ones, instead of failing one step with each in turn. Only a
        # connection the server wrote to while it was idle costs a round trip (infra/postgres_pool.py).
        "check": check_idle_connection,
    }
    # The hot statements' cursors prepare a statement after this many runs on a connection
    # (billing._sql.hot_cursor; Django's own cursors never prepare). Off behind a pooler in
    # transaction mode that does not keep prepared statements (PgBouncer before 1.21).
    DATABASES["default"]["OPTIONS"]["prepare_threshold"] = 5 if _env_bool("DATABASE_PREPARED_STATEMENTS", True) else None
# Threads for the API's database work (infra/db.py), apart from the event loop's other threads.
DATABASE_THREADS = _env_int("DATABASE_THREADS", 8)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "")
# REDIS_URL names one node of a Redis Cluster (any one: the clients discover the rest), and every
# Redis client is a cluster client (infra/redis.py): the limiter, learned limits, /readyz, the
# cache; the channel layer is then channels-redis's pub/sub layer (see below).
REDIS_CLUSTER = _env_bool("REDIS_CLUSTER", False)
if REDIS_CLUSTER and REDIS_URL and urlsplit(REDIS_URL).path.strip("/") not in ("", "0"):
    # Said at start, not as an error on every request: a cluster client refuses such a URL.
    raise ImproperlyConfigured("REDIS_CLUSTER: a Redis Cluster has only database 0; REDIS_URL names another")
if REDIS_URL:
    # channels-redis: its pub/sub layer on a cluster (see infra/redis.py).
    CHANNEL_LAYERS = {"default": channel_layer(REDIS_URL, cluster=REDIS_CLUSTER)}
    CACHES = {
        "default": {
            # Django's RedisCache, but an operation that cannot reach Redis answers as a miss
            # (logged, counted, behind a circuit breaker), on a cluster client with
            # REDIS_CLUSTER: see llmgateway/cache.py.
            "BACKEND": "llmgateway.cache.ResilientRedisCache",
            "LOCATION": REDIS_URL,
            # Seconds: the most a down or frozen Redis costs one cache operation.
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5, "cluster": REDIS_CLUSTER},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# django-ratelimit guards the login and chat pages (sync views). Django's own RedisCache has an
# atomic incr but is not on its "officially supported" list; the embedded default's LocMemCache is
# per process, which is right for the single-process default and documented for multi-worker.
RATELIMIT_USE_CACHE = "default"
# A count the cache cannot give (Redis down: llmgateway/cache.py answers a miss) lets the page
# through, as the API's limiter does by default (LIMITS_FAIL_OPEN).
RATELIMIT_FAIL_OPEN = True
RATELIMIT_VIEW = "llmgateway.pages.ratelimited"
LOGIN_RATE = os.environ.get("LOGIN_RATE", "10/m")
CHAT_PAGE_RATE = os.environ.get("CHAT_PAGE_RATE", "60/m")
# What one user may keep on the chat page: a new conversation past the first cap, or a message in a
# conversation past the second (its answer counted), is refused with a plain 400.
CHAT_MAX_CONVERSATIONS = _env_int("CHAT_MAX_CONVERSATIONS", 1_000)
CHAT_MAX_MESSAGES = _env_int("CHAT_MAX_MESSAGES", 500)
SILENCED_SYSTEM_CHECKS = ["django_ratelimit.W001"] + ([] if REDIS_URL else ["django_ratelimit.E003"])

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
USE_I18N = False
USE_TZ = True
TIME_ZONE = "UTC"
# Calendar periods for budgets and exports are computed in this zone.
BILLING_TIME_ZONE = os.environ.get("BILLING_TIME_ZONE", "UTC")

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/chat/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "WARNING")},
    "loggers": {
        "llmgateway": {"level": os.environ.get("LOG_LEVEL", "INFO"), "propagate": True},
        "streaming": {"level": os.environ.get("LOG_LEVEL", "INFO"), "propagate": True},
        "billing": {"level": os.environ.get("LOG_LEVEL", "INFO"), "propagate": True},
        # Every refused request is already in the JSON call log or its 4xx body; Django's own
        # "Too Many Requests" warning per 429 would flood the log under load.
        "django.request": {"level": os.environ.get("DJANGO_REQUEST_LOG_LEVEL", "ERROR"), "propagate": True},
    },
}

# --- Gateway -------------------------------------------------------------------------------
# Largest accepted request body, on every path; a larger one gets a 413 and is not read further.
GATEWAY_MAX_BODY_BYTES = _env_int("GATEWAY_MAX_BODY_BYTES", 4 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = GATEWAY_MAX_BODY_BYTES + 1024
# Seconds a request body may take to arrive, from the end of its headers (after the API key is
# checked); a slower one gets a 408 (llmgateway/asgi.py).
GATEWAY_BODY_TIMEOUT = _env_float("GATEWAY_BODY_TIMEOUT", 30.0)
# Frames buffered between the upstream reader and the client writer (backpressure bound).
GATEWAY_STREAM_QUEUE_SIZE = _env_int("GATEWAY_STREAM_QUEUE_SIZE", 64)
# Bytes of the kernel's send buffer for each client connection (infra/sockets.py; 0 leaves the
# kernel's autotuning, up to net.ipv4.tcp_wmem's maximum). With the queue above and Granian's
# own buffer (scripts/serve: --http1-buffer-size) it bounds what a client that stops reading
# costs, and how far ahead of it the upstream is read. A large answer to a distant client moves
# at most this much per round trip: raise it for big embeddings batches over long distances.
GATEWAY_CLIENT_SEND_BUFFER = _env_int("GATEWAY_CLIENT_SEND_BUFFER", 128 * 1024)
# Bytes of the kernel's receive buffer for each upstream connection (streaming/providers/openai.py;
# 0 leaves the kernel's autotuning, up to net.ipv4.tcp_rmem's maximum): how far an upstream can
# send ahead of a client that stopped reading, and what one read of it brings into the process.
# A large answer from a distant upstream moves at most about this much per round trip: raise it
# (or set 0) for big embeddings batches from far away.
GATEWAY_UPSTREAM_RECEIVE_BUFFER = _env_int("GATEWAY_UPSTREAM_RECEIVE_BUFFER", 32 * 1024)
# Seconds. Connect: TCP/TLS to the upstream. First token: request sent to first chunk.
# Idle: between two chunks. Total: the whole call. Heartbeat: SSE comment when idle.
GATEWAY_CONNECT_TIMEOUT = _env_float("GATEWAY_CONNECT_TIMEOUT", 10.0)
GATEWAY_FIRST_TOKEN_TIMEOUT = _env_float("GATEWAY_FIRST_TOKEN_TIMEOUT", 120.0)
GATEWAY_IDLE_TIMEOUT = _env_float("GATEWAY_IDLE_TIMEOUT", 60.0)
GATEWAY_TOTAL_TIMEOUT = _env_float("GATEWAY_TOTAL_TIMEOUT", 600.0)
GATEWAY_HEARTBEAT_INTERVAL = _env_float("GATEWAY_HEARTBEAT_INTERVAL", 15.0)
# Open connections to one upstream per worker process; each running call holds one, so this is
# also the most concurrent calls a worker makes to that upstream (the others wait for a slot).
GATEWAY_UPSTREAM_MAX_CONNECTIONS = _env_int("GATEWAY_UPSTREAM_MAX_CONNECTIONS", 10_000)

# Upstreams. The `openai` provider uses the OpenAI SDK's own variables.
OPENAI_API_KEY = os.environ.get("OPENAI_API_KEY", "")
OPENAI_BASE_URL = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")

# Simulator defaults (per-request overrides: see streaming/providers/simulator.py).
SIMULATOR_TOKENS_PER_SECOND = _env_float("SIMULATOR_TOKENS_PER_SECOND", 40.0)
SIMULATOR_TTFT_SECONDS = _env_float("SIMULATOR_TTFT_SECONDS", 0.25)
SIMULATOR_COMPLETION_TOKENS = _env_int("SIMULATOR_COMPLETION_TOKENS", 64)

# Extra catalog entries or overrides, as JSON: {"model-id": {"provider": "openai", ...}}.
GATEWAY_MODELS_JSON = os.environ.get("GATEWAY_MODELS_JSON", "")

# Providers and models from a YAML or JSON document (see README, "Upstreams"), read at start;
# staff add and edit more in the admin (`manage.py import_upstreams FILE` loads a file there).
UPSTREAMS_FILE = os.environ.get("UPSTREAMS_FILE", "")
# Seconds a process reuses the catalog it read; edits in this process apply at once.
UPSTREAMS_CACHE_SECONDS = _env_float("UPSTREAMS_CACHE_SECONDS", 2.0)

# Decimal cap for requests that give no max_tokens (billing reserves against it).
GATEWAY_DEFAULT_MAX_TOKENS = _env_int("GATEWAY_DEFAULT_MAX_TOKENS", 4096)

# --- Billing -------------------------------------------------------------------------------
# Seconds a finished call waits for the database to take its ledger row; past that (or on any
# database error) the row goes to the outbox (billing/outbox.py), durably, and is written when
# the database answers.
GATEWAY_LEDGER_WRITE_TIMEOUT = _env_float("GATEWAY_LEDGER_WRITE_TIMEOUT", 2.0)
# The outbox's journals, one directory per process, keyed by database.
LEDGER_OUTBOX_DIR = Path(os.environ.get("LEDGER_OUTBOX_DIR", VAR_DIR / "outbox"))
# BILLING_TIME_ZONE (above) sets the calendar days and months budgets and rollups use.
# Seconds a budget reservation counts after admission; a process that dies mid-call stops
# holding budget after this. It must outlast the longest call (GATEWAY_TOTAL_TIMEOUT).
BILLING_RESERVATION_TTL = _env_float("BILLING_RESERVATION_TTL", GATEWAY_TOTAL_TIMEOUT + 60.0)
# The price catalog `manage.py importprices` loads with no argument, and migrate loads on a fresh
# database (rows already present are kept).
BILLING_DEFAULT_PRICES_FILE = Path(
    os.environ.get("BILLING_DEFAULT_PRICES_FILE", BASE_DIR / "billing" / "data" / "prices.json")
)

# --- Limits (see calls/limits.py) --------------------------------------------------------
# Per API key unless the key sets its own; per user across all its keys. 0 disables a limit.
LIMITS_KEY_RPM = _env_int("LIMITS_KEY_RPM", 600)
LIMITS_KEY_TPM = _env_int("LIMITS_KEY_TPM", 2_000_000)
LIMITS_KEY_MAX_CONCURRENT = _env_int("LIMITS_KEY_MAX_CONCURRENT", 64)
LIMITS_USER_RPM = _env_int("LIMITS_USER_RPM", 0)
LIMITS_USER_TPM = _env_int("LIMITS_USER_TPM", 0)
# The web chat page's calls (no key) per user, so one person at the page cannot flood the upstream.
LIMITS_CHAT_USER_RPM = _env_int("LIMITS_CHAT_USER_RPM", 20)
LIMITS_CHAT_USER_TPM = _env_int("LIMITS_CHAT_USER_TPM", 0)
LIMITS_CHAT_USER_MAX_CONCURRENT = _env_int("LIMITS_CHAT_USER_MAX_CONCURRENT", 2)
# Requests per minute as a token bucket (burst = the limit, refilled over a minute) or an exact
# sliding window.
LIMITS_RPM_ALGORITHM = os.environ.get("LIMITS_RPM_ALGORITHM", "token_bucket")
LIMITS_FAIL_OPEN = _env_bool("LIMITS_FAIL_OPEN", True)
# Seconds one limiter decision may wait on Redis before it is decided by the failure policy.
# The wait is measured on the event loop, so it includes the worker's own queueing: generous on
# purpose, so a saturated worker does not mistake its own slowness for an outage (measured: 200
# concurrent requests on 3 workers on 2 cores pushed some decisions past 1 s). A dead Redis
# fails at once (connection refused); only a frozen one costs this long, for the few calls
# before the circuit breaker opens.
LIMITS_REDIS_TIMEOUT = _env_float("LIMITS_REDIS_TIMEOUT", 2.0)
LIMITS_BREAKER_RESET = _env_float("LIMITS_BREAKER_RESET", 5.0)
# Prefix of the limiter's Redis keys: gateways that share a Redis share limits only when it matches.
LIMITS_REDIS_PREFIX = os.environ.get("LIMITS_REDIS_PREFIX", "llmgw:rl")
# Published upstream limits per model, as JSON: {"gpt-4o": {"rpm": 500, "tpm": 30000}}.
UPSTREAM_LIMITS = json.loads(os.environ.get("UPSTREAM_LIMITS_JSON") or "{}")
UPSTREAM_LIMIT_HEADROOM = _env_float("UPSTREAM_LIMIT_HEADROOM", 0.2)
UPSTREAM_MAX_WAIT = _env_float("UPSTREAM_MAX_WAIT", 10.0)
# Seconds a call may spend on retries and fallbacks before its first token; no attempt starts
# and no backoff sleeps past it. Attempts per model (its deployments, then retries after backoff).
UPSTREAM_RETRY_DEADLINE = _env_float("UPSTREAM_RETRY_DEADLINE", 30.0)
UPSTREAM_MAX_ATTEMPTS = _env_int("UPSTREAM_MAX_ATTEMPTS", 3)
# Backoff before retrying the same deployment: base * 2^n with full jitter, capped; an upstream's
# retry-after / retry-after-ms wins when it asks for longer.
UPSTREAM_BACKOFF_BASE = _env_float("UPSTREAM_BACKOFF_BASE", 0.25)
UPSTREAM_BACKOFF_MAX = _env_float("UPSTREAM_BACKOFF_MAX", 8.0)
# A deployment that fails this many times in a row is skipped for the cool-down (seconds), then probed.
UPSTREAM_BREAKER_FAILURES = _env_int("UPSTREAM_BREAKER_FAILURES", 5)
UPSTREAM_BREAKER_COOLDOWN = _env_float("UPSTREAM_BREAKER_COOLDOWN", 30.0)
# Learned limits: an upstream 429 cuts a deployment's limit by this fraction (at most once per
# UPSTREAM_LIMIT_CUT_INTERVAL seconds), and it regains UPSTREAM_LIMIT_RECOVERY of its ceiling
# per minute without one.
UPSTREAM_LIMIT_CUT = _env_float("UPSTREAM_LIMIT_CUT", 0.2)
UPSTREAM_LIMIT_CUT_INTERVAL = _env_float("UPSTREAM_LIMIT_CUT_INTERVAL", 2.0)
UPSTREAM_LIMIT_RECOVERY = _env_float("UPSTREAM_LIMIT_RECOVERY", 0.05)

# Seconds a process may reuse a user's account and rates for a model (billing/pricing_cache.py);
# and a verified API key (llmgateway/auth.py). Edits in this process apply at once; in other
# processes within this delay. 0 disables.
BILLING_RATES_CACHE_SECONDS = _env_float("BILLING_RATES_CACHE_SECONDS", 2.0)
AUTH_CACHE_SECONDS = _env_float("AUTH_CACHE_SECONDS", 2.0)
