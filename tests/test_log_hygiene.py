"""Log hygiene: everything vrpc logs (all levels) over a run that moves keys and payloads through
the keyvault, including failures, contains no payload and no key or session secret."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hostile_helpers import MARKER, RawSession, attester, client, serving, sock_uri
from structlog.testing import capture_logs

import vrpc
from services.echo import Echo, EchoImpl
from services.keyvault.impl import KeyVaultImpl
from services.keyvault.interface import KeyType, KeyVault


@pytest.fixture(autouse=True)
def _all_levels() -> Iterator[None]:
    was_configured = structlog.is_configured()
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(0))  # debug too
    yield
    if was_configured:
        structlog.configure(**saved)
    else:
        structlog.reset_defaults()


def _forms(secret: bytes) -> list[str]:
    """How a secret could appear in a log line: hex, base64 (both alphabets), bytes repr."""
    b64 = base64.b64encode(secret).decode()
    return [
        secret.hex(),
        secret.hex().upper(),
        b64[:20],
        base64.urlsafe_b64encode(secret).decode()[:20],
        repr(secret)[2:22],
    ]


def _render(logs: list[dict[str, Any]]) -> str:
    lines = []
    for e in logs:
        lines.append(json.dumps(e, default=repr, sort_keys=True))
        lines.extend(str(v) for v in e.values())  # as a console renderer would print them
    return "\n".join(lines)


def test_forms_catch_what_they_should() -> None:
    # The scanner itself: a leaked secret in any of these forms is found.
    secret = bytes(range(32))
    for leaked in (secret.hex(), base64.b64encode(secret).decode(), repr(secret)):
        text = _render([{"event": "oops", "value": leaked}])
        assert any(form in text for form in _forms(secret))


async def test_no_payloads_or_keys_in_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vrpc.attestation import _document

    # As in a fresh process: the once-per-process insecure warnings are logged (and scanned) too.
    monkeypatch.setattr(_document, "_warned_roots", set())
    monkeypatch.setattr(attester(), "_warned", False)
    uri = sock_uri(tmp_path)
    vault = KeyVaultImpl()
    secrets: dict[str, bytes] = {"payload": MARKER}
    with capture_logs() as logs:
        async with serving(uri, [vault, EchoImpl()]), client(uri) as c:
            kv = c.stub(KeyVault)
            signing = await kv.create_key(KeyType.ED25519, "log-hygiene-sign")
            aead = await kv.create_key(KeyType.AES_256_GCM, "log-hygiene-aead")
            signature = await kv.sign(signing.key_id, MARKER)
            assert await kv.verify(signing.key_id, MARKER, signature)
            ciphertext = await kv.encrypt(aead.key_id, MARKER, b"ad")
            assert await kv.decrypt(aead.key_id, ciphertext, b"ad") == MARKER
            with pytest.raises(vrpc.RpcError):
                await kv.decrypt(aead.key_id, ciphertext, b"wrong ad")
            with pytest.raises(vrpc.RpcError):
                await kv.sign("no-such-key", MARKER)
            with pytest.raises(vrpc.RpcError):  # payload in a wrongly typed argument
                await c.call("echo.v1.echo", [MARKER.decode()])
            with pytest.raises(vrpc.RpcError):  # payload as a method name
                await c.call(MARKER.decode(), [MARKER])
            assert await c.stub(Echo).echo(MARKER) == MARKER
            proto: Any = c._proto
            secrets["client send secret"] = proto.endpoint.session._send_secret
            secrets["client recv secret"] = proto.endpoint.session._recv_secret
            for key in vault._keys.values():
                secrets[f"key material {key.info.key_type}"] = key.material

            # A peer that breaks the protocol right after sending the payload.
            raw = await RawSession.open(uri)
            try:
                raw.call("echo.v1.echo", [MARKER])
                raw.send_wire(b"\x17\x00\x00\x00\x20" + MARKER[:32])  # forged record
                assert await raw.closed_by_server()
            finally:
                raw.close()
    text = _render(logs)
    assert len(logs) > 10, "nothing was captured: the scan would prove nothing"
    assert any(e.get("reason") == "protocol violation" for e in logs)
    for name, secret in secrets.items():
        assert secret, name
        leaked = [form for form in _forms(secret) if form in text]
        assert not leaked, f"{name} appears in the logs"
    assert "VRPC-PLAINTEXT-MARKER" not in text


def test_a_call_context_names_no_field_in_its_repr_and_is_its_own_identity() -> None:
    """A handler that logs ``current_call()`` must not log the caller's metadata (credentials
    travel there); and a context is one call, usable as a dict key."""
    secret = MARKER.decode()
    ctx = vrpc.CallContext(
        "s.m", {"authorization": secret}, vrpc.Peer("/tmp/s.sock"), None, object(), 1
    )
    twin = vrpc.CallContext(
        "s.m", {"authorization": secret}, vrpc.Peer("/tmp/s.sock"), None, object(), 1
    )
    assert secret not in repr(ctx) and "authorization" not in repr(ctx)
    assert repr(ctx).startswith("<vrpc.context.CallContext object at ")
    assert ctx != twin and ctx == ctx
    assert {ctx: 1, twin: 2}[ctx] == 1
