"""Attacks over real AF_VSOCK in the lab: a relay that tampers with records, a debug-mode
enclave, a foreign trust root. Each ends that session only; the server keeps serving."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from hostile_helpers import RawSession, key_update_record
from hostile_helpers import attester as hostile_attester

import vrpc
import vrpc.relay
from services.echo import Echo, EchoImpl
from vrpc.attestation import DEFAULT_TEST_PCRS
from vrpc.relay import Relay

BOUND = 30.0


@pytest.fixture
def attester(monkeypatch: pytest.MonkeyPatch) -> vrpc.InsecureTestAttester:
    monkeypatch.setenv("VRPC_INSECURE_TEST_ATTESTATION", "1")
    return vrpc.InsecureTestAttester(seed=b"vsock-lab")


def connect(uri: str, attester: vrpc.InsecureTestAttester, **options: Any) -> vrpc.Client:
    return vrpc.connect(
        uri, policy=attester.policy(), root=attester.trust_root(), retries=0, **options
    )


async def test_tampering_relay_to_vsock_breaks_only_that_session(
    attester: vrpc.InsecureTestAttester,
    vsock_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = vrpc.Server([EchoImpl()], attester=attester)
    await server.start(f"vsock://ANY:{vsock_port}")
    relay = Relay(f"unix://{tmp_path}/r.sock", f"vsock://LOCAL:{vsock_port}")
    await relay.start()
    armed = {"flip": False}
    original = vrpc.relay._Pipe.data_received

    def tamper(self: vrpc.relay._Pipe, data: bytes) -> None:
        if armed["flip"] and len(data) > 8:
            armed["flip"] = False
            data = data[:-1] + bytes([data[-1] ^ 0x01])  # inside an AEAD tag or ciphertext
        original(self, data)

    monkeypatch.setattr(vrpc.relay._Pipe, "data_received", tamper)
    try:
        async with asyncio.timeout(BOUND):
            async with connect(f"unix://{tmp_path}/r.sock", attester) as victim:
                echo = victim.stub(Echo)
                assert await echo.echo(b"before") == b"before"
                armed["flip"] = True
                with pytest.raises(vrpc.RpcError) as info:
                    await victim.call("echo.v1.echo", [b"x" * 100])
                assert info.value.status is vrpc.Status.UNAVAILABLE
            async with connect(f"vsock://LOCAL:{vsock_port}", attester) as honest:
                assert await honest.stub(Echo).echo(b"still up") == b"still up"
    finally:
        await relay.close()
        await server.close(grace=0)


async def test_debug_mode_enclave_and_foreign_root_refused_over_vsock(
    attester: vrpc.InsecureTestAttester, vsock_port: int
) -> None:
    debug = vrpc.InsecureTestAttester(seed=b"vsock-lab", debug=True)
    server = vrpc.Server([EchoImpl()], attester=debug)
    await server.start(f"vsock://ANY:{vsock_port}")
    try:
        async with asyncio.timeout(BOUND):
            # A policy pinning the real image's PCR0 (and PCR3, which the debug enclave shares)
            # and allowing no debug: the all-zero PCR0 is refused as a debug-mode enclave.
            strict = vrpc.Policy(pcrs={0: DEFAULT_TEST_PCRS[0], 3: DEFAULT_TEST_PCRS[3]})
            with pytest.raises(vrpc.AttestationError, match=r"(?i)debug"):
                async with vrpc.connect(
                    f"vsock://LOCAL:{vsock_port}", policy=strict, root=debug.trust_root()
                ):
                    pass
            other = vrpc.InsecureTestAttester(seed=b"another root")
            with pytest.raises(vrpc.AttestationError):
                async with vrpc.connect(
                    f"vsock://LOCAL:{vsock_port}", policy=debug.policy(), root=other.trust_root()
                ):
                    pass
            async with vrpc.connect(
                f"vsock://LOCAL:{vsock_port}", policy=debug.policy(), root=debug.trust_root()
            ) as ok:
                assert await ok.stub(Echo).echo(b"debug allowed") == b"debug allowed"
    finally:
        await server.close(grace=0)


async def test_resource_attacks_over_vsock_close_only_the_attacker(
    attester: vrpc.InsecureTestAttester, vsock_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Over real AF_VSOCK: a partial 1 MiB message trickled a byte at a time is closed at
    # message_timeout, a KEY_UPDATE flood is closed at once, and an honest client keeps its
    # answers throughout.
    monkeypatch.setenv("VRPC_INSECURE_TEST_ATTESTATION", "1")
    attester = hostile_attester()  # the one RawSession trusts
    server = vrpc.Server([EchoImpl()], attester=attester, message_timeout=0.5)
    await server.start(f"vsock://ANY:{vsock_port}")
    uri = f"vsock://LOCAL:{vsock_port}"
    try:
        async with asyncio.timeout(BOUND), connect(uri, attester) as honest:
            echo = honest.stub(Echo)
            assert await echo.echo(b"before") == b"before"

            trickler = await RawSession.open(uri)
            size = 1024 * 1024
            trickler.send_plain(size.to_bytes(4, "big") + bytes(size - 100))
            started = time.monotonic()
            for i in range(30):  # "activity" that never completes the message
                if trickler.writer.transport.is_closing():
                    break  # the server closed it (uvloop notices before the reader's EOF)
                try:
                    trickler.send_plain(b"\x00")
                except (RuntimeError, ConnectionError):
                    break
                assert await echo.echo(i.to_bytes(2, "big")) == i.to_bytes(2, "big")
                await asyncio.sleep(0.05)
                if trickler.reader.at_eof():
                    break
            assert await trickler.closed_by_server(timeout=5.0)
            assert time.monotonic() - started < 5.0

            flooder = await RawSession.open(uri)
            flooder.send_wire(b"".join(key_update_record(flooder.session) for _ in range(2000)))
            assert await flooder.closed_by_server(timeout=5.0)

            assert await echo.echo(b"after") == b"after"
            assert server.connection_count == 1
    finally:
        await RawSession.close_all()  # raw streams left by a failed assertion too
        await server.close(grace=0)
