"""Warm sandboxes, prepared ahead of time per shape (image layers, disk size, profile ids).

A job takes a ready init (namespaces created, root assembled, waiting for its go message);
the pool refills in the background. Every job still gets a fresh sandbox: an init serves
exactly one job and dies with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ..errors import SandboxError
from ..jail.plan import SandboxShape
from .spawner import InitHandle

if TYPE_CHECKING:
    from .core import Supervisor


class Pool:
    def __init__(self, supervisor: Supervisor, size: int) -> None:
        self.supervisor = supervisor
        self.size = size
        self.idle: dict[SandboxShape, list[InitHandle]] = {}
        self._filling: set[SandboxShape] = set()
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Give the pool a nursery for background refills (the daemon does; the embedded
        CLI does not, and then the pool only prepares on demand)."""
        self._nursery = nursery

    async def take(self, shape: SandboxShape) -> InitHandle:
        idle = self.idle.get(shape)
        while idle:
            init = idle.pop()
            if not init.alive():
                init.close()
                continue
            self._refill(shape)
            return init
        self._refill(shape)
        return await self.supervisor.new_sandbox(shape)

    def _refill(self, shape: SandboxShape) -> None:
        if self.size <= 0 or self._nursery is None or shape in self._filling or shape.upper_dir:
            return
        self._filling.add(shape)
        self._nursery.start_soon(self._fill, shape)

    async def _fill(self, shape: SandboxShape) -> None:
        try:
            idle = self.idle.setdefault(shape, [])
            while len(idle) < self.size:
                try:
                    init = await self.supervisor.new_sandbox(shape)
                except SandboxError:
                    return  # the job path reports set-up failures; do not spin here
                idle.append(init)
        finally:
            self._filling.discard(shape)

    async def drain(self) -> None:
        for inits in self.idle.values():
            for init in inits:
                await init.discard()
        self.idle.clear()
