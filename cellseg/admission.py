"""How the service takes on work: a pixel budget for requests, and batching without memory of waits.

Admission by a pixel budget.

Memory and time of a request grow with its pixels (a 16-megapixel `report` needs about 600 MB), so
counting requests says little: eight concurrent 16 MP requests peaked at 5.1 GB and, queued in the
network's batcher past its latency limit, got 503s with a traceback. A request first takes its pixels
from the budget (network pixels: TTA counts four times) and gives them back when it is answered;
requests that do not fit wait in arrival order, so a large one is not starved by small ones. A request
larger than the whole budget runs alone. One that has waited `timeout_s` is refused with
`Overloaded`, which the service answers as a documented 503 with `Retry-After`.

Batching: see `NoWaitMemoryOptimizer`.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from bentoml._internal.marshal import dispatcher as bentoml_dispatcher


class Overloaded(Exception):
    """The request waited too long for its share of the pixel budget."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PixelBudget:
    """An asyncio, first-come-first-served semaphore counted in pixels (one event loop only)."""

    def __init__(self, capacity: int, timeout_s: float):
        if capacity <= 0:
            raise ValueError(f"pixel budget must be positive, got {capacity}")
        self.capacity = capacity
        self.available = capacity
        self.timeout_s = timeout_s
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def in_use(self) -> int:
        return self.capacity - self.available

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @asynccontextmanager
    async def admit(self, pixels: int) -> AsyncIterator[None]:
        cost = max(1, min(int(pixels), self.capacity))
        await self._acquire(cost)
        try:
            yield
        finally:
            self._release(cost)

    async def _acquire(self, cost: int) -> None:
        if not self._waiting and cost <= self.available:
            self.available -= cost
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (cost, granted)
        self._waiting.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(granted), timeout=self.timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if granted.done() and not granted.cancelled():
                self._release(cost)  # granted just as the wait ended: give it straight back
            else:
                granted.cancel()
                self._waiting.remove(entry)
                self._grant_waiting()  # the head may have been this request, blocking smaller ones
            if isinstance(exc, TimeoutError):
                raise Overloaded(f"the service is busy with other images ({self.in_use:,} of {self.capacity:,} "
                                 f"pixels in work, {self.queued} requests waiting); waited {self.timeout_s:.0f} s",
                                 retry_after_s=max(1, round(self.timeout_s / 4))) from None
            raise

    def _release(self, cost: int) -> None:
        self.available += cost
        self._grant_waiting()

    def _grant_waiting(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.available:
            cost, granted = self._waiting.popleft()
            self.available -= cost
            granted.set_result(None)


class NoWaitMemoryOptimizer(bentoml_dispatcher.Optimizer):
    """BentoML's batching statistics without their memory of past waits.

    BentoML's dispatcher holds a lone request back, hoping for company, for as long as the mean queue
    wait of its last 50 calls. That wait includes time spent behind a busy network, so after a few large
    images the mean reached seconds, every later request was held back that long, and its own long wait
    kept the mean up: 704x520 images took 8 s instead of 0.13 s, 17 minutes later still 24 s. On a CPU a
    batch of n costs about n single calls, so holding a request while the network is idle only adds
    latency. Here the dispatcher sends whatever is queued as soon as the network is free; batches still
    form from the requests that arrive while it is busy (the adaptive batch-size metric shows them).
    """

    def trigger_refresh(self) -> None:
        super().trigger_refresh()
        self.wait = 0


def batch_without_wait_memory() -> None:
    """Make every BentoML batcher built from now on use `NoWaitMemoryOptimizer` (BentoML has no
    setting for it; its dispatcher module looks the class up when a batcher is built). BentoML is
    pinned, and tests/test_admission.py runs its real dispatcher through this."""
    bentoml_dispatcher.Optimizer = NoWaitMemoryOptimizer
