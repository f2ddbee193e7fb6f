"""Continuous batching: one background task owns the backend and feeds every request's queue.

Requests are split into rows (one per choice) and wait in a FIFO; before every decoding step
the scheduler moves as many waiting rows into free slots as there are, and cancels the rows of
requests whose client went away, so a slot is freed on the very next step. The step itself runs
in a single worker thread: the event loop stays free to accept requests and stream tokens, and
no two model forwards ever overlap.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from r1kit.engine import SamplingParams
from r1kit.serve.backends import Admission, RowFailed

log = logging.getLogger("r1kit.serve")
_CANCELLED = object()  # queue sentinel: the request was cancelled, stop reading


class RequestFailed(RuntimeError):
    """The backend failed while this request was running (a server-side error)."""


class Handle:
    """A submitted request: its choices' tokens arrive on `queue` as (index, token, finish_reason)."""

    def __init__(self, rid: str, n: int):
        self.id, self.n = rid, n
        self.queue: asyncio.Queue = asyncio.Queue()
        self.running = n  # choices not finished yet (scheduler side)
        self.done = False  # consumer side: every choice finished, or cancelled, or failed
        self.cancelled = False

    async def events(self):
        """Yield (index, token, finish_reason) until every choice has finished."""
        async for batch in self.batches():
            for item in batch:
                yield item

    async def batches(self):
        """Like events(), but everything that has arrived comes at once: a consumer that fell
        behind (a busy server) catches up in one go, e.g. with one network write."""
        left = self.n
        try:
            while left:
                items = [await self.queue.get()]
                while not self.queue.empty():
                    items.append(self.queue.get_nowait())
                for i, item in enumerate(items):
                    if item is _CANCELLED:
                        return
                    if isinstance(item, BaseException):
                        if i:
                            yield items[:i]
                        raise item
                    left -= item[2] is not None
                yield items
        finally:
            self.done = True


class Scheduler:
    def __init__(self, backend):
        self.backend = backend
        self._pending: deque[Admission] = deque()
        self._handles: dict[str, Handle] = {}
        self._cancels: list[tuple] = []
        self._ids = itertools.count()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="r1kit-decode")
        self.finished = self.cancelled = 0  # requests, since start (shown by /health)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # -- lifecycle (inside the server's event loop) ---------------------------------------------
    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="r1kit-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    @property
    def stats(self) -> dict:
        return {"running": self.backend.active, "waiting": len(self._pending), "capacity": self.backend.capacity,
                "finished": self.finished, "cancelled": self.cancelled}

    # -- requests -------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: list[SamplingParams]) -> Handle:
        rid = f"req{next(self._ids)}"
        handle = Handle(rid, len(params))
        self._handles[rid] = handle
        self._pending.extend(Admission((rid, i), prompt, sp) for i, sp in enumerate(params))
        self._wake.set()
        return handle

    def cancel(self, rid: str) -> None:
        """Forget a request: its waiting rows are dropped, its running rows freed next step."""
        handle = self._handles.pop(rid, None)
        if handle is None:  # finished (or cancelled) already
            return
        self._pending = deque(a for a in self._pending if a.tag[0] != rid)
        self._cancels.extend((rid, i) for i in range(handle.n))
        handle.cancelled = True
        self.cancelled += 1
        handle.queue.put_nowait(_CANCELLED)
        self._wake.set()

    # -- the loop -------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not (self.backend.active or self._pending or self._cancels):
                self._wake.clear()
                await self._wake.wait()
            admit = [self._pending.popleft() for _ in range(min(self.backend.free_slots, len(self._pending)))]
            cancels, self._cancels = self._cancels, []
            try:
                events = await loop.run_in_executor(self._pool, self.backend.tick, admit, cancels)
            except Exception as e:  # a failing step must not take the server down with it
                log.exception("decoding step failed; failing the running requests")
                self._fail_all(e)
                continue
            self._dispatch(events)

    def _dispatch(self, events) -> None:
        for (rid, index), token, reason in events:
            handle = self._handles.get(rid)
            if handle is None:  # cancelled, finished or failed while the step ran
                continue
            if isinstance(reason, RowFailed):  # this request alone fails; its other rows are freed
                log.warning("request %s failed: %s", rid, reason)
                self._fail(rid, handle, RequestFailed(f"generation failed: {reason}"))
                self._cancels.extend((rid, i) for i in range(handle.n) if i != index)
                continue
            handle.queue.put_nowait((index, token, reason))
            if reason is not None:
                handle.running -= 1
                if handle.running == 0:
                    del self._handles[rid]
                    self.finished += 1

    def _fail(self, rid: str, handle: Handle, error: RequestFailed) -> None:
        handle.queue.put_nowait(error)
        self._pending = deque(a for a in self._pending if a.tag[0] != rid)
        del self._handles[rid]

    def _fail_all(self, error: Exception) -> None:
        """Requests with rows in the backend get the error and the backend restarts empty;
        requests that were only waiting keep their place."""
        waiting: dict[str, int] = {}
        for a in self._pending:
            waiting[a.tag[0]] = waiting.get(a.tag[0], 0) + 1
        for rid, handle in list(self._handles.items()):
            if waiting.get(rid, 0) < handle.running:  # some of its rows were in the failed batch
                self._fail(rid, handle, RequestFailed(f"generation failed: {type(error).__name__}: {error}"))
        self._cancels.clear()
        self.backend.reset()
