"""The Redis limiter: one atomic Lua script per decision, and one round trip for the decisions
of the calls that ask at once.

Each operation is one script from ``_lua/`` (see the header of each file for KEYS, ARGV, units
and reply), registered once per client with ``register_script``; redis-py's `Script` reloads it
when Redis answers NOSCRIPT (after a restart or ``SCRIPT FLUSH``). The clock is Redis ``TIME``,
read inside the script, so every process and host agrees on time. Keys live under one
``{group}`` hash tag (see ``_keys``), so the scripts also run on Redis Cluster. Every key has a
TTL a little past the moment its state stops mattering; TTLs only collect garbage, decisions
never depend on them.

Round trips: on a single server the scripts are group-committed (`infra.group_commit`), as the
ledger's rows are. A script asked for while none is on its way is sent at once, alone; those
asked for while a round trip is out go together, in one pipeline (EVALSHA each, not a
transaction: each script is still atomic on its own, and one's failure is its alone), as soon
as it is back. A busy gateway then pays one send, one read and one wake-up of Redis for many
calls' decisions instead of one each. A script's deadline covers its wait for the round trip
already out as well as its own. redis-py refuses scripts in a cluster pipeline, so on a Redis
Cluster each script is its own round trip.

Memory: a token bucket is one small hash per key. The sliding window is an exact log, one ZSET
member (about 60-80 bytes with its score) per admission still inside the window, plus one meta
hash; a 10 000 requests/minute window therefore holds up to ~10 000 members (under 1 MB).
Use token buckets for limits counted in tokens: a window charged with large costs stays small
(one member per call), but a window with a very high request rate is large.

Failure policy:

- **Never hang.** Every call runs under ``asyncio.timeout(timeout)`` (default 100 ms) covering
  the pool wait, connect, send and read; `from_url` also sets socket and connect timeouts to
  the same value and allows one immediate retry (a stale pooled connection after a Redis restart).
  On Redis Cluster (``from_url(..., cluster=True)``, built by `infra.redis`) the same deadline
  covers the redirections and the topology re-read after a node fails: a frozen node costs
  each call on its slots at most ``timeout``, like a frozen server, and counts against the
  breaker of `ResilientLimiter` (one breaker for the whole cluster: while it is open, every
  key is decided by the failure policy, not only the frozen node's).
- **Fail loudly, decide elsewhere.** Any Redis error or timeout raises `LimiterBackendError`;
  this class never decides on its own without Redis. Wrap it in `ResilientLimiter` to fail
  open (in-process fallback) or closed (`LimiterUnavailable`).
- **Races that remain:** a call that times out after Redis ran the script has charged the
  limit although the caller saw an error (over-counting, never over-admission). The client's
  one retry resends a whole pipeline whose connection failed, so a connection lost after Redis
  ran its scripts charges each of them twice (over-counting again). A cancelled
  `acquire()` likewise may or may not have charged; `acquire_waiting` handles that case by
  refunding.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Self

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from infra.group_commit import GroupCommit, WriterStopped
from infra.redis import async_client

from . import _keys, _validate
from ._results import build_decision
from .clock import Clock
from .exceptions import (
    MSG_BACKEND_ERROR,
    MSG_BACKEND_TIMEOUT,
    LimiterBackendError,
    LimiterCommandError,
)
from .specs import Decision, LimitSpec, lease_spec

DEFAULT_PREFIX = "llmgw:rl"
DEFAULT_TIMEOUT = 0.1  # seconds, for the whole call (pool wait, connect, send, read)
# Bounds one pipeline's size, so one round trip's reply stays quick to read and parse.
MAX_SCRIPTS_PER_ROUND_TRIP = 128

_KIND_CODES = {"token_bucket": "tb", "sliding_window": "sw", "concurrency": "cc"}


def _read_lua(name: str) -> str:
    return resources.files(__package__).joinpath("_lua", f"{name}.lua").read_text("utf-8")


def _load_lua(name: str) -> str:
    """A script as Redis runs it: the shared prelude (``now``, ``fmt``, ``GC_MARGIN_MS``), then
    the script."""
    return _read_lua("_prelude") + _read_lua(name)


_SOURCES = {
    name: _load_lua(name) for name in ("acquire", "give_back", "lease_renew", "block")
}

type _Arg = str | int | float


@dataclass(frozen=True, slots=True)
class _ScriptRun:
    name: str
    keys: list[str]
    args: Sequence[_Arg]


class RedisLimiter:
    """A `Limiter` whose state lives in Redis.

    ``client`` may be a `Redis` or a `RedisCluster` client; it is closed by `aclose` only when
    ``owns_client`` (as `from_url` arranges). Bring your own client to share a pool, but give it
    short socket timeouts and at most one retry, as `from_url` does (`infra.redis.async_client`;
    for a cluster, its `ClusterClient`, which routes a first burst of commands correctly).

    ``clock`` replaces Redis ``TIME`` with a client clock (seconds); meant for tests that move
    a `ManualClock`. In production leave it ``None``: host clocks disagree, Redis does not.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Clock | None = None,
        owns_client: bool = False,
        max_in_flight: int = 64,
    ) -> None:
        _keys.check_prefix(prefix)
        _validate.check_seconds(timeout)
        self._client = client
        # A cluster client's node pools refuse a command past their size instead of waiting
        # for a connection: bound the commands in flight here, under the same deadline, as a
        # single server's blocking pool does.
        self._in_flight = (
            asyncio.Semaphore(max_in_flight) if isinstance(client, RedisCluster) else None
        )
        self._prefix = prefix
        self._timeout = timeout
        self._clock = clock
        self._owns_client = owns_client
        self._scripts = {name: client.register_script(src) for name, src in _SOURCES.items()}
        self._round_trips: GroupCommit[_ScriptRun, Any] | None = (
            None
            if isinstance(client, RedisCluster)
            else GroupCommit(
                self._run_together, name="llmgateway-limiter-scripts", max_batch=MAX_SCRIPTS_PER_ROUND_TRIP
            )
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = 64,
        clock: Clock | None = None,
        cluster: bool = False,
    ) -> Self:
        """Build a limiter that owns its client (closed by `aclose`): for a Redis Cluster when
        ``cluster``, ``url`` naming any one node."""
        client = async_client(
            url,
            cluster=cluster,
            timeout=timeout,
            # One immediate retry: after a Redis restart every pooled connection is stale, and
            # its first use fails although the server is back (on a cluster the retry also
            # re-reads the topology, e.g. after a failover). The deadline still bounds it.
            retries=1,
            max_connections=max_connections,
        )
        return cls(
            client,
            prefix=prefix,
            timeout=timeout,
            clock=clock,
            owns_client=True,
            max_in_flight=max_connections,
        )

    @property
    def prefix(self) -> str:
        return self._prefix

    # -- Limiter API ---------------------------------------------------------------------------

    async def acquire(self, specs: Sequence[LimitSpec], *, group: str, lease_id: str | None = None) -> Decision:
        """Charge every spec or none (a concurrency spec's slot for ``lease_id``), in one script run."""
        _validate.check_acquire(specs, group, lease_id)
        keys: list[str] = []
        args: list[_Arg] = [self._now_arg(), len(specs)]
        for spec in specs:
            keys.extend(_keys.spec_keys(self._prefix, group, spec))
            args.extend(
                (_KIND_CODES[spec.kind], spec.limit, spec.period_seconds * 1000.0, spec.cost)
            )
        if lease_id is not None:
            args.append(lease_id)
        reply = await self._run("acquire", keys, args)
        states = [(int(reply[i]), float(reply[i + 1])) for i in range(3, 3 + 2 * len(specs), 2)]
        return build_decision(
            specs,
            allowed=int(reply[0]) == 1,
            violated=int(reply[1]),
            retry_ms=float(reply[2]),
            states=states,
        )

    async def refund(self, spec: LimitSpec, amount: int, *, group: str) -> None:
        """Give back ``amount`` units (see give_back.lua)."""
        await self.give_back([(spec, amount)], group=group)

    async def give_back(
        self, refunds: Sequence[tuple[LimitSpec, int]], *, lease: tuple[str, str] | None = None, group: str
    ) -> None:
        """Refund every ``(spec, amount)`` and release ``lease`` (key, lease id): one script run."""
        for spec, amount in refunds:
            _validate.check_refund(spec, amount, group)
        if lease is not None:
            _validate.check_lease(*lease, group)
        refunds = [(spec, amount) for spec, amount in refunds if amount > 0]
        if not refunds and lease is None:
            return
        keys: list[str] = []
        args: list[_Arg] = [self._now_arg(), len(refunds)]
        for spec, amount in refunds:
            keys.extend(_keys.spec_keys(self._prefix, group, spec)[:2])
            args.extend((_KIND_CODES[spec.kind], spec.limit, spec.period_seconds * 1000.0, amount))
        if lease is not None:
            keys.append(_keys.key_for(self._prefix, group, "lease", lease[0]))
            args.append(lease[1])
        await self._run("give_back", keys, args)

    async def acquire_lease(
        self, key: str, *, limit: int, lease_id: str, ttl_seconds: float, group: str
    ) -> Decision:
        """Take one of ``limit`` slots until ``ttl_seconds`` from now; re-acquiring renews."""
        _validate.check_lease(key, lease_id, group)
        _validate.check_limit(limit)
        _validate.check_seconds(ttl_seconds)
        return await self.acquire([lease_spec(key, limit=limit, ttl_seconds=ttl_seconds)], group=group, lease_id=lease_id)

    async def renew_lease(self, key: str, lease_id: str, *, ttl_seconds: float, group: str) -> bool:
        """Extend a held lease; False if it already expired or was released."""
        _validate.check_lease(key, lease_id, group)
        _validate.check_seconds(ttl_seconds)
        keys = [_keys.key_for(self._prefix, group, "lease", key)]
        reply = await self._run(
            "lease_renew", keys, [self._now_arg(), ttl_seconds * 1000.0, lease_id]
        )
        return int(reply) == 1

    async def release_lease(self, key: str, lease_id: str, *, group: str) -> None:
        """Free the slot (a plain ZREM); unknown ids are ignored."""
        _validate.check_lease(key, lease_id, group)
        lease_key = _keys.key_for(self._prefix, group, "lease", key)
        await self._guard(self._client.zrem(lease_key, lease_id))

    async def block(self, key: str, seconds: float, *, group: str) -> None:
        """Reject specs with this key for ``seconds``, in every process; never shortens."""
        _validate.check_group(group)
        _validate.check_key(key)
        _validate.check_seconds(seconds)
        keys = [_keys.key_for(self._prefix, group, "block", key)]
        await self._run("block", keys, [self._now_arg(), seconds * 1000.0])

    async def health(self) -> dict[str, Any]:
        """PING under the same timeout; ``"down"`` with the error if it fails. Never raises."""
        started = time.perf_counter()
        try:
            await self._guard(self._client.ping())
        except LimiterBackendError as exc:
            return {"backend": "redis", "state": "down", "error": str(exc)}
        latency_ms = (time.perf_counter() - started) * 1000.0
        return {"backend": "redis", "state": "ok", "latency_ms": round(latency_ms, 3)}

    async def aclose(self) -> None:
        """Let the scripts asked for be sent (bounded); close the client if this limiter created it."""
        if self._round_trips is not None:
            await self._round_trips.aclose()
        if self._owns_client:
            await self._client.aclose()

    # -- plumbing ------------------------------------------------------------------------------

    def _now_arg(self) -> str:
        return "" if self._clock is None else repr(self._clock() * 1000.0)

    async def _run(self, name: str, keys: list[str], args: Sequence[_Arg]) -> Any:
        if self._round_trips is None:
            return await self._guard(self._scripts[name](keys=keys, args=args))
        # A caller that gives up (its deadline, its call cancelled) cancels the future: a run
        # not yet sent is then never sent.
        return await self._guard(self._round_trips.submit(_ScriptRun(name, keys, args)))

    async def _run_together(self, runs: Sequence[_ScriptRun]) -> list[Any]:
        """Send `runs` in one pipeline; each gets its reply or its error. The scripts Redis
        forgot (NOSCRIPT, after a restart) are loaded once each and their runs sent again
        together."""
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._pipelined(runs)
        except (RedisError, RedisClusterException, OSError) as error:  # no reply to read
            return [error] * len(runs)
        forgotten = [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if forgotten:
            try:
                async with asyncio.timeout(self._timeout):
                    for name in {runs[index].name for index in forgotten}:
                        await self._client.script_load(_SOURCES[name])
                    rerun = await self._pipelined([runs[index] for index in forgotten])
            except (RedisError, RedisClusterException, OSError) as error:
                rerun = [error] * len(forgotten)
            for index, reply in zip(forgotten, rerun, strict=True):
                replies[index] = reply
        return replies

    async def _pipelined(self, runs: Sequence[_ScriptRun]) -> list[Any]:
        pipeline = self._client.pipeline(transaction=False)
        for run in runs:
            pipeline.evalsha(self._scripts[run.name].sha, len(run.keys), *run.keys, *run.args)
        replies: list[Any] = await pipeline.execute(raise_on_error=False)
        return replies

    async def _guard(self, awaitable: Awaitable[Any]) -> Any:
        """Await a Redis call under the deadline; turn every failure into
        `LimiterBackendError`."""
        try:
            async with asyncio.timeout(self._timeout):
                if self._in_flight is None:
                    return await awaitable
                async with self._in_flight:
                    return await awaitable
        # first: the builtin TimeoutError is an OSError, redis-py's is a RedisError
        except (TimeoutError, RedisTimeoutError) as exc:
            raise LimiterBackendError(MSG_BACKEND_TIMEOUT) from exc
        except (ReadOnlyError, ClusterDownError, TryAgainError, OutOfMemoryError) as exc:  # answers that pass
            raise LimiterBackendError(f"{MSG_BACKEND_ERROR}: {exc}") from exc
        except ResponseError as exc:
            raise LimiterCommandError(f"{MSG_BACKEND_ERROR}: {exc}") from exc
        # RedisClusterException: no cluster node could be reached, or none serves the slot;
        # WriterStopped: the limiter was closed before the script was sent
        except (RedisError, RedisClusterException, OSError, WriterStopped) as exc:
            raise LimiterBackendError(f"{MSG_BACKEND_ERROR}: {exc}") from exc
