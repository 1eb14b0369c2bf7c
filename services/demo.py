"""``make demo`` (``python -m services.demo``): keyvault end to end, on a machine without Nitro.

Everything here is the production code path except the attester: the server attests with the
INSECURE test attester (clearly labelled; its root is trusted only because this demo opts in
twice, in code and through VRPC_INSECURE_TEST_ATTESTATION=1), and KMS is a local KMS-compatible
server on loopback that verifies the enclave's attestation document and enforces the key policy
of deploy/kms-key-policy.json before releasing data keys. Callers are authenticated as in
production (vrpc.auth): an administrator key and an application key, generated for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

_SEED = b"vrpc-demo"


def _check(ok: bool, what: str) -> None:
    # Not `assert`: the demo's checks must hold under python -O too.
    if not ok:
        raise SystemExit(f"demo failed: {what}")


def _say(step: str, proved: str) -> None:
    print(f"  \u2713 {step:<34} {proved}", flush=True)


async def _run(listen: str, connect: str) -> None:
    os.environ["VRPC_INSECURE_TEST_ATTESTATION"] = "1"
    import json

    import structlog
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    import vrpc
    from services.echo import Echo, EchoImpl
    from services.keyvault.impl import METHOD_ROLES, KeyVaultImpl
    from services.keyvault.interface import KeyType, KeyVault
    from services.keyvault.keypolicy import TEMPLATE, render_key_policy
    from services.keyvault.kms import AwsCredentials, KmsClient, StaticCredentials
    from services.keyvault.sealing import KmsSealer
    from services.keyvault.testing import LocalKms, attested_public_key
    from vrpc.auth import CallerAuthenticator, SessionSigner, TrustedCaller
    from vrpc.service import describe_service

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(40)  # errors only: keep it readable
    )
    print("vrpc demo: keyvault in an enclave-style server, a host client, a local KMS")
    print("  !! INSECURE TEST ATTESTATION: no Nitro hardware here; the test root is trusted only")
    print("  !! because this demo opts in. Production clients trust the pinned AWS root only.\n")

    attester = vrpc.InsecureTestAttester(seed=_SEED)
    policy = attester.policy()
    root = attester.trust_root()
    verifier = vrpc.Verifier(policy, root)
    admin_key, app_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    callers = [
        TrustedCaller("demo-admin", admin_key.public_key(), frozenset({"admin"})),
        TrustedCaller("demo-app", app_key.public_key(), frozenset({"signer:*"})),
    ]
    echo_methods = {f"echo.v1.{name}" for name in describe_service(Echo)}
    async with LocalKms(recipient_check=attested_public_key(verifier)) as kms:
        key_policy = render_key_policy(
            json.loads(TEMPLATE.read_text()),
            image_sha384=policy.pcrs[0].hex(),
            enclave_role_arn=kms.principal.arn,
            key_admin_role_arn=f"arn:aws:iam::{kms.account}:role/vrpc-key-admin",
        )
        kms_key = kms.create_key(policy=key_policy)
        creds = AwsCredentials(kms.access_key_id, kms.secret_access_key, kms.session_token)

        def enclave() -> vrpc.Server:
            kms_client = KmsClient(
                endpoint=kms.endpoint,
                region=kms.region,
                credentials=StaticCredentials(creds),
                allow_insecure_http=True,  # the local KMS on loopback; production is https only
            )
            sealer = KmsSealer(kms_client, kms_key, attester)
            vault = KeyVaultImpl(sealer=sealer, check_key_use=True)
            auth = CallerAuthenticator(
                callers,
                method_roles=METHOD_ROLES,
                public_methods={"vrpc.health.check", *echo_methods},
            )
            return vrpc.Server([vault, EchoImpl()], attester=attester, interceptors=[auth])

        def caller(key_id: str, key: Ed25519PrivateKey) -> vrpc.Client:
            signer = SessionSigner(key_id, key)
            return signer.attach(
                vrpc.connect(connect, policy=policy, root=root, interceptors=[signer])
            )

        server = enclave()
        await server.start(listen)
        _say("enclave server listening", f"{listen} (keyvault.v1, echo.v1)")

        wrong = dataclasses.replace(policy, pcrs={**policy.pcrs, 0: b"\x9a" * 48})
        try:
            async with vrpc.connect(connect, policy=wrong, root=root) as bad:
                await bad.call("vrpc.health.check", [""])
            raise SystemExit("demo failed: a wrong PCR0 policy was accepted")
        except vrpc.AttestationError as exc:
            _say("wrong PCR0 policy refused", str(exc)[:72])

        async with vrpc.connect(connect, policy=policy, root=root) as anonymous:
            claims = anonymous.peer_claims
            _say(
                "attested handshake",
                f"PCR0 {claims.pcrs[0].hex()[:16]}\u2026 pinned, session keys bound to it",
            )
            try:
                await anonymous.stub(KeyVault).seal()
                raise SystemExit("demo failed: an unauthenticated caller sealed the store")
            except vrpc.RpcError as exc:
                _check(exc.status is vrpc.Status.UNAUTHENTICATED, "anonymous seal refused")
                _say("unauthenticated caller refused", f"seal -> {exc.status.name}")

        async with caller("demo-admin", admin_key) as admin, caller("demo-app", app_key) as app:
            manage, vault = admin.stub(KeyVault), app.stub(KeyVault)
            signing = await manage.create_key(KeyType.ED25519, "demo-signing")
            try:
                await vault.delete_key(signing.key_id)
                raise SystemExit("demo failed: the application key deleted a key")
            except vrpc.RpcError as exc:
                _check(exc.status is vrpc.Status.PERMISSION_DENIED, "app delete_key refused")
                _say("signer may not administer", f"delete_key -> {exc.status.name}")
            message = b"pay 10 EUR to alice"
            signature = await vault.sign(signing.key_id, message)
            ok = await vault.verify(signing.key_id, message, signature)
            bad_ok = await vault.verify(signing.key_id, message + b"0", signature)
            _check(ok and not bad_ok, "signature verification")
            _say("create ed25519 key, sign, verify", f"{len(signature)}-byte signature verifies")
            public_key = await vault.public_key(signing.key_id)

            aead = await manage.create_key(KeyType.AES_256_GCM, "demo-aead")
            ciphertext = await vault.encrypt(aead.key_id, b"card 4111-1111", b"order-42")
            opened = await vault.decrypt(aead.key_id, ciphertext, b"order-42")
            _check(opened == b"card 4111-1111", "decrypt")
            try:
                await vault.decrypt(aead.key_id, ciphertext, b"order-43")
                raise SystemExit("demo failed: wrong associated data accepted")
            except vrpc.RpcError as exc:
                _say("encrypt, decrypt (AES-256-GCM, AD)", f"wrong AD -> {exc.status.name}")

            sealed = await manage.seal()
            _say("seal key store through KMS", f"{len(sealed)} bytes, data key via attested CMS")

        await server.close(grace=1.0)
        server = enclave()
        await server.start(listen)
        async with caller("demo-admin", admin_key) as admin, caller("demo-app", app_key) as client:
            vault = client.stub(KeyVault)
            restored = await admin.stub(KeyVault).unseal(sealed, min_generation=1)
            _check(await vault.public_key(signing.key_id) == public_key, "same public key")
            signature2 = await vault.sign(signing.key_id, message)
            _check(await vault.verify(signing.key_id, message, signature2), "restored key signs")
            opened = await vault.decrypt(aead.key_id, ciphertext, b"order-42")
            _check(opened == b"card 4111-1111", "decrypt")
            _say("restart, unseal through KMS", f"{len(restored)} keys back, old ciphertext opens")

        # echo.v1 is public in this demo: the throughput figure measures vrpc, not signatures.
        async with vrpc.connect(connect, policy=policy, root=root) as plain:
            echo = plain.stub(Echo)
            payload = b"x" * 64
            done = 0
            stop = time.perf_counter() + 1.0

            async def worker() -> None:
                nonlocal done
                while time.perf_counter() < stop:
                    await echo.echo(payload)
                    done += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(64)))
            rate = done / (time.perf_counter() - started)
            where = (
                " (emulated VM: the figure means nothing)"
                if connect.startswith("vsock")
                else " (one process; make bench for real figures)"
            )
            _say("throughput", f"{rate:,.0f} encrypted 64 B calls/s, 64 in flight{where}")
        await server.close(grace=1.0)
    print("\ndemo finished: every step above was checked.")


def _inner(listen: str, connect: str) -> int:
    try:
        import uvloop

        uvloop.run(_run(listen, connect))
    except ImportError:  # pragma: no cover
        asyncio.run(_run(listen, connect))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m services.demo [--vsock]`` from a source checkout (the repository root)."""
    parser = argparse.ArgumentParser(
        prog="python -m services.demo", description="keyvault end to end on this machine"
    )
    parser.add_argument("--vsock", action="store_true", help="inside the vsock lab VM")
    # Internal: `python -m services.demo LISTEN CONNECT` is what runs inside the vsock lab.
    parser.add_argument("uris", nargs="*", metavar="LISTEN CONNECT", help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.uris:
        if len(args.uris) != 2:
            parser.error("give both LISTEN and CONNECT URIs, or neither")
        return _inner(args.uris[0], args.uris[1])
    if args.vsock:
        root = Path(__file__).resolve().parents[1]
        lab = root / "scripts" / "vsock-lab"
        if not lab.exists():
            print("demo: --vsock needs a source checkout (scripts/vsock-lab)", file=sys.stderr)
            return 1
        listen, connect = "vsock://ANY:50555", "vsock://1:50555"
        cmd = [str(lab), sys.executable, "-m", "services.demo", listen, connect]
        # The lab runs the command in the caller's directory: the root, where `services` imports.
        return subprocess.call(cmd, cwd=root)
    with tempfile.TemporaryDirectory(prefix="vrpc-demo-") as tmp:
        sock = f"unix://{tmp}/keyvault.sock"
        return _inner(sock, sock)


if __name__ == "__main__":
    sys.exit(main())
