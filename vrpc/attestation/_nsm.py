"""The /dev/nsm driver: the only code in vrpc that talks to the Nitro Secure Module.

The kernel interface (Linux ``drivers/misc/nsm.c``, NSM API ``src/driver/mod.rs``) is a single
ioctl, ``_IOWR(0x0A, 0, 32)``, whose argument is two ``{u64 addr, u64 len}`` iovecs: a CBOR request
(at most 4096 bytes) and a response buffer (12288 bytes) whose length the kernel rewrites to the
size of the CBOR answer. Messages are serde's externally tagged enums: a unit variant is a bare
text string (``"DescribeNSM"``), any other a one-key map (``{"DescribePCR": {"index": 0}}``);
failures come back as ``{"Error": "<name>"}``.

The ioctl function is injectable so the driver can be exercised without the device.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import cbor2

from vrpc.exceptions import NsmError

__all__ = [
    "NSM_IOCTL_REQUEST",
    "NSM_MAX_REQUEST",
    "NSM_MAX_RESPONSE",
    "Attester",
    "IoctlFunction",
    "NsmAttester",
    "NsmDevice",
]

NSM_IOCTL_REQUEST = 0xC0200A00  # _IOWR(0x0A, 0, sizeof(struct nsm_message) == 32)
NSM_MAX_REQUEST = 0x1000
NSM_MAX_RESPONSE = 0x3000

#: ``ioctl(fd, request, arg) -> int`` with the semantics of ``fcntl.ioctl(..., mutate_flag=True)``.
IoctlFunction = Callable[[int, int, Any], int]


class _IoVec(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _NsmMessage(ctypes.Structure):
    _fields_ = [("request", _IoVec), ("response", _IoVec)]


def _system_ioctl(fd: int, request: int, arg: Any) -> int:
    return int(fcntl.ioctl(fd, request, arg, True))


class Attester(Protocol):
    """Something that produces attestation documents (the NSM, or the insecure test attester).

    ``insecure`` marks documents under a test root (the server then runs in dev-insecure mode).
    An attester may also set ``attests_inline = True`` when producing a document is quick and
    touches no device; otherwise the shells call ``attest`` in a thread, off the event loop.
    """

    insecure: bool

    def attest(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes: ...


class NsmDevice:
    """A handle on ``/dev/nsm``. Opening fails with :class:`NsmError` outside an enclave."""

    def __init__(self, path: str = "/dev/nsm", ioctl: IoctlFunction | None = None) -> None:
        self.path = path
        try:
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NsmError(
                f"{path} not found: not running inside a Nitro enclave "
                "(or the nsm driver is not loaded)"
            ) from None
        except OSError as exc:
            raise NsmError(f"cannot open {path}: {exc.strerror or exc}") from None
        self._ioctl = ioctl or _system_ioctl
        # One request at a time per handle keeps the driver's buffers simple to reason about.
        self._lock = threading.Lock()

    def close(self) -> None:
        # getattr: __del__ also runs on an instance whose __init__ failed to open the device.
        fd = getattr(self, "_fd", None)
        self._fd = None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> NsmDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # -- transport ------------------------------------------------------------------------

    def _call(self, name: str, request: object) -> object:
        encoded = cbor2.dumps(request)
        if len(encoded) > NSM_MAX_REQUEST:
            raise NsmError(f"{name} request is {len(encoded)} bytes (limit {NSM_MAX_REQUEST})")
        # ctypes buffers do not move, so the addresses handed to the kernel stay valid.
        request_buf = ctypes.create_string_buffer(encoded, len(encoded))
        response_buf = ctypes.create_string_buffer(NSM_MAX_RESPONSE)
        message = _NsmMessage(
            _IoVec(ctypes.addressof(request_buf), len(encoded)),
            _IoVec(ctypes.addressof(response_buf), NSM_MAX_RESPONSE),
        )
        with self._lock:
            if self._fd is None:
                raise NsmError(f"{self.path} is closed")
            try:
                self._ioctl(self._fd, NSM_IOCTL_REQUEST, message)
            except OSError as exc:
                raise NsmError(f"NSM {name} ioctl failed: {exc.strerror or exc}") from exc
        size = message.response.len
        if size > NSM_MAX_RESPONSE:
            raise NsmError(f"NSM {name}: response length {size} exceeds the buffer")
        try:
            response = cbor2.loads(response_buf.raw[:size], allow_duplicate_keys=False)
        except Exception as exc:  # any decoding failure means the device answered garbage
            raise NsmError(f"NSM {name}: undecodable response ({exc})") from exc
        if isinstance(response, Mapping) and len(response) == 1 and "Error" in response:
            raise NsmError(f"NSM refused {name}: {response['Error']}")
        if response == name:
            return None
        if not (isinstance(response, Mapping) and len(response) == 1 and name in response):
            raise NsmError(f"NSM {name}: unexpected response {type(response).__name__}")
        return response[name]

    def _call_map(self, name: str, request: object) -> Mapping[str, Any]:
        body = self._call(name, request)
        if not isinstance(body, Mapping):
            raise NsmError(f"NSM {name}: expected a map in the response")
        return body

    @staticmethod
    def _field_bytes(body: Mapping[str, Any], key: str, name: str) -> bytes:
        value = body.get(key)
        if type(value) is not bytes:
            raise NsmError(f"NSM {name}: response field {key} is not a byte string")
        return value

    # -- the NSM API ----------------------------------------------------------------------

    def attestation(
        self,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        """Ask the NSM for a signed attestation document (COSE_Sign1 bytes)."""
        request = {
            "Attestation": {"user_data": user_data, "nonce": nonce, "public_key": public_key}
        }
        body = self._call_map("Attestation", request)
        return self._field_bytes(body, "document", "Attestation")

    def describe_nsm(self) -> dict[str, Any]:
        return dict(self._call_map("DescribeNSM", "DescribeNSM"))

    def describe_pcr(self, index: int) -> tuple[bool, bytes]:
        """Return (locked, value) of one PCR."""
        body = self._call_map("DescribePCR", {"DescribePCR": {"index": index}})
        lock = body.get("lock")
        if type(lock) is not bool:
            raise NsmError("NSM DescribePCR: response field lock is not a bool")
        return lock, self._field_bytes(body, "data", "DescribePCR")

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend a PCR with ``data``; return its new value."""
        body = self._call_map("ExtendPCR", {"ExtendPCR": {"index": index, "data": data}})
        return self._field_bytes(body, "data", "ExtendPCR")

    def lock_pcr(self, index: int) -> None:
        self._expect_unit("LockPCR", {"LockPCR": {"index": index}})

    def lock_pcrs(self, range_: int) -> None:
        """Lock PCRs ``0 .. range_ - 1``."""
        self._expect_unit("LockPCRs", {"LockPCRs": {"range": range_}})

    def get_random(self) -> bytes:
        body = self._call_map("GetRandom", "GetRandom")
        return self._field_bytes(body, "random", "GetRandom")

    def _expect_unit(self, name: str, request: object) -> None:
        if self._call(name, request) is not None:
            raise NsmError(f"NSM {name}: expected a bare {name!r} acknowledgement")


class NsmAttester:
    """The production :class:`Attester`: documents signed by the Nitro Secure Module."""

    insecure = False

    def __init__(self, device: NsmDevice | None = None) -> None:
        self.device = device if device is not None else NsmDevice()

    def attest(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        return self.device.attestation(user_data=user_data, nonce=nonce, public_key=public_key)
