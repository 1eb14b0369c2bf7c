"""Length-prefixed framing: whole, byte by byte, with trailing bytes, oversize prefixes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vrpc.exceptions import FrameTooLarge
from vrpc.proto.framing import HEADER_SIZE, FrameDecoder, encode_frame

BODIES = [b"", b"a", b"hello", bytes(range(256)) * 3]


def test_encode_frame_prefix() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"


def test_whole_stream_in_one_feed() -> None:
    dec = FrameDecoder(1024)
    stream = b"".join(encode_frame(b) for b in BODIES)
    assert dec.feed(stream) == BODIES
    assert dec.buffered == 0


def test_byte_by_byte() -> None:
    dec = FrameDecoder(1024)
    stream = b"".join(encode_frame(b) for b in BODIES)
    out: list[bytes] = []
    for i in range(len(stream)):
        out += dec.feed(stream[i : i + 1])
    assert out == BODIES
    assert dec.buffered == 0


def test_trailing_bytes_stay_buffered() -> None:
    dec = FrameDecoder(1024)
    assert dec.feed(encode_frame(b"one") + b"\x00\x00") == [b"one"]
    assert dec.buffered == 2
    assert dec.feed(b"\x00\x02x") == []
    assert dec.feed(b"y" + encode_frame(b"z")) == [b"xy", b"z"]
    assert dec.buffered == 0


def test_memoryview_and_bytearray_input() -> None:
    dec = FrameDecoder(16)
    assert dec.feed(memoryview(encode_frame(b"mv"))) == [b"mv"]
    assert dec.feed(bytearray(encode_frame(b"ba"))) == [b"ba"]


def test_oversize_prefix_raises_before_buffering_the_body() -> None:
    dec = FrameDecoder(10)
    assert dec.feed(encode_frame(b"x" * 10)) == [b"x" * 10]
    with pytest.raises(FrameTooLarge):
        dec.feed(b"\x00\x00\x00\x0b")
    with pytest.raises(FrameTooLarge):
        FrameDecoder(10).feed(b"\xff\xff\xff\xff")


def test_invalid_limit() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(0)


@given(st.lists(st.binary(max_size=64), max_size=8), st.data())
def test_any_split_gives_the_same_frames(bodies: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec = FrameDecoder(64)
    out: list[bytes] = []
    last = 0
    for cut in [*cuts, len(stream)]:
        out += dec.feed(stream[last:cut])
        last = cut
    assert out == bodies
    assert dec.buffered == 0


@given(st.binary(max_size=200))
def test_random_bytes_only_frames_or_frame_too_large(data: bytes) -> None:
    dec = FrameDecoder(32)
    try:
        frames = dec.feed(data)
    except FrameTooLarge:
        return
    assert all(len(f) <= 32 for f in frames)
    assert dec.buffered <= 32 + HEADER_SIZE


def _large_stream(sizes: list[int]) -> bytes:
    return b"".join(encode_frame(bytes([i % 251]) * n) for i, n in enumerate(sizes))


@pytest.mark.parametrize("chunk", [1000, 65536, 262144, 300_001])
def test_large_frames_over_many_chunks(chunk: int) -> None:
    sizes = [70_000, 5, 1 << 20, 65536, 0, 200_000]
    stream = _large_stream(sizes)
    dec = FrameDecoder(2 << 20)
    out: list[bytes] = []
    for i in range(0, len(stream), chunk):
        out += dec.feed(memoryview(stream)[i : i + chunk])
    assert [len(b) for b in out] == sizes
    assert out == [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    assert dec.buffered == 0


def test_a_large_partial_frame_counts_as_buffered() -> None:
    dec = FrameDecoder(1 << 20)
    frame = encode_frame(b"x" * 100_000)
    assert dec.feed(frame[:50_000]) == []
    assert dec.buffered == 50_000
    assert dec.feed(frame[50_000:] + b"\x00") == [b"x" * 100_000]
    assert dec.buffered == 1


def test_the_assembly_buffer_is_reused_only_when_nothing_holds_it() -> None:
    dec = FrameDecoder(1 << 20)

    def body_owner(data: bytes) -> tuple[bytearray, bytes]:
        owner = None
        bodies = []
        for part in (data[:1000], data[1000:]):
            for view in dec.views(part):
                owner = view.obj
                bodies.append(bytes(view))
        assert isinstance(owner, bytearray) and len(bodies) == 1
        return owner, bodies[0]

    first, body = body_owner(encode_frame(b"a" * 100_000))
    assert body == b"a" * 100_000
    second, body = body_owner(encode_frame(b"b" * 100_000))
    # ``first`` is still referenced here: the second frame went to a fresh buffer.
    assert second is not first and bytes(first[:100_000]) == b"a" * 100_000
    assert body == b"b" * 100_000
    del first
    ident = id(second)
    del second
    assert id(dec._asm) == ident  # alive in the decoder: no new object can share the id
    third, body = body_owner(encode_frame(b"c" * 90_000))
    assert id(third) == ident and body == b"c" * 90_000  # released: written in place


def test_unheld_sees_live_views_whatever_the_reference_count() -> None:
    from vrpc.proto.framing import unheld

    buf = bytearray(b"abc")
    assert unheld(buf, 1) and buf == b"abc"
    view = memoryview(buf)[1:]
    # Even when told to allow many references, a live export means someone holds the bytes.
    assert not unheld(buf, 100)
    view.release()
    assert unheld(buf, 100) and buf == b"abc"
    other = buf  # a plain reference beyond the owner's
    assert not unheld(buf, 1)
    del other
