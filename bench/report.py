"""Draw the benchmark's report from a saved run, without measuring again.

    python -m bench.report [FILE]        (default bench/results/latest.json)

``bench.run`` saves every raw measurement as JSON and then prints this report from the file it
saved; the figures of the targets table are computed by ``bench.targets`` from the raw
measurements, so a run saved earlier is redrawn with today's definitions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import RESULTS, fmt, percentile
from bench.targets import (
    chunks_per_read,
    cpu_ms_per_stream,
    cpu_us_per_chunk,
    evaluate,
    streams_per_s,
    throughput_ratio,
    tokens_per_s,
    ttft,
)

Json = dict[str, Any]


def _streaming(name: str, config: Json) -> list[str]:
    rows: Json = config.get("streaming") or {}
    if not rows:
        return []
    lines = [
        f"[{name}] Time to first token, ms (closed loop; added = gateway percentile - direct percentile)",
        f"{'load':<14} {'workers':>7} | {'direct p50/p99':>17} | {'gateway p50/p95/p99':>26} | "
        f"{'added p50/p99':>17} | {'samples d/g':>11} | {'gw header p50':>13}",
    ]
    for key, row in rows.items():
        d, g = row["direct"], row["gateway"]
        added = [None if ttft(d, q) is None or ttft(g, q) is None else ttft(g, q) - ttft(d, q) for q in (50, 99)]  # type: ignore[operator]
        header = percentile(sorted(g.get("overhead_ms") or []), 50)
        lines.append(
            f"{key:<14} {g.get('gateway_workers', '?'):>7} | {fmt(ttft(d, 50), '.3f'):>8}/{fmt(ttft(d, 99), '.3f'):<8} | "
            f"{fmt(ttft(g, 50), '.2f'):>8}/{fmt(ttft(g, 95), '.2f'):>8}/{fmt(ttft(g, 99), '.2f'):<8} | "
            f"{fmt(added[0], '.2f'):>8}/{fmt(added[1], '.2f'):<8} | {len(d['ttft_ms']):>5}/{len(g['ttft_ms']):<5} | "
            f"{fmt(header, '.2f'):>13}"
        )
    lines += [
        "",
        f"[{name}] Throughput (content tokens received inside the window), health and CPU (% of one core over the window)",
        f"{'load':<14} | {'direct tok/s':>12} {'gw tok/s':>9} {'ratio':>6} {'gw str/s':>8} | {'stalled':>7} {'errors':>6} "
        f"{'max gap s':>9} | {'chunks/read d/g':>15} | {'gw CPU ms/str':>13} | {'gateway run: gw(sys)/up/lg/other/steal':>38} | "
        f"{'direct run: up/lg/other/steal':>29}",
    ]
    for key, row in rows.items():
        d, g = row["direct"], row["gateway"]
        gc, dc = g["cpu_pct"], d["cpu_pct"]
        lines.append(
            f"{key:<14} | {tokens_per_s(d):>12,.0f} {tokens_per_s(g):>9,.0f} {fmt(throughput_ratio(row), '.3f'):>6} "
            f"{streams_per_s(g):>8.1f} | {g['unfinished'] + g['gap_stalled']:>7} {g['error_count']:>6} {g['max_gap_s']:>9.2f} | "
            f"{fmt(chunks_per_read(d), '.2f'):>7}/{fmt(chunks_per_read(g), '.2f'):<7} | "
            f"{fmt(cpu_ms_per_stream(g, row['load']['tokens']), '.2f'):>13} | "
            f"{fmt(gc.get('gateway'), '.0f'):>20}({fmt(gc.get('gateway_sys'), '.0f')})/{fmt(gc.get('upstream'), '.0f')}/"
            f"{fmt(gc.get('loadgen'), '.0f')}/{fmt(gc.get('other'), '.0f')}/{fmt(gc.get('steal'), '.0f'):<6} | "
            f"{fmt(dc.get('upstream'), '.0f'):>19}/{fmt(dc.get('loadgen'), '.0f')}/{fmt(dc.get('other'), '.0f')}/{fmt(dc.get('steal'), '.0f'):<5}"
        )
    errors: dict[str, int] = {}
    for row in rows.values():
        for message, count in row["gateway"]["errors"].items():
            errors[message] = errors.get(message, 0) + count
    if errors:
        lines.append("  gateway errors: " + "; ".join(f"{count} x {message}" for message, count in errors.items()))
    chunk = cpu_us_per_chunk(config)
    if chunk is not None:
        lines.append(f"  gateway CPU per relayed chunk (slope of CPU/stream, one worker): {chunk:.1f} us")
    return [*lines, ""]


def _memory(name: str, memory: Json | None) -> list[str]:
    if not memory:
        return []
    lines = [f"[{name}] Memory (RSS of the gateway worker processes)"]
    idle = memory.get("idle")
    if idle:
        lines.append(
            f"  idle open streams: {idle['ready']}/{idle['streams']} open (first token received, upstream stalled): "
            f"RSS {idle['rss_before_mb']} -> {idle['rss_during_mb']} MB = {idle['per_stream_kb']} KB per stream; "
            f"worker threads {idle['worker_threads'][0]} -> {idle['worker_threads'][1]}, fds {idle['worker_fds'][0]} -> "
            f"{idle['worker_fds'][1]}; after the clients left, upstream closed within p99 "
            f"{fmt(idle['close']['close_p99_ms'], '.1f')} ms, {idle['close']['left_open']} left open"
        )
    slow = memory.get("slow_readers")
    if slow:
        kernel = slow.get("kernel_queues") or {}
        to_clients = kernel.get("gateway_to_clients") or {}
        from_upstream = [kernel.get(k) or {} for k in ("upstream_to_gateway_upstream_side", "upstream_to_gateway_gateway_side")]
        chunks = slow["close"]["upstream_chunks_sent"]
        lines.append(
            f"  non-reading clients: {slow['ready']}/{slow['clients']} stopped reading after "
            f"{slow['read_bytes_before_pause'] // 1024} KB of an endless stream: RSS {slow['rss_before_mb']} -> "
            f"{slow['rss_after_mb']} MB (+{slow['growth_mb']} MB, {'settled' if slow['settled'] else 'NOT settled'} after "
            f"{slow['observed_s']} s); gateway CPU meanwhile {fmt(slow['gateway_cpu_pct_while_paused'], '.0f')}%; "
            f"upstream tokens read for them {fmt(chunks.get('total'), ',.0f')} (p50 {fmt(chunks.get('p50'), ',.0f')}, max "
            f"{fmt(chunks.get('max'), ',.0f')} per client); relayed to the clients {slow.get('relayed_to_clients_mb')} MB; "
            f"kernel queues gateway->clients {to_clients.get('send_q_mb', 'n/a')} MB, upstream->gateway "
            f"{sum(q.get('send_q_mb', 0) + q.get('recv_q_mb', 0) for q in from_upstream):.1f} MB"
        )
    return [*lines, ""]


def _storm(name: str, storm: Json | None) -> list[str]:
    if not storm:
        return []
    return [
        f"[{name}] Disconnect storm: {storm['ready']}/{storm['clients']} streams mid-stream ({storm['delay_ms']:g} ms/token; "
        f"gateway CPU before {fmt(storm['gateway_cpu_pct_before'], '.0f')}%), all clients closed at once; the upstream saw "
        f"the close after p50 {fmt(storm['close_p50_ms'], '.1f')} / p99 {fmt(storm['close_p99_ms'], '.1f')} / max "
        f"{fmt(storm['close_max_ms'], '.1f')} ms; left open {storm['left_open']}, never reached upstream "
        f"{storm['never_reached_upstream']}; ledger rows {storm['ledger_rows']} {storm['ledger_rows_by_status']}",
        "",
    ]


def _unknown(value: object) -> str:
    return "?" if value is None else str(value)


def _accuracy(name: str, accuracy: Json | None) -> list[str]:
    if not accuracy:
        return []
    if accuracy.get("status") != "ok":
        return [f"[{name}] Limiter accuracy: n/a ({accuracy.get('reason')})", ""]
    shared = "a Redis Cluster" if accuracy["rows"][0].get("redis") == "cluster" else "Redis"
    lines = [f"[{name}] Limiter accuracy (one key, gateway processes sharing {shared}, every request at once)"]
    for r in accuracy["rows"]:
        lines.append(
            f"  {r['algorithm']:<15} {r['gateways']} gateways, {r['rpm']} RPM, {r['requests']} requests in "
            f"{r['burst_s']:.2f} s: admitted {r['admitted']} (at most {r['allowed_max']}), 429 {r['rejected_429']} "
            f"({r['429_without_retry_after']} without Retry-After), other {r['other']}, "
            f"decided without Redis {_unknown(r.get('decided_without_redis'))}"
        )
    return [*lines, ""]


def _limiter(limiter: Json | None) -> list[str]:
    if not limiter:
        return []
    if limiter.get("status") != "ok":
        return [f"Limiter: n/a ({limiter.get('reason')})", ""]
    lines = [f"Limiter (bench/limiter.py, {limiter['seconds']:g} s per scenario)"]
    for r in limiter["rows"]:
        lines.append(
            f"  {r['backend']:<10} {r['scenario']:<15} conc {r['concurrency']:>3}: p50 {r['p50_ms']:.3f} ms, "
            f"p99 {r['p99_ms']:.3f} ms, {r['decisions_per_s']:,.0f} decisions/s, errors {r['errors']}"
        )
    return [*lines, ""]


def render(results: Json) -> str:
    meta = results["meta"]
    dirty = f" (+{meta['git_dirty_files']} modified files)" if meta.get("git_dirty_files") else ""
    lines = [
        f"llmgateway benchmark {meta['started']}, git {meta['git']}{dirty}; {meta['cpus']} CPUs, Python "
        f"{meta['python']}; {'QUICK run, ' if meta['quick'] else ''}took {meta.get('elapsed_s', '?')} s",
    ]
    configs: Json = results.get("configs", {})
    for name, config in configs.items():
        serving = config["serving"]
        state = f"skipped: {serving['why_not']}" if serving.get("why_not") else (
            f"{serving['workers']} worker(s), {'Redis' if serving['redis_url'] else 'in-process limiter'}, "
            f"{'PostgreSQL' if serving['postgres_server'] else 'SQLite'}; took {config.get('elapsed_s', '?')} s; "
            f"machine busy before {fmt(config.get('machine_busy_before_pct'), '.0f')}%"
        )
        lines.append(f"  serving {name}: {state}")
    lines.append("")
    for name, config in configs.items():
        lines += _streaming(name, config)
        lines += _memory(name, config.get("memory"))
        lines += _storm(name, config.get("storm"))
        lines += _accuracy(name, config.get("accuracy"))
        ledger = config.get("ledger")
        if ledger:
            lines += [f"[{name}] Ledger: {ledger['rows']} usage rows for {ledger['gateway_requests']} chat requests sent", ""]
        log = config.get("gateway_log") or {}
        if log.get("errors") or log.get("tracebacks"):
            lines += [f"[{name}] Gateway log: {log['errors']} ERROR lines, {log['tracebacks']} tracebacks; first: {log.get('first_error', '')}", ""]
    lines += _limiter(results.get("limiter"))
    calls = results.get("calls")
    if calls and calls.get("status") == "ok":
        lines += [f"Ledger calls/s (bench/calls_per_second.py): {json.dumps({k: calls[k] for k in ('direct', 'bare_io', 'gateway', 'gateway_vs_bare_io', 'turns', 'ledger') if k in calls})}", ""]
    if "chaos" in results:
        from bench import chaos

        lines += chaos.render(results["chaos"])
    admin = results.get("admin")
    if admin:
        from bench import admin_pages

        lines += [*admin_pages.table(admin), ""] if admin.get("status") == "ok" else [f"Admin pages: n/a ({admin.get('reason')})", ""]
    others = _streaming_cpu(configs, "other")
    if others and (median := percentile(others, 50) or 0.0) > 20:
        lines += [
            f"WARNING: other processes on this machine used a median {median:.0f}% of a core during the streaming "
            "loads (column 'other'): the figures are pessimistic. Rerun on a quiet machine (--wait-quiet).",
            "",
        ]
    stolen = _streaming_cpu(configs, "steal")
    if stolen and (median := percentile(stolen, 50) or 0.0) > 10:
        lines += [
            f"WARNING: the hypervisor gave a median {median:.0f}% of a core (max {stolen[-1]:.0f}%) of this virtual "
            "machine's CPU to other guests during the streaming loads (steal time): every latency and throughput "
            "figure is pessimistic, the CPU figures much less so. Rerun when the host is quieter.",
            "",
        ]
    lines += _targets(results)
    return "\n".join(lines)


def _streaming_cpu(configs: Json, name: str) -> list[float]:
    """One CPU figure (`other`, `steal`) of every streaming load's runs, direct and gateway, sorted."""
    return sorted(
        value
        for config in configs.values()
        for row in (config.get("streaming") or {}).values()
        for value in (row["gateway"]["cpu_pct"].get(name), row["direct"]["cpu_pct"].get(name))
        if value is not None
    )


def _targets(results: Json) -> list[str]:
    rows = evaluate(results)
    lines = [f"{'Target':<66} {'serving':<10} {'measured':>10} {'goal':>10} {'status':<6} baseline; notes"]
    for row in rows:
        value = row["value"]
        measured = "n/a" if value is None else f"{value:,.2f} {row['unit']}".replace(" x", "x")
        note = "; ".join(part for part in (row["baseline"], row["note"]) if part)
        lines.append(f"{row['description']:<66} {row['serving']:<10} {measured:>10} {row['goal']:>10} {row['status']:<6} {note}")
    extra = []
    for config in results.get("configs", {}).values():
        accuracy = config.get("accuracy")
        if accuracy and accuracy.get("status") == "ok":
            acc = accuracy["rows"]
            shared = "a Redis Cluster" if acc[0].get("redis") == "cluster" else "Redis"
            exact = all(
                r["over_admitted"] == 0 and r["under_admitted"] == 0 and r["other"] == 0 and r["429_without_retry_after"] == 0
                for r in acc
            )
            measured = ", ".join(
                f"{r['algorithm']} {r['admitted']}/{r['rpm']} (max {r['allowed_max']}, {_unknown(r.get('decided_without_redis'))} without Redis)"
                for r in acc
            )
            extra.append((f"limiter accuracy, {acc[0]['gateways']} gateway processes sharing {shared}", measured, "0 over-admitted", exact))
    if "chaos" in results:
        from bench import chaos

        extra.append(chaos.target(results["chaos"]))
    admin = results.get("admin")
    if admin and admin.get("status") == "ok":
        from bench import admin_pages

        extra.append(admin_pages.target(admin))
    limiter = results.get("limiter")
    if limiter and limiter.get("status") == "ok":
        single = min(r["concurrency"] for r in limiter["rows"])
        for backend in dict.fromkeys(r["backend"] for r in limiter["rows"]):
            worst = max((r for r in limiter["rows"] if r["backend"] == backend and r["concurrency"] == single), key=lambda r: r["p99_ms"])
            extra.append((f"limiter decision p99, {backend}, {single} caller ({worst['scenario']})", f"{worst['p99_ms']:.3f} ms", "<= 1 ms", worst["p99_ms"] <= 1.0))
    if extra:
        lines += ["", "Other acceptance checks"]
        for name, measured, goal, ok in extra:
            status = "n/a" if ok is None else ("PASS" if ok else "MISS")
            lines.append(f"  {name:<64} {measured:<36} {goal:<22} {status}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("file", nargs="?", type=Path, default=RESULTS / "latest.json", help="a run saved by bench.run")
    args = parser.parse_args(argv)
    print(render(json.loads(args.file.read_text())))
    print(f"\nJSON: {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
