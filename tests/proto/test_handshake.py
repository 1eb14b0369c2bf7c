"""The attested handshake: success paths, every refusal, tampering, replay, MITM, feeding styles."""

from __future__ import annotations

import hmac
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vrpc._verify import handshake_verifier
from vrpc.exceptions import (
    AttestationError,
    BindingMismatch,
    FrameTooLarge,
    HandshakeError,
    LocalProtocolError,
    MalformedDocument,
    PolicyViolation,
    RemoteProtocolError,
    SignatureInvalid,
)
from vrpc.proto import handshake as hsmod
from vrpc.proto.handshake import (
    ClientHandshake,
    HandshakeComplete,
    NeedAttestation,
    ServerHandshake,
    State,
)
from vrpc.proto.keyschedule import x25519_spki
from vrpc.proto.record import PlaintextSession, RecordSession

NOW = 1_760_000_000.0

# -- a fake attester/verifier pair: Ed25519 over the three bound fields plus an "image" ------------


class FakeAttester:
    insecure = True

    def __init__(self, image: bytes = b"image-A", key: Ed25519PrivateKey | None = None) -> None:
        self.image = image
        self.key = key or Ed25519PrivateKey.generate()
        self.calls = 0

    def attest(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        self.calls += 1
        body = b"".join(
            struct.pack(">H", len(x)) + x
            for x in (self.image, nonce or b"", public_key or b"", user_data or b"")
        )
        return b"FAKE" + body + self.key.sign(body)


@dataclass
class FakeVerifier:
    attester: FakeAttester
    image: bytes = b"image-A"

    def __call__(
        self, document: bytes, *, nonce: bytes, public_key: bytes, user_data: bytes, now: float
    ) -> dict[str, Any]:
        if document[:4] != b"FAKE" or len(document) < 4 + 64:
            raise MalformedDocument("not a fake document")
        body, sig = document[4:-64], document[-64:]
        try:
            self.attester.key.public_key().verify(sig, body)
        except Exception as exc:
            raise SignatureInvalid("fake signature does not verify") from exc
        fields = []
        pos = 0
        while pos < len(body):
            (n,) = struct.unpack_from(">H", body, pos)
            fields.append(body[pos + 2 : pos + 2 + n])
            pos += 2 + n
        image, doc_nonce, doc_pk, doc_ud = fields
        if not hmac.compare_digest(image, self.image):
            raise PolicyViolation(f"PCR0 mismatch (expected {self.image!r}, found {image!r})")
        for name, want, got in (
            ("nonce", nonce, doc_nonce),
            ("public_key", public_key, doc_pk),
            ("user_data", user_data, doc_ud),
        ):
            if not hmac.compare_digest(want, got):
                raise BindingMismatch(f"{name} differs")
        return {"image": image, "now": now}


def attested_pair(
    *,
    client_mode: str = "prod",
    server_mode: str = "prod",
    mutual: bool = False,
    **server_kw: Any,
) -> tuple[ClientHandshake, ServerHandshake, FakeAttester, FakeAttester]:
    server_att = FakeAttester(b"image-A")
    client_att = FakeAttester(b"image-C")
    client = ClientHandshake(
        mode=client_mode,
        verify=FakeVerifier(server_att) if client_mode != "plaintext" else None,
        mutual=mutual,
        service=server_kw.pop("client_service", None),
    )
    if mutual and "verify_peer" not in server_kw:
        server_kw["verify_peer"] = FakeVerifier(client_att, b"image-C")
    server = ServerHandshake(mode=server_mode, **server_kw)
    return client, server, server_att, client_att


def answer(hs: ClientHandshake | ServerHandshake, event: object, attester: FakeAttester) -> None:
    assert isinstance(event, NeedAttestation)
    hs.supply_attestation(
        attester.attest(user_data=event.user_data, nonce=event.nonce, public_key=event.public_key)
    )


Wire = Callable[[int, bytes], bytes]


class Stalled(HandshakeError):
    pass


def run(
    client: ClientHandshake,
    server: ServerHandshake,
    server_att: FakeAttester,
    client_att: FakeAttester,
    *,
    wire: Wire = lambda step, data: data,
    feed: Callable[[Any, bytes], list[Any]] | None = None,
) -> tuple[HandshakeComplete, HandshakeComplete]:
    """Drive both sides to completion; ``wire`` may rewrite each flight (step 0, 1, 2)."""

    def deliver(hs: Any, data: bytes) -> list[Any]:
        events = feed(hs, data) if feed is not None else list(hs.receive_data(data, NOW))
        if not events:
            # A tampered length prefix leaves a side waiting for bytes that never come; the
            # shell's handshake timeout ends that connection.
            raise Stalled("handshake waits for more bytes")
        return events

    client.initiate()
    events = deliver(server, wire(0, client.data_to_send()))
    if isinstance(events[0], HandshakeComplete):  # plaintext
        server_done = events[0]
        events = deliver(client, wire(1, server.data_to_send()))
        assert isinstance(events[0], HandshakeComplete)
        return events[0], server_done
    answer(server, events[0], server_att)
    events = deliver(client, wire(1, server.data_to_send()))
    if events and isinstance(events[0], NeedAttestation):
        answer(client, events[0], client_att)
        events = client.receive_data(b"", NOW)
    (client_done,) = events
    assert isinstance(client_done, HandshakeComplete)
    (server_done,) = deliver(server, wire(2, client.data_to_send()))
    assert isinstance(server_done, HandshakeComplete)
    return client_done, server_done


def check_sessions(c: HandshakeComplete, s: HandshakeComplete) -> None:
    msg = b"ping" * 100
    assert s.session.receive(b"".join(c.session.seal(msg))) == msg
    assert c.session.receive(b"".join(s.session.seal(msg[::-1]))) == msg[::-1]


# -- success paths -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["prod", "dev-insecure"])
def test_full_handshake(mode: str) -> None:
    client, server, sa, ca = attested_pair(client_mode=mode, server_mode=mode)
    c, s = run(client, server, sa, ca)
    assert c.mode == s.mode == mode
    assert isinstance(c.session, RecordSession) and c.session.encrypted
    assert c.peer_claims == {"image": b"image-A", "now": NOW}
    assert s.peer_claims is None
    assert c.trailing == s.trailing == b""
    assert c.session.created_at == s.session.created_at == NOW
    assert isinstance(s.session, RecordSession)
    assert c.session.channel_binding == s.session.channel_binding
    assert len(c.session.channel_binding) == 48
    assert sa.calls == 1 and ca.calls == 0
    check_sessions(c, s)
    assert client.state is State.DONE and server.state is State.DONE


def test_mutual_handshake() -> None:
    client, server, sa, ca = attested_pair(mutual=True, require_mutual=True)
    c, s = run(client, server, sa, ca)
    assert c.peer_claims == {"image": b"image-A", "now": NOW}
    assert s.peer_claims == {"image": b"image-C", "now": NOW}
    assert sa.calls == 1 and ca.calls == 1
    check_sessions(c, s)


def test_service_hint_is_checked_and_reported() -> None:
    client, server, sa, ca = attested_pair(client_service="keyvault.v1", services={"keyvault.v1"})
    c, s = run(client, server, sa, ca)
    assert s.service == c.service == "keyvault.v1"
    client, server, sa, ca = attested_pair(client_service="other.v1", services={"keyvault.v1"})
    with pytest.raises(HandshakeError, match="unknown service"):
        run(client, server, sa, ca)
    # Without a hint the server accepts (the hint is optional).
    client, server, sa, ca = attested_pair(services={"keyvault.v1"})
    assert run(client, server, sa, ca)[1].service is None


def test_plaintext_when_both_opt_in() -> None:
    for server_kw in ({"server_mode": "plaintext"}, {"allow_plaintext": True}):
        client, server, sa, ca = attested_pair(client_mode="plaintext", **server_kw)
        c, s = run(client, server, sa, ca)
        assert isinstance(c.session, PlaintextSession) and not c.session.encrypted
        assert isinstance(s.session, PlaintextSession)
        assert c.mode == s.mode == "plaintext"
        assert sa.calls == 0
        assert s.session.receive(b"".join(c.session.seal(b"abc"))) == b"abc"


def test_server_allowing_plaintext_still_attests_prod_clients() -> None:
    client, server, sa, ca = attested_pair(allow_plaintext=True)
    c, _ = run(client, server, sa, ca)
    assert c.session.encrypted and c.mode == "prod"


# -- mode mismatches and refusals ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_mode", "server_kw", "side"),
    [
        ("prod", {"server_mode": "dev-insecure"}, "server"),
        ("dev-insecure", {"server_mode": "prod"}, "server"),
        ("plaintext", {"server_mode": "prod"}, "server"),
        ("plaintext", {"server_mode": "dev-insecure"}, "server"),
        ("prod", {"server_mode": "plaintext"}, "server"),
    ],
)
def test_mode_mismatch_refused(client_mode: str, server_kw: dict[str, Any], side: str) -> None:
    client, server, _sa, _ca = attested_pair(client_mode=client_mode, **server_kw)
    client.initiate()
    with pytest.raises(HandshakeError, match=r"mode|plaintext"):
        server.receive_data(client.data_to_send(), NOW)
    alert = server.data_to_send()
    assert alert == bytes([0x04, 0, 0, 0, 1, hsmod.Alert.MODE_REFUSED])
    with pytest.raises(HandshakeError, match="mode_refused"):
        client.receive_data(alert, NOW)
    assert client.failed and server.failed


def test_prod_client_rejects_a_plaintext_answer() -> None:
    """A MITM cannot downgrade: rewriting the SERVER_HELLO into plaintext is refused."""
    client, *_ = attested_pair()
    client.initiate()
    client.data_to_send()
    core = hsmod.ServerCore(3, 0, 0, 65536, bytes(32), bytes(32)).encode()
    with pytest.raises(HandshakeError, match="mode"):
        client.receive_data(bytes([2, 0, 0, 0, len(core)]) + core, NOW)


def test_prod_client_rejects_a_dev_insecure_answer() -> None:
    client, server, sa, ca = attested_pair(client_mode="prod", server_mode="prod")

    def to_dev(step: int, data: bytes) -> bytes:
        return data[:6] + b"\x02" + data[7:] if step == 1 else data

    with pytest.raises(HandshakeError, match="mode"):
        run(client, server, sa, ca, wire=to_dev)


def test_mutual_refusals() -> None:
    client, server, sa, ca = attested_pair(mutual=False)
    server = ServerHandshake(verify_peer=FakeVerifier(ca), require_mutual=True)
    with pytest.raises(HandshakeError, match="mutual"):
        run(client, server, sa, ca)
    client, _, sa, ca = attested_pair(mutual=True)
    with pytest.raises(HandshakeError, match="mutual"):
        run(client, ServerHandshake(), sa, ca)


def test_constructor_fails_closed() -> None:
    with pytest.raises(ValueError, match="verifier"):
        ClientHandshake(verify=None)
    with pytest.raises(ValueError, match="mode"):
        ClientHandshake(mode="debug", verify=None)
    with pytest.raises(ValueError, match="mutual"):
        ClientHandshake(mode="plaintext", verify=None, mutual=True)
    with pytest.raises(ValueError, match="service"):
        ClientHandshake(verify=lambda *a, **k: None, service="has space")
    with pytest.raises(ValueError, match="require_mutual"):
        ServerHandshake(require_mutual=True)
    with pytest.raises(ValueError, match="mode"):
        ServerHandshake(mode="nope")
    with pytest.raises(ValueError, match="max_record"):
        ServerHandshake(max_record_plaintext=0)


# -- attestation failures ------------------------------------------------------------------------


def test_wrong_image_surfaces_the_verifier_message() -> None:
    client, server, sa, ca = attested_pair()
    sa.image = b"image-EVIL"
    with pytest.raises(PolicyViolation, match="PCR0 mismatch"):
        run(client, server, sa, ca)
    assert client.failed
    assert client.data_to_send() == bytes([4, 0, 0, 0, 1, hsmod.Alert.ATTESTATION_REFUSED])


def test_server_verifies_client_attestation_in_mutual_mode() -> None:
    client, server, sa, ca = attested_pair(mutual=True)
    ca.image = b"image-EVIL"
    with pytest.raises(PolicyViolation, match="PCR0 mismatch"):
        run(client, server, sa, ca)
    assert server.failed


def test_verifier_bug_fails_closed() -> None:
    def broken(*args: Any, **kwargs: Any) -> object:
        raise KeyError("oops")

    client = ClientHandshake(verify=broken)
    server = ServerHandshake()
    with pytest.raises(HandshakeError, match="verifier raised KeyError"):
        run(client, server, FakeAttester(), FakeAttester())


def test_replayed_server_hello_on_a_new_connection() -> None:
    client, server, sa, ca = attested_pair()
    captured: dict[int, bytes] = {}

    def tap(step: int, data: bytes) -> bytes:
        captured[step] = data
        return data

    run(client, server, sa, ca, wire=tap)
    fresh = ClientHandshake(verify=FakeVerifier(sa))
    fresh.initiate()
    with pytest.raises(BindingMismatch, match="nonce"):
        fresh.receive_data(captured[1], NOW)


def test_replayed_document_with_attacker_keys() -> None:
    """An old genuine document cannot vouch for an attacker's fresh key share."""
    client, server, sa, ca = attested_pair()
    captured: dict[int, bytes] = {}

    def tap(step: int, data: bytes) -> bytes:
        captured[step] = data
        return data

    run(client, server, sa, ca, wire=tap)
    old_sh = captured[1][5:]
    old_doc = old_sh[77:-48]
    victim = ClientHandshake(verify=FakeVerifier(sa))
    victim.initiate()
    ch = victim.data_to_send()
    # The attacker plays server with its own key, reusing the old document and the client's nonce.
    attacker = ServerHandshake()
    (need,) = attacker.receive_data(ch, NOW)
    attacker.supply_attestation(old_doc)
    with pytest.raises(BindingMismatch):
        victim.receive_data(attacker.data_to_send(), NOW)
    assert isinstance(need, NeedAttestation)


def _swap_share(frame: bytes, offset: int) -> bytes:
    evil = X25519PrivateKey.generate().public_key().public_bytes_raw()
    return frame[:offset] + evil + frame[offset + 32 :]


def test_mitm_swapping_client_key_share() -> None:
    client, server, sa, ca = attested_pair()
    with pytest.raises(BindingMismatch, match="user_data"):
        # eph_c sits at body offset 41 (frame offset 46).
        run(client, server, sa, ca, wire=lambda i, d: _swap_share(d, 46) if i == 0 else d)


def test_mitm_swapping_server_key_share() -> None:
    client, server, sa, ca = attested_pair()
    with pytest.raises(BindingMismatch, match="public_key"):
        run(client, server, sa, ca, wire=lambda i, d: _swap_share(d, 46) if i == 1 else d)


def test_mitm_with_a_genuine_document_for_its_own_key_fails_finished() -> None:
    """Even a verifier that (wrongly) accepts anything: the Finished MAC still catches a MITM."""
    client = ClientHandshake(verify=lambda *a, **k: "accepted")
    server = ServerHandshake()
    with pytest.raises(HandshakeError, match="Finished"):
        run(
            client,
            server,
            FakeAttester(),
            FakeAttester(),
            wire=lambda i, d: _swap_share(d, 46) if i == 1 else d,
        )


# -- tampering every byte of every message -------------------------------------------------------


def _flight_lengths(mutual: bool) -> list[int]:
    captured: dict[int, bytes] = {}

    def tap(step: int, data: bytes) -> bytes:
        captured[step] = data
        return data

    run(*attested_pair(mutual=mutual), wire=tap)
    return [len(captured[i]) for i in range(3)]


@pytest.mark.parametrize("mutual", [False, True])
def test_tampering_any_byte_of_any_message_fails(mutual: bool) -> None:
    lengths = _flight_lengths(mutual)
    for step, length in enumerate(lengths):
        for pos in range(length):

            def flip(i: int, data: bytes, step: int = step, pos: int = pos) -> bytes:
                if i != step:
                    return data
                return data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1 :]

            client, server, sa, ca = attested_pair(mutual=mutual)
            with pytest.raises((HandshakeError, AttestationError, RemoteProtocolError)) as info:
                run(client, server, sa, ca, wire=flip)
            assert client.failed or server.failed or info.type is Stalled


# -- sizes, feeding styles, trailing bytes -------------------------------------------------------


def test_oversize_length_prefix_is_refused_before_buffering() -> None:
    server = ServerHandshake()
    with pytest.raises(FrameTooLarge):
        server.receive_data(b"\x01\x00\x00\x04\x01", NOW)
    assert server.failed
    client = ClientHandshake(verify=lambda *a, **k: None)
    client.initiate()
    with pytest.raises(FrameTooLarge):
        client.receive_data(b"\x02\xff\xff\xff\xff", NOW)


def _bytewise(hs: Any, data: bytes) -> list[Any]:
    events: list[Any] = []
    for i in range(len(data)):
        events += hs.receive_data(data[i : i + 1], NOW)
    return events


@pytest.mark.parametrize("mutual", [False, True])
def test_byte_by_byte_feeding(mutual: bool) -> None:
    c, s = run(*attested_pair(mutual=mutual), feed=_bytewise)
    check_sessions(c, s)


def test_client_finished_and_records_in_one_chunk_become_trailing() -> None:
    client, server, sa, _ca = attested_pair()
    client.initiate()
    (need,) = server.receive_data(client.data_to_send(), NOW)
    answer(server, need, sa)
    (done_c,) = client.receive_data(server.data_to_send(), NOW)
    assert isinstance(done_c, HandshakeComplete)
    records = b"".join(done_c.session.seal(b"early call")) + done_c.session.close()
    (done_s,) = server.receive_data(client.data_to_send() + records, NOW)
    assert isinstance(done_s, HandshakeComplete)
    assert done_s.trailing == records
    assert done_s.session.receive(done_s.trailing) == b"early call"
    assert done_s.session.peer_closed
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more", NOW)


def test_unexpected_bytes_while_waiting_for_own_attestation() -> None:
    client, server, *_ = attested_pair()
    client.initiate()
    server.receive_data(client.data_to_send(), NOW)
    with pytest.raises(HandshakeError, match="before the handshake allowed"):
        server.receive_data(b"\x03", NOW)


def test_data_before_initiate_is_refused() -> None:
    client = ClientHandshake(verify=lambda *a, **k: None)
    with pytest.raises(HandshakeError):
        client.receive_data(b"\x02\x00", NOW)


# -- the state machine: dead after failure, misuse ----------------------------------------------


def test_dead_after_failure() -> None:
    server = ServerHandshake()
    with pytest.raises(HandshakeError):
        server.receive_data(b"\x07\x00\x00\x00\x00", NOW)
    assert server.data_to_send() == bytes([4, 0, 0, 0, 1, hsmod.Alert.BAD_MESSAGE])
    assert server.data_to_send() == b""
    for call in (
        lambda: server.receive_data(b"", NOW),
        lambda: server.supply_attestation(b"doc"),
    ):
        with pytest.raises(HandshakeError, match="failed"):
            call()


def test_misuse_kills_the_handshake() -> None:
    client = ClientHandshake(verify=lambda *a, **k: None)
    with pytest.raises(LocalProtocolError):
        client.supply_attestation(b"doc")
    assert client.failed
    with pytest.raises(HandshakeError):
        client.initiate()
    client = ClientHandshake(verify=lambda *a, **k: None)
    client.initiate()
    with pytest.raises(LocalProtocolError):
        client.initiate()
    assert client.failed


def test_empty_or_oversize_attestation_is_refused() -> None:
    for doc in (b"", bytes(hsmod.MAX_ATTESTATION + 1)):
        client, server, *_ = attested_pair()
        client.initiate()
        server.receive_data(client.data_to_send(), NOW)
        with pytest.raises(LocalProtocolError):
            server.supply_attestation(doc)
        assert server.failed


def test_received_alert_is_not_answered() -> None:
    client = ClientHandshake(verify=lambda *a, **k: None)
    client.initiate()
    client.data_to_send()
    with pytest.raises(HandshakeError, match="code 99"):
        client.receive_data(b"\x04\x00\x00\x00\x01\x63", NOW)
    assert client.data_to_send() == b""


def test_transition_table_is_closed() -> None:
    """Every (role, state, input) outside the table raises and lands in FAILED."""
    for role_cls in (ClientHandshake, ServerHandshake):
        for state in State:
            for event in hsmod.Input:
                hs = (
                    ClientHandshake(verify=lambda *a, **k: None)
                    if role_cls is ClientHandshake
                    else ServerHandshake()
                )
                hs.state = state
                key = (hs._role, state, event)
                if key in hsmod._TRANSITIONS:
                    hs._step(event)
                    assert hs.state is hsmod._TRANSITIONS[key]
                else:
                    with pytest.raises(LocalProtocolError):
                        hs._guard(lambda hs=hs, event=event: hs._step(event))
                    assert hs.state is State.FAILED


# -- fuzzing -------------------------------------------------------------------------------------

_ALLOWED = (HandshakeError, RemoteProtocolError, AttestationError)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=64))
def test_random_bytes_to_server(data: bytes, chunk: int) -> None:
    server = ServerHandshake()
    try:
        for i in range(0, len(data), chunk):
            server.receive_data(data[i : i + chunk], NOW)
    except _ALLOWED:
        assert server.failed


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_to_client(data: bytes) -> None:
    client = ClientHandshake(verify=FakeVerifier(FakeAttester()))
    client.initiate()
    try:
        client.receive_data(data, NOW)
    except _ALLOWED:
        assert client.failed


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=74, max_size=74 + 40))
def test_random_client_hello_bodies(body: bytes) -> None:
    server = ServerHandshake(allow_plaintext=True)
    frame = bytes([1]) + len(body).to_bytes(4, "big") + body
    try:
        events = server.receive_data(frame, NOW)
    except _ALLOWED:
        assert server.failed
    else:
        assert len(events) == 1


# -- the real test attester and verifier ---------------------------------------------------------


def _real_pair(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    attestation = pytest.importorskip("vrpc.attestation")
    monkeypatch.setenv("VRPC_INSECURE_TEST_ATTESTATION", "1")
    attester = attestation.InsecureTestAttester(seed=b"handshake-tests")
    verifier = attestation.Verifier(attester.policy(), attester.trust_root())
    return attester, handshake_verifier(verifier)


def _run_real(
    client: ClientHandshake, server: ServerHandshake, attester: Any, now: float
) -> tuple[HandshakeComplete, HandshakeComplete]:
    def supply(hs: Any, need: NeedAttestation) -> None:
        hs.supply_attestation(
            attester.attest(user_data=need.user_data, nonce=need.nonce, public_key=need.public_key)
        )

    client.initiate()
    (need,) = server.receive_data(client.data_to_send(), now)
    supply(server, need)
    events = client.receive_data(server.data_to_send(), now)
    if isinstance(events[0], NeedAttestation):
        supply(client, events[0])
        events = client.receive_data(b"", now)
    (done_c,) = events
    (done_s,) = server.receive_data(client.data_to_send(), now)
    assert isinstance(done_c, HandshakeComplete) and isinstance(done_s, HandshakeComplete)
    return done_c, done_s


def test_with_insecure_test_attester(monkeypatch: pytest.MonkeyPatch) -> None:
    attester, verify = _real_pair(monkeypatch)
    now = time.time()
    client = ClientHandshake(mode="dev-insecure", verify=verify, mutual=True)
    server = ServerHandshake(mode="dev-insecure", verify_peer=verify)
    c, s = _run_real(client, server, attester, now)
    assert c.peer_claims is not None and s.peer_claims is not None
    assert (
        c.peer_claims.public_key
        == x25519_spki(  # type: ignore[attr-defined]
            bytes(c.peer_claims.public_key)[-32:]  # type: ignore[attr-defined]
        )
    )
    check_sessions(c, s)


def test_insecure_test_attester_wrong_pcr(monkeypatch: pytest.MonkeyPatch) -> None:
    attestation = pytest.importorskip("vrpc.attestation")
    attester, _ = _real_pair(monkeypatch)
    policy = attestation.Policy(pcrs={0: bytes([1]) * 48})
    verify = handshake_verifier(attestation.Verifier(policy, attester.trust_root()))
    client = ClientHandshake(mode="dev-insecure", verify=verify)
    server = ServerHandshake(mode="dev-insecure")
    with pytest.raises(PolicyViolation, match="PCR0"):
        _run_real(client, server, attester, time.time())


def test_insecure_test_attester_replay_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    attester, verify = _real_pair(monkeypatch)
    now = time.time()
    client = ClientHandshake(mode="dev-insecure", verify=verify)
    server = ServerHandshake(mode="dev-insecure")
    client.initiate()
    (need,) = server.receive_data(client.data_to_send(), now)
    server.supply_attestation(
        attester.attest(user_data=need.user_data, nonce=need.nonce, public_key=need.public_key)
    )
    old_sh = server.data_to_send()
    fresh = ClientHandshake(mode="dev-insecure", verify=verify)
    fresh.initiate()
    with pytest.raises(BindingMismatch):
        fresh.receive_data(old_sh, now)


def test_max_record_below_the_floor_is_refused_locally_and_from_the_peer() -> None:
    from vrpc.proto.handshake import MIN_RECORD_PLAINTEXT

    assert MIN_RECORD_PLAINTEXT == 512
    with pytest.raises(ValueError, match="512"):
        ServerHandshake(max_record_plaintext=511)
    with pytest.raises(ValueError, match="512"):
        ClientHandshake(mode="dev-insecure", verify=lambda *a, **k: None, max_record_plaintext=1)
