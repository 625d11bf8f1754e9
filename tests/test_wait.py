"""The one waiting helper of the tests (tests/support/wait.py): it returns what it waited for, and when the
hang guard fires it says what was awaited and what it saw last (in-process, milliseconds)."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.wait import eventually, eventually_sync


async def test_returns_the_first_truthy_value_of_a_sync_or_async_condition() -> None:
    calls: list[int] = []

    def sync() -> list[int]:
        calls.append(1)
        return calls if len(calls) >= 3 else []

    assert await eventually(sync, what="three calls", interval=0) == [1, 1, 1]

    async def later() -> str:
        await asyncio.sleep(0)
        return "yes"

    assert await eventually(later, what="an async answer") == "yes"
    assert eventually_sync(lambda: 7, what="a sync answer") == 7


async def test_gives_up_saying_what_and_the_last_value() -> None:
    with pytest.raises(AssertionError, match=r"waiting for the answer; last value: 0") as info:
        await eventually(lambda: 0, what="the answer", timeout=0.05, info=lambda: "context here")
    assert "context here" in str(info.value)
    with pytest.raises(AssertionError, match=r"waiting for the sync answer; last value: ''"):
        eventually_sync(lambda: "", what="the sync answer", timeout=0.05, interval=0.01)


async def test_ignored_errors_count_as_not_yet_others_propagate() -> None:
    attempts: list[int] = []

    def flaky() -> bool:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionRefusedError("not yet")
        return True

    assert await eventually(flaky, what="a connection", interval=0, ignore=(OSError,)) is True
    def down() -> bool:
        raise ConnectionRefusedError("down")

    with pytest.raises(AssertionError, match=r"last error: ConnectionRefusedError\('down'\)"):
        await eventually(down, what="x", timeout=0.05, ignore=(OSError,))
    def broken() -> bool:
        raise KeyError("missing")

    with pytest.raises(KeyError):
        await eventually(broken, what="x", ignore=(OSError,))


async def test_a_watched_task_that_ends_fails_the_wait_at_once() -> None:
    async def dies() -> None:
        raise RuntimeError("publisher crashed")

    task = asyncio.create_task(dies(), name="publisher")
    with pytest.raises(AssertionError, match=r"publisher ended while waiting for events.*publisher crashed"):
        await eventually(lambda: False, what="events", watch=[task, None])
