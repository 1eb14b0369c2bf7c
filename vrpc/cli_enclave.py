"""``vrpc enclave run``: one enclave as a foreground process, for systemd on the parent instance.

``nitro-cli run-enclave`` starts an enclave and returns; nothing then notices when the enclave
stops. The supervisor starts it, stays in the foreground while it runs, and:

* polls ``nitro-cli describe-enclaves``; when the enclave is gone or no longer ``RUNNING`` it
  exits with status 1, so a unit with ``Restart=always`` starts a fresh one (three failed polls
  in a row count as gone: the enclave is then terminated, failing closed);
* on SIGTERM or SIGINT terminates the enclave (``nitro-cli terminate-enclave``) and exits 0;
* with ``--enclave-name``, first terminates an enclave left running under that name (by a
  supervisor that was killed), since the unit owns the name;
* connects to the enclave's log stream (``vrpc serve --log-forward``, vrpc/logforward.py) at
  ``--logs`` (default ``vsock://{cid}:5001``, ``{cid}`` being the enclave's CID) and prints each
  line on stdout, as one JSON object, for journald; its own events go to stderr.

``--nitro-cli`` (or ``VRPC_NITRO_CLI``) names the nitro-cli executable.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from vrpc.exceptions import ConnectError, VrpcError
from vrpc.logforward import MAX_LINE
from vrpc.transport import create_connection

__all__ = ["DEFAULT_LOG_PORT", "NITRO_CLI_ENV", "EnclaveError", "add_enclave_parser", "supervise"]

log = structlog.get_logger("vrpc.enclave")

#: The enclave's log stream port (``vrpc serve --log-forward vsock://ANY:5001``).
DEFAULT_LOG_PORT = 5001
#: Environment variable naming the nitro-cli executable (``--nitro-cli`` wins).
NITRO_CLI_ENV = "VRPC_NITRO_CLI"
#: Failed ``describe-enclaves`` polls in a row after which the enclave counts as lost.
MAX_POLL_FAILURES = 3
#: A forwarded event stamped further than this from the parent's clock is reported (seconds).
#: Well inside what depends on the enclave's clock: SigV4 (KMS) and the attestation max_age.
CLOCK_SKEW_WARNING = 30.0
CLOCK_SKEW_REPEAT = 600.0
_COMMAND_TIMEOUT = 120.0  # run-enclave allocates memory: it can take a while on large enclaves


class EnclaveError(VrpcError):
    """nitro-cli failed, or the enclave stopped."""


class NitroCli:
    """The nitro-cli commands the supervisor uses, run as subprocesses."""

    def __init__(self, executable: str) -> None:
        self.executable = executable

    async def _run(self, *argv: str) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                self.executable,
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise EnclaveError(
                f"cannot run nitro-cli {self.executable!r}: {exc.strerror or exc} "
                f"(set --nitro-cli or {NITRO_CLI_ENV})"
            ) from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), _COMMAND_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise EnclaveError(
                f"nitro-cli {argv[0]} did not finish in {_COMMAND_TIMEOUT:g} s"
            ) from None
        except asyncio.CancelledError:
            # A poll cut short by a stop: not left running beside the terminate that follows.
            if proc.returncode is None:
                proc.kill()
            raise
        if proc.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            why = lines[-1] if lines else "no message"
            raise EnclaveError(f"nitro-cli {argv[0]} failed (exit {proc.returncode}): {why}")
        return out.decode(errors="replace")

    async def run_enclave(self, argv: Sequence[str]) -> tuple[str, int]:
        """Start the enclave; returns its id and CID."""
        out = await self._run("run-enclave", *argv)
        # The JSON object follows any progress text nitro-cli prints first.
        start = out.find("{")
        try:
            info, _ = json.JSONDecoder().raw_decode(out, start) if start >= 0 else (None, 0)
        except ValueError:
            info = None
        if not isinstance(info, dict):
            raise EnclaveError("nitro-cli run-enclave printed no JSON description of the enclave")
        enclave_id, cid = info.get("EnclaveID"), info.get("EnclaveCID")
        if not isinstance(enclave_id, str) or not enclave_id or type(cid) is not int:
            raise EnclaveError("nitro-cli run-enclave printed no EnclaveID and EnclaveCID")
        return enclave_id, cid

    async def describe(self) -> list[dict[str, Any]]:
        out = await self._run("describe-enclaves")
        try:
            enclaves = json.loads(out)
        except ValueError:
            enclaves = None
        if not isinstance(enclaves, list) or not all(isinstance(e, dict) for e in enclaves):
            raise EnclaveError("nitro-cli describe-enclaves did not print a JSON array of objects")
        return enclaves

    async def terminate(self, enclave_id: str) -> None:
        await self._run("terminate-enclave", "--enclave-id", enclave_id)


def _clock_skew(event: dict[str, Any], now: float) -> float | None:
    """The event's timestamp (the enclave's clock) minus ``now`` (the parent's), in seconds."""
    stamp = event.get("timestamp")
    if not isinstance(stamp, str) or len(stamp) > 40:
        return None
    try:
        when = datetime.datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None  # not the UTC stamp `vrpc serve` writes: nothing to compare
    return when.timestamp() - now


class _LineReader(asyncio.Protocol):
    """Splits the enclave's log stream into lines, bounded, and hands each valid one on.

    Each event's timestamp comes from the enclave's clock: when it is more than
    ``CLOCK_SKEW_WARNING`` seconds from the parent's, a warning says by how much (at most one
    per ``CLOCK_SKEW_REPEAT`` seconds). It can only inform an operator: the parent's clock is
    not one the enclave may trust.
    """

    def __init__(self, out: Callable[[str], None]) -> None:
        self._out = out
        self._skew_warned_at: float | None = None
        self._buffer = bytearray()
        self._skipping = False  # inside a line that was too long: drop up to its newline
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.rejected = 0

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    self._buffer.clear()
                    if not self._skipping:
                        self._reject("too long")
                    self._skipping = True
                return
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._skipping:
                self._skipping = False
                continue
            if len(line) > MAX_LINE:
                self._reject("too long")
                continue
            self._emit(line)

    def _emit(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            self._reject("not a JSON object")
            return
        # Re-encoded: escapes every control character, whatever the line held.
        self._out(json.dumps(event, ensure_ascii=True, separators=(",", ":")))
        skew = _clock_skew(event, time.time())
        if skew is not None and abs(skew) > CLOCK_SKEW_WARNING:
            now = time.monotonic()
            last = self._skew_warned_at
            if last is None or now - last >= CLOCK_SKEW_REPEAT:
                self._skew_warned_at = now
                log.warning(
                    "the enclave's clock differs from the parent's "
                    "(a negative skew also counts delivery delay)",
                    skew_seconds=round(skew, 1),
                )

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        log.warning("enclave log line rejected", reason=reason)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def _print_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def read_logs(uri: str, out: Callable[[str], None], *, retry: float = 1.0) -> None:
    """Print the enclave's log lines from ``uri`` until cancelled, reconnecting as needed."""
    waiting_logged = False
    while True:
        try:
            transport, reader = await create_connection(uri, lambda: _LineReader(out))
        except ConnectError:
            if not waiting_logged:
                log.info("waiting for the enclave's log stream", address=uri)
                waiting_logged = True
            await asyncio.sleep(retry)
            continue
        log.info("reading the enclave's log stream", address=uri)
        waiting_logged = False
        try:
            await reader.closed
        finally:
            transport.close()
        log.info("the enclave's log stream closed", address=uri)
        await asyncio.sleep(retry)


async def _watch(nitro: NitroCli, enclave_id: str, poll: float) -> tuple[str, bool]:
    """Wait until the enclave stops; returns why, and whether it may still need terminating."""
    failures = 0
    while True:
        await asyncio.sleep(poll)
        try:
            enclaves = await nitro.describe()
        except EnclaveError as exc:
            failures += 1
            log.warning("describe-enclaves failed", error=str(exc), failures=failures)
            if failures >= MAX_POLL_FAILURES:
                return f"describe-enclaves failed {failures} times in a row", True
            continue
        failures = 0
        mine = next((e for e in enclaves if e.get("EnclaveID") == enclave_id), None)
        if mine is None:
            return "the enclave is gone", False
        state = mine.get("State")
        if state != "RUNNING":
            return f"the enclave is {state}", True


async def supervise(
    nitro: NitroCli,
    run_argv: Sequence[str],
    *,
    name: str | None = None,
    logs: str | None = None,
    poll: float = 5.0,
    log_retry: float = 1.0,
    stop: asyncio.Event,
    out: Callable[[str], None] = _print_line,
) -> int:
    """Run one enclave until it stops (returns 1) or ``stop`` is set (terminates it, returns 0).

    ``logs`` is the log stream's address, ``{cid}`` replaced by the enclave's CID; None: none.
    """
    if name is not None:
        for leftover in await nitro.describe():
            if leftover.get("EnclaveName") == name and isinstance(leftover.get("EnclaveID"), str):
                log.warning(
                    "terminating an enclave left running under this name",
                    name=name,
                    enclave_id=leftover["EnclaveID"],
                )
                await nitro.terminate(leftover["EnclaveID"])
    enclave_id, cid = await nitro.run_enclave(run_argv)
    log.info("enclave started", enclave_id=enclave_id, cid=cid)
    loop = asyncio.get_running_loop()
    watcher = loop.create_task(_watch(nitro, enclave_id, poll))
    stopper = loop.create_task(stop.wait())
    reader = None
    if logs is not None:
        reader = loop.create_task(read_logs(logs.format(cid=cid), out, retry=log_retry))
    try:
        await asyncio.wait({watcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if reader is not None:
            reader.cancel()
        if not watcher.done():
            watcher.cancel()
    if stop.is_set() and not watcher.done():
        log.info("stopping: terminating the enclave", enclave_id=enclave_id)
        try:
            await nitro.terminate(enclave_id)
        except EnclaveError:
            # systemd may have signalled the enclave's own process too: gone is what we want.
            if any(e.get("EnclaveID") == enclave_id for e in await nitro.describe()):
                raise
            log.info("the enclave had already stopped", enclave_id=enclave_id)
        return 0
    reason, terminate = watcher.result()
    log.error("enclave stopped", enclave_id=enclave_id, reason=reason)
    if terminate:
        try:
            await nitro.terminate(enclave_id)
        except EnclaveError as exc:
            log.warning("terminate-enclave failed", error=str(exc))
    return 1


def _run_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--eif-path", args.eif_path, "--cpu-count", str(args.cpu_count)]
    argv += ["--memory", str(args.memory)]
    if args.enclave_cid is not None:
        argv += ["--enclave-cid", str(args.enclave_cid)]
    if args.enclave_name is not None:
        argv += ["--enclave-name", args.enclave_name]
    if args.debug_mode:
        argv.append("--debug-mode")
    return argv


async def _enclave_run(args: argparse.Namespace) -> int:
    if args.poll <= 0:
        raise ValueError("--poll must be positive")
    logs = None if args.logs == "none" else args.logs
    if logs is not None:
        from vrpc.transport import parse_address

        try:
            parse_address(logs.format(cid=16))  # a malformed address fails now, not later
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"--logs {logs!r}: {exc}") from None
    if args.debug_mode:
        log.warning("debug mode: the enclave attests with all-zero PCRs; clients refuse it")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nitro = NitroCli(args.nitro_cli or os.environ.get(NITRO_CLI_ENV) or "nitro-cli")
    return await supervise(
        nitro, _run_argv(args), name=args.enclave_name, logs=logs, poll=args.poll, stop=stop
    )


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive whole number")
    return int(text)


def add_enclave_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    enclave = commands.add_parser(
        "enclave", parents=parents, help="run an enclave in the foreground (parent instance)"
    )
    sub = enclave.add_subparsers(dest="enclave_command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        parents=parents,
        help="start an enclave, watch it, forward its logs; exit when it stops",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--eif-path", required=True, metavar="PATH")
    run.add_argument("--cpu-count", type=_positive_int, required=True, metavar="N")
    run.add_argument("--memory", type=_positive_int, required=True, metavar="MIB")
    run.add_argument("--enclave-cid", type=_positive_int, metavar="CID")
    run.add_argument(
        "--enclave-name", metavar="NAME", help="name it (a leftover of that name is terminated)"
    )
    run.add_argument(
        "--debug-mode", action="store_true", help="debug enclave (all-zero PCRs: troubleshooting)"
    )
    run.add_argument(
        "--logs",
        default=f"vsock://{{cid}}:{DEFAULT_LOG_PORT}",
        metavar="URI",
        help="the enclave's log stream, {cid} = its CID; 'none' to not read it "
        f"(default vsock://{{cid}}:{DEFAULT_LOG_PORT})",
    )
    run.add_argument(
        "--poll", type=float, default=5.0, metavar="SECONDS", help="describe-enclaves interval (5)"
    )
    run.add_argument(
        "--nitro-cli", metavar="PATH", help=f"nitro-cli executable (${NITRO_CLI_ENV}, nitro-cli)"
    )
    run.set_defaults(func=_enclave_run, run_async=True)
