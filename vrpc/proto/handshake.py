"""The vrpc/1 attested handshake (sans-IO): X25519 + HKDF-SHA-384 + AES-256-GCM, 1.5 round trips.

Theory of operation
-------------------
::

    client                                                        server (enclave)
    CLIENT_HELLO  version, mode, suite, flags, max_record, nonce_c, eph_c, service  -->
                                          <--  SERVER_HELLO  core, ATT, SF
    CLIENT_FINISHED  [ATT_c], CF  -->

* ``core`` is the server's fixed 73-byte half of the negotiation (version, mode, suite, flags,
  max_record, nonce_s, eph_s).
* ``ATT`` is an attestation document made for this handshake alone: ``user_data = TH1`` (the
  transcript hash through ``core``, which covers both ephemeral keys, both nonces, the mode and the
  service hint), ``public_key`` = the DER SPKI of ``eph_s``, ``nonce = nonce_c``. Producing it is
  I/O (``/dev/nsm``): the server *emits* ``NeedAttestation`` and the shell answers with
  ``supply_attestation(document)``.
* The client verifies ``ATT`` with an injected ``verify`` callable, then checks the server's
  Finished MAC ``SF``: only the holder of ``eph_s`` can compute it, so the attested key is the one
  the traffic keys come from (key confirmation, no relay).
* With mutual attestation the client also emits ``NeedAttestation`` (``user_data = TH3``,
  ``nonce = nonce_s``, ``public_key`` = SPKI of ``eph_c``) and sends the document before ``CF``.
  The client's document goes out only after the server's attestation and Finished verified.
* The server verifies ``CF`` (and ``ATT_c``) before it accepts a single byte of application data.
* ``mode`` travels in both hellos and the transcript: ``prod`` and ``dev-insecure`` must match
  exactly; ``plaintext`` needs an explicit opt-in on both sides and is never a fallback.

The wire layout of every message, the transcript and the key schedule are in docs/protocol.md;
the state machine is ``_TRANSITIONS`` below (which input may move which state where), with
``_EXPECTED`` saying which message each waiting state reads.
Any failure ends the handshake for good: keys are dropped, one ALERT is queued for the peer, and
every later call raises.
"""

from __future__ import annotations

import enum
import hmac
import os
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from vrpc.exceptions import (
    AttestationError,
    FrameTooLarge,
    HandshakeAlert,
    HandshakeError,
    LocalProtocolError,
    RemoteProtocolError,
)
from vrpc.proto import keyschedule as ks
from vrpc.proto.record import (
    DEFAULT_MAX_RECORD_PLAINTEXT,
    KEY_UPDATE_BYTES,
    KEY_UPDATE_RECORDS,
    MAX_RECORD_PLAINTEXT_LIMIT,
    PlaintextSession,
    RecordSession,
    Session,
)

__all__ = [
    "MAX_ATTESTATION",
    "MAX_MESSAGE",
    "MIN_RECORD_PLAINTEXT",
    "MODES",
    "Alert",
    "ClientHandshake",
    "ClientHello",
    "HandshakeComplete",
    "HandshakeEvent",
    "MsgType",
    "NeedAttestation",
    "ServerCore",
    "ServerHandshake",
    "State",
    "Verify",
]

VERSION = 1
SUITE_X25519_SHA384_AES256GCM = 0x0001
SUITE_NONE = 0x0000
FLAG_MUTUAL = 0x01
NONCE_LEN = 32
KEY_LEN = 32
MAC_LEN = ks.HASH_LEN
CORE_LEN = 73
MAX_ATTESTATION = 16384
# The smallest max_record a peer may announce. The record size is the peer's to choose, but a
# tiny one turns every byte we send into a 21-byte record header and tag plus an AEAD call:
# at max_record=1 a 256 KiB answer became 5.5 MiB of wire and 262,144 encryptions in one loop
# turn. 512 is the smallest fragment length TLS lets a peer ask for (RFC 6066
# max_fragment_length, 2**9); at 512 the records cost at most 4 % overhead. (RFC 8449's
# record_size_limit goes down to 64 for constrained IoT devices; no vrpc peer is one.)
MIN_RECORD_PLAINTEXT = 512

# Wire names of the modes (one byte each on the wire).
MODES: dict[str, int] = {"prod": 1, "dev-insecure": 2, "plaintext": 3}
_MODE_NAMES = {v: k for k, v in MODES.items()}
_PLAINTEXT = MODES["plaintext"]

Verify = Callable[..., object]
"""``verify(document, *, nonce, public_key, user_data, now) -> claims``; raises AttestationError.

It MUST check that the document's nonce, public_key and user_data equal the arguments
byte for byte, besides its signature, chain and policy checks."""


class MsgType(enum.IntEnum):
    CLIENT_HELLO = 0x01
    SERVER_HELLO = 0x02
    CLIENT_FINISHED = 0x03
    ALERT = 0x04


# Size caps per message body, checked on the length prefix before anything is buffered.
MAX_MESSAGE: dict[int, int] = {
    MsgType.CLIENT_HELLO: 1024,
    MsgType.SERVER_HELLO: 20480,
    MsgType.CLIENT_FINISHED: 20480,
    MsgType.ALERT: 1,
}


class Alert(enum.IntEnum):
    """The one-byte body of an ALERT. Unauthenticated: a reason for the log, never a decision."""

    BAD_MESSAGE = 1
    MODE_REFUSED = 2
    UNKNOWN_SERVICE = 3
    MUTUAL_REFUSED = 4
    ATTESTATION_REFUSED = 5
    FINISHED_INVALID = 6
    INTERNAL_ERROR = 7
    CONNECTION_LIMIT = 8  # the server is at its connection limit: try again or elsewhere
    HANDSHAKE_LIMIT = 9  # too many handshakes in progress on the server: try again shortly


_hdr = struct.Struct(">BI")
_core = struct.Struct(">BBHBI32s32s")
_u32 = struct.Struct(">I")


def _frame(msg_type: int, body: bytes) -> bytes:
    return _hdr.pack(msg_type, len(body)) + body


def alert_frame(alert: Alert) -> bytes:
    """The ALERT message for ``alert`` (6 bytes)."""
    return _frame(MsgType.ALERT, bytes((alert,)))


# -- messages --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientHello:
    mode: int
    suite: int
    flags: int
    max_record: int
    nonce: bytes
    key_share: bytes
    service: str | None

    def encode_body(self) -> bytes:
        service = (self.service or "").encode("ascii")
        return (
            _core.pack(
                VERSION,
                self.mode,
                self.suite,
                self.flags,
                self.max_record,
                self.nonce,
                self.key_share,
            )
            + bytes((len(service),))
            + service
        )

    @classmethod
    def parse(cls, body: bytes) -> ClientHello:
        if len(body) < CORE_LEN + 1:
            raise HandshakeError("CLIENT_HELLO too short")
        version, mode, suite, flags, max_record, nonce, key_share = _core.unpack_from(body)
        _check_common(version, mode, suite, flags, max_record, key_share)
        n = body[CORE_LEN]
        if len(body) != CORE_LEN + 1 + n:
            raise HandshakeError("CLIENT_HELLO length does not match its service field")
        raw = body[CORE_LEN + 1 :]
        if not all(0x21 <= c <= 0x7E for c in raw):
            raise HandshakeError("CLIENT_HELLO service is not printable ASCII")
        return cls(mode, suite, flags, max_record, nonce, key_share, raw.decode("ascii") or None)


@dataclass(frozen=True, slots=True)
class ServerCore:
    mode: int
    suite: int
    flags: int
    max_record: int
    nonce: bytes
    key_share: bytes

    def encode(self) -> bytes:
        return _core.pack(
            VERSION, self.mode, self.suite, self.flags, self.max_record, self.nonce, self.key_share
        )

    @classmethod
    def parse(cls, core: bytes) -> ServerCore:
        version, mode, suite, flags, max_record, nonce, key_share = _core.unpack(core)
        _check_common(version, mode, suite, flags, max_record, key_share)
        return cls(mode, suite, flags, max_record, nonce, key_share)


def _check_common(
    version: int, mode: int, suite: int, flags: int, max_record: int, key_share: bytes
) -> None:
    if version != VERSION:
        raise HandshakeError(f"unsupported protocol version {version}")
    if mode not in _MODE_NAMES:
        raise HandshakeError(f"unknown mode {mode}")
    if flags & ~FLAG_MUTUAL:
        raise HandshakeError("reserved flag bits set")
    if max_record < MIN_RECORD_PLAINTEXT:
        # Checked before any key exchange or attestation: the peer learns why from BAD_MESSAGE.
        raise HandshakeError(
            f"peer max_record {max_record} is below the minimum of {MIN_RECORD_PLAINTEXT}"
        )
    if max_record > MAX_RECORD_PLAINTEXT_LIMIT:
        raise HandshakeError("max_record out of range")
    if mode == _PLAINTEXT:
        if suite != SUITE_NONE or key_share != bytes(KEY_LEN) or flags:
            raise HandshakeError("plaintext hello with a suite, key share or flags")
    elif suite != SUITE_X25519_SHA384_AES256GCM:
        raise HandshakeError(f"unsupported suite 0x{suite:04x}")


def _split_attested(body: bytes, offset: int, what: str) -> tuple[bytes, bytes]:
    """``att_len(4) || att || mac(48)`` starting at ``offset``; exact length, nothing trailing."""
    if len(body) < offset + 4 + MAC_LEN:
        raise HandshakeError(f"{what} too short")
    (att_len,) = _u32.unpack_from(body, offset)
    if att_len > MAX_ATTESTATION:
        raise HandshakeError(f"{what} attestation longer than {MAX_ATTESTATION} bytes")
    if len(body) != offset + 4 + att_len + MAC_LEN:
        raise HandshakeError(f"{what} length does not match its attestation field")
    return body[offset + 4 : offset + 4 + att_len], body[-MAC_LEN:]


# -- events ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NeedAttestation:
    """Ask the attester for a document with exactly these fields, then ``supply_attestation``."""

    user_data: bytes
    nonce: bytes
    public_key: bytes


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The session is established. Feed ``trailing`` to ``session.receive()`` first."""

    session: Session
    peer_claims: object | None
    mode: str
    trailing: bytes
    service: str | None = None


HandshakeEvent = NeedAttestation | HandshakeComplete


# -- state machine ---------------------------------------------------------------------------------


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    IDLE = "idle"
    WAIT_CLIENT_HELLO = "wait-client-hello"
    WAIT_SERVER_HELLO = "wait-server-hello"
    WAIT_OWN_ATTESTATION = "wait-own-attestation"
    WAIT_CLIENT_FINISHED = "wait-client-finished"
    DONE = "done"
    FAILED = "failed"


class Input(enum.Enum):
    INITIATE = "initiate"
    CLIENT_HELLO = "client-hello"
    CLIENT_HELLO_PLAINTEXT = "client-hello-plaintext"
    SERVER_HELLO = "server-hello"
    SERVER_HELLO_MUTUAL = "server-hello-mutual"
    SERVER_HELLO_PLAINTEXT = "server-hello-plaintext"
    ATTESTATION = "attestation"
    CLIENT_FINISHED = "client-finished"


# Every legal step. Any (role, state, input) not listed is an error and lands in FAILED, which has
# no way out. A received ALERT is never legal: it always ends in FAILED.
_TRANSITIONS: dict[tuple[Role, State, Input], State] = {
    (Role.CLIENT, State.IDLE, Input.INITIATE): State.WAIT_SERVER_HELLO,
    (Role.CLIENT, State.WAIT_SERVER_HELLO, Input.SERVER_HELLO): State.DONE,
    (Role.CLIENT, State.WAIT_SERVER_HELLO, Input.SERVER_HELLO_PLAINTEXT): State.DONE,
    (Role.CLIENT, State.WAIT_SERVER_HELLO, Input.SERVER_HELLO_MUTUAL): State.WAIT_OWN_ATTESTATION,
    (Role.CLIENT, State.WAIT_OWN_ATTESTATION, Input.ATTESTATION): State.DONE,
    (Role.SERVER, State.WAIT_CLIENT_HELLO, Input.CLIENT_HELLO): State.WAIT_OWN_ATTESTATION,
    (Role.SERVER, State.WAIT_CLIENT_HELLO, Input.CLIENT_HELLO_PLAINTEXT): State.DONE,
    (Role.SERVER, State.WAIT_OWN_ATTESTATION, Input.ATTESTATION): State.WAIT_CLIENT_FINISHED,
    (Role.SERVER, State.WAIT_CLIENT_FINISHED, Input.CLIENT_FINISHED): State.DONE,
}

# The message each waiting state reads; in any other state, received bytes are an error
# (except after DONE, where they are the application's and become ``trailing``).
_EXPECTED: dict[State, MsgType] = {
    State.WAIT_SERVER_HELLO: MsgType.SERVER_HELLO,
    State.WAIT_CLIENT_HELLO: MsgType.CLIENT_HELLO,
    State.WAIT_CLIENT_FINISHED: MsgType.CLIENT_FINISHED,
}


class _Fail(Exception):
    """Internal: carries the alert to send along with the exception to raise."""

    def __init__(self, alert: Alert | None, exc: BaseException) -> None:
        super().__init__(alert, exc)
        self.alert = alert
        self.exc = exc


class _Handshake:
    """What both roles share: the inbound buffer, the outbound buffer, the state, failing."""

    _role: Role

    def __init__(
        self,
        *,
        rng: Callable[[int], bytes],
        ephemeral_key: bytes | None,
        max_record_plaintext: int,
        key_update_records: int,
        key_update_bytes: int,
    ) -> None:
        if not MIN_RECORD_PLAINTEXT <= max_record_plaintext <= MAX_RECORD_PLAINTEXT_LIMIT:
            raise ValueError(
                f"max_record_plaintext must be in "
                f"{MIN_RECORD_PLAINTEXT}..{MAX_RECORD_PLAINTEXT_LIMIT}"
            )
        self._rng = rng
        self._eph_raw = ephemeral_key
        self._max_record = max_record_plaintext
        self._ku_records = key_update_records
        self._ku_bytes = key_update_bytes
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._pending: list[HandshakeEvent] = []
        self._transcript = ks.Transcript()
        self._eph: X25519PrivateKey | None = None
        self._hs: bytes | None = None
        self._now: float | None = None
        self.state = State.IDLE

    # -- plumbing ---------------------------------------------------------------------------------

    def _random(self, n: int) -> bytes:
        value = self._rng(n)
        if len(value) != n:
            raise LocalProtocolError("rng returned the wrong number of bytes")
        return value

    def _ephemeral(self) -> X25519PrivateKey:
        raw = self._eph_raw if self._eph_raw is not None else self._random(KEY_LEN)
        self._eph_raw = None
        return X25519PrivateKey.from_private_bytes(raw)

    def _step(self, event: Input) -> None:
        try:
            self.state = _TRANSITIONS[(self._role, self.state, event)]
        except KeyError:
            raise LocalProtocolError(
                f"{event.value} is not allowed in state {self.state.value}"
            ) from None

    def _check_alive(self) -> None:
        if self.state is State.FAILED:
            raise HandshakeError("the handshake has failed; start a new connection")

    def _abort(self, alert: Alert | None) -> None:
        self.state = State.FAILED
        self._eph = None
        self._hs = None
        self._inbuf = bytearray()
        self._pending = []
        self._outbuf = bytearray(_frame(MsgType.ALERT, bytes((alert,)))) if alert else bytearray()

    def _guard(self, func: Callable[[], None]) -> None:
        """Run one step; on any failure, abort (drop keys, queue an ALERT) and raise."""
        try:
            func()
        except _Fail as fail:
            self._abort(fail.alert)
            raise fail.exc from fail.__cause__
        except (HandshakeError, RemoteProtocolError):
            self._abort(Alert.BAD_MESSAGE)
            raise
        except LocalProtocolError:
            self._abort(Alert.INTERNAL_ERROR)
            raise
        except AttestationError:
            self._abort(Alert.ATTESTATION_REFUSED)
            raise
        except Exception as exc:
            self._abort(Alert.INTERNAL_ERROR)
            raise HandshakeError(f"internal error: {type(exc).__name__}") from exc

    def _verify_peer(
        self, verify: Verify, document: bytes, *, nonce: bytes, public_key: bytes, user_data: bytes
    ) -> object:
        assert self._now is not None
        try:
            return verify(
                document, nonce=nonce, public_key=public_key, user_data=user_data, now=self._now
            )
        except AttestationError:
            raise
        except Exception as exc:
            # A verifier that fails in an unexpected way must still fail closed.
            raise _Fail(
                Alert.ATTESTATION_REFUSED,
                HandshakeError(f"attestation verifier raised {type(exc).__name__}"),
            ) from exc

    def _next_message(self) -> tuple[int, bytes] | None:
        buf = self._inbuf
        if len(buf) < 5:
            return None
        msg_type, length = _hdr.unpack_from(buf)
        expected = _EXPECTED.get(self.state)
        if msg_type == MsgType.ALERT:
            if length != 1:
                raise HandshakeError("malformed ALERT")
            if len(buf) < 6:
                return None
            code = buf[5]
            try:
                alert: Alert | None = Alert(code)
                reason = Alert(code).name.lower()
            except ValueError:
                alert, reason = None, f"code {code}"
            # Never answer an ALERT with an ALERT.
            raise _Fail(None, HandshakeAlert(f"peer aborted the handshake ({reason})", alert))
        if expected is None or msg_type != expected:
            raise HandshakeError(f"unexpected handshake message type 0x{msg_type:02x}")
        if length > MAX_MESSAGE[msg_type]:
            raise FrameTooLarge(
                f"handshake message of {length} bytes exceeds {MAX_MESSAGE[msg_type]}"
            )
        if len(buf) < 5 + length:
            return None
        frame = bytes(buf[: 5 + length])
        del buf[: 5 + length]
        return msg_type, frame

    def _session(
        self, *, send: bytes, recv: bytes, exporter: bytes, peer_max: int
    ) -> RecordSession:
        return RecordSession(
            send_secret=send,
            recv_secret=recv,
            max_send_plaintext=min(peer_max, self._max_record),
            max_recv_plaintext=self._max_record,
            created_at=self._now,
            channel_binding=ks.expand_label(exporter, "channel binding", b"", ks.HASH_LEN),
            key_update_records=self._ku_records,
            key_update_bytes=self._ku_bytes,
        )

    def _complete(
        self, session: Session, claims: object | None, mode: int, service: str | None
    ) -> None:
        trailing = bytes(self._inbuf)
        self._inbuf = bytearray()
        self._eph = None
        self._hs = None
        self._pending.append(
            HandshakeComplete(session, claims, _MODE_NAMES[mode], trailing, service)
        )

    # -- public API -------------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[HandshakeEvent]:
        """Feed received bytes (possibly ``b""``); returns the events they (or an earlier
        ``supply_attestation``) produced."""
        self._check_alive()
        self._now = now
        if self.state is State.DONE:
            if data:
                raise LocalProtocolError("handshake complete: feed data to the session")
        else:
            self._inbuf += data
            self._guard(self._process)
        events, self._pending = self._pending, []
        return events

    def _process(self) -> None:
        while self.state in _EXPECTED:
            message = self._next_message()
            if message is None:
                return
            self._handle(*message)
        if self._inbuf and self.state is not State.DONE:
            # Waiting for our own attestation (or not started): the peer has nothing to say yet.
            raise HandshakeError("peer sent data before the handshake allowed it")

    def _handle(self, msg_type: int, frame: bytes) -> None:
        raise NotImplementedError

    def supply_attestation(self, document: bytes) -> None:
        """Answer ``NeedAttestation``. Events it causes come from the next ``receive_data``
        (call ``receive_data(b"", now)`` to collect them without new bytes)."""
        self._check_alive()
        if self.state is not State.WAIT_OWN_ATTESTATION:
            self._abort(Alert.INTERNAL_ERROR)
            raise LocalProtocolError("no attestation was requested")
        document = bytes(document)
        self._guard(lambda: self._attested(document))

    def _attested(self, document: bytes) -> None:
        raise NotImplementedError

    def data_to_send(self) -> bytes:
        """Drain the outbound bytes. After a failure this returns the ALERT once, then b""."""
        out = bytes(self._outbuf)
        self._outbuf.clear()
        return out

    @property
    def failed(self) -> bool:
        return self.state is State.FAILED


class ClientHandshake(_Handshake):
    """The initiator: ``initiate()``, then feed the server's bytes to ``receive_data``."""

    _role = Role.CLIENT

    def __init__(
        self,
        *,
        mode: str = "prod",
        verify: Verify | None,
        service: str | None = None,
        mutual: bool = False,
        rng: Callable[[int], bytes] = os.urandom,
        max_record_plaintext: int = DEFAULT_MAX_RECORD_PLAINTEXT,
        ephemeral_key: bytes | None = None,
        key_update_records: int = KEY_UPDATE_RECORDS,
        key_update_bytes: int = KEY_UPDATE_BYTES,
    ) -> None:
        super().__init__(
            rng=rng,
            ephemeral_key=ephemeral_key,
            max_record_plaintext=max_record_plaintext,
            key_update_records=key_update_records,
            key_update_bytes=key_update_bytes,
        )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}")
        if mode != "plaintext" and verify is None:
            raise ValueError(f"mode {mode!r} needs a verifier (fail closed)")
        if mode == "plaintext" and mutual:
            raise ValueError("mutual attestation needs an attested mode")
        if service is not None and (
            not 0 < len(service) <= 255 or not all(0x21 <= ord(c) <= 0x7E for c in service)
        ):
            raise ValueError("service must be 1..255 printable ASCII characters")
        self._mode = MODES[mode]
        self._verify = verify
        self._service = service
        self._mutual = mutual
        self._claims: object | None = None
        self._nonce = b""
        self._server: ServerCore | None = None
        self._c_fin = b""

    def initiate(self) -> None:
        """Queue the CLIENT_HELLO."""
        self._check_alive()
        self._guard(self._hello)

    def _hello(self) -> None:
        self._step(Input.INITIATE)
        self._nonce = self._random(NONCE_LEN)
        if self._mode == _PLAINTEXT:
            share = bytes(KEY_LEN)
            suite = SUITE_NONE
        else:
            self._eph = self._ephemeral()
            share = self._eph.public_key().public_bytes_raw()
            suite = SUITE_X25519_SHA384_AES256GCM
        hello = ClientHello(
            mode=self._mode,
            suite=suite,
            flags=FLAG_MUTUAL if self._mutual else 0,
            max_record=self._max_record,
            nonce=self._nonce,
            key_share=share,
            service=self._service,
        )
        frame = _frame(MsgType.CLIENT_HELLO, hello.encode_body())
        self._transcript.update(frame)
        self._outbuf += frame

    def _handle(self, msg_type: int, frame: bytes) -> None:
        body = frame[5:]
        if len(body) < CORE_LEN:
            raise HandshakeError("SERVER_HELLO too short")
        core = ServerCore.parse(body[:CORE_LEN])
        if core.mode != self._mode:
            raise _Fail(
                Alert.MODE_REFUSED,
                HandshakeError(
                    f"server answered in mode {_MODE_NAMES[core.mode]!r}, "
                    f"expected {_MODE_NAMES[self._mode]!r}"
                ),
            )
        if core.flags != (FLAG_MUTUAL if self._mutual else 0):
            raise HandshakeError("SERVER_HELLO flags differ from the CLIENT_HELLO")
        self._transcript.update(body[:CORE_LEN])
        if self._mode == _PLAINTEXT:
            if len(body) != CORE_LEN:
                raise HandshakeError("plaintext SERVER_HELLO carries extra bytes")
            self._step(Input.SERVER_HELLO_PLAINTEXT)
            self._complete(PlaintextSession(self._now), None, self._mode, None)
            return
        th1 = self._transcript.digest()
        document, sf = _split_attested(body, CORE_LEN, "SERVER_HELLO")
        self._transcript.update(body[CORE_LEN : CORE_LEN + 4 + len(document)])
        th2 = self._transcript.digest()
        assert self._verify is not None and self._eph is not None
        # Attestation first: a genuine enclave with the wrong image must surface as the verifier's
        # specific message (e.g. a PCR mismatch), not as a generic Finished failure.
        self._claims = self._verify_peer(
            self._verify,
            document,
            nonce=self._nonce,
            public_key=ks.x25519_spki(core.key_share),
            user_data=th1,
        )
        self._hs = ks.handshake_secret(ks.x25519_shared(self._eph, core.key_share))
        self._c_fin, s_fin = ks.finished_keys(self._hs)
        if not hmac.compare_digest(ks.finished_mac(s_fin, th2), sf):
            raise _Fail(Alert.FINISHED_INVALID, HandshakeError("server Finished MAC is invalid"))
        self._transcript.update(sf)
        self._server = core
        if self._mutual:
            self._step(Input.SERVER_HELLO_MUTUAL)
            self._pending.append(
                NeedAttestation(
                    user_data=self._transcript.digest(),
                    nonce=core.nonce,
                    public_key=ks.x25519_spki(self._eph.public_key().public_bytes_raw()),
                )
            )
        else:
            self._step(Input.SERVER_HELLO)
            self._finish(b"")

    def _attested(self, document: bytes) -> None:
        if not 0 < len(document) <= MAX_ATTESTATION:
            raise LocalProtocolError(f"attestation document must be 1..{MAX_ATTESTATION} bytes")
        self._step(Input.ATTESTATION)
        self._finish(document)

    def _finish(self, document: bytes) -> None:
        assert self._hs is not None and self._server is not None
        prefix = _u32.pack(len(document)) + document
        self._transcript.update(prefix)
        th4 = self._transcript.digest()
        cf = ks.finished_mac(self._c_fin, th4)
        self._outbuf += _frame(MsgType.CLIENT_FINISHED, prefix + cf)
        c_ap, s_ap, exporter = ks.application_secrets(self._hs, th4)
        session = self._session(
            send=c_ap, recv=s_ap, exporter=exporter, peer_max=self._server.max_record
        )
        self._c_fin = b""
        self._complete(session, self._claims, self._mode, self._service)


class ServerHandshake(_Handshake):
    """The responder (the enclave): feed the client's bytes to ``receive_data``."""

    _role = Role.SERVER

    def __init__(
        self,
        *,
        mode: str = "prod",
        allow_plaintext: bool = False,
        verify_peer: Verify | None = None,
        require_mutual: bool = False,
        services: Collection[str] | None = None,
        rng: Callable[[int], bytes] = os.urandom,
        max_record_plaintext: int = DEFAULT_MAX_RECORD_PLAINTEXT,
        ephemeral_key: bytes | None = None,
        key_update_records: int = KEY_UPDATE_RECORDS,
        key_update_bytes: int = KEY_UPDATE_BYTES,
    ) -> None:
        super().__init__(
            rng=rng,
            ephemeral_key=ephemeral_key,
            max_record_plaintext=max_record_plaintext,
            key_update_records=key_update_records,
            key_update_bytes=key_update_bytes,
        )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}")
        if require_mutual and (verify_peer is None or mode == "plaintext"):
            raise ValueError("require_mutual needs verify_peer and an attested mode")
        self._mode = MODES[mode]
        self._allow_plaintext = allow_plaintext or mode == "plaintext"
        self._verify = verify_peer
        self._require_mutual = require_mutual
        self._services = frozenset(services) if services is not None else None
        self.state = State.WAIT_CLIENT_HELLO
        self._hello: ClientHello | None = None
        self._core: ServerCore | None = None
        self._th3 = b""

    def _handle(self, msg_type: int, frame: bytes) -> None:
        if msg_type == MsgType.CLIENT_HELLO:
            self._on_hello(frame)
        else:
            self._on_finished(frame)

    def _on_hello(self, frame: bytes) -> None:
        hello = ClientHello.parse(frame[5:])
        if hello.mode == _PLAINTEXT:
            if not self._allow_plaintext:
                raise _Fail(
                    Alert.MODE_REFUSED, HandshakeError("client asked for plaintext; not allowed")
                )
        elif hello.mode != self._mode:
            raise _Fail(
                Alert.MODE_REFUSED,
                HandshakeError(
                    f"client mode {_MODE_NAMES[hello.mode]!r} does not match server mode "
                    f"{_MODE_NAMES[self._mode]!r}"
                ),
            )
        if (
            hello.service is not None
            and self._services is not None
            and hello.service not in self._services
        ):
            raise _Fail(
                Alert.UNKNOWN_SERVICE, HandshakeError("client asked for an unknown service")
            )
        mutual = bool(hello.flags & FLAG_MUTUAL)
        if (mutual and self._verify is None) or (self._require_mutual and not mutual):
            raise _Fail(
                Alert.MUTUAL_REFUSED,
                HandshakeError(
                    "mutual attestation required by the server"
                    if self._require_mutual
                    else "client asked for mutual attestation; no peer verifier configured"
                ),
            )
        self._hello = hello
        self._transcript.update(frame)
        nonce = self._random(NONCE_LEN)
        if hello.mode == _PLAINTEXT:
            core = ServerCore(_PLAINTEXT, SUITE_NONE, 0, self._max_record, nonce, bytes(KEY_LEN))
            self._outbuf += _frame(MsgType.SERVER_HELLO, core.encode())
            self._step(Input.CLIENT_HELLO_PLAINTEXT)
            self._complete(PlaintextSession(self._now), None, _PLAINTEXT, hello.service)
            return
        self._eph = self._ephemeral()
        # The key exchange runs before the (expensive, device-bound) attestation so that an
        # invalid client share is rejected without asking the NSM for anything.
        self._hs = ks.handshake_secret(ks.x25519_shared(self._eph, hello.key_share))
        share = self._eph.public_key().public_bytes_raw()
        core = ServerCore(hello.mode, hello.suite, hello.flags, self._max_record, nonce, share)
        self._core = core
        self._transcript.update(core.encode())
        self._step(Input.CLIENT_HELLO)
        self._pending.append(
            NeedAttestation(
                user_data=self._transcript.digest(),
                nonce=hello.nonce,
                public_key=ks.x25519_spki(share),
            )
        )

    def _attested(self, document: bytes) -> None:
        if not 0 < len(document) <= MAX_ATTESTATION:
            raise LocalProtocolError(f"attestation document must be 1..{MAX_ATTESTATION} bytes")
        assert self._core is not None and self._hs is not None
        prefix = _u32.pack(len(document)) + document
        self._transcript.update(prefix)
        _, s_fin = ks.finished_keys(self._hs)
        sf = ks.finished_mac(s_fin, self._transcript.digest())
        self._transcript.update(sf)
        self._th3 = self._transcript.digest()
        self._outbuf += _frame(MsgType.SERVER_HELLO, self._core.encode() + prefix + sf)
        self._step(Input.ATTESTATION)

    def _on_finished(self, frame: bytes) -> None:
        assert self._hello is not None and self._core is not None and self._hs is not None
        body = frame[5:]
        document, cf = _split_attested(body, 0, "CLIENT_FINISHED")
        mutual = bool(self._hello.flags & FLAG_MUTUAL)
        if bool(document) != mutual:
            raise HandshakeError("CLIENT_FINISHED attestation presence does not match the mode")
        self._transcript.update(body[: 4 + len(document)])
        th4 = self._transcript.digest()
        claims: object | None = None
        if mutual:
            assert self._verify is not None
            claims = self._verify_peer(
                self._verify,
                document,
                nonce=self._core.nonce,
                public_key=ks.x25519_spki(self._hello.key_share),
                user_data=self._th3,
            )
        c_fin, _ = ks.finished_keys(self._hs)
        if not hmac.compare_digest(ks.finished_mac(c_fin, th4), cf):
            raise _Fail(Alert.FINISHED_INVALID, HandshakeError("client Finished MAC is invalid"))
        c_ap, s_ap, exporter = ks.application_secrets(self._hs, th4)
        session = self._session(
            send=s_ap, recv=c_ap, exporter=exporter, peer_max=self._hello.max_record
        )
        self._step(Input.CLIENT_FINISHED)
        self._complete(session, claims, self._hello.mode, self._hello.service)
