"""Redis clients, built one way for a single server or a Redis Cluster.

Everything that uses Redis (the limiter, learned upstream limits, readiness, Django's cache, the
channel layer's choice) builds its clients here, so one setting switches all of them: with
``cluster`` false (REDIS_CLUSTER unset) a plain client for the server ``url`` names; with it true,
``url`` names any one node of a Redis Cluster (the startup node) and the client discovers the
others (CLUSTER SLOTS), sends each command to the node owning its key's slot and follows
MOVED/ASK redirections. A plain client pointed at one node of a cluster would instead get
``MOVED`` for every key that node does not own.

What the caller must know of a cluster client:

- **One slot per command.** A multi-key command or script needs all its keys in one hash slot:
  the limiter's keys share a ``{group}`` hash tag for that (``limits._keys``). Scripts run with
  EVALSHA on the node of their keys; ``SCRIPT LOAD`` after NOSCRIPT goes to every primary.
- **Timeouts and retries.** ``timeout`` is every socket's connect and read timeout, on every
  node. ``retries`` counts whole-command retries: on a cluster a connection error or timeout
  first marks the topology stale and the retry re-reads it (redis-py's per-node connections never
  retry on their own), so a frozen node costs up to ``(1 + retries)`` timeouts plus the topology
  read; callers that must never wait longer also put a deadline around the call (the limiter's
  ``asyncio.timeout``), and callers that may wait at most one timeout pass ``retries=0``.
- **Connections.** ``max_connections`` bounds each node's pool on a cluster; past it a command
  fails at once with `redis.exceptions.MaxConnectionsError` (a ``ConnectionError``) instead of
  waiting as a single server's blocking pool does, so a caller with bursts bounds its own
  commands in flight (the limiter does).
- **Failures.** A cluster also fails with exceptions outside ``RedisError`` (no reachable node,
  a slot no node serves): `UNREACHABLE` lists everything that means "Redis could not answer".

The asyncio cluster client is redis-py's with two repairs (`ClusterClient`, redis-py 8.1): it
reads the topology before it routes its first command (redis-py routes the commands issued while
it has no topology yet to a random node, as if they had no key; with many at once, as the
limiter's first burst, the MOVED answers made it re-read the topology over and over, closing
connections other commands were using), and a command whose connection was closed under it
raises ``ConnectionError``, not the transport's ``TypeError`` (CPython 3.12; redis-py #4287).
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
import redis.cluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ClusterError, RedisClusterException
from redis.retry import Retry


class ClusterClient(redis.asyncio.RedisCluster):
    """redis-py's asyncio cluster client, with the two repairs the module docstring describes."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:
            await self.initialize()  # under redis-py's lock: the first caller reads the topology
        try:
            return await super().execute_command(*args, **kwargs)
        except (TypeError, AttributeError) as error:  # a closed transport, on CPython 3.12
            raise redis.ConnectionError(f"the connection closed under the command ({error!r})") from error


AsyncClient = redis.asyncio.Redis | redis.asyncio.RedisCluster

UNREACHABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError,  # refused, reset, or a cluster node's pool exhausted
    redis.TimeoutError,
    ClusterError,  # CLUSTERDOWN, or redirections that never settled
    RedisClusterException,  # no startup node answered, or no node serves the key's slot
)
"""Exceptions that mean Redis (a server, or the cluster node that owns a key) gave no answer."""


def async_client(
    url: str,
    *,
    cluster: bool,
    timeout: float,
    retries: int = 0,
    max_connections: int | None = None,
) -> AsyncClient:
    """An asyncio client for ``url``: a cluster client when ``cluster``.

    On a single server, ``max_connections`` makes the pool blocking: a command waits up to
    ``timeout`` for a free connection. On a cluster it caps each node's pool (default 100).
    """
    if cluster:
        return ClusterClient.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=AsyncRetry(NoBackoff(), retries),
            **({} if max_connections is None else {"max_connections": max_connections}),
        )
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": AsyncRetry(NoBackoff(), retries),
    }
    if max_connections is None:
        pool: redis.asyncio.ConnectionPool = redis.asyncio.ConnectionPool.from_url(url, **options)
    else:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout, **options
        )
    return redis.asyncio.Redis.from_pool(pool)


def sync_cluster_client(url: str, *, timeout: float | None, retries: int = 0, **options: Any) -> redis.cluster.RedisCluster:
    """A synchronous cluster client for ``url`` (any one node). It reads the cluster's topology
    at once, so it raises one of `UNREACHABLE` when no node answers."""
    return redis.cluster.RedisCluster.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=options.pop("socket_connect_timeout", timeout),
        retry=Retry(NoBackoff(), retries),
        **options,
    )


async def astate(client: AsyncClient) -> str:
    """``"ok"`` when Redis answers: on a cluster, every primary answers PING and the cluster
    reports ``cluster_state:ok`` (every slot served). Raises one of `UNREACHABLE`, or
    `ClusterNotOk`, otherwise. Put a deadline around it."""
    if isinstance(client, redis.asyncio.RedisCluster):
        await client.ping(target_nodes=redis.asyncio.RedisCluster.PRIMARIES)
        info = await client.cluster_info(target_nodes=redis.asyncio.RedisCluster.RANDOM)
        state = info.get("cluster_state")
        if state != "ok":
            raise ClusterNotOk(f"cluster_state:{state}")
        return "ok"
    await client.ping()
    return "ok"


class ClusterNotOk(RedisClusterException):
    """Every node answers, but the cluster says it cannot serve every slot."""


# channels-redis's default layer receives with a blocking pop that waits this long (its
# ``brpop_timeout``) before it asks again; a socket timeout at or under it makes every quiet receive
# fail. redis-py 8 gives every socket a 5 s timeout by default, exactly that wait.
CHANNEL_LAYER_BLOCKING_POP_SECONDS = 5.0
CHANNEL_LAYER_SOCKET_TIMEOUT = CHANNEL_LAYER_BLOCKING_POP_SECONDS + 5.0
CHANNEL_LAYER_CONNECT_TIMEOUT = 2.0


def channel_layer(url: str, *, cluster: bool, prefix: str | None = None) -> dict[str, Any]:
    """Django Channels' ``CHANNEL_LAYERS["default"]`` on the Redis ``url`` names.

    On a cluster, channels-redis's pub/sub layer: its default layer keeps channels and groups in
    lists and sorted sets that its Lua scripts touch several of at once (not one slot), whereas
    Redis Cluster delivers a PUBLISH on any node to the subscribers of every node, so processes
    attached to different nodes (or the same one) hear one another. What the gateway sends on the
    layer (stop orders, live reports, requests for them) is meant for whoever listens now, which
    is all pub/sub delivers: a message is not kept for a listener that is not subscribed yet.

    Either way a socket read waits longer than the default layer's blocking pop (a quiet receive
    is not a failure), and a frozen Redis still fails a send within that bound.
    """
    host = {
        "address": url,
        "socket_timeout": CHANNEL_LAYER_SOCKET_TIMEOUT,
        "socket_connect_timeout": CHANNEL_LAYER_CONNECT_TIMEOUT,
    }
    config: dict[str, Any] = {"hosts": [host]}
    if prefix is not None:
        config["prefix"] = prefix
    backend = "channels_redis.pubsub.RedisPubSubChannelLayer" if cluster else "channels_redis.core.RedisChannelLayer"
    return {"BACKEND": backend, "CONFIG": config}
