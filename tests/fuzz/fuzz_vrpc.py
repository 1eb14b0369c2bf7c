"""Coverage-guided fuzzing of vrpc's parsers with atheris (libFuzzer).

    python tests/fuzz/fuzz_vrpc.py TARGET [libFuzzer options, e.g. -runs=200000 -max_len=70000]

Targets and the contract each one checks (anything else raised is a finding and stops the run):

* ``frames``      FrameDecoder.feed over random splits: only FrameTooLarge; frames round-trip.
* ``connection``  server-role Connection.receive_data: only RemoteProtocolError (RecursionError
                  from the MessagePack decoder on deep nesting is handled by the shell; see
                  docs/reliability.md).
* ``handshake``   ServerHandshake.receive_data on arbitrary bytes: only HandshakeError,
                  RemoteProtocolError (FrameTooLarge) or AttestationError.
* ``records``     a sender seals fuzz-chosen plaintext, the fuzzer flips bytes and re-splits the
                  wire: the receiver returns exactly the plaintext or raises RemoteProtocolError;
                  it never returns different bytes.
* ``attestation`` verify_document against the test root: only AttestationError subclasses.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime

import atheris

os.environ.setdefault("VRPC_INSECURE_TEST_ATTESTATION", "1")

with atheris.instrument_imports(include=["vrpc"]):
    from vrpc.attestation import InsecureTestAttester
    from vrpc.attestation._document import verify_document
    from vrpc.exceptions import (
        AttestationError,
        FrameTooLarge,
        HandshakeError,
        RemoteProtocolError,
    )
    from vrpc.proto.connection import Connection, Role
    from vrpc.proto.framing import FrameDecoder
    from vrpc.proto.handshake import ServerHandshake
    from vrpc.proto.record import RecordSession


def _splits(fdp: atheris.FuzzedDataProvider, data: bytes) -> list[bytes]:
    pieces, pos = [], 0
    while pos < len(data):
        n = fdp.ConsumeIntInRange(1, 4096) if fdp.remaining_bytes() else len(data) - pos
        pieces.append(data[pos : pos + n])
        pos += n
    return pieces


def frames(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    limit = fdp.ConsumeIntInRange(1, 70_000)
    stream = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 70_000))
    decoder = FrameDecoder(limit)
    got: list[bytes] = []
    try:
        for piece in _splits(fdp, stream):
            got.extend(decoder.feed(piece))
    except FrameTooLarge:
        return
    assert decoder.buffered <= limit + 4
    assert sum(4 + len(f) for f in got) + decoder.buffered == len(stream)


def connection(data: bytes) -> None:
    # The whole input is the message stream, fed in two pieces (frame splits: ``frames``).
    conn = Connection(Role.SERVER, max_receive_message_size=65536)
    half = len(data) // 2
    try:
        conn.receive_data(data[:half], 0.0)
        conn.receive_data(data[half:], 0.0)
        conn.handle_timer(1e9)  # deadlines of whatever calls were opened
    except (RemoteProtocolError, RecursionError):
        return


def handshake(data: bytes) -> None:
    hs = ServerHandshake(mode="dev-insecure", allow_plaintext=True)
    try:
        hs.receive_data(data, 1.7e9)
    except (HandshakeError, RemoteProtocolError, AttestationError):
        return


_SECRET_A, _SECRET_B = b"\x11" * 48, b"\x22" * 48


def records(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    sender = RecordSession(send_secret=_SECRET_A, recv_secret=_SECRET_B, max_send_plaintext=4096)
    receiver = RecordSession(send_secret=_SECRET_B, recv_secret=_SECRET_A)
    plaintext = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 20_000))
    wire = bytearray(b"".join(sender.seal(plaintext)))
    if fdp.ConsumeBool():
        wire += sender.close()
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        if wire:
            wire[fdp.ConsumeIntInRange(0, len(wire) - 1)] ^= fdp.ConsumeIntInRange(1, 255)
    out = bytearray()
    try:
        for piece in _splits(fdp, bytes(wire)):
            out += receiver.receive(piece)
    except RemoteProtocolError:
        assert plaintext.startswith(bytes(out))  # what came out before the failure was genuine
        return
    assert bytes(out) == plaintext[: len(out)]


_ROOT = None


def attestation(data: bytes) -> None:
    global _ROOT
    if _ROOT is None:
        _ROOT = InsecureTestAttester(seed=b"fuzz").trust_root()
    try:
        verify_document(data, now=datetime(2026, 1, 1, tzinfo=UTC), root=_ROOT)
    except AttestationError:
        return


TARGETS = {
    "frames": frames,
    "connection": connection,
    "handshake": handshake,
    "records": records,
    "attestation": attestation,
}


def seeds(target: str) -> list[bytes]:
    """Well-formed inputs to start from (a fuzzer rarely invents valid MessagePack frames)."""
    if target == "connection":
        client = Connection(Role.CLIENT)
        client.start_call("echo.v1.echo", [b"x" * 10], now=0.0, timeout=1.0, metadata={"k": "v"})
        client.start_call("echo.v1.stream", [3, 2], now=0.0, stream_response=True)
        call = client.start_call("echo.v1.sink", [], now=0.0, stream_request=True)
        client.send_item(call, b"item")
        client.end_request(call)
        client.cancel(call)
        client.ping(0.0)
        client.goaway("bye")
        wire = bytes(client.data_to_send() or b"")
        return [wire, wire[:40]]
    if target == "handshake":
        from vrpc.proto.handshake import ClientHandshake

        out = []
        for mode in ("plaintext", "dev-insecure"):
            hs = ClientHandshake(
                mode=mode, verify=None if mode == "plaintext" else (lambda *a, **k: None)
            )
            hs.initiate()
            out.append(hs.data_to_send())
        return out
    if target == "attestation":
        att = InsecureTestAttester(seed=b"fuzz")
        return [att.attest(user_data=b"u", nonce=b"n" * 32, public_key=b"k" * 32)]
    return [b"\x00" * 16]


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [CORPUS_DIR] [libFuzzer options]")
    name = sys.argv[1]
    args = sys.argv[2:]
    # A corpus directory (created and seeded if empty) makes runs start from valid inputs.
    if args and not args[0].startswith("-"):
        corpus = args[0]
        os.makedirs(corpus, exist_ok=True)
        if not os.listdir(corpus):
            for i, seed in enumerate(seeds(name)):
                with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
                    f.write(seed)
    atheris.Setup([sys.argv[0], *args], TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
