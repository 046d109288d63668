"""Admission control: at most ``slots`` jobs run at once; the others wait for a slot.

By default they start in arrival order. With ``fair``, waiting jobs are grouped by owner
(the daemon's connection) and a freed slot goes to the owners in turn, each owner's jobs
in their own arrival order: one client that queues a thousand jobs delays another
client's next job by at most one job per other waiting owner, not by its whole queue.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator

import trio


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.granted = False


class Admission:
    """``async with admission.slot(owner):`` runs the body holding one of ``slots``."""

    def __init__(self, slots: int, *, fair: bool = False) -> None:
        self.slots = slots
        self.fair = fair
        self._free = slots
        # Owners with waiting jobs, in the order their turns come (one key unless fair).
        self._waiting: OrderedDict[str, deque[_Waiter]] = OrderedDict()

    @property
    def value(self) -> int:
        """Free slots now (0 when a new job would wait)."""
        return self._free

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @contextlib.asynccontextmanager
    async def slot(self, owner: str = "") -> AsyncIterator[None]:
        await self._acquire(owner)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, owner: str) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        key = owner if self.fair else ""
        waiter = _Waiter()
        self._waiting.setdefault(key, deque()).append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:  # the slot came with the cancellation: pass it on
                self._release()
            else:
                queue = self._waiting[key]
                queue.remove(waiter)
                if not queue:
                    del self._waiting[key]
            raise

    def _release(self) -> None:
        if not self._waiting:
            self._free += 1
            return
        key, queue = next(iter(self._waiting.items()))
        waiter = queue.popleft()
        if queue:
            self._waiting.move_to_end(key)  # its next job waits for the other owners' turn
        else:
            del self._waiting[key]
        waiter.granted = True
        waiter.event.set()
