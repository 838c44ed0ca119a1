"""Django's Redis cache, answering as a miss when Redis is down or frozen.

django-ratelimit counts the login and chat pages' requests in Django's cache, which is Redis when
`REDIS_URL` is set. Django's own `RedisCache` lets redis-py's errors out, so a Redis outage made
those pages answer 500 while the API (whose limiter has its own failure policy) kept working.

Failure policy (deliberate; change it here, not at call sites):

- An operation that cannot reach Redis (`redis.ConnectionError`, which a refused connection
  raises at once, or `redis.TimeoutError` after the socket timeouts in `CACHES` OPTIONS; on a
  cluster also a CLUSTERDOWN answer or no node reachable: `infra.redis.UNREACHABLE`) answers
  as a miss: `get` gives the default, `get_many` ``{}``, `add`, `touch`, `delete` and `has_key`
  ``False``, `set_many` reports every key as not stored, `set` and `delete_many` do nothing, and
  `incr` raises `ValueError`, as for a missing key. Django builds the connection pool without a
  `retry`, so redis-py does not retry: each operation costs at most one socket timeout. The
  cluster client (OPTIONS ``cluster``, from REDIS_CLUSTER) is built with no retry either; after a
  node's timeout it re-reads the topology from the other nodes before it raises.
- django-ratelimit `add`s a counter, then `incr`s it; a count it cannot get is let through when
  `RATELIMIT_FAIL_OPEN` is set (django-ratelimit 4.1, `core.get_usage`). So during an outage the
  pages keep working without rate limits, as the API does (`LIMITS_FAIL_OPEN`).
- A circuit breaker per Redis location, per process: after `FAILURE_THRESHOLD` consecutive
  failures, operations answer as a miss without contacting Redis for `RESET_SECONDS`, then one
  trial operation goes through and closes it if Redis answers. Without it a frozen Redis would
  add a timeout to each of a page's four operations (two limits, an `add` and an `incr` each)
  on every request for the whole outage.
- Every operation answered as a miss increments `llmgateway_cache_failures_total{operation}`;
  a WARNING naming the operation is logged at most once per `LOG_INTERVAL` seconds per Redis
  location and process, with the number of such operations since the previous one.
- `clear()` is not guarded: a flush that did not happen should say so.

What remains: while Redis is unreachable (and until the breaker's next trial after it is back)
the pages are not rate-limited; counts made before the outage survive it only if Redis kept
them. A `delete` that could not reach Redis leaves the key until it expires (nothing deletes
from this cache today). Operations that reached Redis and failed otherwise (e.g. a
`ResponseError`) are not misses: they raise as in Django.

The breaker and the warning budget are module state shared by this process's threads (Django
makes a cache instance per thread and per async context, so instance state would not last).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.cache.backends.redis import RedisCache, RedisCacheClient
from redis.cluster import RedisCluster

from infra import observability
from infra.redis import UNREACHABLE, sync_cluster_client
from limits import CircuitBreaker, Clock, Permit, monotonic_clock

logger = logging.getLogger(__name__)

FAILURE_THRESHOLD = 3
RESET_SECONDS = 5.0
LOG_INTERVAL = 60.0
MSG_UNREACHABLE = "Redis is unreachable: the key reads as missing."

clock: Clock = monotonic_clock
"""The clock of the breakers and warnings created from now on (tests swap in a ManualClock)."""


class _RedisHealth:
    """One Redis location's circuit breaker and warning budget, shared by the process's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # CircuitBreaker itself assumes a single thread
        self._clock = clock
        self._breaker = CircuitBreaker(FAILURE_THRESHOLD, RESET_SECONDS, clock=self._clock)
        self._unreported = 0
        self._next_warning_at = float("-inf")

    def allow(self) -> Permit | None:
        with self._lock:
            return self._breaker.allow()

    def succeeded(self, permit: Permit) -> None:
        with self._lock:
            self._breaker.record_success(permit)

    def release(self, permit: Permit) -> None:
        with self._lock:
            self._breaker.release(permit)

    def missed(self, operation: str, permit: Permit | None, error: Exception | None) -> None:
        """Record an operation answered as a miss: count it, and warn unless warned lately."""
        observability.CACHE_FAILURES.labels(operation).inc()
        with self._lock:
            if permit is not None:
                self._breaker.record_failure(permit)
            self._unreported += 1
            now = self._clock()
            if now < self._next_warning_at:
                return
            unreported, self._unreported = self._unreported, 0
            self._next_warning_at = now + LOG_INTERVAL
        logger.warning(
            "cache %s: Redis unreachable (%s); answered as a cache miss, so the page rate limits "
            "fail open; %d such cache operations since the last warning",
            operation,
            error if error is not None else "not tried: the breaker is open",
            unreported,
        )


_healths: dict[str, _RedisHealth] = {}
_healths_lock = threading.Lock()


def _health_for(location: str) -> _RedisHealth:
    with _healths_lock:
        health = _healths.get(location)
        if health is None:
            health = _healths[location] = _RedisHealth()
        return health


def _key_missing() -> Any:
    raise ValueError(MSG_UNREACHABLE)


class ClusterCacheClient(RedisCacheClient):
    """Django's `RedisCacheClient` on a Redis Cluster: every command goes through one
    `redis.cluster.RedisCluster` (built by `infra.redis`, on the first operation, from the first
    LOCATION: any one node), which sends it to the node that owns its key. Single-key operations
    are Django's own; the multi-key ones, whose keys may live on several nodes, are sent per
    slot (so, as on one server with `set_many`, they are not atomic across keys)."""

    def __init__(self, servers: list[str], **options: Any) -> None:
        super().__init__(servers, **options)
        self._url = servers[0]
        self._timeout: float | None = options.get("socket_timeout")
        self._options = {
            name: options[name] for name in ("socket_connect_timeout", "username", "password") if name in options
        }
        self._values: Any = self._serializer  # type: ignore[attr-defined]  # Django's (not in django-stubs)
        self._cluster: RedisCluster | None = None

    def get_client(self, key: Any = None, *, write: bool = False) -> RedisCluster:  # type: ignore[override]
        if self._cluster is None:
            self._cluster = sync_cluster_client(self._url, timeout=self._timeout, **self._options)
        return self._cluster

    def get_many(self, keys: Any) -> dict[Any, Any]:
        keys = list(keys)
        values = self.get_client(None).mget_nonatomic(keys)
        return {k: self._values.loads(v) for k, v in zip(keys, values, strict=True) if v is not None}

    def set_many(self, data: Any, timeout: Any) -> None:
        client = self.get_client(None, write=True)
        client.mset_nonatomic({k: self._values.dumps(v) for k, v in data.items()})
        if timeout is not None:
            pipeline = client.pipeline()  # grouped by node, one round trip to each
            for key in data:
                pipeline.expire(key, timeout)
            pipeline.execute()


class ResilientRedisCache(RedisCache):
    """Django's `RedisCache` whose operations answer as a miss when Redis cannot be reached; a
    Redis Cluster client when OPTIONS has ``"cluster": True``."""

    def __init__(self, server: str | list[str], params: dict[str, Any]) -> None:
        options = dict(params.get("OPTIONS", {}))
        cluster = bool(options.pop("cluster", False))
        super().__init__(server, {**params, "OPTIONS": options})
        if cluster:
            self._class = ClusterCacheClient
        self._health = _health_for(server if isinstance(server, str) else ",".join(server))

    def _guard(self, operation: str, call: Callable[[], Any], miss: Callable[[], Any]) -> Any:
        permit = self._health.allow()
        if permit is None:
            self._health.missed(operation, None, None)
            return miss()
        try:
            result = call()
        except UNREACHABLE as error:
            self._health.missed(operation, permit, error)
            return miss()
        except BaseException:
            self._health.release(permit)  # Redis answered, or we never reached it: no verdict
            raise
        self._health.succeeded(permit)
        return result

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        return self._guard("get", partial(super().get, key, default, version), lambda: default)

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        return self._guard("get_many", partial(super().get_many, keys, version), dict)

    def has_key(self, key: Any, version: int | None = None) -> bool:
        return self._guard("has_key", partial(super().has_key, key, version), lambda: False)

    def add(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        return self._guard("add", partial(super().add, key, value, timeout, version), lambda: False)

    def set(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> None:
        self._guard("set", partial(super().set, key, value, timeout, version), lambda: None)

    def set_many(
        self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[Any]:
        return self._guard(
            "set_many", partial(super().set_many, data, timeout, version), lambda: list(data)
        )

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        return self._guard("touch", partial(super().touch, key, timeout, version), lambda: False)

    def delete(self, key: Any, version: int | None = None) -> bool:
        return self._guard("delete", partial(super().delete, key, version), lambda: False)

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        self._guard("delete_many", partial(super().delete_many, keys, version), lambda: None)

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return self._guard("incr", partial(super().incr, key, delta, version), _key_missing)
