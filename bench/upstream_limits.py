"""Does the gateway learn an upstream's real limits under load? (issue 13's load benchmark)

    python -m bench.upstream_limits [--duration SECONDS] [--rpm N] [--tpm N] [--no-headers] [--workers N]

On 127.0.0.1 only, it starts a world of its own: a redis-server on a free port, a database (a
SQLite file, or with ``--postgres`` a throwaway PostgreSQL database), the fake upstream
(:class:`testbed.fake_upstream.FakeUpstream`, in a thread of this process) enforcing ``--rpm``
requests (and ``--tpm`` tokens) per sliding minute and answering 429 past it, and the gateway
(Granian, ``--workers`` workers sharing that Redis) routing ``gpt-4o-mini`` to the fake, told a
deliberately wrong published limit (``--published-factor`` times the real one, 1.5 by default)
so that it has to learn. Then Locust (``bench/locust_upstream_limits.py``, headless, in its own
process) offers ``--offered-factor`` (5) times the fake's limit for ``--duration`` seconds, and
it prints and saves as JSON:

- the client calls and what they got: 200; 429 ``upstream_rate_limited`` (an upstream 429 that
  reached the client: these count against the goal of under 1%); 429 ``upstream_capacity`` (the
  gateway's own refusal after waiting ``UPSTREAM_MAX_WAIT`` for room under the learned limit: the
  load is 5x what the upstream takes, so most calls must be turned away, and these do not count);
  anything else;
- the upstream's side: chat requests, admitted, answered 429 (``rejected_429``), and how many of
  those 429s the gateway's retries absorbed (did not reach a client);
- the learned limit, ``llmgateway_upstream_learned_limit{deployment="openai/gpt-4o-mini",unit=...}``
  read from ``/metrics`` every few seconds: where it started, where it settled (the median over
  the last 20% of the run) against the fake's real limit (the goal: within 10%), and its path.

It exits 1 when a goal is missed (2 when the run itself failed). ``bench/README.md`` says how to
read it. The CI variant is ``tests/gating/test_learned_limits_load.py``, which shares this
module's accounting (:func:`outcome_of`, :class:`Tally`, :func:`evaluate`) and drives its short
load with httpx instead of Locust (the test extra does not install Locust).

Choices that may look odd:

- The load is open-loop in effect: each Locust user starts one call every ``pacing`` seconds
  (``constant_pacing``), longer than a call may last (``UPSTREAM_MAX_WAIT`` +
  ``UPSTREAM_RETRY_DEADLINE`` + a margin), and users are spawned at the offered rate, so the
  calls arrive at a steady rate whatever the gateway answers. A closed loop would slow down as
  the gateway makes calls wait, and offer less than 5x.
- The learned limit is judged where it settled, not at one instant: after a cut it recovers a
  little every minute (AIMD), so a single reading depends on when it was taken.
- The gateway's Redis is a redis-server of the run's own, so a learned limit never carries over
  from an earlier run (or into a later one).
- This module imports the testbed's launchers only when the benchmark runs, so the test suite
  can import its accounting without them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LOCUSTFILE = ROOT / "bench" / "locust_upstream_limits.py"
MODEL = "gpt-4o-mini"
DEPLOYMENT = f"openai/{MODEL}"  # the learned limit's `deployment` label: provider/upstream model
LEARNED_GAUGE = "llmgateway_upstream_learned_limit"
UNITS = ("rpm", "tpm")

# How a client call ended. An upstream 429 that reached the client has the code
# `upstream_rate_limited`; the gateway's own refusal after waiting for room has `upstream_capacity`.
OK = "ok"
UPSTREAM_429 = "upstream_429"
CAPACITY_429 = "capacity_429"
OTHER = "other"
UPSTREAM_RATE_LIMITED = "upstream_rate_limited"
UPSTREAM_CAPACITY = "upstream_capacity"

GOAL_UPSTREAM_429_SHARE = 0.01  # of client calls
GOAL_LEARNED_ERROR = 0.10  # of the fake's real limit
SETTLED_SHARE = 0.2  # the learned limit is judged over this last share of the run
TIMELINE_BUCKET = 10  # seconds per row of the client timeline
PROMPT = "In one word: is the sky blue?"


# -- the accounting (shared with the CI test) -------------------------------------------------------


def error_code(body: bytes) -> str | None:
    """The ``code`` of an OpenAI error body, or of the first SSE ``{"error": ...}`` event in it."""
    text = body.strip()
    candidates = [text]
    if text.startswith(b"data:") or b'\ndata: {"error"' in text:
        candidates = [line[5:].strip() for line in text.splitlines() if line.startswith(b"data:")]
    for candidate in candidates:
        try:
            decoded = json.loads(candidate)
        except ValueError:
            continue
        error = decoded.get("error") if isinstance(decoded, dict) else None
        if isinstance(error, dict):
            code = error.get("code") or error.get("type")
            return str(code) if code is not None else None
    return None


def outcome_of(status: int, code: str | None) -> str:
    """Sort one client call: OK, UPSTREAM_429 (counts against the goal), CAPACITY_429, OTHER.

    A 200 whose stream carried an error event is sorted by that event's code (a rate limit that
    started upstream still counts if it arrived that way).
    """
    if code == UPSTREAM_RATE_LIMITED:
        return UPSTREAM_429
    if status == 429 and code == UPSTREAM_CAPACITY:
        return CAPACITY_429
    if status == 200 and code is None:
        return OK
    return OTHER


@dataclass
class Tally:
    """The client calls of one run: outcomes, the other answers by status and code, a timeline."""

    outcomes: Counter[str] = field(default_factory=Counter)
    others: Counter[str] = field(default_factory=Counter)
    timeline: dict[int, Counter[str]] = field(default_factory=dict)  # bucket start (s) -> outcomes
    longest: dict[str, float] = field(default_factory=dict)  # outcome -> its longest call, s
    examples: dict[str, str] = field(default_factory=dict)  # other answer -> its first message

    @property
    def calls(self) -> int:
        return sum(self.outcomes.values())

    def add(
        self, status: int, code: str | None, *, at: float, took: float, body: bytes = b""
    ) -> str:
        """Count one call that ended ``at`` seconds into the run after ``took`` seconds; return
        its outcome. ``body`` (its error, if any) is kept for the first answer of each other kind."""
        outcome = outcome_of(status, code)
        self.outcomes[outcome] += 1
        self.longest[outcome] = max(self.longest.get(outcome, 0.0), took)
        if outcome == OTHER:
            label = f"{status} {code or ''}".strip()
            self.others[label] += 1
            self.examples.setdefault(label, body[:300].decode("utf-8", "replace"))
        bucket = int(max(at, 0.0) // TIMELINE_BUCKET) * TIMELINE_BUCKET
        self.timeline.setdefault(bucket, Counter())[outcome] += 1
        return outcome

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "outcomes": {
                name: self.outcomes[name] for name in (OK, UPSTREAM_429, CAPACITY_429, OTHER)
            },
            "others": dict(self.others),
            "longest_s": {name: round(value, 2) for name, value in self.longest.items()},
            "examples": self.examples,
            "timeline": [
                {
                    "from_s": start,
                    **{name: counts[name] for name in (OK, UPSTREAM_429, CAPACITY_429, OTHER)},
                }
                for start, counts in sorted(self.timeline.items())
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tally:
        tally = cls(
            outcomes=Counter(data["outcomes"]),
            others=Counter(data["others"]),
            longest=dict(data["longest_s"]),
            examples=dict(data["examples"]),
        )
        for row in data["timeline"]:
            start = row["from_s"]
            tally.timeline[start] = Counter({k: v for k, v in row.items() if k != "from_s"})
        return tally


def learned_from_metrics(text: str, deployment: str = DEPLOYMENT) -> dict[str, list[float]]:
    """Every sample of the learned-limit gauge for ``deployment`` in a ``/metrics`` page, by unit
    (several when each worker reports its own)."""
    found: dict[str, list[float]] = {unit: [] for unit in UNITS}
    for family in text_string_to_metric_families(text):
        if family.name != LEARNED_GAUGE:
            continue
        for sample in family.samples:
            unit = sample.labels.get("unit", "")
            if sample.labels.get("deployment") == deployment and unit in found:
                found[unit].append(sample.value)
    return found


def read_learned(
    base_url: str, token: str, *, reads: int = 3, deployment: str = DEPLOYMENT
) -> dict[str, float | None]:
    """The learned limits now: the median of every sample in ``reads`` reads of ``/metrics``
    (each read may be answered by another worker; the value is shared in Redis, so they agree
    but for a worker that has not refreshed it in the last second)."""
    values: dict[str, list[float]] = {unit: [] for unit in UNITS}
    with httpx.Client(timeout=5.0) as client:
        for _ in range(reads):
            try:
                response = client.get(
                    f"{base_url}/metrics", headers={"Authorization": f"Bearer {token}"}
                )
            except httpx.HTTPError:
                continue
            if response.status_code != 200:
                continue
            for unit, found in learned_from_metrics(response.text, deployment).items():
                values[unit].extend(found)
    return {unit: statistics.median(found) if found else None for unit, found in values.items()}


@dataclass
class LearnedSamples:
    """Learned limits read every ``every`` seconds in a thread of its own while the load runs."""

    base_url: str
    token: str
    every: float = 5.0
    samples: list[dict[str, Any]] = field(default_factory=list)  # {"at_s", "rpm", "tpm"}
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _started: float = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="learned-limits", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def sample(self) -> dict[str, Any]:
        at = time.monotonic() - self._started
        row = {"at_s": round(at, 1), **read_learned(self.base_url, self.token)}
        self.samples.append(row)
        return row

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def settled(samples: list[dict[str, Any]], unit: str, duration: float) -> dict[str, Any]:
    """Where the learned ``unit`` limit started, ended and settled (the median of the samples in
    the last SETTLED_SHARE of the run), with the settled window's min and max, and the mean of
    the second half of the run (a reading across a whole cut-and-recover cycle, for reference)."""
    known = [(row["at_s"], row[unit]) for row in samples if row.get(unit) is not None]
    if not known:
        return {
            "first": None,
            "final": None,
            "settled": None,
            "min": None,
            "max": None,
            "samples": 0,
            "mean_second_half": None,
        }
    since = duration * (1 - SETTLED_SHARE)
    window = [value for at, value in known if at >= since] or [known[-1][1]]
    second_half = [value for at, value in known if at >= duration / 2] or [known[-1][1]]
    return {
        "first": known[0][1],
        "final": known[-1][1],
        "settled": statistics.median(window),
        "min": min(window),
        "max": max(window),
        "samples": len(window),
        "mean_second_half": statistics.fmean(second_half),
        "since_s": round(since, 1),
    }


def evaluate(
    *,
    tally: Tally,
    samples: list[dict[str, Any]],
    duration: float,
    real: dict[str, int | None],
) -> dict[str, Any]:
    """The goals: under 1% of client calls got an upstream 429, and each learned limit settled
    within 10% of the fake's real one (for the units the fake limits)."""
    calls = tally.calls
    upstream_429 = tally.outcomes[UPSTREAM_429]
    share = upstream_429 / calls if calls else None
    goals: dict[str, Any] = {
        "upstream_429_share": {
            "measured": share,
            "count": upstream_429,
            "calls": calls,
            "target": GOAL_UPSTREAM_429_SHARE,
            "met": share is not None and share < GOAL_UPSTREAM_429_SHARE,
        }
    }
    learned = {}
    for unit, limit in real.items():
        if limit is None:
            continue
        path = settled(samples, unit, duration)
        value = path["settled"]
        error = abs(value - limit) / limit if value is not None else None
        learned[unit] = {**path, "real": limit, "error": error}
        goals[f"learned_{unit}"] = {
            "measured": error,
            "settled": value,
            "real": limit,
            "target": GOAL_LEARNED_ERROR,
            "met": error is not None and error <= GOAL_LEARNED_ERROR,
        }
    return {"goals": goals, "learned": learned, "met": all(g["met"] for g in goals.values())}


# -- the benchmark ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    duration: float
    rpm: int
    tpm: int | None
    headers: bool
    workers: int
    published_factor: float
    offered_factor: float
    headroom: float
    max_wait: float
    retry_deadline: float
    recovery: float | None
    max_tokens: int
    attempts: int = 3  # UPSTREAM_MAX_ATTEMPTS, the gateway's default unless the environment sets it

    def prompt_tokens(self) -> int:
        """What the fake charges for PROMPT (its own estimate: chars // 4 + 3 per message + 3)."""
        from testbed.fake_upstream import prompt_tokens_for

        return prompt_tokens_for({"messages": [{"role": "user", "content": PROMPT}]})

    def call_tokens(self) -> int:
        return self.prompt_tokens() + self.max_tokens

    def calls_per_minute_allowed(self) -> float:
        """The calls per minute the fake takes: its RPM, or fewer when its TPM binds first."""
        if self.tpm is None:
            return float(self.rpm)
        return min(float(self.rpm), self.tpm / self.call_tokens())

    def offered_per_second(self) -> float:
        return self.offered_factor * self.calls_per_minute_allowed() / 60

    def pacing(self) -> float:
        """Seconds between one user's calls: longer than a call may last. A call turned away
        for capacity has waited UPSTREAM_MAX_WAIT once per attempt (UPSTREAM_MAX_ATTEMPTS, 3 by
        default); one that met upstream 429s retries until UPSTREAM_RETRY_DEADLINE."""
        return self.attempts * self.max_wait + self.retry_deadline + 5.0

    def users(self) -> int:
        return max(1, math.ceil(self.offered_per_second() * self.pacing()))

    def published(self) -> dict[str, int]:
        published = {"rpm": round(self.rpm * self.published_factor)}
        if self.tpm is not None:
            published["tpm"] = round(self.tpm * self.published_factor)
        return published

    def gateway_env(self) -> dict[str, str]:
        """The gateway's settings for the upstream (the rest come from the run)."""
        env = {
            "UPSTREAM_LIMITS_JSON": json.dumps({MODEL: self.published()}),
            "UPSTREAM_LIMIT_HEADROOM": str(self.headroom),
            "UPSTREAM_MAX_WAIT": str(self.max_wait),
            "UPSTREAM_RETRY_DEADLINE": str(self.retry_deadline),
        }
        if self.recovery is not None:
            env["UPSTREAM_LIMIT_RECOVERY"] = str(self.recovery)
        return env


def _log(message: str) -> None:
    print(f"[upstream-limits {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _run_manage(env: dict[str, str], *arguments: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *arguments],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [""])[-1]
        raise RuntimeError(f"manage.py {arguments[0]} exited {done.returncode}: {last[:300]}")
    return done.stdout.strip()


def _locust(
    scenario: Scenario, *, host: str, key: str, tally_path: Path, workdir: Path
) -> subprocess.CompletedProcess[str]:
    """Run Locust headless for the scenario's duration; its tally lands in ``tally_path``."""
    from bench.common import without_proxies

    users = scenario.users()
    stop_timeout = scenario.pacing()  # the calls in flight at the end are answered and counted
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "NO_PROXY": "127.0.0.1,localhost",
        "LLMGATEWAY_API_KEY": key,
        "LLMGATEWAY_MODEL": MODEL,
        "LLMGATEWAY_MAX_TOKENS": str(scenario.max_tokens),
        "LLMGATEWAY_PROMPT": PROMPT,
        "UPSTREAM_LIMITS_PACING": str(scenario.pacing()),
        "UPSTREAM_LIMITS_TALLY": str(tally_path),
    }
    env = without_proxies(env)
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(users), "-r", f"{scenario.offered_per_second():.3f}",
        "--run-time", f"{math.ceil(scenario.duration)}s", "--stop-timeout", f"{stop_timeout:.0f}",
        "--host", host, "--only-summary", "--loglevel", "WARNING",
        "--csv", str(workdir / "locust"),
    ]  # fmt: skip
    with (workdir / "locust.log").open("w") as log:
        return subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=scenario.duration + stop_timeout + 120,
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the world, run the load, and return the results (raises if the run itself fails)."""
    from bench.common import BENCH_LIMITS
    from testbed.fake_upstream import FakeUpstream
    from testbed.gateway import Gateway
    from testbed.services import PostgresDatabase, RedisServer

    scenario = Scenario(
        duration=args.duration,
        rpm=args.rpm,
        tpm=args.tpm,
        headers=args.headers,
        workers=args.workers,
        published_factor=args.published_factor,
        offered_factor=args.offered_factor,
        headroom=args.headroom,
        max_wait=args.max_wait,
        retry_deadline=args.retry_deadline,
        recovery=args.recovery,
        max_tokens=args.max_tokens,
        attempts=int(os.environ.get("UPSTREAM_MAX_ATTEMPTS") or 3),
    )
    workdir = Path(tempfile.mkdtemp(prefix="llmgateway-upstream-limits-"))
    token = secrets.token_hex(16)
    _log(f"working in {workdir}")
    with contextlib.ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, workdir, True)
        redis = RedisServer(log=workdir / "redis.log")
        redis.start()
        stack.callback(redis.stop)
        if args.postgres:
            database = PostgresDatabase(args.postgres, f"llmgateway_upstream_limits_{os.getpid()}")
            if not args.keep:
                stack.callback(database.drop)
            database_url = database.url
        else:
            database_url = f"sqlite:///{workdir / 'gateway.sqlite3'}"
        fake = stack.enter_context(
            FakeUpstream(
                rpm_limit=scenario.rpm,
                tpm_limit=scenario.tpm,
                rate_limit_headers=scenario.headers,
                tokens=scenario.max_tokens,
                max_records=None,
            ).running_in_thread()
        )
        metrics_dir = workdir / "prometheus"
        metrics_dir.mkdir()
        env = {
            name: value
            for name, value in os.environ.items()
            if name.lower() not in {"http_proxy", "https_proxy", "all_proxy"}
        }
        for name, value in BENCH_LIMITS.items():
            env.setdefault(name, value)  # one key carries all the load
        env.update(
            {
                "DATABASE_URL": database_url,
                "REDIS_URL": redis.url,
                "OPENAI_BASE_URL": fake.base_url,
                "OPENAI_API_KEY": "sk-upstream-limits-bench",
                "METRICS_TOKEN": token,
                "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
                "LLMGATEWAY_VAR_DIR": str(workdir / "var"),
                "LEDGER_OUTBOX_DIR": str(workdir / "outbox"),
                "LOG_LEVEL": "WARNING",
                "NO_PROXY": "127.0.0.1,localhost",
                **scenario.gateway_env(),
            }
        )
        _run_manage(env, "migrate", "--noinput", "-v0")
        key = _run_manage(env, "createapikey", "upstream-limits", "--name", "upstream limits bench")
        key = key.splitlines()[-1]  # printed alone on the last line
        started = time.monotonic()
        gateway = Gateway(env, workers=scenario.workers, log=workdir / "gateway.log")
        stack.callback(gateway.stop)
        base_url = f"http://127.0.0.1:{gateway.port}"
        _log(
            f"gateway on :{gateway.port} ({scenario.workers} workers, up in "
            f"{time.monotonic() - started:.1f} s); fake upstream {fake.base_url}: "
            f"{scenario.rpm} RPM{f', {scenario.tpm} TPM' if scenario.tpm else ''}, headers "
            f"{'on' if scenario.headers else 'off'}; published to the gateway: {scenario.published()}"
        )
        _log(
            f"Locust: {scenario.users()} users, one call each per {scenario.pacing():.0f} s "
            f"({scenario.offered_per_second():.2f} calls/s) for {scenario.duration:.0f} s"
        )
        samples = LearnedSamples(base_url, token, every=args.sample_every)
        samples.start()
        stack.callback(samples.stop)
        tally_path = workdir / "tally.json"
        load_started = time.monotonic()
        locust = _locust(scenario, host=base_url, key=key, tally_path=tally_path, workdir=workdir)
        samples.stop()
        samples.sample()  # the value at the end of the load
        if not tally_path.exists():
            tail = (workdir / "locust.log").read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(
                f"Locust exited {locust.returncode} without a tally:\n" + "\n".join(tail)
            )
        tally = Tally.from_json(json.loads(tally_path.read_text()))
        records = list(fake.requests)
        chat = [r for r in records if r.path.endswith("/chat/completions")]
        real = {"rpm": scenario.rpm, "tpm": scenario.tpm}
        verdict = evaluate(
            tally=tally, samples=samples.samples, duration=scenario.duration, real=real
        )
        # The upstream's use of its limit while the learned limit is judged (the last 20%).
        window_from = load_started + scenario.duration * (1 - SETTLED_SHARE)
        window_to = load_started + scenario.duration
        admitted_late = sum(
            1 for r in chat if r.status == 200 and window_from <= r.started_at < window_to
        )
        results = {
            "scenario": {
                **dataclasses.asdict(scenario),
                "allowed_per_min": scenario.calls_per_minute_allowed(),
                "published": scenario.published(),
                "users": scenario.users(),
                "pacing_s": scenario.pacing(),
                "offered_per_s": scenario.offered_per_second(),
                "call_tokens": scenario.call_tokens(),
                "database": "postgresql" if args.postgres else "sqlite",
            },
            "clients": tally.to_json(),
            "upstream": {
                "chat_requests": len(chat),
                "admitted": sum(1 for r in chat if r.status == 200),
                "rejected_429": fake.rejected_429,
                "absorbed_429": max(0, fake.rejected_429 - tally.outcomes[UPSTREAM_429]),
                "admitted_per_min_settled": round(
                    admitted_late / (scenario.duration * SETTLED_SHARE / 60), 1
                ),
            },
            "learned_samples": samples.samples,
            "sample_every": args.sample_every,
            # Locust exits 1 when any call failed, and the turned-away calls are failures.
            "locust_exit": locust.returncode,
            **verdict,
        }
        if args.keep:
            results["workdir"] = str(workdir)
        return results


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}%"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def render(results: dict[str, Any]) -> str:
    s = results["scenario"]
    clients, upstream = results["clients"], results["upstream"]
    calls = clients["calls"]
    outcomes = clients["outcomes"]
    limits = f"{s['rpm']} RPM" + (f", {s['tpm']:,} TPM" if s["tpm"] else "")
    lines = [
        f"Upstream limits (issue 13): {s['duration']:.0f} s of load; fake upstream {limits}, "
        f"x-ratelimit-* headers {'on' if s['headers'] else 'OFF (learn from 429s alone)'}; "
        f"published to the gateway {s['published']}; {s['workers']} Granian workers, Redis, "
        f"{s['database']}",
        f"  offered {s['offered_per_s'] * 60:,.0f} calls/min ({s['offered_factor']}x what the fake takes) "
        f"by {s['users']} Locust users, one call each per {s['pacing_s']:.0f} s",
        f"  client calls {calls:,} ({calls / s['duration']:.2f}/s: "
        f"{calls / s['duration'] * 60 / s['allowed_per_min']:.1f}x the calls per minute the fake takes)",
        f"    200                          {outcomes[OK]:>8,}",
        f"    429 upstream_rate_limited    {outcomes[UPSTREAM_429]:>8,}   started upstream: counts against the goal",
        f"    429 upstream_capacity        {outcomes[CAPACITY_429]:>8,}   the gateway's own (waited {s['max_wait']:g} s "
        f"for room): does not count",
        f"    other                        {outcomes[OTHER]:>8,}   {clients['others'] or ''}",
        "    longest call: "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in clients["longest_s"].items())
        + f" (a user starts one every {s['pacing_s']:.0f} s)",
        *(
            f"    WARNING: {count:,} calls answered {label} (not a goal, but clients saw them), "
            f"e.g. {clients['examples'].get(label, '')}"
            for label, count in clients["others"].items()
        ),
        f"  upstream: {upstream['chat_requests']:,} chat requests, {upstream['admitted']:,} admitted, "
        f"{upstream['rejected_429']:,} answered 429 of which {upstream['absorbed_429']:,} absorbed by "
        f"the gateway's retries; admitted {upstream['admitted_per_min_settled']:,} per minute over the "
        f"last {SETTLED_SHARE:.0%} of the run (it takes {s['allowed_per_min']:.0f} a minute)",
    ]
    for unit, path in results["learned"].items():
        lines.append(
            f"  learned {unit}: started {_num(path['first'])}, final {_num(path['final'])}, settled "
            f"{_num(path['settled'])} (median of {path['samples']} readings from {path.get('since_s', 0):.0f} s; "
            f"min {_num(path['min'])}, max {_num(path['max'])}); real {path['real']:,}: off by {_pct(path['error'])}; "
            f"mean of the second half {_num(path['mean_second_half'])}"
        )
        path_values = [row.get(unit) for row in results["learned_samples"]]
        step = max(1, len(path_values) // 20)
        shown = " ".join("-" if v is None else f"{v:.0f}" for v in path_values[::step])
        lines.append(f"    its path (every {step * results.get('sample_every', 5):.0f} s): {shown}")
    lines.append("  clients per 10 s (200 / upstream 429 / capacity 429 / other):")
    row = []
    for bucket in clients["timeline"]:
        row.append(f"{bucket[OK]}/{bucket[UPSTREAM_429]}/{bucket[CAPACITY_429]}/{bucket[OTHER]}")
    for start in range(0, len(row), 10):
        lines.append("    " + "  ".join(row[start : start + 10]))
    lines.append("")
    lines.append(f"{'Goal':<52}{'measured':<24}{'target':<12}status")
    goals = results["goals"]
    share = goals["upstream_429_share"]
    lines.append(
        f"{'client calls with a 429 that started upstream':<52}"
        f"{_pct(share['measured']) + f' ({share["count"]:,})':<24}{'< 1%':<12}{'PASS' if share['met'] else 'MISS'}"
    )
    for unit in UNITS:
        goal = goals.get(f"learned_{unit}")
        if goal is None:
            continue
        measured = f"{_num(goal['settled'])} vs {goal['real']:,} ({_pct(goal['measured'])})"
        lines.append(
            f"{'learned ' + unit.upper() + ' vs the fake upstream real limit':<52}{measured:<24}"
            f"{'<= 10% off':<12}{'PASS' if goal['met'] else 'MISS'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.upstream_limits", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--duration", type=float, default=600.0, help="seconds of load (default 600)"
    )
    parser.add_argument(
        "--rpm", type=int, default=120, help="the fake upstream's real RPM (default 120)"
    )
    parser.add_argument(
        "--tpm", type=int, default=None, help="the fake upstream's real TPM (default: none)"
    )
    parser.add_argument(
        "--no-headers",
        dest="headers",
        action="store_false",
        help="the fake sends no x-ratelimit-* headers: the gateway must learn from 429s alone",
    )
    parser.add_argument("--workers", type=int, default=2, help="Granian workers (default 2)")
    parser.add_argument(
        "--published-factor",
        type=float,
        default=1.5,
        help="the published limit the gateway is told, times the real one (default 1.5: wrong)",
    )
    parser.add_argument(
        "--offered-factor",
        type=float,
        default=5.0,
        help="load offered, times the real limit (default 5)",
    )
    parser.add_argument(
        "--headroom", type=float, default=0.2, help="UPSTREAM_LIMIT_HEADROOM (default 0.2)"
    )
    parser.add_argument(
        "--max-wait", type=float, default=10.0, help="UPSTREAM_MAX_WAIT, s (default 10)"
    )
    parser.add_argument(
        "--retry-deadline", type=float, default=10.0, help="UPSTREAM_RETRY_DEADLINE, s (default 10)"
    )
    parser.add_argument(
        "--recovery",
        type=float,
        default=None,
        help="UPSTREAM_LIMIT_RECOVERY, share of the limit regained per minute (default: the gateway's)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="max_tokens per call (default 16)"
    )
    parser.add_argument(
        "--sample-every",
        type=float,
        default=5.0,
        help="seconds between readings of the learned limit",
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        default=None,
        help="a throwaway database on this PostgreSQL server (e.g. postgres://postgres@127.0.0.1:5432/postgres) "
        "instead of a SQLite file",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS / "upstream_limits.json",
        help="where to write the JSON results",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the working directory and database"
    )
    args = parser.parse_args(argv)
    if (
        args.duration <= 0
        or args.rpm < 1
        or args.workers < 1
        or (args.tpm is not None and args.tpm < 1)
    ):
        parser.error("--duration, --rpm, --tpm and --workers must be positive")
    try:
        results = run(args)
    except Exception as error:  # the run failed, not the gateway: say so, exit 2
        _log(f"the run failed: {type(error).__name__}: {error}")
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=str))
    print(render(results))
    _log(f"results written to {args.output}")
    return 0 if results["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
