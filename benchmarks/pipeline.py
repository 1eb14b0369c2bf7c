"""One process, no event loop, no socket: round trips of ``echo.v1.echo`` through two
``Connection`` multiplexers and two record sessions, the wire bytes cut into 256 KiB chunks as a
transport delivers them. What is left is vrpc's own work per call (both sides together): the
codec, framing, AES-GCM and every copy, and the page faults of the buffers it touches.

::

    python -m benchmarks.pipeline                     # 1 MiB and 64 B, encrypted
    python -m benchmarks.pipeline --size 1048576 --plaintext
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from typing import Any

from vrpc.proto.connection import Connection, Role
from vrpc.proto.events import RequestReceived, ResponseReceived
from vrpc.proto.record import PlaintextSession, RecordSession

CHUNK = 256 * 1024


def _wire(conn: Connection, session: Any) -> list[bytes]:
    plain = conn.data_to_send()
    parts = session.seal(plain) if plain is not None else []
    data = b"".join(bytes(p) for p in parts)
    # Fresh bytes per chunk, as a transport's reads deliver them.
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def measure(size: int, calls: int, *, plaintext: bool, reps: int = 5) -> tuple[float, float]:
    """(CPU µs per round trip, minor page faults per round trip): the best of ``reps``."""
    if plaintext:
        cs: Any = PlaintextSession()
        ss: Any = PlaintextSession()
    else:
        up, down = os.urandom(48), os.urandom(48)
        cs = RecordSession(send_secret=up, recv_secret=down)
        ss = RecordSession(send_secret=down, recv_secret=up)
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    payload = os.urandom(size)

    def one() -> None:
        client.start_call("echo.v1.echo", [payload], now=0.0)
        for chunk in _wire(client, cs):
            plain = ss.receive(chunk)
            for ev in server.receive_data(plain, 0.0) if plain else []:
                if isinstance(ev, RequestReceived):
                    server.send_response(ev.call_id, ev.args[0])
        got = None
        for chunk in _wire(server, ss):
            plain = cs.receive(chunk)
            for ev in client.receive_data(plain, 0.0) if plain else []:
                if isinstance(ev, ResponseReceived):
                    got = ev.result
        if got != payload:
            raise AssertionError("the echo came back different")

    for _ in range(min(20, calls)):
        one()
    best_cpu = best_faults = float("inf")
    for _ in range(reps):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu = time.process_time()
        for _ in range(calls):
            one()
        best_cpu = min(best_cpu, (time.process_time() - cpu) / calls * 1e6)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        best_faults = min(best_faults, faults / calls)
    return best_cpu, best_faults


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline")
    parser.add_argument("--size", type=int, action="append", help="payload bytes (repeatable)")
    parser.add_argument("--calls", type=int, default=0, help="round trips per repetition")
    parser.add_argument("--plaintext", action="store_true", help="no record layer")
    args = parser.parse_args()
    for size in args.size or [1 << 20, 64]:
        calls = args.calls or (100 if size >= 65536 else 20000)
        cpu, faults = measure(size, calls, plaintext=args.plaintext)
        mode = "plaintext" if args.plaintext else "encrypted"
        print(f"{size:>8} B {mode}: {cpu:8.1f} µs CPU and {faults:6.1f} page faults per round trip")


if __name__ == "__main__":
    main()
