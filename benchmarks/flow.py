"""Flow control, measured: how many bytes a slow consumer's side of a server stream buffers.

The server streams 64 KiB items as fast as credit allows; the client takes one item every few
milliseconds. The figure reported is the largest number of received-but-unconsumed bytes seen
on the client for that stream, against the protocol's window (``INITIAL_WINDOW``): flow control
holds it under the window plus one message, whatever the producer's speed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from typing import Any

import structlog

import vrpc
from services.echo import Echo, EchoImpl
from vrpc.proto.connection import INITIAL_WINDOW

ITEM = 64 * 1024


def _buffered(client: vrpc.Client) -> int:
    proto = client._proto
    if proto is None:
        return 0
    total = 0
    for pending in proto.pending.values():
        if pending.items is not None:
            total += sum(size for _, size in pending.items._queue)  # type: ignore[attr-defined]
    return total


async def _measure(items: int, delay: float) -> dict[str, Any]:
    os.environ.setdefault("VRPC_INSECURE_TEST_ATTESTATION", "1")
    attester = vrpc.InsecureTestAttester(seed=b"bench-flow")
    with tempfile.TemporaryDirectory(prefix="vrpc-flow-") as tmp:
        uri = f"unix://{tmp}/flow.sock"
        server = vrpc.Server([EchoImpl()], attester=attester)
        await server.start(uri)
        try:
            async with vrpc.connect(
                uri, policy=attester.policy(), root=attester.trust_root()
            ) as client:
                peak = 0
                received = 0
                async for item in client.stub(Echo).stream(ITEM, items):
                    received += len(item)
                    peak = max(peak, _buffered(client))
                    await asyncio.sleep(delay)  # the slow consumer
                    peak = max(peak, _buffered(client))
        finally:
            await server.close(grace=0)
    return {
        "item_bytes": ITEM,
        "items": items,
        "consumer_delay_ms": delay * 1000,
        "window_bytes": INITIAL_WINDOW,
        "max_buffered_bytes": peak,
        "bound_bytes": INITIAL_WINDOW + ITEM,
        "received_bytes": received,
    }


def measure(quick: bool) -> dict[str, Any]:
    """Run the measurement in a fresh event loop (stdlib asyncio; buffering, not speed)."""
    # Errors only, as in the benchmark workers: the test attester's warnings are expected here.
    # This runs in the suite's own process (and in tests): restore the caller's configuration.
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    try:
        return asyncio.run(_measure(items=20 if quick else 200, delay=0.002))
    finally:
        structlog.configure(**saved)
