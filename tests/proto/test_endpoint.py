"""The composed protocol of one connection, driven without an event loop: time is passed in,
attestation is answered by the test, bytes move between two endpoints by hand."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vrpc
from vrpc._verify import handshake_verifier
from vrpc.exceptions import HandshakeAlert, HandshakeError, RemoteProtocolError
from vrpc.proto.connection import PING, Connection, Role
from vrpc.proto.endpoint import Endpoint, Phase
from vrpc.proto.events import (
    AttestationRequested,
    CallCancelled,
    ConnectionClosed,
    ErrorReceived,
    Event,
    GoAwayReceived,
    PongReceived,
    RequestReceived,
    ResponseReceived,
    SessionEstablished,
    SettingsReceived,
)
from vrpc.proto.handshake import Alert, ClientHandshake, ServerHandshake, alert_frame
from vrpc.proto.record import REC_KEY_UPDATE
from vrpc.status import Status

WALL = 1_760_000_000.0  # the attester's documents are dated around now; only offsets matter


@pytest.fixture(autouse=True)
def _insecure(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("VRPC_INSECURE_TEST_ATTESTATION", "1")
    yield


_ATTESTER: vrpc.InsecureTestAttester | None = None


def attester() -> vrpc.InsecureTestAttester:
    global _ATTESTER
    if _ATTESTER is None:
        _ATTESTER = vrpc.InsecureTestAttester(seed=b"endpoint-tests")
    return _ATTESTER


def server_endpoint(now: float = 0.0, **options: Any) -> Endpoint:
    calls = Connection(
        Role.SERVER,
        keepalive_interval=options.pop("keepalive_interval", 30.0),
        keepalive_timeout=options.pop("keepalive_timeout", 20.0),
        idle_timeout=options.pop("idle_timeout", None),
        max_send_message_size=options.pop("max_send_message_size", 4 * 1024 * 1024),
        max_concurrent_calls=options.pop("max_calls", 1024),
    )
    hs = ServerHandshake(mode="dev-insecure", services={"s"})
    return Endpoint(hs, calls, now=now, wall_clock=WALL + now, **options)


def client_endpoint(now: float = 0.0, **options: Any) -> Endpoint:
    import datetime

    att = attester()
    verify = handshake_verifier(vrpc.Verifier(att.policy(), att.trust_root()))

    def at_wall_clock(document: bytes, **kw: Any) -> Any:
        # The test attester dates its documents with the real clock: check them at it.
        kw["now"] = datetime.datetime.now(datetime.UTC).timestamp()
        return verify(document, **kw)

    calls = Connection(
        Role.CLIENT,
        keepalive_interval=options.pop("keepalive_interval", 30.0),
        keepalive_timeout=options.pop("keepalive_timeout", 20.0),
    )
    hs = ClientHandshake(mode="dev-insecure", verify=at_wall_clock)
    return Endpoint(hs, calls, now=now, wall_clock=WALL + now, **options)


class Pair:
    """A client and a server endpoint and the wire between them; the test is the shell."""

    def __init__(self, client: Endpoint, server: Endpoint) -> None:
        self.client = client
        self.server = server
        self.events: dict[str, list[Event]] = {"client": [], "server": []}

    def _answer(self, side: str, ep: Endpoint, events: list[Any], now: float) -> None:
        for ev in events:
            self.events[side].append(ev)
            if isinstance(ev, AttestationRequested):
                doc = attester().attest(
                    user_data=ev.user_data, nonce=ev.nonce, public_key=ev.public_key
                )
                self._answer(side, ep, ep.supply_attestation(doc, now), now)

    def pump(self, now: float, rounds: int = 10) -> None:
        for _ in range(rounds):
            moved = False
            for side, src, dst in (
                ("server", self.client, self.server),
                ("client", self.server, self.client),
            ):
                for chunk in src.data_to_send():
                    moved = True
                    self._answer(side, dst, dst.receive_data(bytes(chunk), now), now)
            if not moved:
                return

    def timers(self, now: float) -> None:
        for side, ep in (("client", self.client), ("server", self.server)):
            when = ep.get_timer()
            if when is not None and when <= now:
                self._answer(side, ep, ep.handle_timer(now), now)

    def of(self, side: str, kind: type[Event]) -> list[Any]:
        return [e for e in self.events[side] if isinstance(e, kind)]


def established(now: float = 0.0, client: Any = None, server: Any = None) -> Pair:
    pair = Pair(client or client_endpoint(now), server or server_endpoint(now))
    pair.client.initiate(now)
    pair.pump(now)
    assert pair.client.phase is Phase.OPEN and pair.server.phase is Phase.OPEN
    return pair


def run_for(pair: Pair, start: float, end: float, step: float) -> None:
    t = start
    while t <= end:
        pair.timers(t)
        pair.pump(t)
        t += step


# -- handshake ---------------------------------------------------------------------------------


def test_handshake_establishes_both_sides_and_the_server_announces_its_limit() -> None:
    pair = established(server=server_endpoint(max_calls=7))
    (ev,) = pair.of("client", SessionEstablished)
    assert ev.mode == "dev-insecure" and len(ev.channel_binding) == 48
    assert pair.of("server", SessionEstablished)[0].channel_binding == ev.channel_binding
    assert pair.of("client", SettingsReceived) == [SettingsReceived(7)]
    assert len(pair.of("server", AttestationRequested)) == 1


def test_handshake_deadline_is_absolute_and_trickling_does_not_extend_it() -> None:
    client = client_endpoint()
    server = server_endpoint(handshake_timeout=10.0)
    client.initiate(0)
    hello = b"".join(bytes(c) for c in client.data_to_send())
    t = 0.0
    for i in range(len(hello) - 1):  # one byte a second, never the whole hello
        t = float(i)
        if t >= 10:
            break
        assert server.receive_data(hello[i : i + 1], t) == []
    assert server.get_timer() == 10.0
    (closed,) = server.handle_timer(10.0)
    assert isinstance(closed, ConnectionClosed) and closed.in_handshake
    assert isinstance(closed.error, HandshakeError) and "timed out" in closed.reason
    assert server.closed and server.get_timer() is None


def test_bytes_sent_while_the_server_attests_are_refused_not_buffered() -> None:
    client = client_endpoint()
    server = server_endpoint()
    client.initiate(0)
    hello = b"".join(bytes(c) for c in client.data_to_send())
    (need,) = server.receive_data(hello, 0)
    assert isinstance(need, AttestationRequested) and server.phase is Phase.ATTESTING
    events = server.receive_data(b"\x00" * 65536, 0.1)
    (closed,) = events
    assert isinstance(closed, ConnectionClosed) and closed.in_handshake
    assert not closed.retryable  # a verdict on the peer, not a transport failure
    # The document that arrives afterwards is not needed any more.
    doc = attester().attest(user_data=need.user_data, nonce=need.nonce, public_key=need.public_key)
    assert server.supply_attestation(doc, 0.2) == []


def test_attester_failure_closes_with_an_alert() -> None:
    client = client_endpoint()
    server = server_endpoint()
    client.initiate(0)
    server.receive_data(b"".join(bytes(c) for c in client.data_to_send()), 0)
    (closed,) = server.attestation_failed("device busy", 0.5)
    assert isinstance(closed, ConnectionClosed) and "device busy" in closed.reason
    wire = b"".join(bytes(c) for c in server.data_to_send())
    (client_closed,) = client.receive_data(wire, 0.6)
    assert isinstance(client_closed, ConnectionClosed)
    assert isinstance(client_closed.error, HandshakeAlert)
    assert client_closed.error.alert is Alert.INTERNAL_ERROR


def test_refusal_at_the_connection_limit_is_an_alert_the_client_may_retry() -> None:
    client = client_endpoint()
    server = server_endpoint()
    (closed,) = server.refuse(Alert.CONNECTION_LIMIT, "server at connection limit")
    assert isinstance(closed, ConnectionClosed)
    client.initiate(0)
    (seen,) = client.receive_data(b"".join(bytes(c) for c in server.data_to_send()), 0.001)
    assert isinstance(seen, ConnectionClosed) and seen.retryable and seen.in_handshake
    assert seen.reason == "server at connection limit"


def test_eof_during_the_handshake_is_retryable() -> None:
    client = client_endpoint()
    client.initiate(0)
    (closed,) = client.eof_received(0.1)
    assert isinstance(closed, ConnectionClosed) and closed.retryable and closed.in_handshake


# -- end of stream, CLOSE ----------------------------------------------------------------------


def test_eof_without_close_is_truncation_and_fails_calls_in_flight() -> None:
    pair = established()
    cid = pair.client.calls.start_call("s.m", [], now=1)
    pair.pump(1)
    events = pair.client.eof_received(2)
    assert events[0] == ErrorReceived(cid, Status.UNAVAILABLE, events[1].reason)  # type: ignore[attr-defined]
    closed = events[1]
    assert isinstance(closed, ConnectionClosed) and not closed.clean
    assert "truncated" in closed.reason


def test_close_is_answered_by_close_and_a_request_in_the_same_flight_is_refused_visibly() -> None:
    pair = established()
    cid = pair.client.calls.start_call("s.m", [1], now=1)
    assert pair.client.close(1) == []  # REQUEST and CLOSE leave in one flight
    assert pair.client.phase is Phase.CLOSING
    pair.pump(1)
    server_events = pair.events["server"]
    assert any(isinstance(e, RequestReceived) and e.call_id == cid for e in server_events)
    assert pair.of("server", CallCancelled) == [CallCancelled(cid, Status.CANCELLED)]
    (server_closed,) = pair.of("server", ConnectionClosed)
    assert server_closed.clean
    # The client saw the refusal, then the server's CLOSE: a clean close, not truncation.
    assert pair.of("client", ErrorReceived) == [
        ErrorReceived(cid, Status.CANCELLED, "the client closed the connection")
    ]
    (client_closed,) = pair.of("client", ConnectionClosed)
    assert client_closed.clean
    assert pair.client.closed and pair.server.closed


def test_a_peer_that_never_answers_close_is_given_up_after_the_close_timeout() -> None:
    pair = established(client=client_endpoint(close_timeout=2.0))
    pair.client.close(5)
    pair.client.data_to_send()  # the CLOSE is lost in transit
    assert pair.client.get_timer() == 7.0
    (closed,) = pair.client.handle_timer(7.0)
    assert isinstance(closed, ConnectionClosed) and not closed.clean


# -- keepalive, idle, session age, key update ---------------------------------------------------


@pytest.mark.parametrize("interval", [1.0, 30.0])
def test_an_idle_connection_survives_many_keepalive_intervals(interval: float) -> None:
    pair = established(
        client=client_endpoint(keepalive_interval=interval),
        server=server_endpoint(keepalive_interval=interval),
    )
    run_for(pair, 0.0, 10 * interval, interval / 4)
    assert not pair.of("client", ConnectionClosed) and not pair.of("server", ConnectionClosed)
    # Whichever side's interval ran out first pinged, and was answered every time.
    assert len(pair.of("server", PongReceived)) + len(pair.of("client", PongReceived)) >= 5
    cid = pair.client.calls.start_call("s.m", [], now=10 * interval)
    pair.pump(10 * interval)
    pair.server.calls.send_response(cid, "ok")
    pair.pump(10 * interval)
    assert pair.of("client", ResponseReceived) == [ResponseReceived(cid, "ok", None)]


def test_a_call_longer_than_the_keepalive_interval_succeeds_at_the_defaults() -> None:
    pair = established()  # keepalive 30 s, timeout 20 s on both sides
    cid = pair.client.calls.start_call("s.m", [], now=0)
    pair.pump(0)
    run_for(pair, 0.0, 200.0, 5.0)  # the handler takes 200 s
    pair.server.calls.send_response(cid, 42)
    pair.pump(200)
    assert pair.of("client", ResponseReceived) == [ResponseReceived(cid, 42, None)]
    assert not pair.of("server", ConnectionClosed)
    assert pair.of("server", PongReceived) or pair.of("client", PongReceived)


def test_a_dead_peer_is_detected_by_keepalive() -> None:
    pair = established(server=server_endpoint(keepalive_interval=10, keepalive_timeout=5))
    pair.server.handle_timer(10)  # PING, never answered
    (closed,) = pair.server.handle_timer(15)
    assert isinstance(closed, ConnectionClosed) and closed.reason == "keepalive timeout"


def test_an_oversize_pong_closes_the_connection_with_a_status_not_an_exception() -> None:
    pair = established(server=server_endpoint(max_send_message_size=1024))
    pair.client.calls._emit((PING, b"x" * 4096))  # a PING whose echo exceeds the send limit
    pair.pump(1)
    (closed,) = pair.of("server", ConnectionClosed)
    assert closed.status is Status.RESOURCE_EXHAUSTED
    assert pair.of("client", ConnectionClosed)  # told by the server's CLOSE


def test_idle_connection_is_closed_by_the_server_after_the_idle_timeout() -> None:
    pair = established(server=server_endpoint(idle_timeout=60.0))
    run_for(pair, 0.0, 59.0, 1.0)
    assert not pair.of("server", ConnectionClosed)
    run_for(pair, 59.0, 121.0, 1.0)
    (closed,) = pair.of("server", ConnectionClosed)
    assert closed.reason == "idle timeout"
    assert pair.of("client", GoAwayReceived) and pair.of("client", ConnectionClosed)


def test_session_age_goaway_then_grace_then_close_even_with_a_call_in_flight() -> None:
    pair = established(server=server_endpoint(max_session_age=100.0, session_grace=5.0))
    cid = pair.client.calls.start_call("s.m", [], now=1)
    pair.pump(1)
    run_for(pair, 1.0, 100.0, 1.0)
    assert pair.of("client", GoAwayReceived)
    assert not pair.of("server", ConnectionClosed)
    run_for(pair, 100.0, 106.0, 1.0)
    assert pair.of("server", CallCancelled) == [CallCancelled(cid, Status.UNAVAILABLE)]
    (closed,) = pair.of("server", ConnectionClosed)
    assert closed.reason == "session age limit"
    (error,) = pair.of("client", ErrorReceived)
    assert error.call_id == cid and error.status is Status.UNAVAILABLE


def test_the_client_knows_when_its_session_is_too_old() -> None:
    pair = established(client=client_endpoint(max_session_age=50.0))
    assert not pair.client.expired(49.9)
    assert pair.client.expired(50.0)


def test_time_based_key_update_is_performed_and_the_peer_keeps_up() -> None:
    pair = established(client=client_endpoint(key_update_interval=10.0))
    assert pair.client.get_timer() is not None and pair.client.get_timer() <= 10.0
    pair.client.handle_timer(10.0)
    cid = pair.client.calls.start_call("s.m", [], now=10)
    wire = b"".join(bytes(c) for c in pair.client.data_to_send())
    assert wire[0] == REC_KEY_UPDATE  # the rotation leads the next flight
    events = pair.server.receive_data(wire, 10)
    assert [type(e) for e in events] == [RequestReceived]
    assert events[0].call_id == cid  # type: ignore[attr-defined]


# -- hostile bytes -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_random_bytes_after_the_handshake_never_raise(chunks: list[bytes]) -> None:
    pair = established()
    for i, chunk in enumerate(chunks):
        events = pair.server.receive_data(chunk, float(i))
        for ev in events:
            assert isinstance(ev, (ConnectionClosed, CallCancelled))
        if pair.server.closed:
            (closed,) = [e for e in events if isinstance(e, ConnectionClosed)]
            assert isinstance(closed.error, RemoteProtocolError)
            break


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_in_the_handshake_never_raise(data: bytes) -> None:
    server = server_endpoint()
    events = server.receive_data(data, 0.0)
    for ev in events:
        assert isinstance(ev, (ConnectionClosed, AttestationRequested))


# -- admission and memory limits ---------------------------------------------------------------


def _hello_with_max_record(value: int) -> bytes:
    client = client_endpoint()
    client.initiate(0)
    hello = bytearray(b"".join(bytes(c) for c in client.data_to_send()))
    # frame header (5) + version, mode, suite(2), flags, then max_record (4 bytes)
    hello[10:14] = value.to_bytes(4, "big")
    return bytes(hello)


@pytest.mark.parametrize("value", [1, 64, 511])
def test_a_hello_announcing_tiny_records_is_refused_before_any_attestation(value: int) -> None:
    server = server_endpoint()
    (closed,) = server.receive_data(_hello_with_max_record(value), 0)
    assert isinstance(closed, ConnectionClosed) and closed.in_handshake
    assert "below the minimum of 512" in closed.reason
    assert b"".join(bytes(c) for c in server.data_to_send()) == alert_frame(Alert.BAD_MESSAGE)


def test_a_hello_announcing_the_floor_is_served() -> None:
    server = server_endpoint()
    (need,) = server.receive_data(_hello_with_max_record(512), 0)
    assert isinstance(need, AttestationRequested)


def _frame_start(pair: Pair, announced: int, sent: int) -> tuple[bytes, bytes]:
    """The client's session seals a frame announcing ``announced`` bytes; returns the first
    ``sent`` body bytes' records and the rest (still to be sealed by the caller)."""
    session = pair.client.session
    assert session is not None
    wire = b"".join(bytes(c) for c in session.seal(announced.to_bytes(4, "big") + bytes(sent)))
    return wire, bytes(announced - sent)


def test_a_partial_message_must_complete_within_the_message_timeout() -> None:
    pair = established(server=server_endpoint(message_timeout=5.0))
    server = pair.server
    wire, _rest = _frame_start(pair, 100_000, 1000)
    assert server.receive_data(wire, 1.0) == []
    assert server.buffered_input == 1004 and server.partial_since == 1.0
    assert server.get_timer() == 6.0
    session = pair.client.session
    assert session is not None
    for t in (2.0, 3.0, 4.0, 5.0):  # trickling does not move the deadline
        assert server.receive_data(b"".join(bytes(c) for c in session.seal(b"\x00")), t) == []
        assert server.get_timer() == 6.0
    (closed,) = server.handle_timer(6.0)
    assert isinstance(closed, ConnectionClosed) and not closed.in_handshake
    assert "message_timeout" in closed.reason
    assert server.buffered_input == 0


def test_a_partial_record_alone_is_held_to_the_message_timeout() -> None:
    pair = established(server=server_endpoint(message_timeout=5.0))
    session = pair.client.session
    assert session is not None
    wire = b"".join(bytes(c) for c in session.seal(bytes(50_000)))
    assert pair.server.receive_data(wire[:30_000], 1.0) == []
    assert pair.server.buffered_input == 30_000
    (closed,) = pair.server.handle_timer(6.0)
    assert isinstance(closed, ConnectionClosed) and "message_timeout" in closed.reason


def test_messages_that_complete_restart_the_message_clock() -> None:
    # A busy honest peer always has a message partly received, but each one completes: the
    # deadline follows the message that is partial now, not the first partial byte ever seen.
    pair = established(server=server_endpoint(message_timeout=5.0))
    t = 1.0
    requests = 0
    for _ in range(30):  # 30 s of back-to-back calls, each split across two reads
        pair.client.calls.start_call("s.m", [bytes(3000)], now=t)
        wire = b"".join(bytes(c) for c in pair.client.data_to_send())
        pair.server.receive_data(wire[:-100], t)
        assert pair.server.partial_since == t
        t += 1.0
        events = pair.server.receive_data(wire[-100:], t)
        requests += sum(isinstance(e, RequestReceived) for e in events)
        assert pair.server.partial_since is None
        pair.timers(t)
    assert pair.server.phase is Phase.OPEN
    assert requests == 30


def test_message_timeout_none_disables_it_and_zero_is_refused() -> None:
    pair = established(server=server_endpoint(message_timeout=None))
    wire, _ = _frame_start(pair, 100_000, 10)
    pair.server.receive_data(wire, 1.0)
    # Still accounted (memory, shedding order), but no deadline: an hour later it is open.
    assert pair.server.partial_since == 1.0 and pair.server.buffered_input > 0
    events = pair.server.handle_timer(3601.0)
    assert not any(isinstance(e, ConnectionClosed) for e in events)
    assert pair.server.is_open
    with pytest.raises(ValueError, match="message_timeout"):
        server_endpoint(message_timeout=0)


def test_shed_closes_with_resource_exhausted_and_fails_calls_in_flight() -> None:
    pair = established()
    cid = pair.client.calls.start_call("s.m", [], now=1)
    pair.pump(1)
    events = pair.server.shed(2.0, "server memory budget exceeded")
    closed = events[-1]
    assert isinstance(closed, ConnectionClosed)
    assert closed.status is Status.RESOURCE_EXHAUSTED and "budget" in closed.reason
    # The client learns the session ended (our CLOSE), and its call fails visibly.
    wire = b"".join(bytes(c) for c in pair.server.data_to_send())
    seen = pair.client.receive_data(wire, 2.1)
    assert any(isinstance(e, ErrorReceived) and e.call_id == cid for e in seen)
    assert pair.server.shed(3.0, "again") == []


def test_a_server_hello_announcing_tiny_records_is_refused_by_the_client() -> None:
    client, server = client_endpoint(), server_endpoint()
    client.initiate(0)
    pair = Pair(client, server)
    for chunk in client.data_to_send():
        pair._answer("server", server, server.receive_data(bytes(chunk), 0), 0)
    reply = bytearray(b"".join(bytes(c) for c in server.data_to_send()))
    reply[10:14] = (100).to_bytes(4, "big")  # frame header (5) + version, mode, suite, flags
    (closed,) = client.receive_data(bytes(reply), 0.1)
    assert isinstance(closed, ConnectionClosed) and closed.in_handshake
    assert "below the minimum of 512" in closed.reason
    assert b"".join(bytes(c) for c in client.data_to_send()) == alert_frame(Alert.BAD_MESSAGE)


def test_wants_write_says_whether_data_to_send_has_anything() -> None:
    pair = established()
    assert not pair.server.wants_write and pair.server.data_to_send() == []
    # A PING makes the server owe a PONG; a request makes it owe nothing until it answers.
    pair.client.calls._emit((PING, b"p"))
    pair.client.calls.start_call("s.m", [], now=1)
    for chunk in pair.client.data_to_send():
        pair.server.receive_data(bytes(chunk), 1)
    assert pair.server.wants_write
    assert pair.server.data_to_send() != []
    assert not pair.server.wants_write
    pair.server.close(2.0)  # a CLOSE record waits for the transport
    assert pair.server.wants_write and pair.server.data_to_send() != []
    assert not pair.server.wants_write


def test_timer_changed_says_when_a_read_may_have_moved_the_timer_earlier() -> None:
    pair = established()
    server = pair.server
    server.get_timer()
    assert not server.timer_changed
    # A call without a deadline: nothing earlier to wake for.
    pair.client.calls.start_call("s.m", [], now=1)
    for chunk in pair.client.data_to_send():
        server.receive_data(bytes(chunk), 1)
    assert not server.timer_changed
    # A call with a deadline: the server must ask again, and learns the deadline.
    pair.client.calls.start_call("s.m", [], now=2, timeout=0.5)
    for chunk in pair.client.data_to_send():
        server.receive_data(bytes(chunk), 2)
    assert server.timer_changed
    assert server.get_timer() == 2.5 and not server.timer_changed
    # A partial message starts the message deadline.
    wire, _ = _frame_start(pair, 100_000, 10)
    server.receive_data(wire, 3)
    assert server.timer_changed and server.partial_since == 3


def test_traffic_answering_a_ping_makes_the_next_ping_due_sooner() -> None:
    """With a PING timeout longer than the interval, the next PING is due before the timeout
    the timer was armed for: a read that clears the PING must say so."""
    pair = established(server=server_endpoint(keepalive_interval=1.0, keepalive_timeout=20.0))
    server = pair.server
    server.handle_timer(1.0)  # the interval ran out: PING
    assert server.get_timer() == 21.0  # the PING's timeout
    pair.pump(1.5)  # the client's PONG
    assert server.timer_changed
    assert server.get_timer() == 2.5  # the next interval, not the old PING's timeout
