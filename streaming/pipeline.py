"""The stream pipeline: upstream -> producer task -> bounded queue -> response generator -> client.

One `StreamRelay` runs one upstream call. Its producer task reads the provider's stream into a
bounded `asyncio.Queue`; the response side pulls from it. When the client reads slowly the queue
fills, the producer waits in `put()`, and so it stops reading the upstream: backpressure from the
client's socket to the upstream's, with memory bounded by the queue size.

Whatever way a call ends (completed, client gone, upstream error, timeout), the producer leaves
one `CallOutcome` behind. `aclose()` cancels the producer if it is still running and waits for it
to finish, so no task outlives the call; what the outcome costs is the call owner's business
(`calls.call`), not the relay's.

Timeouts are enforced here, not by the HTTP client: first token (request sent to first chunk),
idle (between two upstream chunks; time spent waiting for a slow client does not count) and total.

A completion-token cap stops a call whose output goes past what was reserved for it (max_tokens
x n, or the gateway's default), whatever the upstream does with max_tokens. Tokens are counted
as content chunks (about one token each in OpenAI's streams) and, for an upstream that sends
large chunks, by the tokenizer at each counted batch; the call ends with `CompletionCapReached`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

from streaming import _sse
from streaming.endpoints import ErrorEvent, Framer
from streaming.providers.base import Provider, ProviderChunk, ProviderRequest, UpstreamError, Usage

logger = logging.getLogger(__name__)

CallStatus = Literal["completed", "cancelled", "upstream_error", "timeout", "rejected"]
CAP_REACHED = (
    "The response reached the {cap} completion tokens reserved for it against your budget, so the "
    "gateway stopped it. Set max_tokens (or max_completion_tokens) to reserve for a longer answer."
)


@dataclass(frozen=True, slots=True)
class Timeouts:
    first_token: float
    idle: float
    total: float
    heartbeat: float


class CompletionTally:
    """Tokens of the text streamed so far, counted in batches so the text itself is not kept.

    A batch is cut just before a space: in the OpenAI encodings a word's token starts with its
    leading space, so counting the parts separately gives the count of the whole. Memory stays
    at one batch however long the stream runs (a stream to a stalled client can run long), held
    as a few strings: the pieces are joined every `JOIN_PIECES`, not kept as one object per chunk.
    Inside an event loop a batch is counted in a worker thread (the tokenizer releases the GIL),
    so that the loop goes on relaying meanwhile; `counted` then lags by the batches in flight.
    """

    BATCH_CHARS = 8192
    JOIN_PIECES = 64

    def __init__(self, count: Callable[[str], int]) -> None:
        self._count = count
        self._pending: list[str] = []
        self._pending_chars = 0
        self._counted = 0
        self._in_flight: dict[int, str] = {}  # batches being counted in a thread, by serial
        self._serial = 0

    def add(self, text: str) -> None:
        self._pending.append(text)
        self._pending_chars += len(text)
        if self._pending_chars >= self.BATCH_CHARS:
            joined = "".join(self._pending)
            cut = joined.rfind(" ")
            if cut <= 0:
                cut = len(joined)
            self._count_batch(joined[:cut])
            rest = joined[cut:]
            self._pending, self._pending_chars = ([rest] if rest else []), len(rest)
        elif len(self._pending) >= self.JOIN_PIECES:
            self._pending = ["".join(self._pending)]

    def _count_batch(self, batch: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop here: count it now
            self._counted += self._count(batch)
            return
        serial = self._serial = self._serial + 1
        self._in_flight[serial] = batch
        counting = loop.run_in_executor(None, self._count, batch)
        counting.add_done_callback(lambda done: self._batch_counted(serial, done))

    def _batch_counted(self, serial: int, done: asyncio.Future[int]) -> None:
        if done.cancelled() or done.exception() is not None:
            return  # stays in flight: tokens() counts it
        batch = self._in_flight.pop(serial, None)
        if batch is not None:
            self._counted += done.result()

    @property
    def counted(self) -> int:
        """Tokens of the batches counted so far (pending text and batches in flight excluded)."""
        return self._counted

    def tokens(self) -> int:
        """The count so far, the text not yet counted included (counted here, at once)."""
        uncounted = [*self._in_flight.values(), "".join(self._pending)]
        return self._counted + sum(self._count(text) for text in uncounted if text)


@dataclass(slots=True)
class CallOutcome:
    """What happened in one upstream call: what the usage record is made from."""

    status: CallStatus = "completed"
    upstream_usage: Usage | None = None
    # Counts the generated text for calls that end without upstream usage (cancelled, failed).
    completion: CompletionTally | None = None
    chunks: int = 0
    content_chunks: int = 0  # chunks that carried generated text: the completion-token cap counts these
    error: UpstreamError | None = None
    upstream_id: str = ""  # the upstream's id of its answer, from the first event that names it
    started_at: float = 0.0  # time.perf_counter()
    first_chunk_at: float | None = None
    finished_at: float = 0.0

    @property
    def ttft_seconds(self) -> float | None:
        return None if self.first_chunk_at is None else self.first_chunk_at - self.started_at

    @property
    def duration_seconds(self) -> float:
        return self.finished_at - self.started_at


class CompletionCapReached(UpstreamError):
    """The gateway stopped the call: its output reached the completion tokens reserved for it.

    An `UpstreamError` so every consumer of the queue already ends the response on it; its kind
    makes a non-streamed call a 400 (the request set no max_tokens), and a stream ends with an
    error event of its `type` and `code`.
    """

    def __init__(self, cap: int) -> None:
        super().__init__("bad_request", CAP_REACHED.format(cap=cap))
        self.cap = cap

    @property
    def type(self) -> str:
        return "insufficient_quota"

    @property
    def code(self) -> str:
        return "budget_reservation_reached"


class CallStopped(UpstreamError):
    """The gateway's operators stopped the call (`reason`: stopped by staff, key revoked, ...).

    An `UpstreamError` so every consumer of the queue ends the response on it; a stream ends with
    an error event whose code is the reason.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__("server_error", message)
        self.reason = reason

    @property
    def type(self) -> str:
        return "invalid_request_error"

    @property
    def code(self) -> str:
        return self.reason


class _End:
    """Queue sentinel: the upstream stream ended normally."""


class _HeartbeatDue:
    """Queue marker: the client has been sent nothing for a heartbeat interval."""


END = _End()
HEARTBEAT_DUE = _HeartbeatDue()
QueueItem = ProviderChunk | UpstreamError | _End | _HeartbeatDue


async def run_to_completion[T](coroutine: Coroutine[Any, Any, T]) -> T:
    """Await `coroutine` to its end even if the caller is cancelled meanwhile, then re-raise."""
    task = asyncio.ensure_future(coroutine)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


class _SilenceDeadline:
    """The first-token, idle and total timeouts of one producer task, without a timer per chunk.

    The producer notes the loop time of each chunk (`heard`); one timer checks, when it is due,
    whether the upstream has been silent for `wait` seconds, and otherwise moves itself to the
    new due time. So a stream of thousands of chunks re-arms a timer once per `wait` seconds
    instead of once per chunk. When it expires it cancels the task, as `asyncio.timeout` does;
    the producer turns that cancellation into `TimeoutError`. While `paused` (the producer waits
    for room in the queue: the client's pace) silence does not count, but the total does.
    """

    __slots__ = ("_handle", "_last_heard", "_loop", "_task", "_total_at", "expired", "paused", "wait")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], *, wait: float, total: float) -> None:
        self._loop = loop
        self._task = task
        now = loop.time()
        self._total_at = now + total
        self._last_heard = now
        self.wait = wait
        self.paused = False
        self.expired = False
        self._handle: asyncio.TimerHandle | None = loop.call_at(min(self._total_at, now + wait), self._check)

    def heard(self) -> None:
        self._last_heard = self._loop.time()

    def first_heard(self, idle: float) -> None:
        """The first chunk came: from now on the upstream may be silent `idle` seconds at most."""
        self.wait = idle
        self.heard()
        self.cancel()
        self._handle = self._loop.call_at(min(self._total_at, self._last_heard + idle), self._check)

    def upstream_done(self) -> None:
        """The upstream has ended: only the total timeout is left."""
        self.wait = float("inf")

    @property
    def total_passed(self) -> bool:
        return self._loop.time() >= self._total_at

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        now = self._loop.time()
        due = self._total_at if self.paused else min(self._total_at, self._last_heard + self.wait)
        if now < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self._handle = None
        self.expired = True
        self._task.cancel()


class StreamRelay:
    def __init__(
        self,
        *,
        provider: Provider,
        request: ProviderRequest,
        queue_size: int,
        timeouts: Timeouts,
        count_text: Callable[[str], int],
        completion_token_cap: int,
    ) -> None:
        self._provider = provider
        self._completion_token_cap = completion_token_cap
        self._request = request
        self._timeouts = timeouts
        self._count_text = count_text
        self.queue: asyncio.Queue[QueueItem] = asyncio.Queue(maxsize=queue_size)
        self.outcome = CallOutcome()
        self._producer: asyncio.Task[None] | None = None
        self._cut_connection: Callable[[], None] | None = None
        self._stopped: CallStopped | None = None
        self._ended = False  # the last item (END or an error) is in the queue
        self._deadline: _SilenceDeadline | None = None
        self.backpressure_waits = 0

    def start(self) -> None:
        self.outcome.started_at = time.perf_counter()
        self._producer = asyncio.create_task(self._produce(), name="llmgateway-stream-producer")

    async def get(self) -> QueueItem:
        return await self.queue.get()

    def abort(self) -> None:
        """Stop the upstream call now, without waiting (the client is gone): its connection is
        cut in this step if the provider said how (`ProviderRequest.on_connection`), and the
        producer is cancelled; `aclose()` waits for it."""
        producer = self._producer
        if producer is not None and not producer.done():
            producer.cancel()
            cut, self._cut_connection = self._cut_connection, None
            if cut is not None:
                cut()

    def _connection_opened(self, cut: Callable[[], None]) -> None:
        self._cut_connection = cut

    async def aclose(self) -> None:
        """Stop the upstream call if it is still running and wait until its outcome is final."""
        producer = self._producer
        if producer is None:
            return
        if not producer.done():
            producer.cancel()
        await run_to_completion(self._wait_quietly(producer))

    @staticmethod
    async def _wait_quietly(task: asyncio.Task[None]) -> None:
        try:
            await task
        except asyncio.CancelledError:
            pass

    def stop(self, error: CallStopped) -> None:
        """End the call now: the upstream is closed and `error` is the last item the client gets.

        From the event loop's thread. A no-op once the call has ended or was stopped already.
        """
        producer = self._producer
        if producer is None or producer.done() or self._stopped is not None:
            return
        self._stopped = error
        producer.cancel()

    def _put_last(self, item: QueueItem) -> None:
        """Queue the call's last item at once, making room if a slow client left the queue full
        (the item it displaces would be followed by the end anyway)."""
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(item)
        self._ended = True

    async def _put(self, item: QueueItem) -> None:
        if self.queue.full():
            # Waiting for room in the queue is the client's pace, not upstream silence.
            self.backpressure_waits += 1
            deadline = self._deadline
            if deadline is not None:
                deadline.paused = True
            try:
                await self.queue.put(item)
            finally:
                if deadline is not None:
                    deadline.paused = False
                    deadline.heard()
        else:
            self.queue.put_nowait(item)
        if not isinstance(item, ProviderChunk):
            self._ended = True

    async def _produce(self) -> None:
        outcome = self.outcome
        completion = outcome.completion = CompletionTally(self._count_text)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        deadline = self._deadline = _SilenceDeadline(
            loop, task, wait=self._timeouts.first_token, total=self._timeouts.total
        )
        phase = "first_token"
        try:
            try:
                request = replace(self._request, on_connection=self._connection_opened)
                async with aclosing(cast(AsyncGenerator[ProviderChunk], self._provider.stream(request))) as chunks:
                    async for chunk in chunks:
                        if phase == "first_token":
                            phase = "idle"
                            deadline.first_heard(self._timeouts.idle)
                            outcome.first_chunk_at = time.perf_counter()
                        else:
                            deadline.heard()
                        if chunk.text:
                            cap = self._completion_token_cap
                            if outcome.content_chunks >= cap or completion.counted >= cap:
                                raise CompletionCapReached(cap)
                            outcome.content_chunks += 1
                            completion.add(chunk.text)
                        outcome.chunks += 1
                        if chunk.usage is not None:
                            outcome.upstream_usage = chunk.usage
                        if not outcome.upstream_id and chunk.upstream_id:
                            outcome.upstream_id = chunk.upstream_id
                        await self._put(chunk)
                        if chunk.text and outcome.content_chunks == 1:
                            # Give the response side a turn to send the first token before
                            # reading on: from an upstream that sends a burst, the queue would
                            # be filled first.
                            await asyncio.sleep(0)
                    deadline.upstream_done()  # only the client's pace remains
                    await self._put(END)
            except asyncio.CancelledError:
                if deadline.expired and task.cancelling() == 1 and task.uncancel() == 0:
                    raise TimeoutError from None  # our own deadline, and nobody else's cancel
                raise
            finally:
                deadline.cancel()
                self._cut_connection = None
        except TimeoutError:
            if deadline.total_passed:
                phase = "total"
            message = {
                "first_token": "The upstream sent no first token within the first-token timeout.",
                "idle": "The upstream stopped sending within the idle timeout.",
                "total": "The upstream call exceeded the total timeout.",
            }[phase]
            outcome.status = "timeout"
            outcome.error = UpstreamError("timeout", message)
            await self._put(outcome.error)
        except CompletionCapReached as error:
            outcome.status = "rejected"
            outcome.error = error
            await self._put(error)
        except UpstreamError as error:
            outcome.status = "upstream_error"
            outcome.error = error
            await self._put(error)
        except asyncio.CancelledError:
            if not self._ended:  # cut before its end; once ended, the outcome is what it was
                outcome.status = "cancelled"
            stopped = self._stopped
            task = asyncio.current_task()
            if stopped is None or self._ended or task is None or task.cancelling() > 1:
                # The client went away (or the stop came with another cancel: nobody reads), or
                # the call had already ended for the client.
                raise
            task.uncancel()  # our own stop(): end the stream with its error instead
            outcome.error = stopped
            self._put_last(stopped)
        except Exception as error:  # a provider bug must still end the stream cleanly
            logger.exception("provider %s failed", self._provider.name)
            outcome.status = "upstream_error"
            outcome.error = UpstreamError("server_error", f"Upstream failure: {type(error).__name__}")
            await self._put(outcome.error)
        finally:
            outcome.finished_at = time.perf_counter()
            stopped = self._stopped
            if stopped is not None and not self._ended:
                # Stopped while waiting to queue its last item (a slow client, a full queue):
                # the stop's error is that last item, or the client would wait forever.
                outcome.status, outcome.error = "cancelled", stopped
                self._put_last(stopped)


# The most frames joined into one write, in bytes (give or take a frame). The server keeps a few
# writes per connection besides its own buffer (Granian: four queued and one waiting), so for a
# client that stops reading this sizes what the server holds for it.
WRITE_BYTES = 4096


def _joined(frames: list[bytes]) -> bytes:
    """The frames as one write, and the list emptied: while a slow client holds the write, the
    frames are not kept a second time."""
    joined = b"".join(frames)
    frames.clear()
    return joined


async def sse_stream(
    relay: StreamRelay,
    first: QueueItem,
    *,
    framer: Framer,
    finish: Callable[[], Coroutine[Any, Any, None]],
    heartbeat: float,
    on_error: Callable[[UpstreamError], ErrorEvent],
    billed_usage: Callable[[], dict[str, int] | None] = lambda: None,
) -> AsyncGenerator[bytes]:
    """The response body: SSE frames from the relay's queue, batched when several are ready.

    The endpoint's `framer` writes the frames, the end of a complete stream (`[DONE]`, and the
    billed usage for a client that asked for it and got none from the upstream) and the error
    event that ends a failed one. A heartbeat comment keeps idle connections alive. `finish` ends
    the call (stops the upstream, records it): it runs before the last frame, so a client that
    sees the end is in the ledger, and when this generator is closed (the client went away).
    """
    queue = relay.queue
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    beat: asyncio.TimerHandle | None = None

    def beat_if_idle() -> None:
        # One timer per heartbeat interval, not one per chunk: it checks when the client was last
        # sent something, and queues a heartbeat only while the response waits on an empty queue.
        nonlocal beat
        now = loop.time()
        if now - sent_at >= heartbeat and queue.empty():
            queue.put_nowait(HEARTBEAT_DUE)
            beat = loop.call_at(now + heartbeat, beat_if_idle)
        else:
            beat = loop.call_at(max(sent_at + heartbeat, now + heartbeat / 10), beat_if_idle)

    item: QueueItem = first
    try:
        beat = loop.call_at(sent_at + heartbeat, beat_if_idle)
        while True:
            frames: list[bytes] = []
            size = 0
            while True:
                if isinstance(item, ProviderChunk):
                    frame = framer.frame(item)
                    if frame:
                        frames.append(frame)
                        size += len(frame)
                elif isinstance(item, _HeartbeatDue):
                    frames.append(_sse.HEARTBEAT)
                else:
                    # What is ready goes out now; the last frame waits for the settlement: once
                    # a client sees the end, the call is in the ledger and its next request is
                    # checked against the updated spend.
                    if frames:
                        yield _joined(frames)
                    await finish()
                    if isinstance(item, _End):
                        last = framer.end(billed_usage())
                    elif isinstance(item, CompletionCapReached | CallStopped):
                        last = framer.error(item)
                    else:
                        last = framer.error(on_error(item))
                    if last:
                        yield last
                    return
                if queue.empty() or size >= WRITE_BYTES:
                    break
                item = queue.get_nowait()
            if frames:
                yield _joined(frames)
                sent_at = loop.time()
            item = await queue.get()
    finally:
        if beat is not None:
            beat.cancel()
        await finish()
