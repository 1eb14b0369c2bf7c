"""The ``vrpc`` command line: serve, call, describe, attest, relay, metrics, enclave.

Errors print one line to stderr, ``vrpc: ...``, and exit non-zero: 2 for a usage or input
mistake (bad arguments, an unreadable file, nothing to serve), 1 for a failure (a call that
failed, a peer or document that did not verify).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vrpc import jsonio
from vrpc.exceptions import AttestationError, RpcError, VrpcError
from vrpc.status import Status

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "UsageError", "main"]

#: A call failed, or a peer or document did not verify.
EXIT_FAILURE = 1
#: A mistake in the command line or its inputs.
EXIT_USAGE = 2

#: The CLI gives up connecting after this long by default (the library waits longer, for an
#: enclave that is still booting): a typo in an address should fail fast.
DEFAULT_CONNECT_TIMEOUT = 2.0

_LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class UsageError(ValueError):
    """A mistake in the command line or its inputs (exit code 2)."""


def _run(coro: Any) -> Any:
    # Only the import is guarded: an ImportError raised while the coroutine runs (a module
    # that `vrpc serve` cannot import) must not make us run the spent coroutine again.
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


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
        kwargs["root"] = TrustRoot.insecure_test(_read_file(args.root, "root"))
    if args.policy is not None:
        _read_file(args.policy, "policy")  # an unreadable file is a usage mistake
        kwargs["policy"] = Policy.load(args.policy)
    return kwargs


def _client(args: argparse.Namespace) -> Any:
    from vrpc.client import Client
    from vrpc.transport import parse_address

    address = parse_address(args.uri)
    abstract = address.path.startswith(("\0", "@"))
    if address.scheme == "unix" and not abstract and not os.path.exists(address.path):
        # Nothing can be listening: say so now instead of retrying until the timeout.
        raise RpcError(
            Status.UNAVAILABLE, f"nothing listens at {args.uri}: {address.path} does not exist"
        )
    return Client(
        args.uri,
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
        **_trust_kwargs(args),
    )


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", help="policy JSON file (vrpc attest policy ...)")
    p.add_argument(
        "--insecure-test-seed",
        metavar="SEED",
        help="trust the INSECURE test root made from SEED (needs VRPC_INSECURE_TEST_ATTESTATION=1)",
    )
    p.add_argument("--root", help="PEM of an INSECURE test root to trust (needs the env var too)")
    p.add_argument("--plaintext", action="store_true", help="no encryption (server must allow it)")
    p.add_argument("--timeout", type=float, default=10.0, help="call deadline, seconds (10)")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up connecting after this long ({DEFAULT_CONNECT_TIMEOUT:g})",
    )


def _add_log_options(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: given before or after the command, the option is not reset by the other parser.
    p.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="log errors only"
    )
    p.add_argument(
        "--log-level", choices=list(_LOG_LEVELS), default=argparse.SUPPRESS, help="log threshold"
    )
    p.add_argument(
        "--log-format",
        choices=["console", "json"],
        default=argparse.SUPPRESS,
        help="log lines for people (console) or machines (json), on stderr",
    )


def _load_target(spec: str, app_dir: str = ".") -> Any:
    module_name, colon, attr = spec.partition(":")
    if not colon or not attr:
        raise UsageError(f"{spec!r}: expected MODULE:ATTR")
    # Like `python -m` and uvicorn: the application's folder comes first on the import path.
    folder = os.path.abspath(app_dir)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        where = f"(looked in {app_dir} and the installed packages; see --app-dir)"
        if exc.name == module_name or module_name.startswith(f"{exc.name}."):
            raise UsageError(f"cannot import {module_name}: no such module {where}") from None
        raise UsageError(f"cannot import {module_name}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UsageError(f"{module_name} has no attribute {attr!r}") from None


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
    forwarder = getattr(args, "log_forwarder", None)
    if forwarder is not None:
        await forwarder.start()  # first: the events of building the server are forwarded too
    server = _build_server(_load_target(args.target, args.app_dir), args)
    for uri in args.listen:
        await server.start(uri)
    await server.serve()
    return 0


def _call_arguments(text: str) -> list[Any] | dict[str, Any]:
    try:
        value = jsonio.loads(text)
    except ValueError as exc:
        raise UsageError(f"--args is not valid JSON: {exc}") from None
    if isinstance(value, list | dict):
        return value
    return [value]  # one bare value: the only argument


async def _method_info(client: Any, method: str) -> dict[str, Any] | None:
    """The method's reflection entry (kind, schema), or None without reflection."""
    try:
        services = await client.call("vrpc.reflection.list_services", [])
    except RpcError as exc:
        if exc.status is Status.UNIMPLEMENTED:
            return None
        raise
    for entries in services.values():
        for entry in entries:
            if entry.get("name") == method:
                return dict(entry)
    raise RpcError(Status.UNIMPLEMENTED, f"{method} is not served here (see vrpc describe)")


def _positional(method: str, info: dict[str, Any] | None, named: dict[str, Any]) -> list[Any]:
    """A JSON object of arguments as the wire's positional list, in declaration order."""
    schema = (info or {}).get("schema", {}).get("arguments")
    if schema is None:
        raise UsageError(
            f"--args as a JSON object needs the parameter names of {method}, and the server "
            "does not offer reflection: pass a JSON array"
        )
    properties: dict[str, Any] = schema["properties"]
    unknown = sorted(set(named) - set(properties))
    if unknown:
        raise UsageError(
            f"{method} has no parameter {unknown[0]!r} (its parameters: "
            f"{', '.join(properties) or 'none'})"
        )
    names = list(properties)
    given = [i for i, name in enumerate(names) if name in named]
    out: list[Any] = []
    for name in names[: given[-1] + 1 if given else 0]:
        if name in named:
            out.append(named[name])
        elif name in schema.get("required", ()):
            raise UsageError(f"{method}: missing argument {name!r}")
        elif "default" in properties[name]:
            out.append(jsonio.from_json(properties[name]["default"]))
        else:
            raise UsageError(
                f"{method}: give {name!r} too (its default has no JSON form to send in its place)"
            )
    missing = [n for n in schema.get("required", ()) if n not in named]
    if missing:
        raise UsageError(f"{method}: missing argument {missing[0]!r}")
    return out


class _StdinItems:
    """Request items for a client- or bidi-streaming call: one JSON value per line of stdin,
    read as the call consumes them. A line that is not JSON ends the call; the mistake is kept
    so it can be reported as such rather than as the cancelled call it causes."""

    def __init__(self) -> None:
        self.error: UsageError | None = None

    async def __call__(self) -> Any:
        number = 0
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                return
            number += 1
            if not line.strip():
                continue
            try:
                item = jsonio.loads(line)
            except ValueError as exc:
                self.error = UsageError(f"stdin line {number} is not valid JSON: {exc}")
                raise self.error from None
            yield item


_STREAMING = re.compile(r" is a (server_stream|client_stream|bidi_stream) method$")


async def _call(args: argparse.Namespace) -> int:
    call_args = _call_arguments(args.args)
    async with _client(args) as client:
        info = None
        if isinstance(call_args, dict) or args.stream:
            info = await _method_info(client, args.method)
        if isinstance(call_args, dict):
            call_args = _positional(args.method, info, call_args)
        if args.stream:
            kind = info["kind"] if info is not None else "server_stream"
            stdin = _StdinItems()
            sends = kind in ("client_stream", "bidi_stream")
            try:
                # One JSON document per line, as the items arrive.
                async for item in client.stream(
                    args.method,
                    call_args,
                    request=stdin() if sends else None,
                    stream_response=kind != "client_stream",
                ):
                    print(jsonio.dumps(item), flush=True)
            except RpcError:
                if stdin.error is not None:
                    raise stdin.error from None
                raise
            return 0
        try:
            result = await client.call(args.method, call_args)
        except RpcError as exc:
            found = _STREAMING.search(exc.message)
            if exc.status is Status.INVALID_ARGUMENT and found:
                hint = "call it with --stream"
                if found.group(1) != "server_stream":
                    hint += " (request items are read from stdin, one JSON value per line)"
                raise RpcError(exc.status, f"{exc.message}: {hint}", exc.details) from None
            raise
    print(jsonio.dumps(result))
    return 0


async def _describe(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        services = await client.call("vrpc.reflection.list_services", [])
    if args.json:
        print(json.dumps(services, indent=2, sort_keys=True))
        return 0
    for service in sorted(services):
        print(service)
        types: dict[str, Any] = {}
        for method in services[service]:
            print(f"  {method['kind']:<14} {method['signature']}")
            schema = method.get("schema") or {}
            if "arguments" in schema:
                print(f"  {'':<14}   arguments: {_compact(schema['arguments']['properties'])}")
            if "request_items" in schema:
                print(f"  {'':<14}   request items: {_compact(schema['request_items'])}")
            if "result" in schema:
                print(f"  {'':<14}   result: {_compact(schema['result'])}")
            types.update(schema.get("$defs", {}))
        for name in sorted(types):
            print(f"  type {name}: {_compact(types[name])}")
    return 0


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "))


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
    parser = argparse.ArgumentParser(
        prog="vrpc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_log_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    logs = argparse.ArgumentParser(add_help=False)
    _add_log_options(logs)

    serve = commands.add_parser(
        "serve", parents=[logs], help="serve MODULE:ATTR (Server, factory, or Service)"
    )
    serve.add_argument("target", metavar="MODULE:ATTR")
    serve.add_argument(
        "--app-dir",
        default=".",
        metavar="DIR",
        help="import MODULE from this folder first (default: the current one)",
    )
    serve.add_argument("--listen", action="append", required=True, metavar="URI")
    serve.add_argument(
        "--insecure-test-attester",
        action="store_true",
        help="attest with the INSECURE test attester (machines without Nitro only)",
    )
    serve.add_argument("--seed", help="seed of the test attester's root (clients rebuild it)")
    serve.add_argument("--allow-plaintext", action="store_true")
    serve.add_argument(
        "--log-forward",
        metavar="URI",
        help="also serve every log event, redacted, as JSON lines to one reader connecting here "
        "(in an enclave: vsock://ANY:5001, read by `vrpc enclave run` on the parent)",
    )
    serve.set_defaults(func=_serve, run_async=True)

    call = commands.add_parser(
        "call", parents=[logs], help="call SERVICE.METHOD and print the result as JSON"
    )
    call.add_argument("uri")
    call.add_argument("method", metavar="SERVICE.METHOD")
    call.add_argument(
        "--args",
        default="[]",
        help='JSON array (positional) or object (by name) of arguments; bytes as {"$b64": "..."}',
    )
    call.add_argument(
        "--stream",
        action="store_true",
        help="streaming method: print one line per result item; a method that streams its "
        "request reads the items from stdin, one JSON value per line",
    )
    _add_client_options(call)
    call.set_defaults(func=_call, run_async=True)

    describe = commands.add_parser(
        "describe",
        parents=[logs],
        help="list a server's services and methods with their JSON schemas",
    )
    describe.add_argument("uri")
    describe.add_argument("--json", action="store_true", help="the reflection listing as JSON")
    _add_client_options(describe)
    describe.set_defaults(func=_describe, run_async=True)

    relay = commands.add_parser("relay", parents=[logs], help="opaque byte relay (parent instance)")
    relay.add_argument("--listen", required=True, metavar="URI")
    relay.add_argument("--to", required=True, metavar="URI")
    relay.set_defaults(func=_relay, run_async=True)

    # The demo is an application (services/), not part of the installed package: point there.
    demo = commands.add_parser("demo", help="moved: python -m services.demo (source checkout)")
    demo.add_argument("rest", nargs=argparse.REMAINDER)
    demo.set_defaults(func=_demo, run_async=False)

    from vrpc.cli_attest import add_attest_parser

    add_attest_parser(commands, parents=[logs])
    from vrpc.cli_metrics import add_metrics_parser

    add_metrics_parser(commands, _add_client_options, _trust_kwargs)
    from vrpc.cli_enclave import add_enclave_parser

    add_enclave_parser(commands, parents=[logs])
    return parser


def _demo(args: argparse.Namespace) -> int:
    print("vrpc: the demo runs from a source checkout: python -m services.demo", file=sys.stderr)
    return 2


def _configure_logging(args: argparse.Namespace) -> None:
    """Logs go to stderr (stdout carries results: JSON for `call`), at the chosen threshold
    and format. Commands that serve log from `info`; `call` and `describe` only errors, since
    their output or their one error line already says what happened; the others warnings."""
    import structlog

    if getattr(args, "quiet", False):
        level = "error"
    else:
        defaults = {
            "serve": "info",
            "relay": "info",
            "enclave": "info",
            "call": "error",
            "describe": "error",
        }
        default = defaults.get(args.command, "warning")
        level = getattr(args, "log_level", default)
    renderer: Any
    if getattr(args, "log_format", "console") == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    forward: list[Any] = []
    if getattr(args, "log_forward", None):
        from vrpc.logforward import LogForwarder

        args.log_forwarder = LogForwarder(args.log_forward)
        forward.append(args.log_forwarder)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *forward,  # the complete event, before it is rendered for stderr
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LOG_LEVELS[level]),
        # Looked up at each use, so a replaced sys.stderr (tests, redirection) is honoured.
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, RpcError):
        return f"{exc.status.name}: {exc.message}"
    if isinstance(exc, UsageError | TypeError | OSError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    _configure_logging(args)
    from vrpc.service import InterfaceError

    try:
        if getattr(args, "run_async", False):
            return int(_run(args.func(args)))
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (UsageError, InterfaceError, OSError) as exc:
        # OSError: a file or address that cannot be used (missing, taken, not permitted).
        print(f"vrpc: {_error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (RpcError, AttestationError, VrpcError) as exc:
        print(f"vrpc: {_error_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except ValueError as exc:  # a malformed address or value given on the command line
        print(f"vrpc: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
