"""From the engine's scheduler thread to asyncio: the engine requests of one HTTP request.

The engine calls `on_event` on its scheduler thread; `EngineRun` hands every event to the
event loop with `loop.call_soon_threadsafe` into one queue per HTTP request, tagged with the
choice it belongs to. Nothing here waits on the engine inside the event loop: `submit` runs in a
worker thread, and cancelling only flags the handles. A client that goes away has its requests
cancelled at once, so their slots free within one scheduling step.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Sequence

from grok1.engine import EngineDead, QueueFull, RequestError
from grok1.serve import generation
from grok1.serve.protocol import APIError, bad_request, unavailable


class EngineRun:
    """The engine requests behind `choices` (one each), and their events."""

    def __init__(self, engine, choices: list, metrics=None):
        self.engine, self.choices, self.metrics = engine, choices, metrics
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles: list = []

    @classmethod
    async def start(cls, state, requests: Sequence, choices: list) -> EngineRun:
        """The server's run of `requests` (one per choice), submitted if the queue has room."""
        state.check_capacity(len(requests))
        run = cls(state.engine, choices, state.metrics)
        await run.submit(requests)
        return run

    async def wait(self, receive) -> None:
        """Until every choice has ended; raises the API error of one that ended badly."""
        async for _ in self.events(receive):
            pass
        check_finished(self.choices)

    async def submit(self, requests: Sequence) -> None:
        """Submits every request (all or none); engine refusals become API errors."""
        try:
            await asyncio.to_thread(self._submit_all, requests)
        except RequestError as e:
            raise bad_request(str(e), getattr(e, "param", None)) from None
        except QueueFull:
            raise unavailable("the server's queue is full; retry shortly", "queue_full") from None
        except EngineDead:
            raise unavailable(
                "the engine has stopped; the server must be restarted",
                "engine_dead",
                retry_after_s=30,
            ) from None

    def _submit_all(self, requests) -> None:
        for i, request in enumerate(requests):
            self.choices[i].submitted_at = time.monotonic()
            try:
                handle = self.engine.submit(request, on_event=functools.partial(self._deliver, i))
            except BaseException:
                self.cancel()
                raise
            self.handles.append(handle)

    def _deliver(self, choice: int, event) -> None:
        """On the scheduler thread: never raises (an exception there could stop the engine)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (choice, event, time.monotonic()))
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass

    async def events(self, receive) -> AsyncIterator[tuple[object, object]]:
        """(choice, event) for every event, each choice updated first, until all have ended.

        `receive` is the ASGI receive of the HTTP request, whose body has been read: a
        disconnect cancels every request. Leaving early cancels the unfinished ones too."""
        watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, self))
        open_ = len(self.handles)
        try:
            while open_:
                i, event, at = await self.queue.get()
                choice = self.choices[i]
                choice.add(event, at)
                if event.finish_reason is not None:
                    open_ -= 1
                yield choice, event
        finally:
            watcher.cancel()
            self.cancel()
            if self.metrics is not None:
                for choice in self.choices[: len(self.handles)]:
                    self.metrics.finished(choice)

    async def sse(self, receive, head: dict, piece, stream_options) -> AsyncIterator[str]:
        """The run as server-sent events: `piece(choice, event, first)` makes an event's choice
        entry (None: nothing to send), each sent in `head`; a choice that ends badly (or a bug)
        ends the stream with an error event; the usage last if `stream_options` asks; then
        `[DONE]`."""
        started: set[int] = set()
        try:
            async for c, event in self.events(receive):
                check_finished([c])  # "error", or "cancelled" by the server: ends the stream
                first = c.index not in started
                started.add(c.index)
                entry = piece(c, event, first)
                if entry is not None:
                    yield generation.sse({**head, "choices": [entry]})
        except Exception as e:  # an APIError, or a bug: the client still gets an error event
            yield generation.error_event(e)
        else:
            if stream_options is not None and stream_options.include_usage:
                usage = generation.usage(self.choices)
                yield generation.sse({**head, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    def cancel(self) -> None:
        """Cancels the unfinished requests (a no-op for finished ones); any thread."""
        for handle in self.handles:
            handle.cancel()


async def _cancel_on_disconnect(receive, run: EngineRun) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            run.cancel()
            return


def check_finished(choices) -> None:
    """Raises the API error for a choice that ended "error", or "cancelled" by the server."""
    for choice in choices:
        if choice.finish_reason == "cancelled":
            raise unavailable("the request was cancelled: the server is shutting down", "shutdown")
        if choice.finish_reason == "error":
            raise APIError(500, "the engine failed on this request (its error is in the server's "
                           "log)", type="internal_error", code="engine_error")  # fmt: skip
