"""The /dev/nsm driver against a fake ioctl that answers with the recorded CBOR shapes."""

from __future__ import annotations

import ctypes
import errno
from pathlib import Path
from typing import Any

import cbor2
import pytest
from attestation_helpers import NSM_VECTORS, vector

from vrpc.attestation import NsmAttester, NsmDevice
from vrpc.attestation._nsm import NSM_IOCTL_REQUEST, NSM_MAX_RESPONSE, _NsmMessage
from vrpc.exceptions import NsmError


def nsm(name: str) -> bytes:
    return vector(name, NSM_VECTORS)


class FakeIoctl:
    """Reads the request through the iovec addresses and writes a canned response back."""

    def __init__(self, response: bytes, *, error: int | None = None, claim: int | None = None):
        self.response = response
        self.error = error
        self.claim = claim
        self.requests: list[bytes] = []
        self.codes: list[int] = []
        self.capacity: list[int] = []

    def __call__(self, fd: int, request: int, arg: Any) -> int:
        assert isinstance(arg, _NsmMessage)
        self.codes.append(request)
        self.requests.append(ctypes.string_at(arg.request.addr, arg.request.len))
        self.capacity.append(arg.response.len)
        if self.error is not None:
            raise OSError(self.error, "simulated")
        ctypes.memmove(arg.response.addr, self.response, len(self.response))
        arg.response.len = self.claim if self.claim is not None else len(self.response)
        return 0


@pytest.fixture
def device_path(tmp_path: Path) -> str:
    path = tmp_path / "nsm"
    path.touch()
    return str(path)


def device(device_path: str, fake: FakeIoctl) -> NsmDevice:
    return NsmDevice(device_path, ioctl=fake)


def test_message_layout_matches_the_kernel() -> None:
    assert ctypes.sizeof(_NsmMessage) == 32
    assert NSM_IOCTL_REQUEST == (3 << 30) | (32 << 16) | (0x0A << 8) | 0


def test_attestation_request_and_response(device_path: str) -> None:
    fake = FakeIoctl(cbor2.dumps({"Attestation": {"document": b"COSE"}}))
    with device(device_path, fake) as dev:
        assert dev.attestation(user_data=b"ud", nonce=bytes(32)) == b"COSE"
        assert dev.attestation() == b"COSE"
    assert fake.requests == [
        nsm("req_Attestation_example.cbor"),
        nsm("req_Attestation_all_null.cbor"),
    ]
    assert fake.codes == [0xC0200A00, 0xC0200A00]
    assert fake.capacity == [NSM_MAX_RESPONSE, NSM_MAX_RESPONSE]


def test_describe_nsm(device_path: str) -> None:
    fake = FakeIoctl(nsm("resp_DescribeNSM_shape.cbor"))
    info = device(device_path, fake).describe_nsm()
    assert fake.requests == [nsm("req_DescribeNSM.cbor")]
    assert info["version_major"] == 1
    assert info["module_id"].startswith("i-")


def test_describe_pcr(device_path: str) -> None:
    fake = FakeIoctl(nsm("resp_DescribePCR_shape.cbor"))
    assert device(device_path, fake).describe_pcr(0) == (True, bytes(48))
    assert fake.requests == [nsm("req_DescribePCR_0.cbor")]


def test_extend_pcr(device_path: str) -> None:
    fake = FakeIoctl(nsm("resp_ExtendPCR_shape.cbor"))
    assert device(device_path, fake).extend_pcr(16, b"hello") == bytes(48)
    assert fake.requests == [nsm("req_ExtendPCR_16.cbor")]


def test_lock_pcr(device_path: str) -> None:
    fake = FakeIoctl(nsm("resp_LockPCR.cbor"))
    assert device(device_path, fake).lock_pcr(16) is None
    assert fake.requests == [nsm("req_LockPCR_16.cbor")]


def test_lock_pcrs(device_path: str) -> None:
    fake = FakeIoctl(cbor2.dumps("LockPCRs"))
    assert device(device_path, fake).lock_pcrs(32) is None
    assert fake.requests == [nsm("req_LockPCRs_32.cbor")]


def test_get_random(device_path: str) -> None:
    fake = FakeIoctl(nsm("resp_GetRandom_shape.cbor"))
    random = device(device_path, fake).get_random()
    assert fake.requests == [nsm("req_GetRandom.cbor")]
    assert len(random) == 256


def test_error_response_is_named(device_path: str) -> None:
    fake = FakeIoctl(nsm("resp_Error_InvalidArgument.cbor"))
    with pytest.raises(NsmError, match="NSM refused DescribePCR: InvalidArgument"):
        device(device_path, fake).describe_pcr(99)


def test_ioctl_failure(device_path: str) -> None:
    fake = FakeIoctl(b"", error=errno.EINVAL)
    with pytest.raises(NsmError, match="ioctl failed"):
        device(device_path, fake).get_random()


@pytest.mark.parametrize(
    ("response", "claim", "match"),
    [
        (b"\xff\xff", None, "undecodable"),
        (cbor2.dumps({"GetRandom": {"random": 5}}), None, "not a byte string"),
        (cbor2.dumps({"DescribeNSM": {}}), None, "unexpected response"),
        (cbor2.dumps("GetRandom"), None, "expected a map"),
        (cbor2.dumps({"GetRandom": {"random": b"x"}}), NSM_MAX_RESPONSE + 1, "exceeds"),
    ],
)
def test_bad_responses(device_path: str, response: bytes, claim: int | None, match: str) -> None:
    with pytest.raises(NsmError, match=match):
        device(device_path, FakeIoctl(response, claim=claim)).get_random()


def test_unit_answer_must_be_bare(device_path: str) -> None:
    fake = FakeIoctl(cbor2.dumps({"LockPCR": {}}))
    with pytest.raises(NsmError, match="acknowledgement"):
        device(device_path, fake).lock_pcr(1)


def test_describe_pcr_lock_must_be_bool(device_path: str) -> None:
    fake = FakeIoctl(cbor2.dumps({"DescribePCR": {"lock": 1, "data": bytes(48)}}))
    with pytest.raises(NsmError, match="lock"):
        device(device_path, fake).describe_pcr(0)


def test_oversize_request_is_refused_before_the_ioctl(device_path: str) -> None:
    fake = FakeIoctl(b"")
    with pytest.raises(NsmError, match="limit 4096"):
        device(device_path, fake).attestation(user_data=bytes(5000))
    assert fake.requests == []


def test_absent_device(tmp_path: Path) -> None:
    with pytest.raises(NsmError, match="not found: not running inside a Nitro enclave"):
        NsmDevice(str(tmp_path / "nsm"))
    with pytest.raises(NsmError, match="not found"):
        NsmAttester(NsmDevice(str(tmp_path / "nsm")))


def test_closed_device(device_path: str) -> None:
    dev = device(device_path, FakeIoctl(cbor2.dumps("LockPCR")))
    dev.close()
    dev.close()
    with pytest.raises(NsmError, match="closed"):
        dev.lock_pcr(0)


def test_nsm_attester(device_path: str) -> None:
    fake = FakeIoctl(cbor2.dumps({"Attestation": {"document": b"DOC"}}))
    attester = NsmAttester(device(device_path, fake))
    assert attester.insecure is False
    assert attester.attest(user_data=b"ud", nonce=bytes(32)) == b"DOC"
    assert fake.requests == [nsm("req_Attestation_example.cbor")]


def test_system_ioctl_on_a_regular_file_is_an_nsm_error(device_path: str) -> None:
    # Exercises the real fcntl.ioctl call with the ctypes message; a plain file answers ENOTTY.
    with NsmDevice(device_path) as dev, pytest.raises(NsmError, match="ioctl failed"):
        dev.get_random()
