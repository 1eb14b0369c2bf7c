"""The record layer: round trips, tamper/replay/reorder/drop/truncation, key updates, limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vrpc.exceptions import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from vrpc.proto import record as recmod
from vrpc.proto.record import (
    REC_CLOSE,
    REC_DATA,
    REC_KEY_UPDATE,
    TAG_LEN,
    PlaintextSession,
    RecordSession,
)

C2S = bytes(range(48))
S2C = bytes(range(48, 96))


def pair(**kw: int) -> tuple[RecordSession, RecordSession]:
    a = RecordSession(send_secret=C2S, recv_secret=S2C, **kw)
    b = RecordSession(send_secret=S2C, recv_secret=C2S, **kw)
    return a, b


def records(wire: bytes) -> list[bytes]:
    """Split wire bytes into whole records."""
    out = []
    pos = 0
    while pos < len(wire):
        n = int.from_bytes(wire[pos + 1 : pos + 5], "big")
        out.append(wire[pos : pos + 5 + n])
        pos += 5 + n
    return out


def sealed(session: RecordSession, data: bytes) -> bytes:
    return b"".join(session.seal(data))


@pytest.mark.parametrize("size", [0, 1, 100, 16383, 16384, 65536, 65537, 300_000])
def test_round_trip_and_record_split(size: int) -> None:
    a, b = pair()
    data = bytes(i % 251 for i in range(size))
    wire = sealed(a, data)
    recs = records(wire)
    assert len(recs) == -(-size // 65536)
    assert all(r[0] == REC_DATA for r in recs)
    assert len(wire) == size + len(recs) * (5 + TAG_LEN)
    assert b.receive(wire) == data


def test_peer_limit_on_record_size() -> None:
    a = RecordSession(send_secret=C2S, recv_secret=S2C, max_send_plaintext=1000)
    b = RecordSession(send_secret=S2C, recv_secret=C2S, max_recv_plaintext=1000)
    recs = records(sealed(a, bytes(2500)))
    assert [len(r) for r in recs] == [1021, 1021, 521]
    assert b.receive(b"".join(recs)) == bytes(2500)
    # A record one byte above the receiver's limit is refused from its header alone.
    big = RecordSession(send_secret=C2S, recv_secret=S2C, max_send_plaintext=1001)
    with pytest.raises(FrameTooLarge):
        b.receive(sealed(big, bytes(1001))[:5])


def test_oversize_length_prefix() -> None:
    _, b = pair()
    with pytest.raises(FrameTooLarge):
        b.receive(b"\x17\xff\xff\xff\xff")
    with pytest.raises(RemoteProtocolError, match="failed"):
        b.receive(b"")


@pytest.mark.parametrize("style", ["whole", "bytewise", "two-chunks"])
def test_feeding_styles(style: str) -> None:
    a, b = pair()
    parts = [bytes([i]) * (i * 37 % 500) for i in range(1, 40)]
    wire = b"".join(sealed(a, p) for p in parts)
    if style == "whole":
        got = b.receive(wire)
    elif style == "bytewise":
        got = b"".join(b.receive(wire[i : i + 1]) for i in range(len(wire)))
    else:
        mid = len(wire) // 2 + 3
        got = bytes(b.receive(wire[:mid])) + bytes(b.receive(wire[mid:]))
    assert got == b"".join(parts)


def test_tampering_any_byte_fails_and_kills() -> None:
    a, _ = pair()
    wire = sealed(a, b"secret payload") + sealed(a, b"x")
    for pos in range(len(wire)):
        _, b = pair()
        bad = wire[:pos] + bytes([wire[pos] ^ 0x80]) + wire[pos + 1 :]
        with pytest.raises(RemoteProtocolError):
            b.receive(bad)
            b.eof_received()  # a tampered length may just look incomplete
        with pytest.raises(RemoteProtocolError):
            b.receive(wire)


def test_replay_reorder_drop() -> None:
    a, _ = pair()
    r1, r2, r3 = (sealed(a, bytes([i]) * 10) for i in range(3))
    for wire in (r1 + r1, r2 + r1, r1 + r3, r2):
        _, b = pair()
        with pytest.raises(RemoteProtocolError, match="authentication"):
            b.receive(wire)


def test_type_is_authenticated() -> None:
    a, b = pair()
    rec = sealed(a, b"")  # nothing: no record for empty input
    assert rec == b""
    close = a.close()
    assert close[0] == REC_CLOSE and len(close) == 5 + TAG_LEN
    forged = bytes([REC_KEY_UPDATE]) + close[1:]
    with pytest.raises(RemoteProtocolError, match="authentication"):
        b.receive(forged)


def test_clean_close_and_truncation() -> None:
    a, b = pair()
    b.receive(sealed(a, b"last words"))
    with pytest.raises(RemoteProtocolError, match="truncated"):
        b.eof_received()

    a, b = pair()
    assert b.receive(sealed(a, b"last words") + a.close()) == b"last words"
    assert b.peer_closed
    b.eof_received()  # clean
    assert b.receive(b"") == b""
    with pytest.raises(RemoteProtocolError, match="after the peer's CLOSE"):
        b.receive(b"\x17")


def test_bytes_after_close_in_the_same_chunk() -> None:
    a, b = pair()
    close = a.close()
    with pytest.raises(RemoteProtocolError, match="after the peer's CLOSE"):
        b.receive(close + b"\x17\x00")


def test_nothing_sent_after_close() -> None:
    a, b = pair()
    a.close()
    with pytest.raises(LocalProtocolError):
        a.seal(b"x")
    with pytest.raises(LocalProtocolError):
        a.close()
    with pytest.raises(LocalProtocolError):
        a.request_key_update()
    # The other direction still works (half close).
    assert a.receive(sealed(b, b"reply")) == b"reply"


def test_key_update_by_record_count_both_sides() -> None:
    a, b = pair(key_update_records=3)
    for sender, receiver in ((a, b), (b, a)):
        wire = b"".join(sealed(sender, bytes([i])) for i in range(10))
        types = [r[0] for r in records(wire)]
        assert types.count(REC_KEY_UPDATE) == 3
        assert types[3] == REC_KEY_UPDATE
        assert receiver.receive(wire) == bytes(range(10))


def test_key_update_by_bytes() -> None:
    a, b = pair(key_update_bytes=1000)
    wire = sealed(a, bytes(700)) + sealed(a, bytes(700)) + sealed(a, bytes(10))
    types = [r[0] for r in records(wire)]
    assert types == [REC_DATA, REC_DATA, REC_KEY_UPDATE, REC_DATA]
    assert b.receive(wire) == bytes(1410)


def test_key_update_on_request_changes_keys() -> None:
    a, b = pair()
    before = sealed(a, b"same")
    a.request_key_update()
    update = sealed(a, b"")
    assert [r[0] for r in records(update)] == [REC_KEY_UPDATE]
    after = sealed(a, b"same")
    assert before[5:] != after[5:]
    assert b.receive(before + update + after) == b"samesame"
    # A record of the old key replayed after the update does not decrypt.
    with pytest.raises(RemoteProtocolError):
        b.receive(before)


def test_dropped_key_update_is_detected() -> None:
    a, b = pair()
    first = sealed(a, b"1")
    a.request_key_update()
    wire = sealed(a, b"2")
    assert b.receive(first) == b"1"
    with pytest.raises(RemoteProtocolError):
        b.receive(records(wire)[1])


def test_receiver_refuses_too_many_records_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recmod, "RECEIVE_RECORDS_PER_KEY", 5)
    a, b = pair()
    wire = b"".join(sealed(a, b"x") for _ in range(5))
    with pytest.raises(RemoteProtocolError, match="update its key"):
        b.receive(wire)


def test_malformed_control_records() -> None:
    _a, b = pair()
    with pytest.raises(RemoteProtocolError, match="malformed"):
        b.receive(bytes([REC_CLOSE, 0, 0, 0, 17]) + bytes(17))
    _, b = pair()
    with pytest.raises(RemoteProtocolError, match="malformed"):
        b.receive(bytes([0x99, 0, 0, 0, 16]) + bytes(16))
    _, b = pair()
    with pytest.raises(RemoteProtocolError, match="shorter"):
        b.receive(bytes([REC_DATA, 0, 0, 0, 3]) + bytes(3))


def test_seal_does_not_keep_caller_buffers() -> None:
    a, b = pair()
    buf = bytearray(b"hello" * 5000)
    wire = a.seal(buf)
    buf[:] = b"X" * len(buf)
    buf.extend(b"resizable again")  # would raise BufferError if a view were still held
    assert b.receive(b"".join(wire)) == b"hello" * 5000
    mv = memoryview(b"0123456789" * 3000)
    assert b.receive(b"".join(a.seal(mv[5:]))) == bytes(mv[5:])


def test_large_payloads_are_sealed_into_one_fresh_buffer() -> None:
    a, b = pair()
    parts = a.seal(bytes(40000))
    assert [len(p) for p in parts] == [5 + 40000 + TAG_LEN]
    several = a.seal(bytes(3 * 65536 + 7))  # four records, encrypted in place, one buffer
    assert [len(p) for p in several] == [3 * (5 + 65536 + TAG_LEN) + 5 + 7 + TAG_LEN]
    assert several[0] is not parts[0]
    assert len(a.seal(bytes(100))) == 1
    # and they open to the same bytes, decrypted into one buffer on the other side
    assert b.receive(bytes(parts[0]) + bytes(several[0])) == bytes(40000 + 3 * 65536 + 7)


def test_constructor_limits() -> None:
    with pytest.raises(ValueError):
        RecordSession(send_secret=C2S, recv_secret=S2C, max_send_plaintext=(1 << 20) + 1)
    with pytest.raises(ValueError):
        RecordSession(send_secret=C2S, recv_secret=S2C, key_update_records=0)


def test_plaintext_session_is_the_identity() -> None:
    s = PlaintextSession(created_at=5.0)
    assert not s.encrypted and s.created_at == 5.0
    buf = bytearray(b"abc")
    out = s.seal(buf)
    buf[0] = 0
    assert out == [b"abc"]
    assert s.seal(b"") == []
    assert s.receive(b"xyz") == b"xyz"
    assert s.close() == b""
    s.request_key_update()
    s.eof_received()
    assert s.peer_closed


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
def test_random_bytes_only_remote_protocol_error(data: bytes, chunk: int) -> None:
    _, b = pair()
    try:
        for i in range(0, len(data), chunk):
            assert b.receive(data[i : i + chunk]) == b""
        b.eof_received()
    except RemoteProtocolError:
        pass
    else:  # pragma: no cover - a forgery would mean AES-GCM is broken
        raise AssertionError("random bytes were accepted")


# -- limits on what a record costs the receiver ------------------------------------------------


def test_unknown_record_type_is_refused_from_its_header_alone() -> None:
    # Only the 5-byte header has arrived: the body (60,000 bytes announced) is never awaited.
    for header in (
        bytes([0x99]) + (60_000).to_bytes(4, "big"),
        bytes([REC_KEY_UPDATE]) + (60_000).to_bytes(4, "big"),
        bytes([REC_CLOSE]) + (17).to_bytes(4, "big"),
    ):
        _, b = pair()
        with pytest.raises(RemoteProtocolError, match="malformed"):
            b.receive(header)
        assert b.buffered == 0


def test_a_partial_record_is_reported_as_buffered() -> None:
    a, b = pair()
    wire = sealed(a, bytes(1000))
    assert b.receive(wire[:600]) == b""
    assert b.buffered == 600
    assert b.receive(wire[600:]) == bytes(1000)
    assert b.buffered == 0


class _EmptyData:
    """Crafts empty DATA records under the sender's current key (an honest sender never does)."""

    def __init__(self, sender: RecordSession) -> None:
        self.sender = sender

    def record(self) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        from vrpc.proto.keyschedule import traffic_key_iv

        s = self.sender
        key, iv = traffic_key_iv(s._send_secret or b"")
        hdr = bytes([REC_DATA]) + TAG_LEN.to_bytes(4, "big")
        nonce = (int.from_bytes(iv, "big") ^ s._send_seq).to_bytes(12, "big")
        s._send_seq += 1
        return hdr + AESGCM(key).encrypt(nonce, b"", hdr)


def _key_update(sender: RecordSession) -> bytes:
    sender.request_key_update()
    return sealed(sender, b"")


def test_empty_data_records_beyond_the_allowance_are_refused() -> None:
    a, b = pair()
    empty = _EmptyData(a)
    allowed = recmod.EMPTY_RECORD_ALLOWANCE // recmod.EMPTY_RECORD_COST
    assert allowed == 32
    assert b.receive(b"".join(empty.record() for _ in range(allowed))) == b""
    with pytest.raises(RemoteProtocolError, match="too many empty"):
        b.receive(empty.record())


def test_key_updates_are_earned_by_data_received() -> None:
    a, b = pair()
    for _ in range(32):
        assert b.receive(_key_update(a)) == b""
    # Spent: one more is allowed only after another 64 KiB of data.
    data = bytes(recmod.EMPTY_RECORD_COST)
    assert b.receive(sealed(a, data)) == data
    assert b.receive(_key_update(a)) == b""
    assert b.receive(sealed(a, b"x")) == b"x"
    with pytest.raises(RemoteProtocolError, match="too many empty or KEY_UPDATE"):
        b.receive(_key_update(a))


def test_a_flood_of_key_updates_is_refused_before_it_is_processed() -> None:
    a, b = pair()
    flood = b"".join(_key_update(a) for _ in range(20_000))
    with pytest.raises(RemoteProtocolError, match="too many empty"):
        b.receive(flood)


def test_a_large_seal_reuses_its_buffer_only_once_the_wire_bytes_are_released() -> None:
    a, b = pair()
    first = a.seal(bytes(200_000))
    held = bytes(first[0])
    second = a.seal(b"\x01" * 200_000)
    # The first wire bytes are still referenced (a transport with unsent data): untouched.
    assert bytes(first[0]) == held
    assert isinstance(second[0], memoryview) and second[0].obj is not first[0].obj
    assert b.receive(held) == bytes(200_000)
    assert b.receive(bytes(second[0])) == b"\x01" * 200_000
    del first, second
    kept = [id(buf) for buf in a._seal_spares]  # alive: no new object can share these ids
    third = a.seal(b"\x02" * 150_000)
    assert id(third[0].obj) in kept  # released: the same memory, no fresh page faults
    assert b.receive(bytes(third[0])) == b"\x02" * 150_000


def test_while_the_last_sealed_buffer_is_held_the_one_before_is_reused() -> None:
    a, b = pair()
    first = a.seal(bytes(100_000))
    assert b.receive(bytes(first[0])) == bytes(100_000)
    del first
    earlier = id(a._seal_spares[0])
    held = a.seal(b"\x07" * 100_000)  # a busy socket keeps this one
    assert id(held[0].obj) == earlier
    nxt = a.seal(b"\x08" * 100_000)
    later = id(nxt[0].obj)
    assert later != earlier  # never written over while held
    assert b.receive(bytes(held[0])) == b"\x07" * 100_000
    assert b.receive(bytes(nxt[0])) == b"\x08" * 100_000
    del nxt
    assert [id(buf) for buf in a._seal_spares] == [earlier, later]
    again = a.seal(b"\x09" * 100_000)
    assert id(again[0].obj) == later  # the other kept buffer is free: no fresh one
    assert bytes(held[0]) != bytes(again[0])
    assert b.receive(bytes(again[0])) == b"\x09" * 100_000


def test_a_large_open_never_writes_over_plaintext_still_referenced() -> None:
    a, b = pair()
    one = b.receive(sealed(a, b"\x03" * 100_000))
    two = b.receive(sealed(a, b"\x04" * 100_000))
    assert bytes(one) == b"\x03" * 100_000 and bytes(two) == b"\x04" * 100_000
    assert isinstance(two, memoryview)
    del one, two
    assert b._recv_spare is not None
    owner = id(b._recv_spare)
    three = b.receive(sealed(a, b"\x05" * 60_000))
    assert bytes(three) == b"\x05" * 60_000
    assert isinstance(three, memoryview) and id(three.obj) == owner


@pytest.mark.parametrize("chunk", [7, 1000, 65536 + 20, 65536 + 21, 65536 + 22, 100_000, 262_144])
def test_large_records_over_chunks_of_any_size(chunk: int) -> None:
    a, b = pair()
    data = bytes(i % 253 for i in range(5 * 65536 + 999))
    wire = sealed(a, data) + sealed(a, b"tail") + a.close()
    got = bytearray()
    for i in range(0, len(wire), chunk):
        got += b.receive(wire[i : i + chunk])
    assert bytes(got) == data + b"tail"
    assert b.peer_closed


@pytest.mark.parametrize("extra", [b"\x17", b"\x17\x00\x00\x00\x10" + bytes(16)])
def test_bytes_after_a_close_that_completes_a_pending_record(extra: bytes) -> None:
    a, b = pair()
    close = a.close()
    assert b.receive(close[:3]) == b""
    with pytest.raises(RemoteProtocolError, match="after the peer's CLOSE"):
        b.receive(close[3:] + extra)


def test_a_tampered_record_completed_by_a_later_chunk_fails() -> None:
    a, b = pair()
    wire = bytearray(sealed(a, bytes(100_000)))
    wire[70_000] ^= 1  # inside the second record
    assert len(b.receive(bytes(wire[:66_000]))) == 65536
    with pytest.raises(RemoteProtocolError, match="authentication"):
        b.receive(bytes(wire[66_000:]))


def test_buffers_above_the_keep_limit_are_not_kept() -> None:
    a, b = pair()
    big = recmod._KEEP_MAX + 1
    first = a.seal(bytes(big))
    assert b.receive(bytes(first[0])) == bytes(big)
    del first
    assert a._seal_spares == []  # nothing kept from the oversize seal
    small = a.seal(bytes(100_000))
    assert len(small[0].obj) < big and a._seal_spares[0] is small[0].obj


def test_a_live_view_of_sealed_bytes_is_never_written_over() -> None:
    a, _ = pair()
    wire = a.seal(bytes(100_000))
    pending = wire[0][1000:]  # what a transport keeps of a partial write: a view, not the list
    expected = bytes(pending)
    del wire
    for n in range(3):
        more = a.seal(bytes([n + 1]) * 100_000)
        assert bytes(pending) == expected
        del more
