"""Admission control on its own: which waiting job gets a freed slot."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sandbox.supervisor.admission import Admission


async def _start_order(admission: Admission, jobs: list[tuple[str, str]]) -> list[str]:
    """Queue ``jobs`` (owner, name) behind one running job; the order in which they run."""
    started: list[str] = []
    gate = trio.Event()

    async def job(owner: str, name: str) -> None:
        async with admission.slot(owner):
            started.append(name)
            if name == "first":
                await gate.wait()
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(job, "a", "first")
        await trio.testing.wait_all_tasks_blocked()
        for owner, name in jobs:
            nursery.start_soon(job, owner, name)
            await trio.testing.wait_all_tasks_blocked()
        assert admission.value == 0 and admission.waiting == len(jobs)
        gate.set()
    assert admission.value == admission.slots and admission.waiting == 0
    return started[1:]


QUEUE = [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1"), ("b", "b2")]


def test_arrival_order_by_default() -> None:
    order = trio.run(_start_order, Admission(1), QUEUE)
    assert order == ["a1", "a2", "a3", "b1", "c1", "b2"]


def test_fair_takes_turns_between_owners() -> None:
    order = trio.run(_start_order, Admission(1, fair=True), QUEUE)
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]


@pytest.mark.parametrize("fair", [False, True])
def test_a_cancelled_waiter_leaves_its_place_and_a_granted_one_passes_the_slot_on(
        fair: bool) -> None:
    async def main() -> list[str]:
        admission = Admission(1, fair=fair)
        started: list[str] = []
        gate = trio.Event()

        async def job(name: str, scope: trio.CancelScope | None = None) -> None:
            with scope or trio.CancelScope():
                async with admission.slot(name):
                    started.append(name)
                    if name == "first":
                        await gate.wait()

        cancelled, granted = trio.CancelScope(), trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job, "first")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(job, "cancelled", cancelled)
            nursery.start_soon(job, "granted", granted)
            nursery.start_soon(job, "last")
            await trio.testing.wait_all_tasks_blocked()
            cancelled.cancel()  # leaves the queue before its turn
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
            granted.cancel()  # the slot is handed to it and it is cancelled before it runs
        assert admission.value == 1 and admission.waiting == 0
        return started

    assert trio.run(main) == ["first", "last"]


def test_several_slots_and_nobody_waits_while_one_is_free() -> None:
    async def main() -> None:
        admission = Admission(2, fair=True)
        async with admission.slot("a"), admission.slot("a"):
            assert admission.value == 0
        assert admission.value == 2

    trio.run(main)
