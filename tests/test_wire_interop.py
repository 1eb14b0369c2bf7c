"""The message layer against an independent MessagePack implementation (msgpack-python).

vrpc encodes with msgspec; a peer written with any other MessagePack library must interoperate,
so frames built with msgpack are fed to the sans-IO connection and its output is decoded with
msgpack.
"""

from __future__ import annotations

import msgpack
import pytest

from vrpc.exceptions import RemoteProtocolError
from vrpc.proto.connection import Connection, Role
from vrpc.proto.events import RequestReceived, ResponseReceived
from vrpc.status import Status


def frame(message: list[object]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def frames(data: bytes) -> list[list[object]]:
    out = []
    while data:
        size = int.from_bytes(data[:4], "big")
        out.append(msgpack.unpackb(data[4 : 4 + size], raw=False))
        data = data[4 + size :]
    return out


def test_server_accepts_requests_encoded_by_msgpack() -> None:
    conn = Connection(Role.SERVER)
    wire = frame([0, 1, "echo.v1.echo", [b"\x00\xff"], 0, 1500, {"k": "v"}])
    events = conn.receive_data(wire, now=0.0)
    assert events == [
        RequestReceived(
            1, "echo.v1.echo", [b"\x00\xff"], {"k": "v"}, 1.5, False, False, len(wire) - 4
        )
    ]
    conn.send_response(1, {"data": b"\x01", "n": 3}, {"t": 1})
    out = conn.data_to_send()
    assert out is not None
    assert frames(bytes(out)) == [[1, 1, {"data": b"\x01", "n": 3}, {"t": 1}]]


def test_client_output_decodes_with_msgpack_and_errors_map_back() -> None:
    conn = Connection(Role.CLIENT)
    call_id = conn.start_call("kv.get", ["key", None], now=0.0, metadata={"a": 1})
    out = conn.data_to_send()
    assert out is not None
    assert frames(bytes(out)) == [[0, call_id, "kv.get", ["key", None], 0, None, {"a": 1}]]
    events = conn.receive_data(frame([2, call_id, 5, "no key", {"key": "key"}, None]), now=0.0)
    assert len(events) == 1
    err = events[0]
    assert (err.status, err.message, err.details) == (Status.NOT_FOUND, "no key", {"key": "key"})  # type: ignore[attr-defined]
    assert not conn.is_active(call_id)


def test_str_where_bin_expected_is_not_silently_bytes() -> None:
    # msgpack's str and bin are different types on the wire; vrpc keeps them apart.
    conn = Connection(Role.CLIENT)
    call_id = conn.start_call("x.y", [], now=0.0)
    (event,) = conn.receive_data(frame([1, call_id, "text", None]), now=0.0)
    assert isinstance(event, ResponseReceived) and event.result == "text"


def test_wrong_arity_from_a_foreign_encoder_is_a_protocol_error() -> None:
    conn = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(frame([0, 1, "a.b", []]), now=0.0)


def test_credit_for_a_unary_call_is_a_protocol_error() -> None:
    # Unary calls carry no flow-control state; a CREDIT naming one must not be accepted (it
    # would otherwise alter state shared by every unary call).
    server = Connection(Role.SERVER)
    server.receive_data(frame([0, 1, "a.b", [], 0, None, None]), now=0.0)
    with pytest.raises(RemoteProtocolError, match="CREDIT"):
        server.receive_data(frame([6, 1, 1000]), now=0.0)
    client = Connection(Role.CLIENT)
    call_id = client.start_call("a.b", [], now=0.0)
    with pytest.raises(RemoteProtocolError, match="CREDIT"):
        client.receive_data(frame([6, call_id, 1000]), now=0.0)


def test_deep_nesting_is_a_protocol_error_in_the_core() -> None:
    depth = 200_000  # far past the interpreter's recursion limit, well inside the frame limit
    body = b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]] as fixarray(1) headers
    conn = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError, match=r"nested too deeply|undecodable"):
        conn.receive_data(len(body).to_bytes(4, "big") + body, now=0.0)


def test_request_flags_reach_the_server_event() -> None:
    conn = Connection(Role.SERVER)
    (event,) = conn.receive_data(frame([0, 1, "a.b", [], 2, None, None]), now=0.0)
    assert isinstance(event, RequestReceived)
    assert (event.stream_request, event.stream_response) == (False, True)
