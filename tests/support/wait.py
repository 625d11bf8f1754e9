"""Waiting in tests, the one way: poll a condition until it holds.

Tests assert order, completeness and state, never speed (speed is measured in bench/). So a test never
sleeps "long enough" for something to happen: it waits for the thing itself with `eventually`, whose
timeout is a hang guard (generous, so a loaded machine does not fail a correct gateway), not a
threshold. When the guard fires, the message says what was awaited and the last value seen.

`eventually` takes a sync or an async condition; `eventually_sync` is the same for code that runs
outside an event loop (threads, subprocess start-up).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar, overload

T = TypeVar("T")

HANG_S = 30.0
"""Default hang guard: far above any healthy wait on this (shared, 2-core) machine."""


def _show(value: object, limit: int = 600) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _gave_up(
    what: str, timeout: float, last: object, error: BaseException | None, info: Callable[[], str] | None
) -> AssertionError:
    message = f"gave up after {timeout:g}s waiting for {what}; last value: {_show(last)}"
    if error is not None:
        message += f"; last error: {error!r}"
    if info is not None:
        message += f"\n{info()}"
    return AssertionError(message)


def _check_watched(watch: Iterable[asyncio.Task[Any] | None], what: str, info: Callable[[], str] | None) -> None:
    for task in watch:
        if task is not None and task.done():
            exc = None if task.cancelled() else task.exception()
            extra = f"\n{info()}" if info is not None else ""
            raise AssertionError(f"{task.get_name()} ended while waiting for {what}: {exc!r}{extra}")


@overload
async def eventually(
    condition: Callable[[], Awaitable[T]], *, what: str, timeout: float = ..., interval: float = ...,
    ignore: tuple[type[BaseException], ...] = ..., watch: Iterable[asyncio.Task[Any] | None] = ...,
    info: Callable[[], str] | None = ...,
) -> T: ...


@overload
async def eventually(
    condition: Callable[[], T], *, what: str, timeout: float = ..., interval: float = ...,
    ignore: tuple[type[BaseException], ...] = ..., watch: Iterable[asyncio.Task[Any] | None] = ...,
    info: Callable[[], str] | None = ...,
) -> T: ...


async def eventually(
    condition: Callable[[], Any],
    *,
    what: str,
    timeout: float = HANG_S,
    interval: float = 0.02,
    ignore: tuple[type[BaseException], ...] = (),
    watch: Iterable[asyncio.Task[Any] | None] = (),
    info: Callable[[], str] | None = None,
) -> Any:
    """Call `condition` (sync, or async and awaited) until it returns something truthy; return that.

    `what` names the awaited state for the failure message. Exceptions of the types in `ignore` count
    as "not yet" (e.g. connection refused while a server starts); others propagate at once. A task in
    `watch` that ends meanwhile fails the wait at once (a background publisher or reader died), and
    `info()` adds context to any failure."""
    watch = list(watch)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = None
    error: BaseException | None = None
    while True:
        _check_watched(watch, what, info)
        try:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
        except ignore as exc:
            error = exc
        else:
            if value:
                return value
            last, error = value, None
        if loop.time() > deadline:
            raise _gave_up(what, timeout, last, error, info)
        await asyncio.sleep(interval)


def eventually_sync(
    condition: Callable[[], T],
    *,
    what: str,
    timeout: float = HANG_S,
    interval: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
    info: Callable[[], str] | None = None,
) -> T:
    """`eventually` for code without an event loop (blocks the calling thread between attempts)."""
    deadline = time.monotonic() + timeout
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            value = condition()
        except ignore as exc:
            error = exc
        else:
            if value:
                return value
            last, error = value, None
        if time.monotonic() > deadline:
            raise _gave_up(what, timeout, last, error, info)
        time.sleep(interval)
