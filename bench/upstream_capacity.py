"""How much the fake upstream can send: direct loads only, no gateway.

    python -m bench.upstream_capacity [--seconds 5] [--cwd DIR --module MOD]

Runs the load generator straight against the fake upstream (in its own process) and prints, per
load, the content chunks per second it delivered, the fake's CPU (and per chunk), the load
generator's CPU, what the rest of the machine used meanwhile, and chunks per read. If the fake
is near a core at a load, the benchmark's direct baseline at that load measures the fake, not a
ceiling. ``--cwd``/``--module`` run another checkout's upstream host (e.g. an older fake), to
compare two versions on the same machine in one sitting.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from bench.common import HOST, ROOT, log, process_env
from bench.run import BODY, CHAT_PATH, LAUNCH_MARGIN, Load, LoadGen
from testbed.samplers import CpuWindow, MachineCpuWindow
from testbed.upstream_host import UpstreamHost

LOADS = (
    Load("0ms-100", 0.0, 100, 5.0),
    Load("0ms-1000", 0.0, 1000, 6.0),
    Load("20ms-1000", 20.0, 1000, 8.0),
)


class _OtherHost(UpstreamHost):
    """An upstream host of another checkout (same stdin/stdout protocol)."""

    def __init__(self, env: dict[str, str], cwd: str, module: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", module], cwd=cwd, env={**env, "PYTHONPATH": cwd},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        from testbed.upstream_host import read_json_line

        assert self.process.stdout is not None
        self.base_url = read_json_line(self.process.stdout, 20, "the fake upstream")["base_url"]
        self.port = int(self.base_url.rsplit(":", 1)[1].split("/", 1)[0])


def measure(upstream: UpstreamHost, spec: Load, env: dict[str, str]) -> dict[str, Any]:
    upstream.configure(tokens=spec.tokens, inter_token_delay=spec.delay_ms / 1000)
    start_at = time.monotonic() + LAUNCH_MARGIN
    generator = LoadGen(
        {"kind": "load", "host": HOST, "port": upstream.port, "path": CHAT_PATH, "headers": {},
         "body": BODY, "concurrency": spec.concurrency, "start_at": start_at, "duration": spec.duration,
         "warmup": spec.warmup, "stagger": spec.stagger, "drain": 20, "expect_tokens": spec.tokens},
        env,
    )  # fmt: skip
    windows = [CpuWindow([upstream.pid]), CpuWindow([generator.process.pid]), MachineCpuWindow()]
    time.sleep(max(0.0, start_at + spec.warmup - time.monotonic()))
    for window in windows:
        window.start()
    time.sleep(max(0.0, start_at + spec.duration - time.monotonic()))
    up, lg, machine = (window.stop() or 0.0 for window in windows)
    result = generator.read(spec.duration + 80)
    generator.finish()
    chunks = result["window_tokens"] / result["window_s"]
    return {
        "load": spec.key,
        "chunks_per_s": round(chunks),
        "upstream_cpu_pct": round(up, 1),
        "upstream_us_per_chunk": round(up * 1e4 / chunks, 2) if chunks else None,
        "loadgen_cpu_pct": round(lg, 1),
        "other_cpu_pct": round(max(0.0, machine - up - lg), 1),
        "chunks_per_read": round(result["window_tokens"] / result["window_reads"], 2) if result["window_reads"] else None,
        "errors": result["error_count"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream_capacity", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--cwd", default=str(ROOT), help="checkout whose upstream host to run (default: this one)")
    parser.add_argument("--module", default="testbed.upstream_host", help="its host module")
    parser.add_argument("--loads", default=",".join(spec.key for spec in LOADS), help="which loads")
    args = parser.parse_args(argv)
    env = process_env()
    if args.cwd == str(ROOT) and args.module == "testbed.upstream_host":
        upstream: UpstreamHost = UpstreamHost(env)
    else:
        upstream = _OtherHost(env, args.cwd, args.module)
    try:
        for spec in LOADS:
            if spec.key in args.loads.split(","):
                row = measure(upstream, spec, env)
                log(json.dumps(row))
                print(json.dumps(row), flush=True)
    finally:
        upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
