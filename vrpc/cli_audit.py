"""``vrpc attest audit DIR``: re-verify a client's attestation audit trail (see vrpc/audit.py).

Prints one line per entry (``ok`` or ``FAILED`` and why) and a summary; exits 1 when any entry
fails or the trail is empty, 0 otherwise. ``--json`` prints one JSON object per entry instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vrpc.audit import verify_trail
from vrpc.exceptions import AttestationError

__all__ = ["add_audit_parser"]


def cmd_audit(args: argparse.Namespace) -> int:
    from vrpc.attestation import InsecureTestAttester, TrustRoot

    try:
        insecure_root = None
        if args.insecure_test_seed is not None:
            insecure_root = InsecureTestAttester(seed=args.insecure_test_seed.encode()).trust_root()
        elif args.root is not None:
            insecure_root = TrustRoot.insecure_test(Path(args.root).read_bytes())
        results = verify_trail(args.dir, insecure_root=insecure_root)
    except (AttestationError, OSError, ValueError) as exc:
        print(f"vrpc: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    failed = [r for r in results if not r.ok]
    for r in results:
        if args.json:
            print(json.dumps({**r.__dict__, "status": "ok" if r.ok else "FAILED"}))
            continue
        where = f"#{r.seq}" if r.seq is not None else f"{r.segment}:{r.line}"
        status = "ok" if r.ok else "FAILED"
        print(f"{where:<8} {r.verified_at or '?':<24} {r.peer or '?'}  {status}: {r.detail}")
    if not results:
        print(f"vrpc: no audit entries in {args.dir}", file=sys.stderr)
        return 1
    summary = f"{len(results)} entries, {len(failed)} FAILED"
    print(summary, file=sys.stderr)
    return 1 if failed else 0


def add_audit_parser(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``audit DIR`` to ``vrpc attest``."""
    audit = commands.add_parser(
        "audit", help="re-verify an attestation audit trail (exit 1 if any entry fails)"
    )
    audit.add_argument("dir", help="the AuditTrail directory")
    insecure = audit.add_mutually_exclusive_group()
    insecure.add_argument(
        "--root",
        metavar="PEM",
        help="INSECURE test root for entries recorded with one "
        "(needs VRPC_INSECURE_TEST_ATTESTATION=1)",
    )
    insecure.add_argument(
        "--insecure-test-seed",
        metavar="SEED",
        help="the INSECURE test root made from SEED (needs VRPC_INSECURE_TEST_ATTESTATION=1)",
    )
    audit.add_argument("--json", action="store_true", help="one JSON object per entry")
    audit.set_defaults(func=cmd_audit)
