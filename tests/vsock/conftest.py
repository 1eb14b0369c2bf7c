"""Tests over real AF_VSOCK: they run only inside the vsock lab VM (``make test-vsock``).

Every test in this folder is marked ``vsock`` and skipped unless ``VRPC_VSOCK_LAB=1``, which
``scripts/vsock-lab`` sets inside its guest. Outside the guest this machine's vsock belongs to its
hypervisor: nothing here may open a vsock socket there. Async tests run once per event loop
(stdlib asyncio and uvloop).
"""

from __future__ import annotations

import asyncio
import faulthandler
import itertools
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

IN_LAB = os.environ.get("VRPC_VSOCK_LAB") == "1"
SKIP_REASON = "real AF_VSOCK runs only inside the vsock lab VM: make test-vsock"
_HERE = Path(__file__).resolve().parent

# Ports below 50000 are never used, not even inside the guest, so a test that escaped the lab by
# mistake could not reach a well-known service.
FIRST_PORT = 50000
_ports = itertools.count(FIRST_PORT)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items: touch only those collected from this folder.
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.vsock)
            if not IN_LAB:
                item.add_marker(skip)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]] | None:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency of vrpc
        return factories
    factories["uvloop"] = uvloop.new_event_loop
    return factories


# A test stuck on a broken transport would otherwise hold the VM until the lab's overall timeout:
# dump every thread's stack and end the run instead, so the log shows where it hung.
TEST_WATCHDOG_SECONDS = 120.0


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    if not IN_LAB:
        yield
        return
    faulthandler.dump_traceback_later(TEST_WATCHDOG_SECONDS, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def vsock_port() -> Iterator[int]:
    """A vsock port (>= 50000) no other test in this session uses."""
    yield next(_ports)
