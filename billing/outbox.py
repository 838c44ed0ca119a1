"""The ledger outbox: no upstream call's row is lost, whatever the database or the process does.

Every upstream call leaves exactly one ledger row. Two things can stand between a finished call
and its row: the database (down, refusing connections, pool exhausted, deadlocked) and the
process itself (killed at Granian's shutdown deadline, or crashed, mid-call). The outbox covers
both with one local, append-only journal per process:

- ``open``: written when a call reaches its upstream, with everything the row needs but the
  usage (who, which model, the rates it is billed at, the budget held). A plain ``write()``:
  it is in the kernel's page cache at once, so it survives the process being killed (not a
  power cut; that would need an fsync per call on the hot path).
- ``progress``: every ``CHECKPOINT_SECONDS`` the completion tokens each open call has produced,
  so a call cut by a kill is billed for what it produced up to the last checkpoint.
- ``final``: the finished row, when the database could not take it in time. Written *and
  fsynced* before the client sees ``[DONE]``; the drainer writes it as soon as the database
  answers, idempotently by ``request_id`` (a row already there is left alone), which settles the
  call's budget hold in the same transaction.

Why a local journal and not a Redis stream: the outbox must work on the embedded default, which
has no Redis, and must not depend on Redis being up (a Redis outage is one of the faults it is
there for); an fsynced local file is durable against the faults a gateway actually sees, costs
one ``write()`` per call, and needs no coordination: each process owns one directory
(``<LEDGER_OUTBOX_DIR>/<database>/<process>/``), held by an ``flock`` for its life. The kernel
drops that lock when the process dies, however it dies, so any live gateway process of the same
database (or ``manage.py drain_outbox``) can claim a dead process's directory and replay it:
``final`` entries are written as they are; an ``open`` call with no row is written as
``cancelled`` with ``error_kind="interrupted"``, its prompt estimated and its completion tokens
from the last checkpoint. The directory is keyed by the database, so two gateways on two
databases sharing one ``var/`` never replay into each other.

A segment file is deleted once every call it mentions has its row, so the journal stays small;
an entry that the database refuses for good (an integrity error: its user was deleted, say) is
moved to ``dead-letter.jsonl`` beside the directories and logged, so it cannot block the others.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError, connections

from billing.money import Rates
from infra.db import db_task
from infra.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 0.5
DRAIN_RETRY_SECONDS = 0.5
SEGMENT_MAX_ENTRIES = 20_000
SEGMENT_MAX_SECONDS = 30.0
INTERRUPTED = "interrupted"
LOCK_FILE = "lock"
DEAD_LETTER = "dead-letter.jsonl"

type Row = dict[str, Any]
"""The keyword arguments of `billing.services.usage_record_create` for one call."""


# --- Rows as JSON ---------------------------------------------------------------------------


def _encode(row: Row) -> dict[str, Any]:
    encoded: dict[str, Any] = {}
    for name, value in row.items():
        if isinstance(value, Rates):
            value = {
                "input": str(value.input),
                "cached_input": str(value.cached_input),
                "output": str(value.output),
                "multiplier": str(value.multiplier),
                "source": value.source,
            }
        elif isinstance(value, Decimal | uuid.UUID):
            value = str(value)
        elif isinstance(value, datetime):
            value = value.isoformat()
        encoded[name] = value
    return encoded


def _decode(encoded: dict[str, Any]) -> Row:
    row = dict(encoded)
    row["request_id"] = uuid.UUID(row["request_id"])
    if row.get("call_id") is not None:
        row["call_id"] = uuid.UUID(row["call_id"])
    row["created_at"] = datetime.fromisoformat(row["created_at"])
    rates = row["rates"]
    row["rates"] = Rates(
        input=Decimal(rates["input"]),
        cached_input=Decimal(rates["cached_input"]),
        output=Decimal(rates["output"]),
        multiplier=Decimal(rates["multiplier"]),
        source=rates["source"],
    )
    if row.get("reserved_usd") is not None:
        row["reserved_usd"] = Decimal(row["reserved_usd"])
    return row


def interrupted_row(opened: Row, completion_tokens: int) -> Row:
    """The row of a call whose process died mid-call: billed for what it had produced."""
    row = dict(opened)
    prompt_estimate = row.pop("prompt_tokens_estimate")
    row.update(
        status="cancelled",
        error_kind=INTERRUPTED,
        prompt_tokens=prompt_estimate,
        completion_tokens=completion_tokens,
        cached_tokens=0,
        reasoning_tokens=0,
        token_source="estimated",
        ttft_us=None,
        duration_us=0,
    )
    return row


# --- Writing rows ---------------------------------------------------------------------------


@dataclass(slots=True)
class WriteResult:
    done: list[str] = field(default_factory=list)  # ids now in the ledger (written or found there)
    refused: list[tuple[Row, str]] = field(default_factory=list)  # rows the database refuses for good
    error: str = ""  # why the rest could not be written now ("" when nothing is left)


def write_rows(rows: list[Row]) -> WriteResult:
    """Write the rows not yet in the ledger, in order, until the database fails (sync, DB).

    Idempotent by `request_id`: a row already there, or written meanwhile by a call whose own
    write outran its deadline, is counted as done and not written again.
    """
    from billing.models import UsageRecord
    from billing.services import usage_record_create

    result = WriteResult()
    try:
        present = _existing_ids([row["request_id"] for row in rows])
        for row in rows:
            request_id = str(row["request_id"])
            if request_id not in present:
                try:
                    usage_record_create(**row)
                except IntegrityError as error:
                    if not UsageRecord.objects.filter(request_id=row["request_id"]).exists():
                        result.refused.append((row, str(error)))
                        continue
                except (OperationalError, InterfaceError):
                    raise  # the database is away: this row and the rest wait
                except Exception as error:  # the row's own fault (bad data): it never will be
                    result.refused.append((row, f"{type(error).__name__}: {error}"))
                    continue
            result.done.append(request_id)
    except Exception as error:  # the database is away: what is left waits
        result.error = f"{type(error).__name__}: {error}"
    return result


def _existing_ids(ids: list[uuid.UUID]) -> set[str]:
    from billing.models import UsageRecord

    return {str(value) for value in UsageRecord.objects.filter(request_id__in=ids).values_list("request_id", flat=True)}


def database_key() -> str:
    """A short, stable name for the default database: journals are replayed only into it."""
    database = settings.DATABASES["default"]
    identity = "|".join(str(database.get(name) or "") for name in ("ENGINE", "NAME", "HOST", "PORT"))
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


# --- The journal of this process ------------------------------------------------------------


@dataclass(slots=True)
class _Segment:
    path: Path
    fd: int
    entries: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    live: set[str] = field(default_factory=set)  # calls it mentions that have no row yet
    sealed: bool = False


@dataclass(slots=True)
class _Open:
    segment: _Segment
    progress: Callable[[], int]
    checkpointed: int = -1


class LedgerOutbox:
    """The process's journal, its drainer and its checkpoints (one per process: `get_outbox`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dir: Path | None = None
        self._lock_fd: int | None = None
        self._segment: _Segment | None = None
        self._segments_of: dict[str, list[_Segment]] = {}
        self._open: dict[str, _Open] = {}
        self._pending: dict[str, Row] = {}  # deferred rows, oldest first
        self._sequence = 0
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._late_writes: set[asyncio.Future[Any]] = set()
        self._fsync_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmgateway-outbox")
        # Told the number of rows waiting whenever it changes (a metrics gauge).
        self.on_depth: Callable[[int], None] = lambda depth: None

    # -- the call's side ------------------------------------------------------------------

    def call_opened(self, row: Row, progress: Callable[[], int]) -> None:
        """Journal a call that reached its upstream (no fsync: see the module docstring)."""
        request_id = str(row["request_id"])
        segment = self._append({"op": "open", "id": request_id, "row": _encode(row)}, request_id)
        self._open[request_id] = _Open(segment=segment, progress=progress)
        self._ensure_running()

    async def defer(self, row: Row) -> None:
        """Keep a row the database could not take: durable (fsynced) when this returns."""
        request_id = str(row["request_id"])
        self._open.pop(request_id, None)
        segment = self._append({"op": "final", "id": request_id, "row": _encode(row)}, request_id)
        # Its own thread: the shared ones may all be waiting for the database right now.
        await asyncio.get_running_loop().run_in_executor(self._fsync_thread, os.fsync, segment.fd)
        self._pending[request_id] = row
        self.on_depth(len(self._pending))
        self._ensure_running()
        assert self._wake is not None
        self._wake.set()

    def adopt(self, write: asyncio.Future[Any]) -> None:
        """Own a ledger write that outran its deadline: it may still commit, in which case the
        deferred copy of its row is found in the ledger and not written again."""
        self._late_writes.add(write)
        write.add_done_callback(self._late_write_done)

    def _late_write_done(self, write: asyncio.Future[Any]) -> None:
        self._late_writes.discard(write)
        if not write.cancelled() and write.exception() is not None:
            logger.info("a late ledger write failed (its row is in the outbox): %s", write.exception())

    def call_recorded(self, request_id: uuid.UUID) -> None:
        """The call's row is in the ledger: forget it (its segments may go)."""
        key = str(request_id)
        self._open.pop(key, None)
        self._settle(key)

    @property
    def depth(self) -> int:
        """Rows waiting for the database in this process."""
        return len(self._pending)

    # -- journal files --------------------------------------------------------------------

    def _directory(self) -> Path:
        if self._dir is None:
            # Locked under a hidden name, then renamed: a claimer never sees it unlocked.
            name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            hidden = self.root / database_key() / f".{name}"
            hidden.mkdir(parents=True)
            lock_fd = os.open(hidden / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            directory = hidden.with_name(name)
            hidden.rename(directory)
            self._dir, self._lock_fd = directory, lock_fd
        return self._dir

    def _current_segment(self) -> _Segment:
        segment = self._segment
        if segment is not None and (
            segment.entries >= SEGMENT_MAX_ENTRIES or time.monotonic() - segment.opened_at >= SEGMENT_MAX_SECONDS
        ):
            segment.sealed = True
            self._segment = None
            self._delete_if_done(segment)
            segment = None
        if segment is None:
            self._sequence += 1
            path = self._directory() / f"{self._sequence:08d}.jsonl"
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
            segment = self._segment = _Segment(path=path, fd=fd)
        return segment

    def _append(self, entry: dict[str, Any], request_id: str | None) -> _Segment:
        segment = self._current_segment()
        os.write(segment.fd, orjson.dumps(entry) + b"\n")
        segment.entries += 1
        if request_id is not None:
            segment.live.add(request_id)
            segments = self._segments_of.setdefault(request_id, [])
            if segment not in segments:
                segments.append(segment)
        return segment

    def _settle(self, request_id: str) -> None:
        for segment in self._segments_of.pop(request_id, ()):
            segment.live.discard(request_id)
            self._delete_if_done(segment)

    def _delete_if_done(self, segment: _Segment) -> None:
        if segment.sealed and not segment.live:
            os.close(segment.fd)
            segment.path.unlink(missing_ok=True)

    def _checkpoint(self) -> None:
        changed: dict[str, int] = {}
        for request_id, call in self._open.items():
            tokens = call.progress()
            if tokens != call.checkpointed:
                call.checkpointed = changed[request_id] = tokens
        if changed:
            segment = self._current_segment()
            lines = [orjson.dumps({"op": "progress", "id": key, "completion_tokens": n}) for key, n in changed.items()]
            os.write(segment.fd, b"\n".join(lines) + b"\n")
            segment.entries += len(lines)
            for request_id in changed:
                segment.live.add(request_id)
                segments = self._segments_of.setdefault(request_id, [])
                if segment not in segments:
                    segments.append(segment)

    # -- the background loop ----------------------------------------------------------------

    def start(self) -> None:
        """Start the loop now (at process start: it claims dead processes' journals at once)."""
        self._ensure_running()

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="llmgateway-ledger-outbox")

    async def _run(self) -> None:
        assert self._wake is not None
        next_claim = 0.0
        orphans_wait = False  # a stopped process's journal could not be written yet
        while True:
            try:
                self._checkpoint()
                if self._pending:
                    await self.drain()
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + 10 * DRAIN_RETRY_SECONDS
                    orphans_wait = True  # until the claim below says otherwise (it may raise)
                    orphans_wait = (await db_task(claim_orphans)(self.root)).waiting > 0
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("the ledger outbox loop failed; retrying")
            if not self._open and not self._pending and not orphans_wait:
                return  # idle: started again by the next call
            self._wake.clear()
            try:
                async with asyncio.timeout(CHECKPOINT_SECONDS if self._open else DRAIN_RETRY_SECONDS):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def drain(self) -> int:
        """Write the deferred rows the database takes now; return how many are left."""
        result = await db_task(write_rows)(list(self._pending.values()))
        for request_id in result.done:
            self._pending.pop(request_id, None)
            self._settle(request_id)
        for row, why in result.refused:
            request_id = str(row["request_id"])
            _dead_letter(self.root, row, why)
            self._pending.pop(request_id, None)
            self._settle(request_id)
        self.on_depth(len(self._pending))
        if result.done:
            logger.info("ledger outbox: wrote %d deferred rows, %d left", len(result.done), len(self._pending))
        if result.error:
            logger.warning("ledger outbox: %d rows wait for the database (%s)", len(self._pending), result.error)
        return len(self._pending)

    async def aclose(self) -> None:
        """Stop the loop; try once more to write what waits (what fails stays journaled)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._late_writes:
            await asyncio.wait(self._late_writes, timeout=DRAIN_RETRY_SECONDS * 10)
        if self._pending:
            await self.drain()
        self._fsync_thread.shutdown(wait=False)
        if self._dir is not None and not self._pending and not self._open:
            shutil.rmtree(self._dir, ignore_errors=True)  # nothing left to replay


def _dead_letter(root: Path, row: Row, why: str) -> None:
    logger.error("ledger outbox: the database refuses row %s for good (%s); kept in %s", row["request_id"], why, DEAD_LETTER)
    path = root / database_key() / DEAD_LETTER
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as file:
        file.write(orjson.dumps({"row": _encode(row), "error": why}) + b"\n")
        file.flush()
        os.fsync(file.fileno())


# --- Claiming a dead process's journal ------------------------------------------------------


def _read_journal(directory: Path) -> tuple[dict[str, Row], dict[str, Row], dict[str, int]]:
    opened: dict[str, Row] = {}
    finals: dict[str, Row] = {}
    progress: dict[str, int] = {}
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a line cut by the kill: its call has an earlier entry or never started
            request_id = entry["id"]
            if entry["op"] == "open":
                opened[request_id] = _decode(entry["row"])
            elif entry["op"] == "final":
                finals[request_id] = _decode(entry["row"])
            elif entry["op"] == "progress":
                progress[request_id] = entry["completion_tokens"]
    return opened, finals, progress


def replay_journal(directory: Path) -> WriteResult:
    """Write the rows a dead process's journal holds (sync, DB)."""
    opened, finals, progress = _read_journal(directory)
    rows: list[Row] = list(finals.values())
    unfinished = [request_id for request_id in opened if request_id not in finals]
    if unfinished:
        try:
            present = _existing_ids([opened[request_id]["request_id"] for request_id in unfinished])
        except Exception as error:  # the database is away: the journal waits
            return WriteResult(error=f"{type(error).__name__}: {error}")
        rows += [
            interrupted_row(opened[request_id], progress.get(request_id, 0))
            for request_id in unfinished
            if request_id not in present
        ]
    result = write_rows(rows)
    for row, why in result.refused:
        _dead_letter(directory.parent.parent, row, why)
    return result


@dataclass(slots=True)
class ClaimResult:
    journals: int = 0  # journals of stopped processes replayed and removed
    rows: int = 0  # their calls now in the ledger (written now, or found there already)
    waiting: int = 0  # journals kept because the database failed meanwhile


def claim_orphans(root: Path) -> ClaimResult:
    """Replay and remove the journals of stopped processes of this database.

    A journal whose owner is alive is skipped (its lock is held). Sync: it uses the database.
    """
    claimed = ClaimResult()
    base = root / database_key()
    if not base.is_dir():
        return claimed
    for directory in sorted(path for path in base.iterdir() if path.is_dir() and not path.name.startswith(".")):
        lock_path = directory / LOCK_FILE
        try:
            lock_fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive
            result = replay_journal(directory)
            claimed.rows += len(result.done)
            if result.error:
                claimed.waiting += 1
                logger.warning("ledger outbox: the journal %s waits for the database (%s)", directory.name, result.error)
                continue
            claimed.journals += 1
            shutil.rmtree(directory, ignore_errors=True)
            logger.info("ledger outbox: replayed the journal of a stopped process (%s)", directory.name)
        finally:
            os.close(lock_fd)
            for connection in connections.all(initialized_only=True):
                if not connection.in_atomic_block:
                    connection.close()
    return claimed


def orphan_journals(root: Path) -> int:
    """Journals of stopped processes not replayed yet (their lock is free): for /readyz."""
    base = root / database_key()
    if not base.is_dir():
        return 0
    orphans = 0
    for directory in base.iterdir():
        if not directory.is_dir() or directory.name.startswith("."):
            continue
        try:
            lock_fd = os.open(directory / LOCK_FILE, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            orphans += 1
        except BlockingIOError:
            pass  # its process is alive
        finally:
            os.close(lock_fd)  # and with it the lock, if this took it
    return orphans


_outbox: LedgerOutbox | None = None


def get_outbox() -> LedgerOutbox:
    global _outbox
    if _outbox is None:
        _outbox = LedgerOutbox(Path(settings.LEDGER_OUTBOX_DIR))
    return _outbox


async def aclose_outbox() -> None:
    global _outbox
    if _outbox is not None:
        outbox, _outbox = _outbox, None
        await outbox.aclose()
