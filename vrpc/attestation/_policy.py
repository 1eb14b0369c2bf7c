"""What a verified document must additionally satisfy: pinned PCRs, no debug mode, freshness,
module id, and the caller's bindings (nonce, public key, user data).

PCRs identify the *image* (0: EIF, 1: kernel + boot ramfs, 2: application, 8: EIF signing
certificate) and optionally the deployment (3: IAM role, 4: parent instance id). They do not
identify one running instance: pin ``module_id_prefix`` or PCR4 when the instance matters.

A policy that decides who a session talks to must pin an image-identifying PCR (0, 2 or 8) to a
non-zero value (:meth:`Policy.require_pins`): PCR3/PCR4 are chosen by the untrusted parent, PCR1
is shared by every image built with the same nitro-cli, and zeros are what every debug enclave
(PCR0-2) or unsigned image (PCR8) reports.
"""

from __future__ import annotations

import hmac
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import structlog

from vrpc.attestation._document import Claims
from vrpc.exceptions import BindingMismatch, LocalProtocolError, PolicyViolation

__all__ = ["ALLOW_DEBUG_ENV_VAR", "IMAGE_PCRS", "Policy", "check_bindings"]

_log = structlog.get_logger("vrpc.attestation")

#: PCRs that identify the enclave image: the EIF (0), the application (2), the EIF signer (8).
IMAGE_PCRS = (0, 2, 8)
#: The environment variable that must be exactly "1" before a prod session accepts a policy
#: with ``allow_debug=True`` (debug-mode enclaves' memory is readable by the parent instance).
ALLOW_DEBUG_ENV_VAR = "VRPC_ALLOW_DEBUG_ENCLAVE"

_PCR_SIZE = 48
_PCR_COUNT = 32
_POLICY_FORMAT = "vrpc.attestation.policy/1"
_HOW_TO_PIN = (
    "build one from the enclave image: `nitro-cli describe-eif --eif-path app.eif > "
    "measurements.json`, then `vrpc attest policy measurements.json > policy.json` and "
    "Policy.load('policy.json')"
)


def _short(value: bytes) -> str:
    return value[:2].hex() + "…"


def _pcr_bytes(index: object, value: object) -> tuple[int, bytes]:
    if type(index) is not int or not 0 <= index < _PCR_COUNT:
        raise LocalProtocolError(f"PCR index must be an int 0..31, got {index!r}")
    if isinstance(value, str):
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise LocalProtocolError(f"PCR{index}: not a hex string: {value!r}") from None
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
    else:
        raise LocalProtocolError(f"PCR{index}: expected bytes or hex, got {type(value).__name__}")
    if len(raw) != _PCR_SIZE:
        raise LocalProtocolError(
            f"PCR{index}: expected {_PCR_SIZE} bytes (SHA-384), got {len(raw)}"
        )
    return index, raw


@dataclass(frozen=True)
class Policy:
    """The client's acceptance rules for a peer enclave.

    ``pcrs`` maps PCR index to its expected 48-byte value; hex strings are accepted and converted
    (``Policy(pcrs={0: "9a3c…"})``). Every pinned index must be present in the document and
    equal. Debug-mode documents (PCR0 all zero) are refused unless ``allow_debug``. ``max_age``
    bounds ``|now - timestamp|`` in seconds. ``module_id_prefix`` optionally pins the instance.
    """

    pcrs: Mapping[int, bytes] = field(default_factory=dict)
    allow_debug: bool = False
    max_age: float = 300.0
    module_id_prefix: str | None = None

    def __post_init__(self) -> None:
        pinned = dict(_pcr_bytes(i, v) for i, v in self.pcrs.items())
        object.__setattr__(self, "pcrs", MappingProxyType(dict(sorted(pinned.items()))))
        if not (isinstance(self.max_age, int | float) and math.isfinite(self.max_age)):
            raise LocalProtocolError(f"max_age must be a finite number, got {self.max_age!r}")
        if self.max_age < 0:
            raise LocalProtocolError(f"max_age must be >= 0, got {self.max_age!r}")

    # -- construction helpers -------------------------------------------------------------

    @classmethod
    def pinned(cls, pcrs: Mapping[int, bytes | str], **options: Any) -> Policy:
        """Typed helper for pins given as hex strings (or bytes)."""
        return cls(pcrs={i: _pcr_bytes(i, v)[1] for i, v in pcrs.items()}, **options)

    @classmethod
    def from_measurements(cls, source: Mapping[str, Any] | str | os.PathLike[str]) -> Policy:
        """Pin PCR0/1/2 (and PCR8 when present) from ``nitro-cli build-enclave`` or
        ``describe-eif`` JSON output (a parsed object or a path to it)."""
        obj = _read_json(source) if isinstance(source, str | os.PathLike) else source
        measurements = obj.get("Measurements") if isinstance(obj, Mapping) else None
        if not isinstance(measurements, Mapping):
            raise PolicyViolation(
                "not nitro-cli measurements: expected an object with a 'Measurements' key"
            )
        algorithm = measurements.get("HashAlgorithm", "")
        if not (isinstance(algorithm, str) and algorithm.lower().startswith("sha384")):
            raise PolicyViolation(f"measurements: expected HashAlgorithm Sha384, got {algorithm!r}")
        pins: dict[int, bytes] = {}
        for index in (0, 1, 2, 3, 4, 8):
            value = measurements.get(f"PCR{index}")
            if value is None:
                continue
            try:
                pins[index] = _pcr_bytes(index, value)[1]
            except LocalProtocolError as exc:
                raise PolicyViolation(f"measurements: {exc}") from None
        missing = [i for i in (0, 1, 2) if i not in pins]
        if missing:
            raise PolicyViolation(f"measurements: missing PCR{missing[0]}")
        return cls(pcrs=pins)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read a policy file holding the text of :meth:`dump` (or nitro-cli measurements JSON)."""
        obj = _read_json(path)
        if isinstance(obj, Mapping) and "Measurements" in obj:
            return cls.from_measurements(obj)
        if not isinstance(obj, Mapping) or obj.get("format") != _POLICY_FORMAT:
            raise PolicyViolation(f"{path}: not a vrpc policy file (format {_POLICY_FORMAT})")
        allow_debug = obj.get("allow_debug", False)
        max_age = obj.get("max_age", 300.0)
        prefix = obj.get("module_id_prefix")
        if type(allow_debug) is not bool or type(max_age) not in (int, float):
            raise PolicyViolation(f"{path}: allow_debug must be a bool and max_age a number")
        if prefix is not None and not isinstance(prefix, str):
            raise PolicyViolation(f"{path}: module_id_prefix must be a string or null")
        try:
            return cls(
                pcrs={int(i): v for i, v in obj.get("pcrs", {}).items()},
                allow_debug=allow_debug,
                max_age=float(max_age),
                module_id_prefix=prefix,
            )
        except (LocalProtocolError, ValueError, TypeError, AttributeError) as exc:
            raise PolicyViolation(f"{path}: invalid policy file ({exc})") from None

    def dump(self) -> str:
        """The policy as JSON text, readable by :meth:`load`."""
        return json.dumps(
            {
                "format": _POLICY_FORMAT,
                "pcrs": {str(i): v.hex() for i, v in self.pcrs.items()},
                "allow_debug": self.allow_debug,
                "max_age": self.max_age,
                "module_id_prefix": self.module_id_prefix,
            },
            indent=2,
        )

    # -- checks ---------------------------------------------------------------------------

    def require_pins(self, *, prod: bool = True) -> None:
        """Refuse a policy that does not identify an enclave image (fail closed).

        Called before a policy decides who a session talks to (by the client when it is built and
        by :func:`vrpc._verify.handshake_verifier` for every handshake verifier). It requires a
        non-zero pin of PCR0, PCR2 or PCR8; with ``allow_debug`` an all-zero PCR0 or PCR2 pin is
        accepted instead (debug enclaves report zeros, so only debug enclaves pass). In ``prod``
        (a non-test trust root) ``allow_debug`` also needs ``VRPC_ALLOW_DEBUG_ENCLAVE=1``.
        """
        image = {i: v for i, v in self.pcrs.items() if i in IMAGE_PCRS}
        if not image:
            pinned = ", ".join(f"PCR{i}" for i in self.pcrs) or "no PCRs"
            raise PolicyViolation(
                f"the policy pins {pinned}, which identifies no enclave image, so any enclave "
                "would pass: PCR3/PCR4 are chosen by the parent instance; PCR1 is shared by every "
                f"image built with the same nitro-cli; pin PCR0, PCR2 or PCR8 ({_HOW_TO_PIN})"
            )
        if not any(any(v) for v in image.values()) and not (
            self.allow_debug and (0 in image or 2 in image)
        ):
            raise PolicyViolation(
                "the policy pins only all-zero image PCRs, which identify no image: every "
                "unsigned image has PCR8 all zero and every debug-mode enclave PCR0-2; pin the "
                f"image's non-zero PCR0 or PCR2 (or PCR8 of a signed image) ({_HOW_TO_PIN})"
            )
        if self.allow_debug and prod:
            if os.environ.get(ALLOW_DEBUG_ENV_VAR) != "1":
                raise PolicyViolation(
                    "allow_debug=True refused in prod mode: a debug-mode enclave's memory is "
                    "readable by the parent instance, so nothing it holds is confidential; set "
                    f"{ALLOW_DEBUG_ENV_VAR}=1 in the environment to accept debug enclaves anyway"
                )
            _log.warning(
                "DEBUG-MODE ENCLAVES ACCEPTED: their memory is readable by the parent instance, "
                "nothing sent to them is confidential",
                env=ALLOW_DEBUG_ENV_VAR,
            )

    def check(self, claims: Claims, *, now: datetime) -> None:
        """Raise PolicyViolation unless ``claims`` satisfy this policy at ``now`` (aware)."""
        if now.tzinfo is None:
            raise LocalProtocolError("Policy.check: now must be a timezone-aware datetime")
        for index, expected in self.pcrs.items():
            got = claims.pcrs.get(index)
            if got is None:
                raise PolicyViolation(f"PCR{index} is pinned but absent from the document")
            if not hmac.compare_digest(got, expected):
                hint = "; debug-mode enclave?" if not any(got) else ""
                raise PolicyViolation(
                    f"PCR{index} mismatch (expected {_short(expected)}, got {_short(got)}{hint})"
                )
        if claims.debug and not self.allow_debug:
            raise PolicyViolation(
                "debug-mode enclave refused (PCR0 is all zero); "
                "set allow_debug=True only for development"
            )
        if self.module_id_prefix is not None and not claims.module_id.startswith(
            self.module_id_prefix
        ):
            raise PolicyViolation(
                f"module_id mismatch (expected prefix {self.module_id_prefix!r}, "
                f"got {claims.module_id!r})"
            )
        age = (now - claims.timestamp).total_seconds()
        if age > self.max_age:
            raise PolicyViolation(
                f"document too old: signed {age:.1f} s before now (max_age {self.max_age:g} s)"
            )
        if -age > self.max_age:
            raise PolicyViolation(
                f"document from the future: signed {-age:.1f} s after now "
                f"(max_age {self.max_age:g} s; check the clocks)"
            )


def _read_json(path: str | os.PathLike[str]) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PolicyViolation(f"cannot read {os.fspath(path)}: {exc}") from None


def check_bindings(
    claims: Claims,
    *,
    nonce: bytes | None = None,
    public_key: bytes | None = None,
    user_data: bytes | None = None,
) -> None:
    """Raise BindingMismatch unless each given expectation equals the document's field.

    ``None`` means "not checked"; an expectation against a null field is a mismatch.
    """
    for name, expected, got in (
        ("nonce", nonce, claims.nonce),
        ("public_key", public_key, claims.public_key),
        ("user_data", user_data, claims.user_data),
    ):
        if expected is None:
            continue
        if got is None:
            raise BindingMismatch(f"{name} mismatch (expected {len(expected)} bytes, got null)")
        if not hmac.compare_digest(got, expected):
            raise BindingMismatch(
                f"{name} mismatch (expected {len(expected)} bytes {_short(expected)}, "
                f"got {len(got)} bytes {_short(got)})"
            )
