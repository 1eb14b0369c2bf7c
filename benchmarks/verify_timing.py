"""How much the chain-validation cache saves in the client's handshake (a few seconds).

``python -m benchmarks.verify_timing [--rounds N]`` measures, interleaved (cold, warm, cold, ...):

* ``verify``: ``Verifier.verify`` of a fresh test-attester document (new nonce each time), as the
  client runs it in every handshake; ``cold`` empties the chain cache first (the cost without the
  cache), ``warm`` leaves it filled;
* ``handshake``: ``vrpc.connect`` + close over a unix socket to an in-process server.

It prints medians and quartiles in milliseconds; docs/security.md quotes a run. Not a test: it
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime

import structlog

import vrpc
from services.echo import EchoImpl
from vrpc.attestation import _document


def _summary(samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=4)
    return f"median {statistics.median(samples):.3f} ms (q1 {q[0]:.3f}, q3 {q[2]:.3f})"


def measure_verify(rounds: int) -> dict[str, list[float]]:
    attester = vrpc.InsecureTestAttester(seed=b"verify timing")
    verifier = vrpc.Verifier(attester.policy(), attester.trust_root())
    out: dict[str, list[float]] = {"cold": [], "warm": []}
    for i in range(rounds):
        for mode in ("cold", "warm"):
            nonce = i.to_bytes(4, "big") + mode.encode()
            document = attester.attest(nonce=nonce)
            if mode == "cold":
                _document.clear_chain_cache()
            now = datetime.now(UTC)
            start = time.perf_counter()
            verifier.verify(document, now=now, nonce=nonce)
            out[mode].append((time.perf_counter() - start) * 1000)
    return out


async def measure_handshake(rounds: int) -> dict[str, list[float]]:
    attester = vrpc.InsecureTestAttester(seed=b"verify timing")
    out: dict[str, list[float]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"unix://{tmp}/timing.sock"
        async with vrpc.Server([EchoImpl()], attester=attester) as server:
            await server.start(uri)
            policy, root = attester.policy(), attester.trust_root()
            for _ in range(rounds):
                for mode in ("cold", "warm"):
                    if mode == "cold":
                        _document.clear_chain_cache()
                    start = time.perf_counter()
                    async with vrpc.connect(uri, policy=policy, root=root):
                        pass
                    out[mode].append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    os.environ["VRPC_INSECURE_TEST_ATTESTATION"] = "1"
    # The insecure root logs a warning per verification: keep the console out of the figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    verify = measure_verify(args.rounds)
    handshake = asyncio.run(measure_handshake(max(10, args.rounds // 4)))
    for name, result in (("verify", verify), ("handshake", handshake)):
        for mode in ("cold", "warm"):
            print(f"{name:9} {mode}: {_summary(result[mode])}  n={len(result[mode])}")


if __name__ == "__main__":
    main()
