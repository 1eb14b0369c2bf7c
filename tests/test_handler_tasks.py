"""Each call's handler runs in an asyncio Task of its own, named after the method, and a task
factory the application installed on the loop is honoured."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import vrpc


class Tasks(vrpc.Service, name="tasks.v1"):
    @vrpc.rpc
    async def whoami(self) -> str: ...


class TasksImpl(Tasks):
    async def whoami(self) -> str:
        task = asyncio.current_task()
        assert task is not None
        async with asyncio.timeout(5):  # needs a real task
            await asyncio.sleep(0)
        return task.get_name()


@pytest.mark.parametrize("transport", ["memory"])
async def test_the_handler_task_is_named_after_its_method(
    serve: Callable[..., Any], uri: str
) -> None:
    async with serve(uri, [TasksImpl()]) as (_, client):
        assert await client.stub(Tasks).whoami() == "tasks.v1.whoami"


@pytest.mark.parametrize("transport", ["memory"])
async def test_an_installed_task_factory_makes_the_handler_tasks(
    serve: Callable[..., Any], uri: str
) -> None:
    loop = asyncio.get_running_loop()
    made: list[str] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        made.append(coro.__qualname__)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    try:
        async with serve(uri, [TasksImpl()]) as (_, client):
            assert await client.stub(Tasks).whoami() == "tasks.v1.whoami"
    finally:
        loop.set_task_factory(None)
    assert "_ServerConnection._run" in made  # the factory made the handler's task
