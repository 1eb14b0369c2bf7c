"""Soak scenario at the default timing settings (part of ``make soak``).

The suite tests keepalive, idle and session age with short intervals; this runs the behaviour
that shows within a soak's minutes at the *defaults*: a server and a client built with no timing
options, one connection left idle across several keepalive intervals (30 s) and then used again,
and one call that runs longer than the keepalive interval. Both must succeed on the same
connection, with no reconnect and no re-attestation.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time

os.environ.setdefault("VRPC_INSECURE_TEST_ATTESTATION", "1")

import vrpc
from vrpc.server import Server

KEEPALIVE_DEFAULT = 30.0


class Sleeper(vrpc.Service, name="soak.sleeper.v1"):
    @vrpc.rpc
    async def sleep(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds


async def run(seconds: float) -> tuple[list[str], str]:
    """Returns (failures, summary). Needs at least ~2.2 keepalive intervals of ``seconds``."""
    failures: list[str] = []
    idle = max(2.2 * KEEPALIVE_DEFAULT, min(seconds * 0.45, 4 * KEEPALIVE_DEFAULT))
    long_call = KEEPALIVE_DEFAULT * 1.2
    attester = vrpc.InsecureTestAttester(seed=b"soak-defaults")
    elapsed = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"unix://{tmp}/defaults.sock"
        server = Server([Sleeper()], attester=attester)  # every timing option at its default
        await server.start(uri)
        try:
            async with vrpc.connect(
                uri, policy=attester.policy(), root=attester.trust_root()
            ) as client:
                stub = client.stub(Sleeper)
                await stub.sleep(0)
                first = client._proto
                started = time.monotonic()
                await asyncio.sleep(idle)
                if await stub.sleep(0) != 0 or client._proto is not first:
                    failures.append(f"defaults: idle {idle:.0f} s broke or replaced the connection")
                if await stub.sleep(long_call) != long_call or client._proto is not first:
                    failures.append(f"defaults: a {long_call:.0f} s call failed or reconnected")
                if server.connection_count != 1:
                    failures.append(f"defaults: {server.connection_count} connections, want 1")
                elapsed = time.monotonic() - started
        finally:
            await server.close(grace=0)
    summary = (
        f"defaults: idle {idle:.0f} s then a {long_call:.0f} s call on one connection "
        f"(keepalive {KEEPALIVE_DEFAULT:.0f} s) in {elapsed:.0f} s: "
        + ("ok" if not failures else "FAILED")
    )
    return failures, summary
