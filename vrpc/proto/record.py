"""The vrpc/1 record layer (sans-IO): AES-256-GCM records with implicit sequence numbers.

Theory of operation
-------------------
After the handshake every byte on the wire is a record::

    type(1) || length(4, big-endian) || AES-256-GCM(key, nonce, plaintext, aad=type||length)

``length`` counts the ciphertext including the 16-byte tag. ``nonce = iv XOR seq`` (``seq`` as a
96-bit big-endian integer, RFC 8446 §5.3). ``seq`` is never sent: it starts at 0 for every key and
each side counts records per direction, so a replayed, reordered, dropped or injected record fails
authentication and ends the session. Record types:

=========== ====== ===============================================================
DATA        0x17   a piece of the plaintext stream (0 .. max_record_plaintext bytes)
KEY_UPDATE  0x18   empty plaintext; the sender's *next* record uses the next key
CLOSE       0x15   empty plaintext; the sender sends nothing more (authenticated
                   end of stream, so truncation is detectable)
=========== ====== ===============================================================

The header is the AEAD's associated data, so the type and length are authenticated too.

The sender rotates its key (KEY_UPDATE then ``x_ap' = ExpandLabel(x_ap, "traffic upd")``) after
``key_update_records`` records or ``key_update_bytes`` plaintext bytes under one key, or when the
shell calls ``request_key_update()``. The receiver refuses more than 2**24 records under one key
(the AES-GCM usage bound of RFC 8446 §5.5, rounded down).

Each header is judged before its body is awaited: an unknown type, a KEY_UPDATE or CLOSE whose
length is not exactly the tag, or a length over the receiver's maximum fails from the five header
bytes. Records that carry no data (an empty DATA record, a KEY_UPDATE) spend an allowance that
received data earns back (``EMPTY_RECORD_COST``): a flood of them fails after 32.

Every failure is final: the keys are dropped and every later call raises. ``eof_received()`` is the
shell's way to report the transport's end of stream: without a CLOSE record first it raises
``RemoteProtocolError`` (truncation), distinct from a clean close.

The plaintext carried by DATA records is an opaque byte stream; message boundaries are not
record boundaries (a message may span records and a record may hold many messages).

``PlaintextSession`` is the identity session used by the explicitly opted-in plaintext mode: bytes
pass through unchanged and there are no records at all.
"""

from __future__ import annotations

import struct
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vrpc.exceptions import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from vrpc.proto.framing import unheld
from vrpc.proto.keyschedule import traffic_key_iv, update_secret

__all__ = [
    "DEFAULT_MAX_RECORD_PLAINTEXT",
    "EMPTY_RECORD_ALLOWANCE",
    "EMPTY_RECORD_COST",
    "KEY_UPDATE_BYTES",
    "KEY_UPDATE_RECORDS",
    "MAX_RECORD_PLAINTEXT_LIMIT",
    "RECEIVE_RECORDS_PER_KEY",
    "REC_CLOSE",
    "REC_DATA",
    "REC_KEY_UPDATE",
    "TAG_LEN",
    "PlaintextSession",
    "RecordSession",
    "Session",
]

REC_CLOSE = 0x15
REC_DATA = 0x17
REC_KEY_UPDATE = 0x18
HEADER_LEN = 5
TAG_LEN = 16
DEFAULT_MAX_RECORD_PLAINTEXT = 65536
MAX_RECORD_PLAINTEXT_LIMIT = 1 << 20
KEY_UPDATE_RECORDS = 1 << 20
KEY_UPDATE_BYTES = 1 << 34
RECEIVE_RECORDS_PER_KEY = 1 << 24
_MAX_KEY_UPDATE_RECORDS = RECEIVE_RECORDS_PER_KEY
# Records that carry no data (an empty DATA record, a KEY_UPDATE) are refused beyond one per
# 64 KiB of data received, after a start allowance of 32 (OpenSSL likewise refuses a 33rd empty
# record or KeyUpdate in a row). The allowance is kept in bytes: every received plaintext byte
# earns one, up to EMPTY_RECORD_ALLOWANCE; every empty record spends EMPTY_RECORD_COST. An honest
# sender updates its key once an hour, or after 2**20 records or 2**34 bytes, and never sends an
# empty DATA record; a peer that floods them spends at least as much bandwidth on data as the
# receiver spends CPU on the empty records.
EMPTY_RECORD_COST = 65536
EMPTY_RECORD_ALLOWANCE = 32 * EMPTY_RECORD_COST
# A single small record is sealed and opened with the allocating AEAD calls (cheapest for a few
# bytes); from this size on, or for several records at once, the *_into calls work in one
# preallocated buffer instead of one object per record plus a join.
_JOIN_BELOW = 16384
# A large seal or open works in a buffer kept from the previous one, as long as nothing else
# references it any more (the transport wrote it; the caller dropped its view). A fresh megabyte
# costs ~256 page faults when first written, more than encrypting it. Buffers above this size
# are not kept (a connection keeps at most two sealing buffers and one opening buffer).
_KEEP_MAX = 4 * 1024 * 1024 + 65536

_hdr = struct.Struct(">BI")
_pack_hdr = _hdr.pack
_unpack_hdr = _hdr.unpack_from


class Session(Protocol):
    """What the connection shell needs from a session, encrypted or not."""

    peer_closed: bool
    encrypted: bool
    created_at: float | None

    def receive(self, data: bytes) -> bytes | bytearray | memoryview:
        """Wire bytes in, plaintext stream bytes out (possibly ``b""``). The session never
        writes over what it returned while anyone still references it."""
        ...

    def seal(
        self, plaintext: bytes | bytearray | memoryview
    ) -> list[bytes | bytearray | memoryview]:
        """Plaintext stream bytes in; the wire bytes to send, in order (for writelines). The
        session never writes over a returned buffer while anyone (a transport with unsent
        data) still references it."""
        ...

    def close(self) -> bytes:
        """The authenticated end-of-stream record; nothing may be sealed afterwards."""
        ...

    def request_key_update(self) -> None:
        """Rotate the sending key at the next ``seal`` (``seal(b"")`` sends just the update)."""
        ...

    def eof_received(self) -> None:
        """The transport reached end of stream; raises if that truncated the session."""
        ...

    @property
    def buffered(self) -> int:
        """Received bytes held for an incomplete record (memory accounting)."""
        ...


class PlaintextSession:
    """The identity session of plaintext mode: no records, no protection, no truncation check."""

    __slots__ = ("created_at", "peer_closed")

    encrypted = False

    def __init__(self, created_at: float | None = None) -> None:
        self.created_at = created_at
        self.peer_closed = False

    def receive(self, data: bytes) -> bytes:
        return bytes(data)

    def seal(
        self, plaintext: bytes | bytearray | memoryview
    ) -> list[bytes | bytearray | memoryview]:
        # bytes(b) of a bytes object is the same object: no copy in the common case, and a
        # caller's bytearray is copied so we never keep a buffer the caller may mutate.
        return [bytes(plaintext)] if len(plaintext) else []

    def close(self) -> bytes:
        return b""

    def request_key_update(self) -> None:
        return None

    buffered = 0  # nothing is ever held

    def eof_received(self) -> None:
        # Plaintext mode has no authenticated close: end of stream is all there is.
        self.peer_closed = True


class RecordSession:
    """An encrypted, authenticated session (one per connection, made by the handshake).

    ``send_secret``/``recv_secret`` are the 48-byte application traffic secrets of each
    direction. ``max_send_plaintext`` is the largest record the peer accepts (announced in the
    handshake), ``max_recv_plaintext`` the largest this side accepts.
    """

    __slots__ = (
        "_allowance",
        "_buf",
        "_failed",
        "_ku_bytes",
        "_ku_records",
        "_local_closed",
        "_max_recv_ct",
        "_max_send",
        "_recv_aead",
        "_recv_iv",
        "_recv_secret",
        "_recv_seq",
        "_recv_spare",
        "_seal_spares",
        "_send_aead",
        "_send_bytes",
        "_send_iv",
        "_send_secret",
        "_send_seq",
        "_update_requested",
        "channel_binding",
        "created_at",
        "peer_closed",
    )

    encrypted = True

    def __init__(
        self,
        *,
        send_secret: bytes,
        recv_secret: bytes,
        max_send_plaintext: int = DEFAULT_MAX_RECORD_PLAINTEXT,
        max_recv_plaintext: int = DEFAULT_MAX_RECORD_PLAINTEXT,
        created_at: float | None = None,
        channel_binding: bytes = b"",
        key_update_records: int = KEY_UPDATE_RECORDS,
        key_update_bytes: int = KEY_UPDATE_BYTES,
    ) -> None:
        for value in (max_send_plaintext, max_recv_plaintext):
            if not 0 < value <= MAX_RECORD_PLAINTEXT_LIMIT:
                raise ValueError(f"record size must be in 1..{MAX_RECORD_PLAINTEXT_LIMIT}")
        if not 0 < key_update_records < _MAX_KEY_UPDATE_RECORDS or key_update_bytes <= 0:
            raise ValueError("key update thresholds out of range")
        self.created_at = created_at
        # A value unique to this session, derived one-way from the exporter secret; the same on
        # both sides (for binding higher-level exchanges to the session, like tls-exporter).
        self.channel_binding = channel_binding
        self.peer_closed = False
        self._failed = False
        self._local_closed = False
        self._update_requested = False
        self._max_send = max_send_plaintext
        self._max_recv_ct = max_recv_plaintext + TAG_LEN
        self._ku_records = key_update_records
        self._ku_bytes = key_update_bytes
        self._buf = bytearray()
        self._allowance = EMPTY_RECORD_ALLOWANCE
        self._recv_spare: bytearray | None = None
        # Two: while a busy socket holds the last sealed buffer, the one before is usually free.
        self._seal_spares: list[bytearray] = []
        self._send_secret: bytes | None = send_secret
        self._recv_secret: bytes | None = recv_secret
        self._send_aead: AESGCM | None = None
        self._recv_aead: AESGCM | None = None
        self._send_iv = self._recv_iv = 0
        self._send_seq = self._recv_seq = self._send_bytes = 0
        self._install_send(send_secret)
        self._install_recv(recv_secret)

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete record held until the rest arrives."""
        return len(self._buf)

    # -- keys -------------------------------------------------------------------------------------

    def _install_send(self, secret: bytes) -> None:
        key, iv = traffic_key_iv(secret)
        self._send_secret = secret
        self._send_aead = AESGCM(key)
        self._send_iv = int.from_bytes(iv, "big")
        self._send_seq = 0
        self._send_bytes = 0

    def _install_recv(self, secret: bytes) -> None:
        key, iv = traffic_key_iv(secret)
        self._recv_secret = secret
        self._recv_aead = AESGCM(key)
        self._recv_iv = int.from_bytes(iv, "big")
        self._recv_seq = 0

    def _drop_send(self) -> None:
        # Python cannot wipe memory; dropping the only references is the best available.
        self._send_aead = None
        self._send_secret = None
        self._seal_spares = []

    def _drop_recv(self) -> None:
        self._recv_aead = None
        self._recv_secret = None
        self._buf = bytearray()
        self._recv_spare = None

    def _fail(self, exc: RemoteProtocolError) -> RemoteProtocolError:
        self._failed = True
        self._drop_send()
        self._drop_recv()
        return exc

    # -- receiving --------------------------------------------------------------------------------

    def _open_buffer(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes to decrypt into: the one kept from the previous
        open when nothing references it any more (the caller released what ``receive``
        returned), else a fresh one."""
        spare = self._recv_spare
        # Owned through the attribute and ``spare``; anything else is a holder.
        if spare is not None and len(spare) >= size and unheld(spare, 2):
            return spare
        buf = bytearray(size)
        self._recv_spare = buf if size <= _KEEP_MAX else None
        return buf

    def receive(self, data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        if self._failed:
            raise RemoteProtocolError("session already failed")
        if self.peer_closed:
            if len(data):
                raise self._fail(RemoteProtocolError("data after the peer's CLOSE record"))
            return b""
        aead = self._recv_aead
        if aead is None:  # pragma: no cover - only after a failure, handled above
            raise RemoteProtocolError("session already failed")
        buf = self._buf
        max_ct = self._max_recv_ct
        view: bytes | bytearray | memoryview
        # A pending record that this chunk completes: only the bytes it lacks are copied to the
        # buffer, and the rest of the chunk is read in place (not copied through the buffer).
        head: bytearray | None = None
        if buf:
            missing = 0
            if len(buf) >= HEADER_LEN:
                length = _unpack_hdr(buf, 0)[1]
                if length <= max_ct:
                    missing = HEADER_LEN + length - len(buf)
            if 0 < missing <= len(data):
                buf += memoryview(data)[:missing]
                head = buf
                view = memoryview(data)[missing:]
            else:
                buf += data
                view = buf
        else:
            # Common case: parse the caller's chunk in place, buffer only an incomplete tail.
            view = data
        end = len(view)
        pos = 0
        seq = self._recv_seq
        iv = self._recv_iv
        result: bytes | bytearray = b""
        with memoryview(view) as mv, memoryview(head if head is not None else b"") as hv:
            # Pass 1: find the complete records (the completed pending one first), checking
            # each header as soon as it is seen (an oversize length fails before anything is
            # buffered for it). The first bad header stops the scan; the records before it are
            # still authenticated first, so errors come out in wire order.
            records: list[tuple[int, memoryview, int, int]] = []
            header_error: RemoteProtocolError | None = None
            data_bytes = 0
            data_records = 0
            allowance = self._allowance
            for src, src_end in ((hv, len(hv)), (mv, end)) if head is not None else ((mv, end),):
                scan = 0
                while src_end - scan >= HEADER_LEN:
                    rtype, length = _unpack_hdr(src, scan)
                    if length > max_ct:
                        header_error = FrameTooLarge(
                            f"record of {length} bytes exceeds the maximum of {max_ct}"
                        )
                        break
                    # Type and length are judged from the header alone, before a byte of the
                    # body is buffered: an unknown type costs its five header bytes, nothing more.
                    if rtype != REC_DATA and (
                        length != TAG_LEN or (rtype != REC_KEY_UPDATE and rtype != REC_CLOSE)
                    ):
                        header_error = RemoteProtocolError("malformed record header")
                        break
                    if length < TAG_LEN:
                        header_error = RemoteProtocolError("record shorter than its tag")
                        break
                    stop = scan + HEADER_LEN + length
                    if stop > src_end:
                        break
                    if length == TAG_LEN and rtype != REC_CLOSE:
                        # An empty DATA record or a KEY_UPDATE carries nothing yet costs a
                        # decryption (a key derivation for KEY_UPDATE): each spends
                        # EMPTY_RECORD_COST of the allowance that received data earns back.
                        allowance -= EMPTY_RECORD_COST
                        if allowance < 0:
                            header_error = RemoteProtocolError(
                                "too many empty or KEY_UPDATE records for the data received"
                            )
                            break
                    elif rtype == REC_DATA:
                        allowance += length - TAG_LEN
                        if allowance > EMPTY_RECORD_ALLOWANCE:
                            allowance = EMPTY_RECORD_ALLOWANCE
                    records.append((rtype, src, scan, stop))
                    if rtype == REC_DATA:
                        data_bytes += length - TAG_LEN
                        data_records += 1
                    scan = stop
                    if rtype == REC_CLOSE:
                        break  # anything after it is refused below
                if header_error is not None or (records and records[-1][0] == REC_CLOSE):
                    break
            self._allowance = allowance
            # Pass 2: authenticate and decrypt in order. Several records, or a large one, are
            # decrypted straight into one buffer (decrypt_into): no plaintext object per record
            # and no join afterwards.
            into = data_records > 1 or data_bytes >= _JOIN_BELOW
            chunks: list[bytes] = []
            out_buf = self._open_buffer(data_bytes) if into else None
            filled = 0
            with memoryview(out_buf if out_buf is not None else b"") as dst:
                for rtype, src, start, stop in records:
                    nonce = (iv ^ seq).to_bytes(12, "big")
                    body = src[start + HEADER_LEN : stop]
                    hdr = src[start : start + HEADER_LEN]
                    try:
                        if into and rtype == REC_DATA:
                            size = stop - start - HEADER_LEN - TAG_LEN
                            aead.decrypt_into(nonce, body, hdr, dst[filled : filled + size])
                            filled += size
                        else:
                            plain = aead.decrypt(nonce, body, hdr)
                    except InvalidTag:
                        self._recv_seq = seq
                        raise self._fail(
                            RemoteProtocolError("record authentication failed")
                        ) from None
                    finally:
                        # Slices pin the buffer: release them so it can be resized below.
                        body.release()
                        hdr.release()
                    seq += 1
                    if src is mv:
                        pos = stop
                    if rtype == REC_DATA:
                        if not into and plain:
                            chunks.append(plain)
                        if seq >= RECEIVE_RECORDS_PER_KEY:
                            raise self._fail(
                                RemoteProtocolError("peer did not update its key in time")
                            )
                    elif rtype == REC_KEY_UPDATE:
                        secret = self._recv_secret
                        assert secret is not None
                        self._install_recv(update_secret(secret))
                        fresh = self._recv_aead
                        assert fresh is not None
                        aead = fresh
                        seq = 0
                        iv = self._recv_iv
                    else:  # REC_CLOSE
                        # CLOSE must be the last bytes: of the chunk, or (completing a
                        # pending record) with nothing after it in the chunk.
                        if (stop != end) if src is mv else end:
                            raise self._fail(
                                RemoteProtocolError("data after the peer's CLOSE record")
                            )
                        self.peer_closed = True
                        break
            if header_error is not None:
                self._recv_seq = seq
                raise self._fail(header_error)
            if not self.peer_closed and view is not buf and head is None and pos < end:
                buf += mv[pos:]
        # Outside the ``with``: a bytearray cannot be resized while a memoryview exports it.
        if self.peer_closed:
            self._drop_recv()
        else:
            self._recv_seq = seq
            if head is not None:
                # The completed record was read (or the session failed above); keep only the
                # incomplete tail of this chunk.
                del buf[:]
                if pos < end:
                    buf += view[pos:]
            elif view is buf and pos:
                del buf[:pos]
        if out_buf is not None:
            # A view of exactly the plaintext (the buffer may be longer, kept from before); a
            # holder of the view is what keeps the buffer from being written again.
            return memoryview(out_buf)[:data_bytes]
        if chunks:
            result = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return result

    def eof_received(self) -> None:
        if self._failed:
            raise RemoteProtocolError("session already failed")
        if not self.peer_closed:
            raise self._fail(
                RemoteProtocolError("connection closed without a CLOSE record (truncated)")
            )

    # -- sending ----------------------------------------------------------------------------------

    def _key_update_record(self) -> bytes:
        aead = self._send_aead
        secret = self._send_secret
        assert aead is not None and secret is not None
        hdr = _pack_hdr(REC_KEY_UPDATE, TAG_LEN)
        record = hdr + aead.encrypt((self._send_iv ^ self._send_seq).to_bytes(12, "big"), b"", hdr)
        self._install_send(update_secret(secret))
        self._update_requested = False
        return record

    def _check_send(self) -> AESGCM:
        if self._failed:
            raise LocalProtocolError("session failed; nothing can be sent")
        if self._local_closed:
            raise LocalProtocolError("session closed; nothing can be sent")
        aead = self._send_aead
        assert aead is not None
        return aead

    def seal(
        self, plaintext: bytes | bytearray | memoryview
    ) -> list[bytes | bytearray | memoryview]:
        aead = self._check_send()
        out: list[bytes | bytearray | memoryview] = []
        total = len(plaintext)
        if not total:
            if self._update_requested:
                out.append(self._key_update_record())
            return out
        max_send = self._max_send
        seq = self._send_seq
        if (
            total <= max_send
            and total < _JOIN_BELOW
            and not self._update_requested
            and seq < self._ku_records
            and self._send_bytes < self._ku_bytes
        ):
            # Fast path (one record, no key update due): the common case for small messages.
            hdr = _pack_hdr(REC_DATA, total + TAG_LEN)
            ct = aead.encrypt((self._send_iv ^ seq).to_bytes(12, "big"), plaintext, hdr)
            self._send_seq = seq + 1
            self._send_bytes += total
            return [hdr + ct]
        # General path: every record (and any key update due before one) is written into one
        # buffer, encrypted in place with encrypt_into: no ciphertext object per record and no
        # join (measured ~3.5x faster than encrypt() + writelines for 1 MiB in 64 KiB records).
        # The buffer is one kept from an earlier seal that nobody references any more, else a
        # fresh one; what was handed over is never written while anyone holds it.
        records = -(-total // max_send)
        need = total + records * (2 * HEADER_LEN + 2 * TAG_LEN)
        spares = self._seal_spares
        for buf in spares:
            # Owned through the list and ``buf``; any other holder (the transport with unsent
            # data, a caller) still has those wire bytes: never write over them.
            if len(buf) >= need and unheld(buf, 2):
                break
        else:
            buf = bytearray(need)
            if need <= _KEEP_MAX:
                if len(spares) >= 2:
                    del spares[0]
                spares.append(buf)
        end = 0
        with memoryview(plaintext) as src, memoryview(buf) as dst:
            pos = 0
            while pos < total:
                if (
                    self._update_requested
                    or self._send_seq >= self._ku_records
                    or self._send_bytes >= self._ku_bytes
                ):
                    update = self._key_update_record()
                    dst[end : end + len(update)] = update
                    end += len(update)
                    fresh = self._send_aead
                    assert fresh is not None
                    aead = fresh
                size = min(max_send, total - pos)
                hdr = _pack_hdr(REC_DATA, size + TAG_LEN)
                dst[end : end + HEADER_LEN] = hdr
                end += HEADER_LEN
                aead.encrypt_into(
                    (self._send_iv ^ self._send_seq).to_bytes(12, "big"),
                    src[pos : pos + size],
                    hdr,
                    dst[end : end + size + TAG_LEN],
                )
                end += size + TAG_LEN
                self._send_seq += 1
                self._send_bytes += size
                pos += size
        # A view of what was written (room reserved for key updates that were not due, or a
        # kept buffer's extra length, is not sent).
        out.append(memoryview(buf)[:end])
        return out

    def close(self) -> bytes:
        aead = self._check_send()
        hdr = _pack_hdr(REC_CLOSE, TAG_LEN)
        record = hdr + aead.encrypt((self._send_iv ^ self._send_seq).to_bytes(12, "big"), b"", hdr)
        self._local_closed = True
        self._drop_send()
        return record

    def request_key_update(self) -> None:
        self._check_send()
        self._update_requested = True
