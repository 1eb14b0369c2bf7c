"""``vrpc metrics``: re-expose an enclave server's metrics over HTTP for Prometheus.

An enclave has no network, so Prometheus cannot scrape it. On the parent instance, ``vrpc metrics
URI --http 127.0.0.1:9464`` connects to the enclave like ``vrpc call`` (same trust options, the
attestation verified) and answers ``GET /metrics`` by calling ``vrpc.reflection.prometheus()``
there and returning its text, followed by the relay's own view of the enclave
(``vrpc_enclave_up``, ``vrpc_enclave_scrape_failures_total``). When the enclave cannot be
reached or refuses attestation the answer is still 200 with ``vrpc_enclave_up 0``, so an alert
can tell "enclave down" from "relay down" (Prometheus' own ``up``).

The HTTP side is deliberately tiny: HTTP/1.x, one request per connection, GET only, request
heads bounded in size and time. It is meant for a loopback address.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from vrpc.exceptions import RpcError
from vrpc.metrics import handshake_failure_reason
from vrpc.prometheus import CONTENT_TYPE

__all__ = ["MetricsHttpServer", "ScrapeRelay", "add_metrics_parser"]

log = structlog.get_logger("vrpc.metrics")

_MAX_HEAD = 8 * 1024
_HEAD_TIMEOUT = 5.0
DEFAULT_HTTP = "127.0.0.1:9464"


class ScrapeRelay:
    """Fetches the exposition from a connected ``vrpc.Client``; never raises."""

    def __init__(self, client: Any, *, timeout: float | None = 10.0) -> None:
        self.client = client
        self.timeout = timeout
        self.failures: dict[str, int] = {}

    async def scrape(self) -> str:
        try:
            text = await self.client.call("vrpc.reflection.prometheus", [], timeout=self.timeout)
            if not isinstance(text, str):
                raise TypeError("vrpc.reflection.prometheus did not answer text")
            up = 1
        except Exception as exc:
            reason = _failure_reason(exc)
            self.failures[reason] = self.failures.get(reason, 0) + 1
            log.warning("metrics scrape failed", reason=reason, error=str(exc))
            text, up = "", 0
        lines = [
            "# HELP vrpc_enclave_up Whether the last scrape of the enclave's metrics worked.",
            "# TYPE vrpc_enclave_up gauge",
            f"vrpc_enclave_up {up}",
            "# HELP vrpc_enclave_scrape_failures_total Failed scrapes of the enclave, by reason.",
            "# TYPE vrpc_enclave_scrape_failures_total counter",
            *(
                f'vrpc_enclave_scrape_failures_total{{reason="{reason}"}} {n}'
                for reason, n in sorted(self.failures.items())
            ),
        ]
        return text + "\n".join(lines) + "\n"


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, RpcError):
        return exc.status.name.lower()
    if isinstance(exc, TypeError):
        return "bad_answer"
    # Attestation and handshake failures: the same small label set as the server's counters.
    return handshake_failure_reason(exc)


def _response(status: str, body: bytes, content_type: str, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class MetricsHttpServer:
    """``GET /metrics`` on ``host:port`` answered by ``fetch()`` (port 0 picks a free port)."""

    def __init__(self, fetch: Callable[[], Awaitable[str]], host: str, port: int) -> None:
        self._fetch = fetch
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        # limit bounds what readuntil buffers: a longer request head is refused, not read.
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=_MAX_HEAD
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await self._answer(reader))
            await writer.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    async def _answer(self, reader: asyncio.StreamReader) -> bytes:
        plain = "text/plain; charset=utf-8"
        try:
            async with asyncio.timeout(_HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return _response("431 Request Header Fields Too Large", b"", plain)
        except asyncio.IncompleteReadError:
            return _response("400 Bad Request", b"", plain)
        if len(head) > _MAX_HEAD:
            return _response("431 Request Header Fields Too Large", b"", plain)
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response("400 Bad Request", b"", plain)
        method, target = parts[0], parts[1]
        if target.split(b"?", 1)[0] != b"/metrics":
            return _response("404 Not Found", b"only /metrics is served\n", plain)
        if method != b"GET":
            return _response("405 Method Not Allowed", b"", plain, "Allow: GET\r\n")
        body = (await self._fetch()).encode("utf-8")
        return _response("200 OK", body, CONTENT_TYPE)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def _metrics(args: argparse.Namespace) -> int:
    from vrpc.client import Client

    host, port = args.http
    # One attempt per scrape: Prometheus scrapes again, and a retry would outlast its timeout.
    client = Client(
        args.uri,
        timeout=args.timeout,
        connect_timeout=args.timeout,
        retries=0,
        **args.trust_kwargs(args),
    )
    relay = ScrapeRelay(client, timeout=args.timeout)
    http = MetricsHttpServer(relay.scrape, host, port)
    await http.start()
    print(f"serving http://{host}:{http.port}/metrics for {client.uri}", file=sys.stderr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await http.close()
        await client.close()
    return 0


def add_metrics_parser(
    subparsers: argparse._SubParsersAction[Any],
    add_client_options: Callable[[argparse.ArgumentParser], None],
    trust_kwargs: Callable[[argparse.Namespace], dict[str, Any]],
) -> None:
    """Add ``metrics URI --http HOST:PORT`` to the ``vrpc`` command line."""
    metrics = subparsers.add_parser(
        "metrics", help="serve an enclave server's metrics over HTTP for Prometheus"
    )
    metrics.add_argument("uri", help="the enclave server, e.g. vsock://16:5000")
    metrics.add_argument(
        "--http",
        type=_host_port,
        default=_host_port(DEFAULT_HTTP),
        metavar="HOST:PORT",
        help=f"where to serve GET /metrics (default {DEFAULT_HTTP})",
    )
    add_client_options(metrics)
    # The trust options are the command line's own (passed in: this module does not import it).
    metrics.set_defaults(func=_metrics, run_async=True, trust_kwargs=trust_kwargs)
