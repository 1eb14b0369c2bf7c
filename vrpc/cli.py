"""The ``vrpc`` command line: serve, call, describe, attest, relay, demo.

Errors print one line to stderr and exit non-zero (2 for usage, 1 for everything else).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from vrpc import jsonio
from vrpc.exceptions import RpcError, VrpcError

__all__ = ["main"]


def _run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency
        return asyncio.run(coro)


def _trust_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from vrpc.attestation import InsecureTestAttester, Policy, TrustRoot

    if args.plaintext:
        return {"plaintext": True}
    kwargs: dict[str, Any] = {}
    if args.insecure_test_seed is not None:
        attester = InsecureTestAttester(seed=args.insecure_test_seed.encode())
        kwargs["root"] = attester.trust_root()
        kwargs["policy"] = attester.policy()
    elif args.root is not None:
        with open(args.root, "rb") as f:
            kwargs["root"] = TrustRoot.insecure_test(f.read())
    if args.policy is not None:
        kwargs["policy"] = Policy.load(args.policy)
    return kwargs


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", help="policy JSON file (vrpc attest policy ...)")
    p.add_argument(
        "--insecure-test-seed",
        metavar="SEED",
        help="trust the INSECURE test root made from SEED (needs VRPC_INSECURE_TEST_ATTESTATION=1)",
    )
    p.add_argument("--root", help="PEM of an INSECURE test root to trust (needs the env var too)")
    p.add_argument("--plaintext", action="store_true", help="no encryption (server must allow it)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")


def _load_target(spec: str) -> Any:
    module_name, colon, attr = spec.partition(":")
    if not colon or not attr:
        raise ValueError(f"{spec!r}: expected MODULE:ATTR")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{module_name} has no attribute {attr!r}") from None


def _build_server(target: Any, args: argparse.Namespace) -> Any:
    from vrpc.attestation import InsecureTestAttester
    from vrpc.server import Server
    from vrpc.service import Service

    attester: Any = None
    if args.insecure_test_attester:
        seed = args.seed.encode() if args.seed else None
        attester = InsecureTestAttester(seed=seed)
    if isinstance(target, type) and issubclass(target, Service):
        target = target()
    elif callable(target) and not isinstance(target, Service | Server):
        target = target(attester=attester) if attester is not None else target()
    if isinstance(target, Server):
        return target
    services = target if isinstance(target, list | tuple) else [target]
    return Server(services, attester=attester, allow_plaintext=args.allow_plaintext)


async def _serve(args: argparse.Namespace) -> int:
    server = _build_server(_load_target(args.target), args)
    for uri in args.listen:
        await server.start(uri)
    await server.serve()
    return 0


async def _call(args: argparse.Namespace) -> int:
    from vrpc.client import Client

    try:
        call_args = jsonio.loads(args.args)
    except ValueError as exc:
        raise ValueError(f"--args is not valid JSON: {exc}") from None
    if not isinstance(call_args, list):
        call_args = [call_args]
    async with Client(
        args.uri, timeout=args.timeout, connect_timeout=args.timeout, **_trust_kwargs(args)
    ) as client:
        if args.stream:
            # One JSON document per line, as the items arrive.
            async for item in client.stream(args.method, call_args):
                print(jsonio.dumps(item), flush=True)
            return 0
        result = await client.call(args.method, call_args)
    print(jsonio.dumps(result))
    return 0


async def _describe(args: argparse.Namespace) -> int:
    from vrpc.client import Client

    async with Client(
        args.uri, timeout=args.timeout, connect_timeout=args.timeout, **_trust_kwargs(args)
    ) as client:
        services = await client.call("vrpc.reflection.list_services", [])
    for service in sorted(services):
        print(service)
        for method in services[service]:
            print(f"  {method['kind']:<14} {method['signature']}")
    return 0


async def _relay(args: argparse.Namespace) -> int:
    from vrpc.relay import Relay

    relay = Relay(args.listen, args.to)
    await relay.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await relay.close()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vrpc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve MODULE:ATTR (Server, factory, or Service)")
    serve.add_argument("target", metavar="MODULE:ATTR")
    serve.add_argument("--listen", action="append", required=True, metavar="URI")
    serve.add_argument(
        "--insecure-test-attester",
        action="store_true",
        help="attest with the INSECURE test attester (machines without Nitro only)",
    )
    serve.add_argument("--seed", help="seed of the test attester's root (clients rebuild it)")
    serve.add_argument("--allow-plaintext", action="store_true")
    serve.set_defaults(func=_serve, run_async=True)

    call = commands.add_parser("call", help="call SERVICE.METHOD and print the result as JSON")
    call.add_argument("uri")
    call.add_argument("method", metavar="SERVICE.METHOD")
    call.add_argument(
        "--args", default="[]", help='JSON list of arguments; bytes as {"$b64": "..."}'
    )
    call.add_argument(
        "--stream", action="store_true", help="server-streaming method: print one line per item"
    )
    _add_client_options(call)
    call.set_defaults(func=_call, run_async=True)

    describe = commands.add_parser("describe", help="list a server's services and methods")
    describe.add_argument("uri")
    _add_client_options(describe)
    describe.set_defaults(func=_describe, run_async=True)

    relay = commands.add_parser("relay", help="opaque byte relay (parent instance)")
    relay.add_argument("--listen", required=True, metavar="URI")
    relay.add_argument("--to", required=True, metavar="URI")
    relay.set_defaults(func=_relay, run_async=True)

    demo = commands.add_parser("demo", help="keyvault end to end on this machine (no Nitro)")
    demo.add_argument("--vsock", action="store_true", help="inside the vsock lab VM")
    demo.set_defaults(func=_demo, run_async=False)

    from vrpc.cli_attest import add_attest_parser

    add_attest_parser(commands)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from vrpc.demo import main as demo_main

    return demo_main(vsock=args.vsock)


def _logs_to_stderr() -> None:
    # stdout carries results (JSON for `call`): logs go to stderr. Looked up at each use, so a
    # replaced sys.stderr (tests, redirection) is honoured.
    import structlog

    # Only the default printer is redirected: a logger factory chosen by the host stays.
    if isinstance(structlog.get_config()["logger_factory"], structlog.PrintLoggerFactory):
        structlog.configure(logger_factory=lambda *_: structlog.PrintLogger(sys.stderr))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    _logs_to_stderr()
    try:
        if getattr(args, "run_async", False):
            return int(_run(args.func(args)))
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (RpcError, VrpcError, ValueError, OSError) as exc:
        name = exc.status.name if isinstance(exc, RpcError) else type(exc).__name__
        message = exc.message if isinstance(exc, RpcError) else str(exc)
        print(f"vrpc: {name}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
