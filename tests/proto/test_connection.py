"""The sans-IO call multiplexer with fake time: keepalive, idle timeout, deadlines, flow control,
GOAWAY, protocol violations; random input; a state machine of a client and a server wired back to
back."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vrpc.exceptions import LocalProtocolError, RemoteProtocolError, RpcError
from vrpc.proto.connection import INITIAL_WINDOW, CallState, Connection, Role
from vrpc.proto.events import (
    CallCancelled,
    ConnectionTerminated,
    CreditAvailable,
    ErrorReceived,
    Event,
    GoAwayReceived,
    HeadersReceived,
    ItemReceived,
    PongReceived,
    RequestReceived,
    ResponseReceived,
    SettingsReceived,
    StreamEnded,
)
from vrpc.proto.framing import encode_frame
from vrpc.status import Status


def pipe(src: Connection, dst: Connection, now: float = 0.0) -> list[Event]:
    data = src.data_to_send()
    return [] if data is None else dst.receive_data(bytes(data), now)


def frame(*fields: Any) -> bytes:
    return encode_frame(msgspec.msgpack.encode(list(fields)))


def pair(**server_options: Any) -> tuple[Connection, Connection]:
    return Connection(Role.CLIENT), Connection(Role.SERVER, **server_options)


def test_unary_call_round_trip() -> None:
    client, server = pair()
    cid = client.start_call("s.m", [1, b"x"], now=0, metadata={"k": "v"})
    wire = client.data_to_send()
    assert wire is not None
    (req,) = server.receive_data(wire, 0)
    # size: the encoded REQUEST message, what the server weighs a call's arguments by.
    assert req == RequestReceived(
        cid, "s.m", [1, b"x"], {"k": "v"}, None, False, False, len(wire) - 4
    )
    server.send_headers(cid, {"h": 1})
    server.send_response(cid, {"ok": True}, {"t": 2})
    assert pipe(server, client) == [
        HeadersReceived(cid, {"h": 1}),
        ResponseReceived(cid, {"ok": True}, {"t": 2}),
    ]
    assert client.calls_in_flight == server.calls_in_flight == 0


@pytest.mark.parametrize("bad", [object(), 2**70])
def test_unencodable_result_still_answers(bad: Any) -> None:
    client, server = pair()
    cid = client.start_call("s.m", [], now=0)
    pipe(client, server)
    server.send_response(cid, bad)
    assert pipe(server, client) == [
        ErrorReceived(cid, Status.INTERNAL, "result could not be encoded")
    ]
    # the stream is intact: another call still works
    cid2 = client.start_call("s.m", [], now=0)
    pipe(client, server)
    server.send_response(cid2, 2)
    assert pipe(server, client) == [ResponseReceived(cid2, 2, None)]


def test_unencodable_argument_leaves_no_trace() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(TypeError):
        client.start_call("s.m", [object()], now=0)
    assert client.data_to_send() is None
    assert client.calls_in_flight == 0


def test_error_round_trip() -> None:
    client, server = pair()
    cid = client.start_call("s.m", [], now=0)
    pipe(client, server)
    server.send_error(cid, Status.NOT_FOUND, "nope", {"d": 1}, {"t": 1})
    assert pipe(server, client) == [
        ErrorReceived(cid, Status.NOT_FOUND, "nope", {"d": 1}, {"t": 1})
    ]


def test_unencodable_details_keep_the_status() -> None:
    client, server = pair()
    cid = client.start_call("s.m", [], now=0)
    pipe(client, server)
    server.send_error(cid, Status.ABORTED, "x", object())
    assert pipe(server, client) == [ErrorReceived(cid, Status.ABORTED, "x")]


def test_keepalive_detects_a_dead_peer() -> None:
    client = Connection(Role.CLIENT, keepalive_interval=10, keepalive_timeout=5)
    client.start_clock(0)
    assert client.get_timer() == 10
    assert client.handle_timer(9) == []
    assert client.data_to_send() is None
    assert client.handle_timer(10) == []
    ping = client.data_to_send()
    assert ping is not None and msgspec.msgpack.decode(bytes(ping)[4:])[0] == 8
    assert client.get_timer() == 15
    events = client.handle_timer(15)
    assert events == [ConnectionTerminated(Status.UNAVAILABLE, "keepalive timeout")]
    assert client.closed


def test_keepalive_answered_by_a_live_peer() -> None:
    client = Connection(Role.CLIENT, keepalive_interval=10, keepalive_timeout=5)
    server = Connection(Role.SERVER)
    client.start_clock(0)
    client.handle_timer(10)
    pipe(client, server, 11)
    assert pipe(server, client, 12) == [PongReceived(2.0)]
    assert client.handle_timer(15) == []
    assert not client.closed
    assert client.get_timer() == 22  # next ping after the interval from the last activity


def test_idle_timeout_only_without_calls() -> None:
    client, server = pair(idle_timeout=30)
    server.start_clock(0)
    cid = client.start_call("s.m", [], now=0)
    pipe(client, server, 1)
    assert server.handle_timer(100) == []  # a call is in flight
    server.send_response(cid, None)
    # Idleness is checked lazily: the timer that notices the call ended restarts the clock.
    assert server.get_timer() == 130
    assert server.handle_timer(130) == []
    assert server.get_timer() == 160
    assert server.handle_timer(160) == [ConnectionTerminated(Status.UNAVAILABLE, "idle timeout")]


def test_pings_keep_a_connection_alive_but_not_busy() -> None:
    client, server = pair(idle_timeout=30)
    server.start_clock(0)
    for t in range(5, 30, 5):  # a PING every 5 s (answered) is traffic, not a call
        client.ping(t)
        pipe(client, server, t)
    assert server.handle_timer(30) == [ConnectionTerminated(Status.UNAVAILABLE, "idle timeout")]


def test_deadline_on_both_sides() -> None:
    client, server = pair()
    cid = client.start_call("s.m", [], now=0, timeout=1.5)
    (req,) = pipe(client, server, 0)
    assert req.timeout == 1.5  # type: ignore[attr-defined]
    assert server.get_timer() == 1.5
    assert server.handle_timer(1.5) == [CallCancelled(cid, Status.DEADLINE_EXCEEDED)]
    assert client.handle_timer(1.5) == [
        ErrorReceived(cid, Status.DEADLINE_EXCEEDED, "deadline exceeded")
    ]
    # the crossing messages are ignored
    assert pipe(server, client) == []
    assert pipe(client, server) == []
    server.send_response(cid, 1)
    assert server.data_to_send() is None


def test_cancel_reaches_the_server() -> None:
    client, server = pair()
    cid = client.start_call("s.m", [], now=0)
    pipe(client, server)
    client.cancel(cid)
    assert pipe(client, server) == [CallCancelled(cid, Status.CANCELLED)]
    assert server.calls_in_flight == 0


def test_streams_and_credit() -> None:
    client, server = pair()
    cid = client.start_call("s.m", [], now=0, stream_request=True, stream_response=True)
    pipe(client, server)
    item = b"x" * 10_000
    sent = 0
    while client.can_send(cid):
        assert client.send_item(cid, item)
        sent += 1
    assert sent == -(-INITIAL_WINDOW // (len(item) + 6)) or sent > INITIAL_WINDOW // len(item)
    with pytest.raises(LocalProtocolError):
        client.send_item(cid, item)
    events = pipe(client, server)
    assert len(events) == sent and all(isinstance(e, ItemReceived) for e in events)
    for ev in events:
        server.consumed(cid, ev.size)  # type: ignore[attr-defined]
    assert pipe(server, client) == [CreditAvailable(cid)]
    assert client.can_send(cid)
    client.end_request(cid)
    assert pipe(client, server) == [StreamEnded(cid)]
    assert server.send_item(cid, 7)
    server.send_response(cid, None)
    item_ev, done = pipe(server, client)
    assert isinstance(item_ev, ItemReceived) and (item_ev.call_id, item_ev.item) == (cid, 7)
    assert done == ResponseReceived(cid, None, None)


def test_items_without_credit_break_the_protocol() -> None:
    client, server = pair()
    cid = client.start_call("s.m", [], now=0, stream_request=True)
    pipe(client, server)
    big = b"y" * (INITIAL_WINDOW + 10)
    data = frame(4, cid, big) + frame(4, cid, b"more")
    with pytest.raises(RemoteProtocolError, match="credit"):
        server.receive_data(data, 0)


def test_goaway_fails_newer_calls_and_refuses_new_ones() -> None:
    client, server = pair()
    first = client.start_call("s.m", [], now=0)
    pipe(client, server)
    second = client.start_call("s.m", [], now=0)
    server.goaway("bye")
    events = pipe(server, client)
    assert events[0] == GoAwayReceived(first, "bye")
    # Never started by the server: marked so that any call, idempotent or not, may be resent.
    assert events[1] == ErrorReceived(
        second, Status.UNAVAILABLE, "server draining; not processed", {"unprocessed": True}
    )
    with pytest.raises(RpcError) as info:
        client.start_call("s.m", [], now=0)
    assert info.value.status is Status.UNAVAILABLE
    # the server answers a REQUEST that crossed the GOAWAY with UNAVAILABLE
    assert pipe(client, server) == []
    server.send_response(first, 1)
    assert pipe(server, client) == [ResponseReceived(first, 1, None)]


def test_calls_in_flight_limit() -> None:
    client, server = pair(max_concurrent_calls=1)
    a = client.start_call("s.m", [], now=0)
    b = client.start_call("s.m", [], now=0)
    assert len(pipe(client, server)) == 1
    (err,) = pipe(server, client)
    assert isinstance(err, ErrorReceived) and err.call_id == b
    assert err.status is Status.RESOURCE_EXHAUSTED
    assert server.is_active(a)


def test_oversize_message_is_refused_locally() -> None:
    client = Connection(Role.CLIENT, max_send_message_size=100)
    with pytest.raises(RpcError) as info:
        client.start_call("s.m", [b"z" * 200], now=0)
    assert info.value.status is Status.RESOURCE_EXHAUSTED
    assert client.data_to_send() is None and client.calls_in_flight == 0


def test_oversize_result_becomes_resource_exhausted() -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER, max_send_message_size=100)
    cid = client.start_call("s.m", [], now=0)
    pipe(client, server)
    server.send_response(cid, b"z" * 200)
    (err,) = pipe(server, client)
    assert isinstance(err, ErrorReceived) and err.status is Status.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("role", "data", "match"),
    [
        (Role.SERVER, frame(0, 0, "s.m", [], 0, None, None) * 2, "not above"),
        (Role.SERVER, frame(0, 1, 5, [], 0, None, None), "wrong types"),
        (Role.SERVER, frame(0, 1, "s.m", [], 0, -1, None), "timeout"),
        (Role.SERVER, frame(0, 1, "s.m", [], 0, None, {1: 2}), "string keys"),
        (Role.SERVER, frame(1, 1, None, None), "RESPONSE"),
        (Role.SERVER, frame(10, 1, ""), "GOAWAY"),
        (Role.CLIENT, frame(0, 1, "s.m", [], 0, None, None), "REQUEST"),
        (Role.CLIENT, frame(3, 1), "CANCEL"),
        (Role.SERVER, frame(99), "not defined"),
        (Role.SERVER, frame(8), "not defined"),
        (Role.SERVER, encode_frame(b"\xc1"), "undecodable"),
        (Role.SERVER, encode_frame(msgspec.msgpack.encode({"a": 1})), "array"),
        (Role.SERVER, encode_frame(msgspec.msgpack.encode([])), "array"),
    ],
)
def test_protocol_violations(role: Role, data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        Connection(role).receive_data(data, 0)


def test_only_a_client_starts_calls() -> None:
    with pytest.raises(LocalProtocolError):
        Connection(Role.SERVER).start_call("s.m", [], now=0)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([Role.CLIENT, Role.SERVER]), st.lists(st.binary(max_size=40), max_size=6))
def test_random_bytes_give_events_or_remote_protocol_error(role: Role, chunks: list[bytes]) -> None:
    conn = Connection(role, max_receive_message_size=1024)
    try:
        for chunk in chunks:
            for ev in conn.receive_data(chunk, 0):
                assert isinstance(ev, Event)
    except RemoteProtocolError:
        pass


_values = st.one_of(st.none(), st.integers(-3, 2**33), st.text(max_size=5), st.binary(max_size=5))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([Role.CLIENT, Role.SERVER]), st.lists(st.lists(_values, max_size=8)))
def test_random_messages_give_events_or_remote_protocol_error(
    role: Role, messages: list[list[Any]]
) -> None:
    conn = Connection(role)
    if role is Role.CLIENT:
        conn.start_call("s.m", [], now=0, stream_response=True)
    for msg in messages:
        try:
            events = conn.receive_data(encode_frame(msgspec.msgpack.encode(msg)), 0)
        except RemoteProtocolError:
            return
        assert all(isinstance(ev, Event) for ev in events)


class CallPair(RuleBasedStateMachine):
    """A client and a server Connection back to back with fake time.

    The model mirrors what each side should still consider in flight; the invariants check the
    two never leak a call (once both sides have seen everything, nothing is left over) and never
    wedge (a call that can still stream has credit or will get it once items are consumed).
    """

    def __init__(self) -> None:
        super().__init__()
        self.client = Connection(Role.CLIENT)
        self.server = Connection(Role.SERVER)
        self.now = 0.0
        self.client_open: set[int] = set()  # calls the client awaits
        self.server_open: set[int] = set()  # calls with a running handler
        self.server_unconsumed: dict[int, list[int]] = {}
        self.client_unconsumed: dict[int, list[int]] = {}

    def _deliver_to_server(self) -> None:
        for ev in pipe(self.client, self.server, self.now):
            if isinstance(ev, RequestReceived):
                self.server_open.add(ev.call_id)
                self.server_unconsumed[ev.call_id] = []
            elif isinstance(ev, ItemReceived):
                self.server_unconsumed[ev.call_id].append(ev.size)
            elif isinstance(ev, CallCancelled):
                self.server_open.discard(ev.call_id)

    def _deliver_to_client(self) -> None:
        for ev in pipe(self.server, self.client, self.now):
            if isinstance(ev, ResponseReceived | ErrorReceived):
                assert ev.call_id in self.client_open
                self.client_open.discard(ev.call_id)
            elif isinstance(ev, ItemReceived):
                assert ev.call_id in self.client_open
                self.client_unconsumed.setdefault(ev.call_id, []).append(ev.size)

    @rule(
        stream_request=st.booleans(),
        stream_response=st.booleans(),
        timeout=st.none() | st.floats(0.5, 5),
    )
    def start_call(
        self, stream_request: bool, stream_response: bool, timeout: float | None
    ) -> None:
        cid = self.client.start_call(
            "s.m",
            [],
            now=self.now,
            timeout=timeout,
            stream_request=stream_request,
            stream_response=stream_response,
        )
        self.client_open.add(cid)

    @precondition(lambda self: self.client_open)
    @rule(data=st.data())
    def client_cancel(self, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(sorted(self.client_open)))
        self.client.cancel(cid)
        self.client_open.discard(cid)

    @precondition(lambda self: self.client_open)
    @rule(data=st.data(), size=st.integers(0, 100_000))
    def client_item(self, data: st.DataObject, size: int) -> None:
        cid = data.draw(st.sampled_from(sorted(self.client_open)))
        call = self.client._calls[cid]
        if call.state is CallState.OPEN and self.client.can_send(cid):
            assert self.client.send_item(cid, b"i" * size)

    @precondition(lambda self: self.client_open)
    @rule(data=st.data())
    def client_end(self, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(sorted(self.client_open)))
        call = self.client._calls[cid]
        if call.state is CallState.OPEN:
            self.client.end_request(cid)

    @precondition(lambda self: self.server_open)
    @rule(data=st.data(), size=st.integers(0, 100_000))
    def server_item(self, data: st.DataObject, size: int) -> None:
        cid = data.draw(st.sampled_from(sorted(self.server_open)))
        if not self.server.is_active(cid):
            return
        if self.server._calls[cid].stream_response and self.server.can_send(cid):
            assert self.server.send_item(cid, b"o" * size)

    @precondition(lambda self: self.server_open)
    @rule(data=st.data(), ok=st.booleans())
    def server_finish(self, data: st.DataObject, ok: bool) -> None:
        cid = data.draw(st.sampled_from(sorted(self.server_open)))
        if ok:
            self.server.send_response(cid, 1)
        else:
            self.server.send_error(cid, Status.ABORTED, "no")
        self.server_open.discard(cid)

    @rule()
    def server_consume(self) -> None:
        for cid, sizes in self.server_unconsumed.items():
            for size in sizes:
                self.server.consumed(cid, size)
            sizes.clear()

    @rule()
    def client_consume(self) -> None:
        for cid, sizes in self.client_unconsumed.items():
            for size in sizes:
                self.client.consumed(cid, size)
            sizes.clear()

    @rule()
    def to_server(self) -> None:
        self._deliver_to_server()

    @rule()
    def to_client(self) -> None:
        self._deliver_to_client()

    @rule(dt=st.floats(0, 3))
    def tick(self, dt: float) -> None:
        self.now += dt
        for ev in self.client.handle_timer(self.now):
            if isinstance(ev, ErrorReceived):
                assert ev.status is Status.DEADLINE_EXCEEDED
                self.client_open.discard(ev.call_id)
        for ev in self.server.handle_timer(self.now):
            if isinstance(ev, CallCancelled):
                self.server_open.discard(ev.call_id)

    @invariant()
    def model_matches(self) -> None:
        assert set(self.client._calls) == self.client_open
        assert set(self.server._calls) <= self.server_open | set(self.server._calls)
        assert {c for c in self.server._calls} <= self.server_open

    @invariant()
    def receive_buffers_are_bounded(self) -> None:
        for cid, sizes in self.server_unconsumed.items():
            assert sum(sizes) <= INITIAL_WINDOW + 100_010, cid
        for cid, sizes in self.client_unconsumed.items():
            assert sum(sizes) <= INITIAL_WINDOW + 100_010, cid

    def teardown(self) -> None:
        # Quiesce: the server finishes every handler, both sides exchange everything.
        for _ in range(3):
            self._deliver_to_server()
            for cid in sorted(self.server_open):
                self.server.send_response(cid, None)
            self.server_open.clear()
            self._deliver_to_client()
        assert self.client._calls == {}
        assert self.server._calls == {}
        assert self.client_open == set()


CallPair.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestCallPair = CallPair.TestCase


def test_a_client_ignoring_the_announced_limit_is_refused_unprocessed() -> None:
    client, server = pair(max_concurrent_calls=2)
    server.send_settings()
    assert pipe(server, client, 0) == [SettingsReceived(2)]
    ids = [client.start_call("s.m", [], now=0) for _ in range(3)]
    assert len(pipe(client, server, 0)) == 2
    (refused,) = pipe(server, client, 0)
    assert refused == ErrorReceived(
        ids[2],
        Status.RESOURCE_EXHAUSTED,
        "more than 2 calls in flight on this connection",
        {"unprocessed": True},
    )


def test_credit_returns_a_quarter_of_the_window_at_a_time() -> None:
    client, server = pair()
    cid = client.start_call("s.m", [], now=0, stream_request=True)
    pipe(client, server)
    quarter = INITIAL_WINDOW // 4
    server.consumed(cid, quarter - 1)
    assert server.pending_bytes == 0  # not yet worth a CREDIT message
    server.consumed(cid, 1)
    sent = server.data_to_send()
    assert sent is not None
    assert msgspec.msgpack.decode(bytes(sent[4:])) == [6, cid, quarter]  # CREDIT


_ARG = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.binary(), st.text())


@given(method=st.text(max_size=40), args=st.lists(_ARG, max_size=5), calls=st.integers(1, 4))
@settings(max_examples=60, deadline=None)
def test_start_unary_sends_what_start_call_sends(method: str, args: list[Any], calls: int) -> None:
    fast, general = Connection(Role.CLIENT), Connection(Role.CLIENT)
    for _ in range(calls):
        assert fast.start_unary(method, args) == general.start_call(method, args, now=0.0)
    assert fast.data_to_send() == general.data_to_send()
    assert fast.is_active(calls) and general.is_active(calls)


def test_start_unary_refuses_as_start_call_does() -> None:
    client, server = pair()
    server.goaway("draining")
    pipe(server, client)
    with pytest.raises(RpcError, match="draining"):
        client.start_unary("s.m", [])
    with pytest.raises(LocalProtocolError, match="only a client"):
        Connection(Role.SERVER).start_unary("s.m", [])
    assert client.data_to_send() is None  # nothing was sent for a refused call


def test_per_call_events_stay_out_of_the_cycle_collector() -> None:
    import gc

    client, server = pair()
    client.start_call("s.m", [b"x"], now=0)
    (request,) = pipe(client, server)
    server.send_response(1, [b"y"])
    (response,) = pipe(server, client)
    assert isinstance(request, RequestReceived) and isinstance(response, ResponseReceived)
    assert not gc.is_tracked(request) and not gc.is_tracked(response)
    assert request == RequestReceived(1, "s.m", [b"x"], None, None, False, False, request.size)


def test_calls_coming_and_going_never_make_the_timer_earlier() -> None:
    """The shells ask for the timer after reads but not when a call ends: that is only safe
    because the idle look is scheduled whether or not calls are in flight."""
    client, server = pair(idle_timeout=30, keepalive_interval=None)
    server.start_clock(0)
    assert server.get_timer() == 30
    cid = client.start_call("s.m", [], now=0)
    pipe(client, server, 1)
    assert server.get_timer() == 30  # busy, yet the idle look stays scheduled
    assert server.handle_timer(30) == []  # the look sees the call and restarts the clock
    assert server.get_timer() == 60
    server.send_response(cid, None)  # the call ends: the timer does not move earlier
    assert server.get_timer() == 60
    assert server.handle_timer(60) == []  # the call went: idleness starts at the earliest now
    assert server.handle_timer(90) == [ConnectionTerminated(Status.UNAVAILABLE, "idle timeout")]
