"""Warm sandboxes, prepared ahead of time per shape (image layers, disk size, profile ids).

A warm sandbox is an init that has built the root (namespaces created, overlay and /proc
mounted, pivoted) and waits for its go message, already placed in a fresh cgroup of its own.
A job takes one; the last steps (limits, files, uid drop, seccomp, spawn) run; the pool
refills in the background once the job's result is out (at once when the job took the
last warm sandbox). Every job still gets a fresh sandbox: an init serves exactly one
job and dies with it, its tmpfs (the writable layer) and its cgroup with it.

Idle cost: one sleeping init process per warm sandbox (a fork of the small spawner) and its
empty tmpfs; no memory is charged to a cgroup until the job runs.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..cgroups import JobCgroup
from ..errors import SandboxError
from ..jail.plan import SandboxShape
from .spawner import InitHandle

if TYPE_CHECKING:
    from .core import Supervisor


def layer_ids(lower: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """Which directories the layer paths are now (a layer deleted and unpacked again is
    another directory: a warm sandbox mounted over the old one is stale)."""
    ids = []
    for path in lower:
        try:
            st = os.stat(path)
        except OSError:
            return ()
        ids.append((st.st_dev, st.st_ino))
    return tuple(ids)


@dataclass
class Sandbox:
    """A ready init and the cgroup it already sits in."""

    init: InitHandle
    cgroup: JobCgroup
    layers: tuple[tuple[int, int], ...] = ()

    async def destroy(self) -> None:
        """Kill the init (and so everything in its namespaces), then remove the cgroup."""
        with trio.CancelScope(shield=True):
            self.init.kill()
            await self.init.wait_dead()
            self.init.close()
            with contextlib.suppress(SandboxError):
                # Removing a cgroup can take milliseconds in the kernel: never on the event
                # loop, where other jobs' events wait.
                await trio.to_thread.run_sync(self.cgroup.remove)


class Pool:
    """Up to ``size`` warm sandboxes for each of the ``max_shapes`` most recently used
    shapes. ``size`` 0 prepares every sandbox on demand."""

    def __init__(self, supervisor: Supervisor, size: int, *, max_shapes: int = 8,
                 parallel: int | None = None) -> None:
        self.supervisor = supervisor
        self.size = size
        self.max_shapes = max_shapes
        self.parallel = parallel or max(2, os.cpu_count() or 1)
        self.idle: OrderedDict[SandboxShape, list[Sandbox]] = OrderedDict()
        self._filling: dict[SandboxShape, int] = {}
        self._nursery: trio.Nursery | None = None
        self.created = 0
        self.served_warm = 0
        self.served_cold = 0

    def attach(self, nursery: trio.Nursery) -> None:
        """Give the pool a nursery for background work: refills, and destroying used
        sandboxes after their result is out (the daemon does; the embedded CLI does not,
        and then sandboxes are prepared on demand and destroyed inline)."""
        self._nursery = nursery

    @property
    def background(self) -> trio.Nursery | None:
        return self._nursery

    async def take(self, shape: SandboxShape) -> Sandbox:
        idle = self.idle.get(shape)
        if idle is not None:
            self.idle.move_to_end(shape)
        current = layer_ids(shape.lower) if idle else ()
        while idle:
            sandbox = idle.pop()
            if sandbox.init.alive() and sandbox.layers == current:
                if not idle:  # the last warm one: refill now, more jobs may be coming
                    self._refill(shape)
                self.served_warm += 1
                return sandbox
            if self._nursery is not None:
                self._nursery.start_soon(sandbox.destroy)
            else:
                await sandbox.destroy()
        self._refill(shape)
        self.served_cold += 1
        return await self.supervisor.new_sandbox(shape)

    def warm(self, shape: SandboxShape) -> None:
        """Start filling the pool for ``shape`` up to its size: at daemon start, and when a
        job's result is out. (A job that takes a warm sandbox does not start its refill
        unless it took the last one: a refill, about 4 ms of CPU, would compete with the
        job it was taken for.)"""
        self._refill(shape)

    def _refill(self, shape: SandboxShape) -> None:
        if self.size <= 0 or self._nursery is None or shape.upper_dir:
            return
        idle = self.idle.setdefault(shape, [])
        self.idle.move_to_end(shape)
        while len(self.idle) > self.max_shapes:
            _, evicted = self.idle.popitem(last=False)
            for sandbox in evicted:
                self._nursery.start_soon(sandbox.destroy)
        missing = self.size - len(idle) - self._filling.get(shape, 0)
        for _ in range(max(0, min(missing, self.parallel))):
            self._filling[shape] = self._filling.get(shape, 0) + 1
            self._nursery.start_soon(self._fill_one, shape)

    async def _fill_one(self, shape: SandboxShape) -> None:
        try:
            sandbox = await self.supervisor.new_sandbox(shape)
        except SandboxError:
            return  # the job path reports set-up failures; do not spin here
        finally:
            self._filling[shape] -= 1
        self.created += 1
        idle = self.idle.get(shape)
        if idle is None or len(idle) >= self.size:
            await sandbox.destroy()
        else:
            idle.append(sandbox)

    def stats(self) -> dict[str, int]:
        return {"size": self.size, "idle": sum(len(v) for v in self.idle.values()),
                "shapes": len(self.idle), "warm_hits": self.served_warm,
                "cold_starts": self.served_cold}

    async def drain(self) -> None:
        shapes, self.idle = self.idle, OrderedDict()
        for sandboxes in shapes.values():
            for sandbox in sandboxes:
                await sandbox.destroy()
