"""Run a request handler inline: most calls never wait, so they should not pay for a task.

``drive(coro, loop)`` runs the coroutine on the caller's stack up to its first suspension. A handler that
finishes without suspending (Create, Start, Status, ...) costs no task and no extra turn of the
event loop; one that waits (Controller.Wait, Stop, a first module compile) carries on in a task,
exactly as if it had been wrapped in one from the start (cancellation included).
"""

from __future__ import annotations

import asyncio
import inspect
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


def drive(coro: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop) -> asyncio.Future[T]:
    """A future of ``coro``'s outcome on ``loop`` (the running one), already done when it never suspended."""
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        done: asyncio.Future[T] = loop.create_future()
        done.set_result(stop.value)
        return done
    except Exception as exc:
        failed: asyncio.Future[T] = loop.create_future()
        failed.set_exception(exc)
        return failed
    task = loop.create_task(_resume(coro, yielded))
    task.add_done_callback(lambda done: _cancel_unstarted(coro) if done.cancelled() else None)
    return task


def _cancel_unstarted(coro: Coroutine[Any, Any, Any]) -> None:
    """A task cancelled before its first step never reached ``coro``: deliver the cancellation."""
    if inspect.getcoroutinestate(coro) == inspect.CORO_SUSPENDED:
        try:
            coro.throw(asyncio.CancelledError())
        except (asyncio.CancelledError, Exception):  # it ends as a cancelled call ends
            return
        coro.close()  # it kept waiting: there is no task left to wait in


async def _resume(coro: Coroutine[Any, Any, T], yielded: Any) -> T:
    result: T = await _continue(coro, yielded)
    return result


@types.coroutine
def _continue(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Hand what ``coro`` yielded (the future it waits on) to the task, and feed its answer back."""
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # the task's cancellation (or close) goes on to the handler
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value
