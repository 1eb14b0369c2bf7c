"""``vrpc attest``: verify, inspect and build policies for Nitro attestation documents.

``add_attest_parser(subparsers)`` adds the ``attest`` command to the ``vrpc`` CLI; each
subcommand sets ``func(args) -> int`` (the exit code: 0 valid, 1 not valid, 2 for a usage or
input mistake such as a file that cannot be read).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from vrpc.attestation import AWS_NITRO_ROOT, Claims, Policy, TrustRoot, Verifier
from vrpc.attestation._document import _parse_envelope, _parse_payload
from vrpc.exceptions import AttestationError, LocalProtocolError

__all__ = ["add_attest_parser", "main"]


def _fail(args: argparse.Namespace, reason: str, exc: BaseException | None = None) -> int:
    kind = type(exc).__name__ if exc is not None else "Error"
    if getattr(args, "json", False):
        print(json.dumps({"valid": False, "error": kind, "reason": reason}))
    else:
        print(f"INVALID: {kind}: {reason}", file=sys.stderr)
    return 1


def _unreadable(path: str, exc: OSError) -> int:
    # Not a verdict on the document: there is none to judge.
    print(f"vrpc: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
    return 2


def _read_document(path: str) -> bytes:
    return Path(path).read_bytes()


def _parse_unverified(document: bytes) -> Claims:
    """Structure and payload only: for inspection and for --at-document-time."""
    _, payload, _ = _parse_envelope(document)
    return _parse_payload(payload)


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    # A time without an offset is taken as UTC: attestation times are UTC throughout.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _parse_pin(text: str) -> tuple[int, str]:
    index, sep, value = text.partition("=")
    if not sep or not index.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected N=HEX, got {text!r}")
    return int(index), value.strip()


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _summary(claims: Claims) -> dict[str, Any]:
    return {
        "module_id": claims.module_id,
        "digest": claims.digest,
        "timestamp": _iso(claims.timestamp),
        "timestamp_ms": claims.timestamp_ms,
        "debug": claims.debug,
        "pcrs": {str(i): v.hex() for i, v in claims.pcrs.items()},
        "public_key": None if claims.public_key is None else claims.public_key.hex(),
        "user_data": None if claims.user_data is None else claims.user_data.hex(),
        "nonce": None if claims.nonce is None else claims.nonce.hex(),
    }


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        document = _read_document(args.file)
        root_pem = None if args.root is None else Path(args.root).read_bytes()
    except OSError as exc:
        return _unreadable(exc.filename or args.file, exc)
    try:
        root = AWS_NITRO_ROOT
        if root_pem is not None:
            root = TrustRoot.insecure_test(root_pem)
        if args.at_document_time:
            now = _parse_unverified(document).timestamp
        elif args.at is not None:
            now = _parse_time(args.at)
        else:
            now = datetime.now(UTC)
        policy = Policy.pinned(dict(args.pcr), allow_debug=args.allow_debug, max_age=args.max_age)
        claims = Verifier(policy, root).verify(document, now=now)
    except (AttestationError, LocalProtocolError) as exc:
        return _fail(args, str(exc), exc)
    except (OSError, ValueError) as exc:
        return _fail(args, str(exc), exc)
    if args.json:
        print(json.dumps({"valid": True, "verified_at": _iso(now), **_summary(claims)}, indent=2))
        return 0
    pinned = ", ".join(f"PCR{i}" for i in policy.pcrs) or "none (any image passes)"
    print(f"VALID at {_iso(now)} (root sha256 {root.fingerprint[:16]}…)")
    if root.insecure:
        print("WARNING: INSECURE test root: this document proves nothing about an enclave")
    print(f"  module_id   {claims.module_id}")
    print(f"  timestamp   {_iso(claims.timestamp)}")
    print(f"  debug mode  {'yes (PCR0 all zero)' if claims.debug else 'no'}")
    print(f"  pinned      {pinned}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        claims = _parse_unverified(_read_document(args.file))
    except OSError as exc:
        return _unreadable(args.file, exc)
    except AttestationError as exc:
        return _fail(args, str(exc), exc)
    print("NOT VERIFIED (inspection only; use `vrpc attest verify`)")
    print(f"module_id    {claims.module_id}")
    print(f"digest       {claims.digest}")
    print(f"timestamp    {_iso(claims.timestamp)} ({claims.timestamp_ms} ms)")
    print(f"debug mode   {'yes (PCR0 all zero)' if claims.debug else 'no'}")
    for index, value in claims.pcrs.items():
        print(f"PCR{index:<2}        {value.hex()}")
    for name in ("public_key", "user_data", "nonce"):
        value = getattr(claims, name)
        shown = "null" if value is None else f"{len(value)} bytes {value[:32].hex()}"
        print(f"{name:<12} {shown}{'…' if value is not None and len(value) > 32 else ''}")
    chain = [("leaf", claims.certificate)] + [
        (f"cabundle[{i}]", der) for i, der in enumerate(claims.cabundle)
    ]
    for label, der in chain:
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            print(f"{label:<12} (not a DER certificate)")
            continue
        print(
            f"{label:<12} {cert.subject.rfc4514_string()} "
            f"[{_iso(cert.not_valid_before_utc)} .. {_iso(cert.not_valid_after_utc)}]"
        )
    return 0


def _measurements(path: str) -> Any:
    """The measurements object of ``build-enclave``/``describe-eif`` output, or of the one enclave
    in ``describe-enclaves`` output (a JSON array)."""
    try:
        obj = json.loads(Path(path).read_text())
    except OSError as exc:
        raise LocalProtocolError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise LocalProtocolError(f"{path} is not JSON") from None
    if isinstance(obj, list):
        if len(obj) != 1:
            raise LocalProtocolError(
                f"{path} lists {len(obj)} enclaves (describe-enclaves output); keep the one "
                "entry to pin, or use `nitro-cli describe-eif` output"
            )
        obj = obj[0]
    return obj


def cmd_policy(args: argparse.Namespace) -> int:
    if not Path(args.measurements).is_file():
        return _unreadable(args.measurements, FileNotFoundError(2, "No such file"))
    try:
        policy = Policy.from_measurements(_measurements(args.measurements))
        pcrs = policy.pcrs
        if args.only:
            missing = [i for i in args.only if i not in pcrs]
            if missing:
                hint = " (the EIF is not signed)" if missing == [8] else ""
                raise LocalProtocolError(f"the measurements have no PCR{missing[0]}{hint}")
            pcrs = {i: pcrs[i] for i in args.only}
        policy = Policy(
            pcrs=pcrs,
            max_age=policy.max_age if args.max_age is None else args.max_age,
            module_id_prefix=args.module_id_prefix,
        )
    except (AttestationError, LocalProtocolError) as exc:
        return _fail(args, str(exc), exc)
    print(policy.dump())
    return 0


def _indices(text: str) -> list[int]:
    try:
        indices = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected PCR indices like 8 or 0,1,2, got {text!r}"
        ) from None
    if any(not 0 <= i < 32 for i in indices):
        raise argparse.ArgumentTypeError(f"PCR indices are 0..31, got {text!r}")
    return indices


def cmd_test_root(args: argparse.Namespace) -> int:
    from vrpc.attestation import InsecureTestAttester

    attester = InsecureTestAttester(seed=args.seed.encode())
    outputs: list[tuple[str | None, str]] = [
        (args.root_out, attester.root_pem.decode()),
        (args.policy_out, attester.policy().dump() + "\n"),
    ]
    printed = []
    for path, text in outputs:
        if path is None:
            printed.append(text)
            continue
        try:
            Path(path).write_text(text)
        except OSError as exc:
            print(f"vrpc: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    sys.stdout.write("".join(printed))
    return 0


def add_attest_parser(
    subparsers: argparse._SubParsersAction[Any], parents: Sequence[argparse.ArgumentParser] = ()
) -> None:
    """Add ``attest verify|inspect|policy|test-root`` to the ``vrpc`` command line."""
    attest = subparsers.add_parser(
        "attest", parents=list(parents), help="verify and inspect Nitro attestation documents"
    )
    commands = attest.add_subparsers(dest="attest_command", required=True, metavar="COMMAND")
    parents = list(parents)

    test_root = commands.add_parser(
        "test-root",
        parents=parents,
        help="print the INSECURE test root (PEM) and policy (JSON) of a seed, so clients can "
        "trust `vrpc serve --insecure-test-attester --seed SEED`",
    )
    test_root.add_argument("--seed", required=True, help="the seed the server was given")
    test_root.add_argument("--root-out", metavar="PATH", help="write the PEM here instead")
    test_root.add_argument("--policy-out", metavar="PATH", help="write the policy here instead")
    test_root.set_defaults(func=cmd_test_root)

    verify = commands.add_parser(
        "verify", parents=parents, help="verify a document (exit 0 valid, 1 not)"
    )
    verify.add_argument("file", help="attestation document (raw COSE_Sign1 bytes)")
    when = verify.add_mutually_exclusive_group()
    when.add_argument("--at", metavar="ISO8601", help="verify at this time (default: now)")
    when.add_argument(
        "--at-document-time",
        action="store_true",
        help="verify at the document's own timestamp (for recorded documents)",
    )
    verify.add_argument(
        "--root",
        metavar="PEM",
        help="INSECURE test root to trust instead of AWS (needs VRPC_INSECURE_TEST_ATTESTATION=1)",
    )
    verify.add_argument(
        "--pcr", metavar="N=HEX", type=_parse_pin, action="append", default=[], help="pin a PCR"
    )
    verify.add_argument("--allow-debug", action="store_true", help="accept debug-mode enclaves")
    verify.add_argument(
        "--max-age", type=float, default=300.0, metavar="SECONDS", help="freshness window"
    )
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.set_defaults(func=cmd_verify)

    inspect = commands.add_parser(
        "inspect", parents=parents, help="print a document's fields (no verification)"
    )
    inspect.add_argument("file")
    inspect.set_defaults(func=cmd_inspect)

    policy = commands.add_parser(
        "policy",
        parents=parents,
        help="policy JSON from `nitro-cli describe-eif` / build-enclave / describe-enclaves output",
    )
    policy.add_argument(
        "measurements",
        help="JSON file with a 'Measurements' object (or a one-enclave describe-enclaves array)",
    )
    policy.add_argument(
        "--only",
        type=_indices,
        default=None,
        metavar="N[,N...]",
        help="pin only these PCRs (e.g. 8: any image signed with the same certificate)",
    )
    policy.add_argument("--max-age", type=float, default=None, metavar="SECONDS")
    policy.add_argument("--module-id-prefix", default=None)
    policy.set_defaults(func=cmd_policy)

    from vrpc.cli_audit import add_audit_parser

    add_audit_parser(commands)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``attest`` on its own (``vrpc attest verify FILE ...`` without the other commands)."""
    parser = argparse.ArgumentParser(prog="vrpc")
    add_attest_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["attest", *(sys.argv[1:] if argv is None else argv)])
    result: int = args.func(args)
    return result
