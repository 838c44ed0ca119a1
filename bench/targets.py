"""The benchmark's targets, as a table of data, and how each is computed from the saved JSON.

Each :class:`Target` says what it measures, in which unit, its goal and comparison, and (``how``)
where its figure comes from in the JSON that ``bench.run`` saves; ``measure`` computes it. Rows
marked ``per_serving`` are computed once per serving configuration (``configs.<name>`` in the
JSON), the others once per run. ``bench.report`` prints them; ``bench/README.md`` explains them.

Every figure is computed here from raw measurements (TTFT samples, token and stream counts, CPU
percentages over the measured window), so a change of definition redraws old runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.common import fmt, percentile

Json = dict[str, Any]

# The cost of one relayed chunk is the slope between these two loads (tokens per stream).
CHUNKS_SHORT, CHUNKS_LONG = "chunks-10-1w", "chunks-110-1w"


@dataclass(frozen=True)
class Measured:
    value: float | None  # in the target's unit; None: not measured
    baseline: str = ""  # the direct figure it is set against, or what it is made of
    note: str = ""  # what else a reader needs beside it (load generator CPU, samples...)
    also_ok: bool = True  # a second condition of the target (0 left open, settled...)


@dataclass(frozen=True)
class Target:
    id: str
    description: str
    unit: str
    goal: float
    comparison: str  # "<=" or ">="
    how: str  # where the figure comes from in the JSON
    measure: Callable[[Json, Json], Measured]  # (the run's JSON, one configuration's) -> figure
    per_serving: bool = True

    def passes(self, measured: Measured) -> bool | None:
        if measured.value is None:
            return None
        within = measured.value <= self.goal if self.comparison == "<=" else measured.value >= self.goal
        return within and measured.also_ok


# -- figures of one load (a row of configs.<name>.streaming) ---------------------------------------


def ttft(result: Json, q: float) -> float | None:
    """TTFT percentile ``q`` in ms of one load's samples (requests sent after the warm-up)."""
    return percentile(sorted(result["ttft_ms"]), q)


def added_ttft(row: Json, q: float) -> float | None:
    d, g = ttft(row["direct"], q), ttft(row["gateway"], q)
    return None if d is None or g is None else g - d


def tokens_per_s(result: Json) -> float:
    """Content tokens that arrived inside the measured window, from every stream (ended or
    not), per second: a server too slow to end a stream within the window still counts."""
    tokens = result.get("received_tokens", result["window_tokens"])
    return float(tokens) / (result["window_s"] or 1.0)


def streams_per_s(result: Json) -> float:
    return float(result["window_streams"]) / (result["window_s"] or 1.0)


def throughput_ratio(row: Json) -> float | None:
    direct = tokens_per_s(row["direct"])
    return tokens_per_s(row["gateway"]) / direct if direct else None


def cpu_ms_per_stream(result: Json, tokens_per_stream: int, who: str = "gateway") -> float | None:
    """CPU ms per stream: % of a core over the window / streams per second, the streams counted
    by their content tokens that arrived in the window (`tokens_per_s` / `tokens_per_stream`).

    Not by the streams that ended in the window: closed-loop clients that start together end
    their streams in waves, and a window a few streams long holds a wave more or less (a 4.3 s
    window of 2.2 s streams counted 79 ended streams for 95 streams' worth of tokens).
    """
    cpu, rate = result["cpu_pct"].get(who), tokens_per_s(result) / tokens_per_stream
    return None if cpu is None or not rate else 10 * cpu / rate


def chunks_per_read(result: Json) -> float | None:
    """Content chunks per read of the load generator's sockets in the window (1.0: one chunk
    per read)."""
    reads = result.get("received_reads", result.get("window_reads"))
    tokens = result.get("received_tokens", result["window_tokens"])
    return tokens / reads if reads else None


def cpu_us_per_chunk(config: Json) -> float | None:
    """Gateway CPU per relayed chunk: the slope of CPU per stream between the short and the
    long paced loads (same pacing and concurrency, one worker), in microseconds."""
    rows = config.get("streaming", {})
    short, long = rows.get(CHUNKS_SHORT), rows.get(CHUNKS_LONG)
    if not short or not long:
        return None
    a = cpu_ms_per_stream(short["gateway"], short["load"]["tokens"])
    b = cpu_ms_per_stream(long["gateway"], long["load"]["tokens"])
    tokens = long["load"]["tokens"] - short["load"]["tokens"]
    return None if a is None or b is None else 1000 * (b - a) / tokens


def _load(config: Json, key: str) -> Json | None:
    row: Json | None = config.get("streaming", {}).get(key)
    return row


def _cpu_note(result: Json) -> str:
    cpu = result["cpu_pct"]
    return (
        f"CPU % gw {fmt(cpu.get('gateway'), '.0f')} up {fmt(cpu.get('upstream'), '.0f')} "
        f"lg {fmt(cpu.get('loadgen'), '.0f')} other {fmt(cpu.get('other'), '.0f')}"
    )


# -- the measures ---------------------------------------------------------------------------------


def _added_ttft(key: str, q: float) -> Callable[[Json, Json], Measured]:
    def measure(run: Json, config: Json) -> Measured:
        row = _load(config, key)
        if row is None:
            return Measured(None)
        d, g = row["direct"], row["gateway"]
        return Measured(
            added_ttft(row, q),
            baseline=f"direct p{q:g} {fmt(ttft(d, q), '.2f')} ms",
            note=f"{len(g['ttft_ms'])} samples; {_cpu_note(g)}",
            also_ok=g["error_count"] == 0,
        )

    return measure


def _throughput(key: str) -> Callable[[Json, Json], Measured]:
    def measure(run: Json, config: Json) -> Measured:
        row = _load(config, key)
        if row is None:
            return Measured(None)
        d, g = row["direct"], row["gateway"]
        return Measured(
            throughput_ratio(row),
            baseline=f"direct {tokens_per_s(d):,.0f} tok/s, gw {tokens_per_s(g):,.0f}",
            note=f"errors {g['error_count']}, stalled {g['unfinished'] + g['gap_stalled']}, "
            f"chunks/read d {fmt(chunks_per_read(d), '.2f')} g {fmt(chunks_per_read(g), '.2f')}; "
            + _cpu_note(g),
            also_ok=g["error_count"] == 0,
        )

    return measure


def _cpu_per_chunk(run: Json, config: Json) -> Measured:
    rows = config.get("streaming", {})
    short, long = rows.get(CHUNKS_SHORT), rows.get(CHUNKS_LONG)
    if short is None or long is None:  # a run of one of the two loads: no slope
        return Measured(None)
    return Measured(
        cpu_us_per_chunk(config),
        baseline=f"slope of gw CPU/stream, {short['load']['tokens']} vs "
        f"{long['load']['tokens']} tokens, {long['load']['concurrency']} streams",
        note=f"chunks/read d {fmt(chunks_per_read(long['direct']), '.2f')} "
        f"g {fmt(chunks_per_read(long['gateway']), '.2f')}; {_cpu_note(long['gateway'])}",
    )


def _cpu_per_stream(run: Json, config: Json) -> Measured:
    row = _load(config, "0ms-10")
    if row is None:
        return Measured(None)
    g, tokens = row["gateway"], row["load"]["tokens"]
    return Measured(
        cpu_ms_per_stream(g, tokens),
        baseline=f"upstream {fmt(cpu_ms_per_stream(row['direct'], tokens, 'upstream'), '.2f')} ms/stream direct",
        note=f"{row['load']['tokens']} tokens, {row['load']['concurrency']} clients; {_cpu_note(g)}",
    )


def _storm(run: Json, config: Json) -> Measured:
    storm = config.get("storm")
    if not storm:
        return Measured(None)
    return Measured(
        storm["close_p99_ms"],
        baseline=f"p50 {fmt(storm['close_p50_ms'], '.1f')} ms, {storm['clients']} clients",
        note=f"left open {storm['left_open']}, never reached {storm['never_reached_upstream']}, "
        f"ledger rows {storm['ledger_rows']}/{storm['clients']}",
        also_ok=storm["left_open"] == 0
        and storm["never_reached_upstream"] == 0
        and storm["ledger_rows"] == storm["clients"],
    )


def _slow_readers(run: Json, config: Json) -> Measured:
    slow = config.get("memory", {}).get("slow_readers")
    if not slow:
        return Measured(None)
    chunks = slow["close"]["upstream_chunks_sent"]
    total = chunks.get("total")
    per_client = total / max(1, slow["clients"]) if total is not None else None
    return Measured(
        slow["growth_mb"],
        baseline=f"RSS {slow['rss_before_mb']} -> {slow['rss_after_mb']} MB, "
        + ("settled" if slow["settled"] else "NOT settled")
        + f" after {slow['observed_s']} s",
        note=f"upstream tokens read for them {fmt(total, ',.0f')} ({fmt(per_client, ',.0f')} per client, "
        f"max {fmt(chunks.get('max'), ',.0f')}); relayed to clients {slow.get('relayed_to_clients_mb')} MB",
        also_ok=bool(slow["settled"]),
    )


def _calls(run: Json, config: Json) -> Measured:
    calls = run.get("calls")
    if not calls or calls.get("status") != "ok":
        reason = (calls or {}).get("reason", "not run")
        return Measured(None, note=f"n/a: {reason}")
    gateway, direct, bare = calls.get("gateway", {}), calls.get("direct") or {}, calls.get("bare_io") or {}
    ledger = calls.get("ledger", {})
    return Measured(
        gateway.get("calls_per_second"),
        baseline=f"direct {fmt(direct.get('calls_per_second'), ',.0f')}/s, bare I/O "
        f"{fmt(bare.get('calls_per_second'), ',.0f')}/s at {fmt(bare.get('server_cpu_ms_per_call'), '.2f')} ms/call "
        f"(gateway {fmt(calls.get('gateway_vs_bare_io'), '.2f')}x of it)",
        note=f"p99 {fmt(gateway.get('p99_ms'), '.1f')} ms; CPU ms/call gw {fmt(gateway.get('gateway_cpu_ms_per_call'), '.2f')} "
        f"pg {fmt(gateway.get('postgres_cpu_ms_per_call'), '.2f')} redis {fmt(gateway.get('redis_cpu_ms_per_call'), '.2f')}; "
        f"steal {fmt(gateway.get('steal_cpu_percent'), '.0f')}%; "
        f"batch ms (items) holds {fmt(gateway.get('hold_batch_ms'), '.1f')} ({fmt(gateway.get('hold_batch_items'), '.1f')}) "
        f"ledger {fmt(gateway.get('ledger_batch_ms'), '.1f')} ({fmt(gateway.get('ledger_batch_items'), '.1f')}) "
        f"limiter {fmt(gateway.get('limiter_batch_ms'), '.1f')} ({fmt(gateway.get('limiter_batch_items'), '.1f')}); "
        f"ledger {'ok' if ledger.get('ok') else 'NOT ok'}",
        also_ok=bool(ledger.get("ok", True)),
    )


TARGETS: tuple[Target, ...] = (
    Target(
        "ttft-p50-1",
        "added TTFT p50, 1 client, 0 ms between tokens",
        "ms",
        1.0,
        "<=",
        "streaming['0ms-1']: p50 of gateway.ttft_ms - p50 of direct.ttft_ms",
        _added_ttft("0ms-1", 50),
    ),
    Target(
        "ttft-p99-100",
        "added TTFT p99, 100 streams, 20 ms",
        "ms",
        3.0,
        "<=",
        "streaming['20ms-100']: p99 of gateway.ttft_ms - p99 of direct.ttft_ms",
        _added_ttft("20ms-100", 99),
    ),
    Target(
        "throughput-1000",
        "throughput vs direct, 1,000 streams, 20 ms",
        "x",
        0.9,
        ">=",
        "streaming['20ms-1000']: gateway received_tokens/window_s over direct's",
        _throughput("20ms-1000"),
    ),
    Target(
        "throughput-300-1w",
        "throughput vs direct, 300 streams, 20 ms, one worker",
        "x",
        0.95,
        ">=",
        "streaming['20ms-300-1w'] (a one-worker gateway): as above",
        _throughput("20ms-300-1w"),
    ),
    Target(
        "cpu-per-chunk-1w",
        "gateway CPU per relayed chunk, paced one per read, one worker",
        "us",
        30.0,
        "<=",
        "streaming['chunks-10-1w'] and ['chunks-110-1w']: (CPU ms/stream long - short) / 100 "
        "tokens, CPU ms/stream = 10 * cpu_pct.gateway / (window_streams/window_s)",
        _cpu_per_chunk,
    ),
    Target(
        "cpu-per-stream",
        "gateway CPU per 100-token stream, 0 ms",
        "ms",
        1.0,
        "<=",
        "streaming['0ms-10']: 10 * cpu_pct.gateway / (window_streams/window_s)",
        _cpu_per_stream,
    ),
    Target(
        "disconnect-500",
        "disconnect -> upstream close p99, 500 at once (and 0 left open)",
        "ms",
        20.0,
        "<=",
        "storm: close_p99_ms (upstream closed_at - client close), left_open == 0",
        _storm,
    ),
    Target(
        "slow-readers-100",
        "RSS growth, 100 non-reading clients (settled)",
        "MB",
        32.0,
        "<=",
        "memory.slow_readers: growth_mb, settled; upstream tokens read = close.upstream_chunks_sent",
        _slow_readers,
    ),
    Target(
        "ledger-calls",
        "ledger: short non-stream calls/s, full path (PostgreSQL, Redis, 2 workers)",
        "/s",
        1000.0,
        ">=",
        "calls (bench/calls_per_second.py --json): gateway.calls_per_second",
        _calls,
        per_serving=False,
    ),
)


def evaluate(results: Json) -> list[Json]:
    """One row per target and serving configuration (per run for the others)."""
    rows: list[Json] = []
    configs: Json = results.get("configs", {})
    for target in TARGETS:
        scopes = list(configs.items()) if target.per_serving else [("full path", {})]
        for name, config in scopes:
            if target.per_serving and "serving" in config and len(config) == 1:
                measured = Measured(None, note=f"n/a: {config['serving'].get('why_not')}")
            else:
                measured = target.measure(results, config)
            passed = target.passes(measured)
            rows.append(
                {
                    "id": target.id,
                    "description": target.description,
                    "serving": name,
                    "value": measured.value,
                    "unit": target.unit,
                    "goal": f"{target.comparison} {target.goal:g} {target.unit}".replace(" x", "x"),
                    "status": "n/a" if passed is None else ("PASS" if passed else "MISS"),
                    "baseline": measured.baseline,
                    "note": measured.note,
                }
            )
    return rows
