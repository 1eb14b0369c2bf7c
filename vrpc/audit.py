"""The client's attestation audit trail: evidence of which enclave image answered each session.

``vrpc.connect(uri, policy=..., audit=vrpc.AuditTrail("/var/lib/app/audit"))`` records, for
every handshake the client verifies (accepted or refused), the raw attestation document, the
time it was verified at, the verdict, the policy (and its digest), the trust root's fingerprint,
the session's bindings and the peer address. ``vrpc attest audit DIR`` (:func:`verify_trail`)
re-verifies every entry later, each at its own recorded time against its own recorded policy.

Layout (docs/attestation.md describes each field)::

    DIR/audit-000001.jsonl        one JSON object per line, append-only, hash-chained
    DIR/docs/<sha256>.cbor        the attestation documents, named by their SHA-256
    DIR/policies/<sha256>.json    the policies (Policy.dump() text), named by their SHA-256

Segments rotate at ``max_segment_bytes`` (their lines plus the documents they reference); beyond
``max_segments`` the oldest segment and its documents are deleted, which bounds the disk used.
One process writes one directory. A write that fails refuses the session (fail closed: a session
without its evidence is not allowed to start).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from vrpc.attestation import AWS_NITRO_ROOT, Claims, Policy, TrustRoot, Verifier
from vrpc.exceptions import AttestationError, HandshakeError, LocalProtocolError

__all__ = ["FORMAT", "AuditEntryResult", "AuditTrail", "verify_trail"]

log = structlog.get_logger("vrpc.audit")

#: The ``format`` of every entry line.
FORMAT = "vrpc.audit/1"
#: The ``prev`` of the very first entry of a trail.
GENESIS = "0" * 64

_SEGMENT = re.compile(r"^audit-(\d{6})\.jsonl$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _iso(when: float) -> str:
    stamp = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def _segments(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.iterdir():
        match = _SEGMENT.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def _write_once(path: Path, data: bytes, fsync: bool) -> None:
    """Write a content-addressed file unless it is already there (atomically: temp + rename)."""
    if path.exists() and path.stat().st_size == len(data):
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


class AuditTrail:
    """An append-only, size-bounded record of every attestation verdict a client reaches.

    Pass it to ``vrpc.connect(..., audit=trail)``; several clients in one process may share it.
    ``fsync`` (default on) makes each entry durable before the session proceeds: a handshake
    is rare next to calls, and evidence lost in a crash is evidence missing.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_segment_bytes: int = 16 * 1024 * 1024,
        max_segments: int = 64,
        fsync: bool = True,
    ) -> None:
        if max_segment_bytes < 64 * 1024:
            raise ValueError("max_segment_bytes must be at least 64 KiB (a document is ~5 KiB)")
        if max_segments < 1:
            raise ValueError("max_segments must be at least 1")
        self.directory = Path(directory)
        self.max_segment_bytes = max_segment_bytes
        self.max_segments = max_segments
        self.fsync = fsync
        self._lock = threading.Lock()
        (self.directory / "docs").mkdir(parents=True, exist_ok=True)
        (self.directory / "policies").mkdir(parents=True, exist_ok=True)
        self._seq = 0
        self._prev = GENESIS
        self._segment_index = 0
        self._segment_bytes = 0
        self._resume()

    # -- writing ----------------------------------------------------------------------------

    def _resume(self) -> None:
        """Continue the chain of an existing trail (after a restart)."""
        segments = _segments(self.directory)
        if not segments:
            self._segment_index = 1
            return
        index, path = segments[-1]
        data = path.read_bytes()
        complete = data.split(b"\n")[:-1]  # the last piece is b"" or a torn line
        for line in reversed(complete):
            try:
                entry = json.loads(line)
                self._seq = int(entry["seq"])
            except (ValueError, KeyError, TypeError):
                continue
            self._prev = _sha256(line)
            break
        if data and not data.endswith(b"\n"):
            # A torn last line (a crash mid-write): start a new segment rather than append to it.
            self._segment_index = index + 1
            return
        self._segment_index = index
        self._segment_bytes = len(data)
        for line in complete:
            try:
                self._segment_bytes += int(json.loads(line).get("document_size", 0))
            except (ValueError, TypeError, AttributeError):
                pass

    def _segment_path(self, index: int) -> Path:
        return self.directory / f"audit-{index:06d}.jsonl"

    def _rotate(self) -> None:
        self._segment_index += 1
        self._segment_bytes = 0
        segments = _segments(self.directory)
        # The new segment does not exist yet: keep max_segments - 1 old ones.
        excess = len(segments) - (self.max_segments - 1)
        if excess <= 0:
            return
        dropped, kept = segments[:excess], segments[excess:]
        still_referenced = {d for _, path in kept for d in _documents_of(path)}
        for _, path in dropped:
            for digest in _documents_of(path) - still_referenced:
                (self.directory / "docs" / f"{digest}.cbor").unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            log.info("audit segment rotated out", segment=path.name)

    def record(
        self,
        document: bytes,
        *,
        verifier: Verifier,
        peer: str,
        now: float,
        nonce: bytes | None,
        public_key: bytes | None,
        user_data: bytes | None,
        claims: Claims | None,
        error: BaseException | None,
    ) -> dict[str, Any]:
        """Append one entry (and store its document and policy); returns the entry."""
        policy_text = verifier.policy.dump().encode()
        doc_digest = _sha256(document)
        policy_digest = _sha256(policy_text)
        with self._lock:
            entry: dict[str, Any] = {
                "format": FORMAT,
                "seq": self._seq + 1,
                "prev": self._prev,
                "verified_at": _iso(now),
                "verified_at_unix": now,
                "peer": peer,
                "verdict": "ok" if error is None else "refused",
                "error": None if error is None else f"{type(error).__name__}: {error}",
                "document_sha256": doc_digest,
                "document_size": len(document),
                "policy_sha256": policy_digest,
                "root_sha256": verifier.root.fingerprint,
                "root_insecure": verifier.root.insecure,
                "nonce": _hex(nonce),
                "public_key": _hex(public_key),
                "user_data": _hex(user_data),
                "module_id": None if claims is None else claims.module_id,
                "pcrs": None
                if claims is None
                else {str(i): v.hex() for i, v in sorted(claims.pcrs.items())},
            }
            line = json.dumps(entry, separators=(",", ":"), sort_keys=True).encode()
            size = len(line) + 1 + len(document)
            if self._segment_bytes and self._segment_bytes + size > self.max_segment_bytes:
                self._rotate()
            _write_once(self.directory / "docs" / f"{doc_digest}.cbor", document, self.fsync)
            _write_once(
                self.directory / "policies" / f"{policy_digest}.json", policy_text, self.fsync
            )
            with open(self._segment_path(self._segment_index), "ab") as f:
                f.write(line + b"\n")
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            self._segment_bytes += size
            self._seq += 1
            self._prev = _sha256(line)
        return entry

    def wrap(
        self, verify: Callable[..., Claims], verifier: Verifier, *, peer: str
    ) -> Callable[..., Claims]:
        """A handshake ``verify`` callable that records every verdict of ``verify``."""

        def audited(
            document: bytes, *, nonce: bytes, public_key: bytes, user_data: bytes, now: float
        ) -> Claims:
            def record(claims: Claims | None, error: BaseException | None) -> None:
                self.record(
                    document,
                    verifier=verifier,
                    peer=peer,
                    now=now,
                    nonce=nonce,
                    public_key=public_key,
                    user_data=user_data,
                    claims=claims,
                    error=error,
                )

            try:
                claims = verify(
                    document, nonce=nonce, public_key=public_key, user_data=user_data, now=now
                )
            except Exception as exc:
                try:
                    record(None, exc)
                except OSError as write_error:
                    log.error("audit trail write failed", error=str(write_error), peer=peer)
                raise
            try:
                record(claims, None)
            except OSError as exc:
                log.error("audit trail write failed: session refused", error=str(exc), peer=peer)
                raise HandshakeError(f"the audit trail cannot be written: {exc}") from exc
            return claims

        return audited

    def __repr__(self) -> str:
        return f"AuditTrail({str(self.directory)!r})"


def _documents_of(segment: Path) -> set[str]:
    digests: set[str] = set()
    try:
        lines = segment.read_bytes().splitlines()
    except OSError:
        return digests
    for line in lines:
        try:
            digest = json.loads(line).get("document_sha256")
        except (ValueError, AttributeError):
            continue
        if isinstance(digest, str) and _HEX64.match(digest):
            digests.add(digest)
    return digests


# -- re-verification ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditEntryResult:
    """The outcome of re-checking one entry: ``ok`` or not, and why."""

    segment: str
    line: int
    seq: int | None
    verified_at: str | None
    peer: str | None
    verdict: str | None
    ok: bool
    detail: str


def _bytes_or_none(value: object, name: str) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} is not hex")
    return bytes.fromhex(value)


def _stored(directory: Path, kind: str, digest: object, suffix: str) -> bytes:
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise ValueError(f"{kind} digest is not a SHA-256")
    path = directory / kind / f"{digest}{suffix}"
    try:
        data = path.read_bytes()
    except OSError:
        what = "document" if kind == "docs" else "policy"
        raise ValueError(f"stored {what} {digest[:16]}… is missing") from None
    if _sha256(data) != digest:
        raise ValueError(
            f"stored {'document' if kind == 'docs' else 'policy'} {digest[:16]}… was altered "
            f"(its SHA-256 is now {_sha256(data)[:16]}…)"
        )
    return data


def _check_entry(
    directory: Path, entry: dict[str, Any], root_for: Callable[[bool], TrustRoot | None]
) -> tuple[bool, str]:
    if entry.get("format") != FORMAT:
        return False, f"unknown entry format {entry.get('format')!r}"
    try:
        document = _stored(directory, "docs", entry.get("document_sha256"), ".cbor")
        _stored(directory, "policies", entry.get("policy_sha256"), ".json")
        policy = Policy.load(directory / "policies" / f"{entry['policy_sha256']}.json")
        if _sha256(policy.dump().encode()) != entry["policy_sha256"]:
            return False, "the recorded policy does not load back to the same policy"
        when = entry.get("verified_at_unix")
        if not isinstance(when, int | float) or isinstance(when, bool):
            return False, "verified_at_unix is not a number"
        nonce = _bytes_or_none(entry.get("nonce"), "nonce")
        public_key = _bytes_or_none(entry.get("public_key"), "public_key")
        user_data = _bytes_or_none(entry.get("user_data"), "user_data")
    except ValueError as exc:
        return False, str(exc)
    except (AttestationError, LocalProtocolError) as exc:
        return False, f"the recorded policy is invalid: {exc}"
    insecure = entry.get("root_insecure") is True
    root = root_for(insecure)
    if root is None:
        return False, (
            "recorded with an INSECURE test root: pass --root or --insecure-test-seed "
            "(with VRPC_INSECURE_TEST_ATTESTATION=1) to re-check it"
        )
    if root.fingerprint != entry.get("root_sha256"):
        return False, (
            f"recorded against root {str(entry.get('root_sha256'))[:16]}…, "
            f"not the given root {root.fingerprint[:16]}…"
        )
    try:
        Verifier(policy, root).verify(
            document,
            now=datetime.fromtimestamp(float(when), UTC),
            nonce=nonce,
            public_key=public_key,
            user_data=user_data,
        )
    except (AttestationError, LocalProtocolError) as exc:
        failure = f"{type(exc).__name__}: {exc}"
        if entry.get("verdict") == "refused":
            return True, f"refused, confirmed ({failure})"
        return False, failure
    if entry.get("verdict") != "ok":
        return False, "recorded as refused, but the document verifies"
    return True, "verified"


def _lines(directory: Path) -> Iterator[tuple[str, int, bytes]]:
    for _, path in _segments(directory):
        for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
            if line:
                yield path.name, number, line


def verify_trail(
    directory: str | os.PathLike[str], *, insecure_root: TrustRoot | None = None
) -> list[AuditEntryResult]:
    """Re-check every entry of a trail: the hash chain, the stored document and policy, and the
    verdict (the document verified again at its recorded time, against its recorded policy and
    bindings, under the pinned AWS root, or ``insecure_root`` for entries recorded with a test
    root). A refused entry passes when the document is still refused."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory")

    def root_for(insecure: bool) -> TrustRoot | None:
        return insecure_root if insecure else AWS_NITRO_ROOT

    results = []
    expected_seq: int | None = None
    prev_hash: str | None = None
    for segment, number, line in _lines(path):
        seq = verified_at = peer = verdict = None
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
            seq, verified_at = entry.get("seq"), entry.get("verified_at")
            peer, verdict = entry.get("peer"), entry.get("verdict")
        except ValueError:
            ok, detail = False, "unreadable entry"
            entry = None
            expected_seq = None
        if entry is not None:
            ok, detail = _check_entry(path, entry, root_for)
            if expected_seq is not None and (seq != expected_seq or entry.get("prev") != prev_hash):
                # The entry before this one was altered, or entries were removed or moved.
                ok, detail = False, f"the chain is broken before this entry; {detail}"
            expected_seq = seq + 1 if isinstance(seq, int) else None
        prev_hash = _sha256(line)
        results.append(
            AuditEntryResult(
                segment,
                number,
                seq if isinstance(seq, int) else None,
                verified_at if isinstance(verified_at, str) else None,
                peer if isinstance(peer, str) else None,
                verdict if isinstance(verdict, str) else None,
                ok,
                detail,
            )
        )
    return results
